//! `fulcrum run`: the appliance. DPDK on the bootstrap file's port, one pinned worker per
//! configured core (one rx and one tx queue each, RSS across them), manifests watched.

use anyhow::Context;
use fulcrum_config::Bootstrap;
use fulcrum_control::serve::{serve, Input, ServeOptions};
use fulcrum_dataplane::runtime::WorkerSpec;
use fulcrum_dataplane::worker::WorkerConfig;
use fulcrum_dpdk::{Eal, EthPort, Mempool, PortConf};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bootstrap file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    #[command(flatten)]
    pub input: super::InputArgs,
    /// Print the counters (JSON) to stderr every SECONDS; 0: never (as without the option).
    #[arg(long, value_name = "SECONDS", value_parser = super::seconds)]
    pub stats_every: Option<f64>,
    /// Override the first port's device (e.g. `net_af_packet0,iface=veth-lb`).
    #[arg(long, value_name = "DEVARGS")]
    pub device: Option<String>,
    /// How often to check the manifests for changes, in seconds; 0: only on SIGHUP. (The
    /// Kubernetes API is watched: changes arrive as they happen.)
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = super::seconds)]
    pub watch_every: f64,
    /// Packet buffers (mbufs) in the pool; default: enough for every ring and burst, doubled.
    #[arg(long, value_name = "N")]
    pub mbufs: Option<u32>,
}

/// A PCI address (`0000:03:00.0` or `03:00.0`) rather than a vdev string.
fn is_pci(dev: &str) -> bool {
    let d = dev.split(',').next().unwrap_or("");
    d.contains(':') && d.contains('.') && d.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
}

/// The EAL command line: the bootstrap's own arguments, then the port's device, a per-process
/// file prefix unless one is given (so several instances can run side by side), and unless the
/// arguments lay out the lcores, one lcore (the main thread) on `control_cpus`.
pub fn eal_args(boot: &Bootstrap, device: &str, control_cpus: &[usize]) -> Vec<String> {
    let mut args = boot.eal_args.clone();
    if is_pci(device) {
        args.push("-a".into());
        args.push(device.into());
    } else if needs_af_xdp_copy_mode(&args, device) {
        eprintln!(
            "fulcrum: note: {} without hugepages runs in AF_XDP copy mode (force_copy=1): zero-copy \
             drivers refuse frames that cross a 4 KiB page, which the port's packed pool has",
            port_name(device)
        );
        args.push(format!("--vdev={device},force_copy=1"));
    } else {
        args.push(format!("--vdev={device}"));
    }
    if !args.iter().any(|a| a.starts_with("--file-prefix")) {
        args.push(format!("--file-prefix=fulcrum-{}", std::process::id()));
    }
    if !gives_lcores(&args) && !control_cpus.is_empty() {
        let list: Vec<String> = control_cpus.iter().map(|c| c.to_string()).collect();
        args.push(format!("--lcores=0@({})", list.join(",")));
    }
    args
}

/// Whether EAL arguments lay out the lcores themselves (then they are left as given).
fn gives_lcores(args: &[String]) -> bool {
    args.iter().any(|a| a == "-c" || a.starts_with("-l") || a.starts_with("--lcores") || a.starts_with("--main-lcore"))
}

/// The CPUs for every thread but the workers: those this process may use except the workers'
/// (all of them if the workers take every one).
///
/// Unless the bootstrap's EAL arguments lay out the lcores, the main thread is made to run there
/// before DPDK starts, and DPDK is given one lcore, the main thread, on them
/// (`--lcores=0@(CPUS)`): its own threads (interrupts, telemetry) then take the same CPUs, as
/// do the threads started later (the control loop and its snapshot builds, hundreds of
/// milliseconds for 10,000 Services; the admin endpoint; the Kubernetes client). Without it
/// DPDK made every CPU an lcore, parked a thread of its own on each, and pinned the main
/// thread, and so all of those, to the first CPU: worker 0's in most layouts, whose polling
/// they then took time from. The workers pin themselves and become lcores of their own
/// (`Port::attach_thread`).
fn control_cpus(allowed: &[usize], workers: &[usize]) -> Vec<usize> {
    let spare: Vec<usize> = allowed.iter().copied().filter(|c| !workers.contains(c)).collect();
    if spare.is_empty() {
        allowed.to_vec()
    } else {
        spare
    }
}

