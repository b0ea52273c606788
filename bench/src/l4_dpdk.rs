//! `fulcrum-bench l4 --io dpdk-null`: the same L4 path on real mbufs through DPDK. Each loop:
//! rx_burst on `net_null0` (it hands out mbufs from the pool, as a NIC's rx ring would), the
//! frame written into each (what the NIC's DMA would have done), the worker, tx_burst on
//! `net_null1` (which frees them). Beside it, in the same run, `dpdk-testpmd` io-forwarding on the
//! same vdevs and core: the ceiling with no work per packet.

use crate::dpdk_common::{null_ports, testpmd};
use crate::l4::{generator_cost, Generator, L4Args, ModeArg};
use crate::report;
use fulcrum_dataplane::port::{Burst, Port, BURST};
use fulcrum_dataplane::worker::Worker;
use fulcrum_dpdk::Mbuf;
use std::time::Instant;

pub fn run(a: &L4Args, core: Option<usize>, mut w: Worker, mut gen: Generator) -> anyhow::Result<()> {
    let core = core.unwrap_or(0);
    let mut ports = null_ports(core)?;

    // Phase 1: a SYN per flow; phase 2: ACKs on random flows for the requested time.
    let t_new = drive(
        &mut w,
        &mut ports.q0,
        &mut ports.q1,
        a.flows as u64,
        None,
        |g: &Generator, b: &mut Mbuf, i| g.syn(b, i as u32),
        &gen,
    );
    let syn_drops = w.stats.total_drops();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let flows = a.flows as u64;
    let t_est = drive(
        &mut w,
        &mut ports.q0,
        &mut ports.q1,
        a.packets.unwrap_or(u64::MAX),
        Some(a.seconds),
        |g, b, _| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            g.ack(b, ((rng >> 11) % flows) as u32)
        },
        &gen,
    );
    let drops = w.stats.total_drops() - syn_drops;
    let gen_ns = generator_cost(&mut gen, a.flows);
    drop(ports);
    let testpmd = testpmd(core, 4);
    let ns = t_est.0 * 1e9 / t_est.1 as f64;
    let mpps = 1e3 / ns;
    report::print(serde_json::json!({
        "bench": "l4",
        "io": "dpdk-null",
        "mode": match a.mode { ModeArg::Fullnat => "fullnat", ModeArg::DsrIpip => "dsr-ipip" },
        "flows": a.flows,
        "mpps_per_core": mpps,
        "ns_per_packet": ns,
        "ns_per_packet_without_generator": ns - gen_ns,
        "new_flows_per_s": a.flows as f64 / t_new.0,
        "packets": t_est.1,
        "drops": drops + syn_drops,
        "generator_ns_per_packet": gen_ns,
        "testpmd_io_mpps": testpmd,
        "ratio_to_testpmd": testpmd.map(|t| mpps / t),
        "core": core,
        "loadavg": report::loadavg(),
    }));
    if drops + syn_drops > 0 {
        anyhow::bail!("the worker dropped packets");
    }
    Ok(())
}

/// (seconds, packets): rx_burst + frame written + worker + tx_burst, all timed.
fn drive<F: FnMut(&Generator, &mut Mbuf, u64)>(
    w: &mut Worker,
    rxq: &mut fulcrum_dpdk::PortQueue,
    txq: &mut fulcrum_dpdk::PortQueue,
    total: u64,
    seconds: Option<f64>,
    mut make: F,
    gen: &Generator,
) -> (f64, u64) {
    let mut rx: Burst<Mbuf> = Burst::new();
    let mut tx: Burst<Mbuf> = Burst::new();
    let start = Instant::now();
    let mut now_ms = 1u64;
    let mut done = 0u64;
    while done < total {
        if done.is_multiple_of(1 << 16) {
            let el = start.elapsed();
            now_ms = 1 + el.as_millis() as u64;
            if seconds.is_some_and(|s| el.as_secs_f64() >= s) {
                break;
            }
        }
        let want = (total - done).min(BURST as u64) as usize;
        while rx.len() < want {
            if rxq.rx_burst(&mut rx) == 0 {
                break;
            }
        }
        rx.truncate(want);
        for (i, b) in rx.iter_mut().enumerate() {
            make(gen, b, done + i as u64);
        }
        let n = rx.len() as u64;
        w.process_burst(now_ms, &mut rx, &mut tx);
        while !tx.is_empty() {
            txq.tx_burst(&mut tx);
        }
        done += n;
    }
    (start.elapsed().as_secs_f64(), done)
}
