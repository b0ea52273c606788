//! `fulcrum-bench io-forward`: io forwarding between two `net_null` vdevs on one core through
//! our binding's `PortQueue` (no work per packet: the cost of the binding itself), beside
//! `dpdk-testpmd --forward-mode=io` on the same vdevs and core in the same run.

use crate::dpdk_common::{null_ports, testpmd};
use crate::report;
use fulcrum_dataplane::port::{Burst, Port};
use fulcrum_dpdk::Mbuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct IoForwardArgs {
    #[arg(long, default_value_t = 2)]
    pub seconds: u64,
    /// CPU core (default: the last one).
    #[arg(long)]
    pub core: Option<usize>,
}

pub fn run(a: &IoForwardArgs) -> anyhow::Result<()> {
    let core = a.core.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() - 1).unwrap_or(0));
    let load_before = report::loadavg();
    let tp = testpmd(core, a.seconds);
    let mut ports = null_ports(core)?;
    let mut b: Burst<Mbuf> = Burst::new();
    let mut result = (0.0, 0u64);
    // A short warm-up, then the measured run.
    for (measured, run) in [(false, Duration::from_millis(300)), (true, Duration::from_secs(a.seconds))] {
        let mut fwd = 0u64;
        let start = Instant::now();
        while start.elapsed() < run {
            for _ in 0..1024 {
                ports.q0.rx_burst(&mut b);
                fwd += ports.q1.tx_burst(&mut b) as u64;
                b.clear();
                ports.q1.rx_burst(&mut b);
                fwd += ports.q0.tx_burst(&mut b) as u64;
                b.clear();
            }
        }
        if measured {
            result = (fwd as f64 / start.elapsed().as_secs_f64() / 1e6, fwd);
        }
    }
    let leaked = ports.pool.size() - ports.pool.available();
    report::print(serde_json::json!({
        "bench": "io_forward",
        "vdev": "net_null",
        "core": core,
        "seconds": a.seconds,
        "packets": result.1,
        "fulcrum_mpps": result.0,
        "testpmd_mpps": tp,
        "ratio": tp.map(|t| result.0 / t),
        "mbufs_not_returned": leaked,
        "loadavg_before": load_before,
        "loadavg": report::loadavg(),
    }));
    anyhow::ensure!(leaked == 0, "{leaked} mbufs did not come back to the pool");
    Ok(())
}
