//! `fulcrum lab`: the embedded default. Brings up the namespace lab (vagrant/lab.sh), runs the
//! appliance on DPDK's AF_XDP vdev on the appliance's veth (AF_PACKET where XDP cannot attach),
//! drives HTTP and UDP from the client namespace at the lab's VIPs, prints a live table each
//! second and one final JSON line, and tears everything down, on Ctrl-C too.

use anyhow::{bail, Context};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The lab's bootstrap file and Services, built in so that `fulcrum lab` needs no files.
const LAB_BOOTSTRAP: &str = include_str!("../../../config/examples/bootstrap.yaml");
const LAB_MANIFESTS: &str = include_str!("../../../config/examples/lab/manifests.yaml");

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    #[value(name = "af_xdp")]
    AfXdp,
    #[value(name = "af_packet")]
    AfPacket,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of traffic.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Packet I/O on the appliance's veth (default: AF_XDP, falling back to AF_PACKET where XDP
    /// cannot attach).
    #[arg(long, value_enum)]
    pub io: Option<Io>,
    /// The lab scripts (default: vagrant/ of the source tree this binary was built from).
    #[arg(long, value_name = "DIR")]
    pub lab_dir: Option<PathBuf>,
    /// Keep the lab up afterwards (for poking at it with `vagrant/lab.sh exec`).
    #[arg(long)]
    pub keep: bool,
}

const HTTP_TARGETS: &[&str] = &["10.20.0.10:80", "[fd00:20::10]:80", "10.20.0.12:8080"];
const UDP_TARGET: &str = "10.20.0.11:5353";
/// The lab Ingress's host on the bootstrap's `l7.address`: through Fulcrum's HTTP proxy.
const INGRESS_TARGET: &str = "10.20.0.100:80=web.lab";

fn lab_dir(a: &Args) -> PathBuf {
    a.lab_dir
        .clone()
        .or_else(|| std::env::var_os("FULCRUM_LAB_DIR").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant"))
}

fn lab_sh(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("bash")
        .arg(dir.join("lab.sh"))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}/lab.sh", dir.display()))?;
    if !out.status.success() {
        bail!("lab.sh {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(())
}

/// Tears the lab down when dropped (normal end, error or Ctrl-C).
struct Lab {
    dir: PathBuf,
    appliance: Option<Child>,
    keep: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.appliance.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep {
            if let Err(e) = lab_sh(&self.dir, &["down"]) {
                eprintln!("fulcrum lab: teardown: {e:#}");
            }
        }
    }
}

/// Starts the appliance in the appliance namespace; its stderr lines (counters as JSON every
/// second) go to `lines`.
fn start_appliance(tmp: &Path, device: &str, lines: mpsc::Sender<String>) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", "fl-lb"])
        .arg(exe)
        .arg("run")
        .arg("--config")
        .arg(tmp.join("bootstrap.yaml"))
        .arg("--manifests")
        .arg(tmp.join("manifests.yaml"))
        .args(["--device", device, "--stats-every", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the appliance (ip netns exec fl-lb fulcrum run)")?;
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = lines.send(l);
        }
    });
    Ok(child)
}

/// Waits until the client reaches the VIP through the appliance (ARP answered, ping echoed).
fn wait_for_vip(child: &mut Child, stop: &AtomicBool) -> anyhow::Result<bool> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) && !stop.load(Ordering::Relaxed) {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(false); // the appliance exited: this I/O mode does not work here
        }
        let ok = Command::new("ip")
            .args(["netns", "exec", "fl-client", "ping", "-c", "1", "-W", "1", "10.20.0.10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(true);
        }
    }
    Ok(false)
}