/// Restricts the calling thread (and the threads it starts from now on) to `cpus`.
fn run_current_thread_on(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write into it; sched_setaffinity(0, ..)
    // changes only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether an AF_XDP device must be forced into copy mode. Its pool is packed (frames back to
/// back, see `run`), so without hugepages most frames cross a 4 KiB page. In zero-copy mode the
/// kernel checks that such a frame's pages are physically contiguous and drops fill and
/// transmit descriptors that are not (their mbufs never come back: the pool drains and the
/// port stalls); copy mode has no such check, and is what veth and drivers without zero-copy
/// use anyway. With hugepages only the rare frame across a 2 MiB boundary is at risk (each
/// lost once), so zero-copy stays available. A `force_copy` the user gave is kept.
fn needs_af_xdp_copy_mode(eal_args: &[String], device: &str) -> bool {
    port_name(device).starts_with("net_af_xdp")
        && eal_args.iter().any(|a| a == "--no-huge")
        && !device.split(',').any(|kv| kv.starts_with("force_copy="))
}

/// DPDK's name for the port a device string creates (the vdev name, or the PCI address).
fn port_name(device: &str) -> &str {
    device.split(',').next().unwrap_or(device)
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let mut boot = Bootstrap::load(&a.config)?;
    if let Some(d) = &a.device {
        boot.ports[0].device = d.clone();
    }
    // Fail on bad manifests (or an unreachable API server) before touching any device.
    let input = match (&a.input.manifests, a.input.kubeconfig()) {
        (Some(m), _) => {
            fulcrum_config::load_desired(&boot, m)?;
            Input::Manifests {
                path: m.clone(),
                watch_every: (a.watch_every > 0.0).then(|| Duration::from_secs_f64(a.watch_every)),
            }
        }
        (None, kubeconfig) => Input::Kubernetes(fulcrum_control::k8s::Kube::connect(kubeconfig.as_deref())?),
    };
    let port_cfg = boot.ports[0].clone();
    if boot.ports.len() > 1 {
        eprintln!("fulcrum: note: serving port {} only; more ports per worker are not supported yet", port_cfg.name);
    }
    let workers = boot.workers.cores.len() as u16;
    let allowed: Vec<usize> = core_affinity::get_core_ids().unwrap_or_default().iter().map(|c| c.id).collect();
    let control = control_cpus(&allowed, &boot.workers.cores);
    let eal_args = eal_args(&boot, &port_cfg.device, &control);
    if !gives_lcores(&boot.eal_args) && !control.is_empty() {
        run_current_thread_on(&control)
            .with_context(|| format!("cannot run the control thread on CPUs {control:?}"))?;
    }
    let eal = Eal::init(&eal_args).context("cannot start DPDK (EAL)")?;
    // Enough mbufs for every rx and tx ring plus bursts in flight and hand-off rings.
    let af_xdp = port_cfg.device.starts_with("net_af_xdp");
    let default_mbufs = (workers as u32 * (1024 + 1024 + 8 * 32)).max(4096) * 2 - 1;
    let n_mbufs = a.mbufs.unwrap_or(default_mbufs);
    // AF_XDP's driver makes the pool's memory the socket's UMEM: it must be one block of equal
    // frames (see Mempool::new_packed), or the kernel refuses the mbufs past its end.
    let pool = if af_xdp {
        let pool = Mempool::new_packed("fulcrum-pkts", n_mbufs, 256, -1).context("cannot create the packet pool")?;
        if pool.mem_chunks() != 1 {
            anyhow::bail!(
                "the packet pool ({n_mbufs} mbufs) lies in {} memory chunks; an AF_XDP port needs one: \
                 give DPDK more memory (-m in eal_args) or fewer mbufs (--mbufs)",
                pool.mem_chunks()
            );
        }
        pool
    } else {
        Mempool::new("fulcrum-pkts", n_mbufs, 256, -1).context("cannot create the packet pool")?
    };
    let conf = PortConf {
        rx_queues: workers,
        tx_queues: workers,
        rss: workers > 1,
        mtu: Some(port_cfg.mtu),
        ..PortConf::default()
    };
    let port = EthPort::open(port_name(&port_cfg.device), &conf, &pool)
        .with_context(|| format!("cannot open port {} ({})", port_cfg.name, port_cfg.device))?;
    if let Ok(mac) = port.mac() {
        if mac != port_cfg.mac.0 {
            eprintln!(
                "fulcrum: warning: port {} has MAC {} but the bootstrap file says {}; answering ARP/NDP with the latter",
                port_cfg.name,
                fulcrum_config::bootstrap::MacAddr(mac),
                port_cfg.mac
            );
        }
    }
    let mut specs = Vec::new();
    for (i, &cpu) in boot.workers.cores.iter().enumerate() {
        specs.push(WorkerSpec {
            config: WorkerConfig::from_bootstrap(&boot, i as u16, workers),
            cpu: Some(cpu),
            port: port.queue(i as u16, i as u16)?,
            access_log: None,
        });
    }
    eprintln!(
        "fulcrum: port {} ({}) up with {workers} worker(s) on CPU(s) {:?}",
        port_cfg.name, port_cfg.device, boot.workers.cores
    );
    let opts = ServeOptions {
        input,
        stats_every: a.stats_every.filter(|&s| s > 0.0).map(Duration::from_secs_f64),
        control: None,
    };
    let stats = serve(&boot, specs, &opts, Arc::new(AtomicBool::new(false)))?;
    let last = serde_json::json!({"fulcrum": "stopped", "stats": stats.to_json()});
    if boot.l7.as_ref().and_then(|l7| l7.access_log.as_ref()).is_some_and(|log| log.path == "-") {
        // Standard output is the access log's: its readers expect nothing but request lines.
        eprintln!("{last}");
    } else {
        println!("{last}");
    }
    drop(port);
    drop(pool);
    drop(eal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_become_eal_arguments() {
        assert!(is_pci("0000:03:00.0"));
        assert!(is_pci("03:00.1"));
        assert!(!is_pci("net_af_xdp0,iface=veth-lb"));
        assert_eq!(port_name("net_af_xdp0,iface=veth-lb"), "net_af_xdp0");
        assert_eq!(port_name("0000:03:00.0"), "0000:03:00.0");
    }

    fn boot_with(eal: &[&str]) -> Bootstrap {
        let mut boot = Bootstrap::parse(
            std::path::Path::new("config/examples/bootstrap.yaml"),
            include_str!("../../../config/examples/bootstrap.yaml"),
        )
        .unwrap();
        boot.eal_args = eal.iter().map(|s| s.to_string()).collect();
        boot
    }

    fn vdev(args: &[String]) -> &str {
        args.iter().find_map(|a| a.strip_prefix("--vdev=")).expect("a --vdev argument")
    }

    #[test]
    fn af_xdp_without_hugepages_is_forced_into_copy_mode() {
        let no_huge = boot_with(&["--no-huge", "-m", "512"]);
        let huge = boot_with(&["-m", "512"]);
        assert_eq!(vdev(&eal_args(&no_huge, "net_af_xdp0,iface=eth1", &[])), "net_af_xdp0,iface=eth1,force_copy=1");
        // Hugepages: zero-copy stays possible.
        assert_eq!(vdev(&eal_args(&huge, "net_af_xdp0,iface=eth1", &[])), "net_af_xdp0,iface=eth1");
        // The user's own choice is kept, either way.
        assert_eq!(
            vdev(&eal_args(&no_huge, "net_af_xdp0,iface=eth1,force_copy=0", &[])),
            "net_af_xdp0,iface=eth1,force_copy=0"
        );
        // Other devices are untouched.
        assert_eq!(vdev(&eal_args(&no_huge, "net_af_packet0,iface=eth1", &[])), "net_af_packet0,iface=eth1");
        assert_eq!(eal_args(&no_huge, "0000:03:00.0", &[])[3..5], ["-a".to_string(), "0000:03:00.0".to_string()]);
    }

    #[test]
    fn control_threads_keep_off_the_workers_cpus() {
        assert_eq!(control_cpus(&[0, 1, 2, 3], &[0]), [1, 2, 3]);
        assert_eq!(control_cpus(&[0, 1, 2, 3], &[1, 2]), [0, 3]);
        // Workers on every CPU: the rest shares them all rather than sitting on one.
        assert_eq!(control_cpus(&[0, 1], &[0, 1]), [0, 1]);
        let boot = boot_with(&["--no-huge"]);
        let args = eal_args(&boot, "net_null0", &[1, 3]);
        assert_eq!(args.iter().filter(|a| a.starts_with("--lcores")).collect::<Vec<_>>(), ["--lcores=0@(1,3)"]);
        assert!(!eal_args(&boot, "net_null0", &[]).iter().any(|a| a.starts_with("--lcores")));
        // The bootstrap's own layout is kept, and then none is added.
        for own in [&["-l", "2"][..], &["-l2-3"], &["-c", "0x4"], &["--lcores=0@2"], &["--main-lcore", "1"]] {
            let boot = boot_with(own);
            assert!(gives_lcores(&boot.eal_args), "{own:?}");
            let args = eal_args(&boot, "net_null0", &[1]);
            assert!(!args.iter().any(|a| a.starts_with("--lcores=0@(")), "{args:?}");
        }
        assert!(!gives_lcores(&boot_with(&["--no-huge", "--log-level=lib.eal:warning"]).eal_args));
    }
}
