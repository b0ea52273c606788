//! What the DPDK benchmarks share: an EAL with two `net_null` vdevs on one core, and
//! `dpdk-testpmd`'s io forwarding on the same vdevs and core, run in the same session as the
//! ceiling to compare against.

use fulcrum_dpdk::{Eal, EthPort, Mempool, PortConf, PortQueue, SOCKET_ANY};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The EAL, its pool and two started `net_null` ports (`net_null0`, `net_null1`), one queue each.
pub struct NullPorts {
    pub q0: PortQueue,
    pub q1: PortQueue,
    pub pool: Mempool,
    _ports: (EthPort, EthPort),
    _eal: Eal,
}

pub fn null_ports(core: usize) -> anyhow::Result<NullPorts> {
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
    let pool = Mempool::new("bench_pool", 8191, 256, SOCKET_ANY)?;
    let conf = PortConf { rss: false, ..PortConf::default() };
    let p0 = EthPort::open("net_null0", &conf, &pool)?;
    let p1 = EthPort::open("net_null1", &conf, &pool)?;
    Ok(NullPorts { q0: p0.queue(0, 0)?, q1: p1.queue(0, 0)?, pool, _ports: (p0, p1), _eal: eal })
}

/// dpdk-testpmd io forwarding between the same two vdevs on the same core for `secs` seconds:
/// the mean Tx-pps of both ports over its stats periods, the first one left out.
pub fn testpmd(core: usize, secs: u64) -> Option<f64> {
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
    let periods: Vec<f64> = tx.chunks_exact(2).map(|c| c[0] + c[1]).collect();
    (periods.len() >= 2).then(|| periods[1..].iter().sum::<f64>() / (periods.len() - 1) as f64 / 1e6)
}