fn appliance_counters(line: &str) -> Option<serde_json::Value> {
    let json = line.strip_prefix("fulcrum: ")?;
    serde_json::from_str::<serde_json::Value>(json).ok().filter(|v| v.get("rx").is_some())
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let dir = lab_dir(a);
    if !dir.join("lab.sh").exists() {
        bail!("{}: no lab.sh here (give --lab-dir or FULCRUM_LAB_DIR)", dir.display());
    }
    eprintln!("fulcrum lab: bringing up the namespace lab ({})", dir.display());
    lab_sh(&dir, &["down"]).ok();
    let mut lab = Lab { dir: dir.clone(), appliance: None, keep: a.keep };
    lab_sh(&dir, &["up"])?;
    let tmp = std::env::temp_dir().join(format!("fulcrum-lab-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(tmp.join("bootstrap.yaml"), LAB_BOOTSTRAP)?;
    std::fs::write(tmp.join("manifests.yaml"), LAB_MANIFESTS)?;

    let choices: Vec<(Io, &str)> = match a.io {
        Some(Io::AfXdp) => vec![(Io::AfXdp, "net_af_xdp0,iface=veth-lb")],
        Some(Io::AfPacket) => vec![(Io::AfPacket, "net_af_packet0,iface=veth-lb")],
        None => vec![(Io::AfXdp, "net_af_xdp0,iface=veth-lb"), (Io::AfPacket, "net_af_packet0,iface=veth-lb")],
    };
    let (tx, rx) = mpsc::channel();
    let mut io_used = None;
    for (io, dev) in choices {
        let mut child = start_appliance(&tmp, dev, tx.clone())?;
        if wait_for_vip(&mut child, &stop)? {
            lab.appliance = Some(child);
            io_used = Some(io);
            eprintln!("fulcrum lab: appliance up on {dev}");
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
        let log: Vec<String> = rx.try_iter().collect();
        eprintln!(
            "fulcrum lab: the appliance did not come up on {dev}{}",
            log.iter().rev().find(|l| l.contains("error")).map(|l| format!(": {l}")).unwrap_or_default()
        );
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
    }
    let Some(io_used) = io_used else { bail!("the appliance came up on no I/O mode (see above)") };
    if io_used == Io::AfPacket && a.io.is_none() {
        eprintln!("fulcrum lab: note: AF_XDP could not attach to veth-lb here; using AF_PACKET (slower)");
    }

    // Traffic from the client namespace.
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", "fl-client"]).arg(exe).arg("lab-client");
    for t in HTTP_TARGETS {
        cmd.args(["--http", t]);
    }
    cmd.args(["--ingress", INGRESS_TARGET]);
    cmd.args(["--udp", UDP_TARGET, "--seconds", &a.duration.to_string()]);
    let mut client = cmd.stdout(Stdio::piped()).spawn().context("cannot start the lab client")?;
    let out = BufReader::new(client.stdout.take().unwrap());
    let mut last_client = serde_json::Value::Null;
    let mut last_appliance = serde_json::Value::Null;
    let start = Instant::now();
    eprintln!(
        "{:>4} {:>9} {:>7} {:>9} {:>9} {:>10} {:>10} {:>8}  share per backend",
        "s", "requests", "errors", "udp sent", "udp recv", "lb rx", "lb tx", "lb drops"
    );
    for line in out.lines().map_while(Result::ok) {
        if stop.load(Ordering::Relaxed) {
            let _ = client.kill();
            break;
        }
        for l in rx.try_iter() {
            if let Some(v) = appliance_counters(&l) {
                last_appliance = v;
            }
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let total: u64 = v["per_backend"].as_object().map(|m| m.values().filter_map(|x| x.as_u64()).sum()).unwrap_or(0);
        let shares: Vec<String> = v["per_backend"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, x)| format!("{k} {:.0}%", 100.0 * x.as_u64().unwrap_or(0) as f64 / total.max(1) as f64))
                    .collect()
            })
            .unwrap_or_default();
        let drops: u64 =
            last_appliance["drops"].as_object().map(|m| m.values().filter_map(|x| x.as_u64()).sum()).unwrap_or(0);
        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
        eprintln!(
            "{:>4.0} {:>9} {:>7} {:>9} {:>9} {:>10} {:>10} {:>8}  {}",
            start.elapsed().as_secs_f64(),
            n(&v["requests"]),
            n(&v["errors"]),
            n(&v["udp_sent"]),
            n(&v["udp_received"]),
            n(&last_appliance["rx"]["packets"]),
            n(&last_appliance["tx"]["packets"]),
            drops,
            shares.join("  ")
        );
        last_client = v;
    }
    let _ = client.wait();
    std::thread::sleep(Duration::from_millis(1100));
    for l in rx.try_iter() {
        if let Some(v) = appliance_counters(&l) {
            last_appliance = v;
        }
    }
    let interrupted = stop.load(Ordering::Relaxed);
    drop(lab);
    let _ = std::fs::remove_dir_all(&tmp);
    let per_backend = last_client["per_backend"].clone();
    println!(
        "{}",
        serde_json::json!({
            "lab": if interrupted { "interrupted" } else { "done" },
            "seconds": a.duration,
            "io": match io_used { Io::AfXdp => "af_xdp", Io::AfPacket => "af_packet" },
            "requests": last_client["requests"],
            "errors": last_client["errors"],
            "udp_sent": last_client["udp_sent"],
            "udp_received": last_client["udp_received"],
            "per_backend": per_backend,
            "per_target": last_client["per_target"],
            "last_error": last_client["last_error"],
            "appliance": {"rx": last_appliance["rx"], "tx": last_appliance["tx"], "drops": last_appliance["drops"],
                          "conntrack": last_appliance["conntrack"]},
        })
    );
    if last_client["errors"].as_u64() != Some(0) || last_client["requests"].as_u64().unwrap_or(0) == 0 {
        bail!("the lab saw errors or no requests");
    }
    Ok(())
}
