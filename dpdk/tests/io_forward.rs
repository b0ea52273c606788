//! io forwarding between two `net_null` vdevs on one core through `PortQueue` (no work per
//! packet: the cost of the binding itself), beside `dpdk-testpmd --forward-mode=io` on the same
//! vdevs and core in the same run. Ignored by default:
//! `cargo test --release -p fulcrum-dpdk --test io_forward -- --ignored --nocapture`
//! Prints one JSON line. FULCRUM_BENCH_CORE (default 1), FULCRUM_BENCH_SECONDS (default 2).

use arrayvec::ArrayVec;
use fulcrum_dataplane::port::{Burst, Port};
use fulcrum_dpdk::{Eal, EthPort, Mbuf, Mempool, PortConf, SOCKET_ANY};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// testpmd io forwarding for `secs` + 2 s; the mean total Tx-pps (both ports) over its
/// stats periods, the first (start-up) one left out.
fn testpmd(core: usize, secs: u64) -> Option<f64> {
    let bin = ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
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
    // Two ports per stats period.
    let periods: Vec<f64> = tx.chunks_exact(2).map(|c| c[0] + c[1]).collect();
    if periods.len() < 2 {
        eprintln!("testpmd output not understood:\n{out}");
        return None;
    }
    let use_ = &periods[1..];
    Some(use_.iter().sum::<f64>() / use_.len() as f64 / 1e6)
}

fn ours(core: usize, secs: u64) -> (f64, u64) {
    let args: Vec<String> = [
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "-l",
        &core.to_string(),
        "--log-level=lib.eal:warning",
        "--vdev=net_null0",
        "--vdev=net_null1",
        "--file-prefix",
        &format!("fulcrum-bench-{}", std::process::id()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let eal = Eal::init(&args).expect("EAL init");
    let pool = Mempool::new("bench_pool", 8191, 256, SOCKET_ANY).unwrap();
    let conf = PortConf { rx_queues: 1, tx_queues: 1, rx_desc: 1024, tx_desc: 1024, rss: false, mtu: None };
    let p0 = EthPort::open("net_null0", &conf, &pool).unwrap();
    let p1 = EthPort::open("net_null1", &conf, &pool).unwrap();
    let (mut q0, mut q1) = (p0.queue(0, 0).unwrap(), p1.queue(0, 0).unwrap());
    let mut b: Burst<Mbuf> = ArrayVec::new();
    // Warm-up, then the measured run.
    for measured in [false, true] {
        let run = if measured { Duration::from_secs(secs) } else { Duration::from_millis(300) };
        let mut fwd = 0u64;
        let start = Instant::now();
        loop {
            for _ in 0..1024 {
                q0.rx_burst(&mut b);
                fwd += q1.tx_burst(&mut b) as u64;
                b.clear();
                q1.rx_burst(&mut b);
                fwd += q0.tx_burst(&mut b) as u64;
                b.clear();
            }
            if start.elapsed() >= run {
                break;
            }
        }
        if measured {
            let el = start.elapsed().as_secs_f64();
            drop((q0, q1, p0, p1));
            assert_eq!(pool.available(), pool.size(), "no mbuf leaked");
            drop(pool);
            drop(eal);
            return (fwd as f64 / el / 1e6, fwd);
        }
    }
    unreachable!()
}

#[test]
#[ignore]
fn io_forward_net_null() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let core: usize = env_or("FULCRUM_BENCH_CORE", if cores > 1 { 1 } else { 0 });
    let secs: u64 = env_or("FULCRUM_BENCH_SECONDS", 2);
    let load_before = loadavg();
    let tp = testpmd(core, secs);
    let (mpps, packets) = ours(core, secs);
    let tp_json = tp.map(|v| format!("{v:.2}")).unwrap_or_else(|| "null".into());
    let ratio = tp.map(|v| format!("{:.3}", mpps / v)).unwrap_or_else(|| "null".into());
    println!(
        "{{\"bench\":\"io_forward\",\"vdev\":\"net_null\",\"core\":{core},\"seconds\":{secs},\"packets\":{packets},\
         \"fulcrum_mpps\":{mpps:.2},\"testpmd_mpps\":{tp_json},\"ratio\":{ratio},\
         \"loadavg_before\":\"{load_before}\",\"loadavg_after\":\"{}\"}}",
        loadavg()
    );
}
