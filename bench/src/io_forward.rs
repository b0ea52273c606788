//! `fulcrum-bench io-forward`: io forwarding between two `net_null` vdevs on one core through
//! our binding's `PortQueue` (no work per packet: the cost of the binding itself), beside
//! `dpdk-testpmd --forward-mode=io` on the same vdevs and core in the same run. The loop also
//! runs on a spawned thread with and without the lcore `fulcrum run`'s workers take.

use crate::dpdk_common::{null_ports, testpmd, NullPorts};
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
    let secs = Duration::from_secs(a.seconds);
    // The same loop on three kinds of thread, one after another on the same core: the EAL's
    // main lcore (as testpmd's forwarding lcore); a thread spawned and attached to its ports as
    // `fulcrum run`'s workers are (an lcore of its own, see `Port::attach_thread`); and the
    // same thread without that (not an lcore: each mbuf the null ports take or return goes
    // through the pool's shared ring, as it did for the workers before they attached).
    let main = forward(&mut ports, secs);
    let attached = on_thread(&mut ports, core, true, secs)?;
    let unattached = on_thread(&mut ports, core, false, secs)?;
    let leaked = ports.pool.size() - ports.pool.available();
    report::print(serde_json::json!({
        "bench": "io_forward",
        "vdev": "net_null",
        "core": core,
        "seconds": a.seconds,
        "packets": main.1,
        "fulcrum_mpps": main.0,
        "testpmd_mpps": tp,
        "ratio": tp.map(|t| main.0 / t),
        "worker_thread_mpps": attached.0,
        "unattached_thread_mpps": unattached.0,
        "mbufs_not_returned": leaked,
        "loadavg_before": load_before,
        "loadavg": report::loadavg(),
    }));
    anyhow::ensure!(leaked == 0, "{leaked} mbufs did not come back to the pool");
    Ok(())
}

/// Forwards on a thread of its own pinned to `core`, attached to its ports or not.
fn on_thread(ports: &mut NullPorts, core: usize, attach: bool, secs: Duration) -> anyhow::Result<(f64, u64)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            anyhow::ensure!(
                core_affinity::set_for_current(core_affinity::CoreId { id: core }),
                "cannot pin to CPU {core}"
            );
            let _attachment = if attach { ports.q0.attach_thread().map_err(anyhow::Error::msg)? } else { None };
            anyhow::ensure!(
                attach == (fulcrum_dpdk::lcore_id() != fulcrum_dpdk::LCORE_ID_ANY),
                "lcore id {}",
                fulcrum_dpdk::lcore_id()
            );
            Ok(forward(ports, secs))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the forwarding thread panicked"))?
    })
}

/// io forwarding both ways for `run` after a short warm-up: (Mpps, packets).
fn forward(ports: &mut NullPorts, run: Duration) -> (f64, u64) {
    let mut b: Burst<Mbuf> = Burst::new();
    let mut result = (0.0, 0u64);
    for (measured, run) in [(false, Duration::from_millis(300)), (true, run)] {
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
    result
}
