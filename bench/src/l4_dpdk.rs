//! `fulcrum-bench l4 --io dpdk-null`: the same L4 path on real mbufs through DPDK. Each loop:
//! rx_burst on `net_null0` (it hands out mbufs from the pool, as a NIC's rx ring would), the
//! frame written into each (what the NIC's DMA would have done), the worker, tx_burst on
//! `net_null1` (which frees them). Beside it, in the same run, `dpdk-testpmd` io-forwarding on the
//! same vdevs and core: the ceiling with no work per packet.

use crate::l4::{generator_cost, Generator, L4Args, ModeArg};
use crate::report;
use fulcrum_dataplane::port::{Burst, Port, BURST};
use fulcrum_dataplane::worker::Worker;
use fulcrum_dpdk::{Eal, EthPort, Mbuf, Mempool, PortConf, SOCKET_ANY};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn run(a: &L4Args, core: Option<usize>, mut w: Worker, mut gen: Generator) -> anyhow::Result<()> {
    let core = core.unwrap_or(0);
    let prefix = format!("fulcrum-bench-{}", std::process::id());
    let args: Vec<String> = [
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--vdev=net_null0",
        "--vdev=net_null1",
        "-l",
        &core.to_string(),
        "--file-prefix",
        &prefix,
        "--log-level=lib.eal:warning",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let eal = Eal::init(&args)?;
    let pool = Mempool::new("bench_l4", 8191, 256, SOCKET_ANY)?;
    let conf = PortConf { rss: false, ..PortConf::default() };
    let p0 = EthPort::open("net_null0", &conf, &pool)?;
    let p1 = EthPort::open("net_null1", &conf, &pool)?;
    let mut rxq = p0.queue(0, 0)?;
    let mut txq = p1.queue(0, 0)?;

    // Phase 1: a SYN per flow; phase 2: ACKs on random flows for the requested time.
    let t_new = drive(&mut w, &mut rxq, &mut txq, a.flows as u64, None, |g: &Generator, b: &mut Mbuf, i| {
        g.syn(b, i as u32)
    }, &gen);
    let syn_drops = w.stats.total_drops();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let flows = a.flows as u64;
    let t_est = drive(&mut w, &mut rxq, &mut txq, a.packets.unwrap_or(u64::MAX), Some(a.seconds), |g, b, _| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        g.ack(b, ((rng >> 11) % flows) as u32)
    }, &gen);
    let drops = w.stats.total_drops() - syn_drops;
    let gen_ns = generator_cost(&mut gen, a.flows);
    drop((rxq, txq, p0, p1, pool, eal));
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

/// dpdk-testpmd io forwarding between the same two vdevs on the same core for `secs` seconds:
/// the mean Tx-pps of both ports over its stats periods, the first one left out.
fn testpmd(core: usize, secs: u64) -> Option<f64> {
    let bin = ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"].into_iter().find(|p| std::path::Path::new(p).exists())?;
    let main = if core == 0 { 1 } else { 0 };
    let prefix = format!("fulcrum-testpmd-{}", std::process::id());
    let mut child = Command::new(bin)
        .args(["--no-huge", "-m", "512", "--no-pci", "--vdev=net_null0", "--vdev=net_null1"])
        .args(["-l", &format!("{main},{core}"), "--file-prefix", &prefix, "--log-level=lib.eal:warning"])
        .args(["--", "--forward-mode=io", "--stats-period", "1", "-a", "--total-num-mbufs=8191"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_secs(secs + 2) + Duration::from_millis(500));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    let tx: Vec<f64> = out.split("Tx-pps:").skip(1).filter_map(|s| s.split_whitespace().next()?.parse().ok()).collect();
    let periods: Vec<f64> = tx.chunks_exact(2).map(|c| c[0] + c[1]).collect();
    (periods.len() >= 2).then(|| periods[1..].iter().sum::<f64>() / (periods.len() - 1) as f64 / 1e6)
}
