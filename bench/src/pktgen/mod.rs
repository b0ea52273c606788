//! `fulcrum-bench pktgen`: a DPDK packet generator for testing a load balancer from outside.
//!
//! Open loop at a constant rate, UDP/IPv4 probes over many flows, each with a tag, a sequence
//! number and its transmit TSC in the payload; whatever comes back (an echo service behind a
//! VIP, a reflector, or the port itself on a loopback `net_ring`) is matched by payload, so
//! latency is a round trip measured on one clock. It answers ARP for its source addresses and
//! resolves its next hop by ARP, so it works in the lab without static neighbours, and on a real
//! NIC given by PCI address.
//!
//! One JSON line per trial; with `--search`, trials at decreasing / increasing rates as in
//! RFC 2544 section 26.1 (the highest rate at which no frame is lost, by binary search), then a
//! summary line.

mod frame;
mod trial;

use crate::report;
use frame::{Endpoints, Template};
use fulcrum_dpdk::{tsc_hz, Eal, EthPort, Mempool, PortConf, SOCKET_ANY};
use std::net::Ipv4Addr;
use trial::{Generator, Plan};

#[derive(clap::Args, Debug)]
pub struct PktgenArgs {
    /// The port: a DPDK vdev (`net_ring0` loops back to itself; `net_af_packet0,iface=IF`,
    /// `net_af_xdp0,iface=IF`) or a PCI address (`0000:03:00.0`, bound to vfio-pci).
    #[arg(long, default_value = "net_ring0")]
    pub port: String,
    /// Offered load, packets per second (with --search: the highest rate tried).
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    /// Seconds per trial.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Frame size in bytes without FCS (60 = 64 on the wire).
    #[arg(long, default_value_t = 60)]
    pub size: usize,
    /// Flows: distinct (source address, source port) pairs, sent round robin.
    #[arg(long, default_value_t = 1024)]
    pub flows: u32,
    /// First source address; the generator answers ARP for it and the next --src-ips - 1.
    #[arg(long, default_value = "10.10.0.100")]
    pub src_ip: Ipv4Addr,
    #[arg(long, default_value_t = 1)]
    pub src_ips: u32,
    /// Destination: the VIP.
    #[arg(long, default_value = "10.20.0.11")]
    pub dst_ip: Ipv4Addr,
    #[arg(long, default_value_t = 5353)]
    pub dst_port: u16,
    /// Next hop to resolve by ARP for the destination MAC (default: the destination itself).
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// Destination MAC instead of ARP (e.g. a loopback or a DUT that does not answer ARP).
    #[arg(long, value_parser = parse_mac)]
    pub dst_mac: Option<[u8; 6]>,
    /// Milliseconds to wait for stragglers after each trial.
    #[arg(long, default_value_t = 300)]
    pub drain_ms: u64,
    /// RFC 2544 throughput search: binary search between --min-rate and --rate for the highest
    /// rate whose loss ratio is at most --loss-tolerance.
    #[arg(long)]
    pub search: bool,
    #[arg(long, default_value_t = 1000.0)]
    pub min_rate: f64,
    /// Stop when the search interval is below this fraction of the rate found.
    #[arg(long, default_value_t = 0.02)]
    pub precision: f64,
    #[arg(long, default_value_t = 0.0)]
    pub loss_tolerance: f64,
    /// No learning phase (one packet per flow before measuring, so that the DUT has its
    /// neighbours and flows; RFC 2544 section 23).
    #[arg(long)]
    pub no_learning: bool,
    /// CPU core to run on.
    #[arg(long, default_value_t = 0)]
    pub core: usize,
    /// Extra EAL arguments (e.g. "--socket-mem 1024" for a NIC with huge pages).
    #[arg(long, allow_hyphen_values = true)]
    pub eal: Option<String>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> =
        s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    parts.try_into().map_err(|_| format!("{s}: a MAC is six hex bytes separated by ':'"))
}

fn is_pci(dev: &str) -> bool {
    let b = dev.as_bytes();
    // DDDD:BB:DD.F or BB:DD.F
    let tail = |s: &[u8]| {
        s.len() == 7
            && s[2] == b':'
            && s[5] == b'.'
            && s.iter().enumerate().all(|(i, c)| i == 2 || i == 5 || c.is_ascii_hexdigit())
    };
    tail(b) || (b.len() == 12 && b[4] == b':' && b[..4].iter().all(u8::is_ascii_hexdigit) && tail(&b[5..]))
}

pub fn run(a: &PktgenArgs) -> anyhow::Result<()> {
    if !(a.rate > 0.0 && a.seconds > 0.0) {
        anyhow::bail!("--rate and --seconds must be positive");
    }
    if a.flows == 0 || a.src_ips == 0 {
        anyhow::bail!("--flows and --src-ips must be at least 1");
    }
    let size = a.size.clamp(frame::MIN_FRAME, frame::MAX_FRAME);
    if size < frame::HEADERS + frame::PROBE {
        anyhow::bail!("--size {size}: a probe needs {} bytes", frame::HEADERS + frame::PROBE);
    }
    let prefix = format!("fulcrum-pktgen-{}", std::process::id());
    let mut args: Vec<String> = vec!["-l".into(), a.core.to_string(), "--file-prefix".into(), prefix.clone()];
    let name = if is_pci(&a.port) {
        args.extend(["-a".into(), a.port.clone()]);
        a.port.clone()
    } else {
        args.extend(["--no-huge".into(), "-m".into(), "512".into(), "--no-pci".into(), format!("--vdev={}", a.port)]);
        a.port.split(',').next().unwrap_or_default().to_string()
    };
    args.push("--log-level=lib.eal:warning".into());
    if let Some(extra) = &a.eal {
        args.extend(extra.split_whitespace().map(str::to_string));
    }
    crate::pin(Some(a.core));
    let eal = Eal::init(&args)?;
    let result = (|| {
        let pool = Mempool::new("pktgen_pool", 16383, 256, SOCKET_ANY)?;
        let port = EthPort::open(&name, &PortConf { rss: false, ..PortConf::default() }, &pool)?;
        let src_mac = port.mac()?;
        let q = port.queue(0, 0)?;
        let mut ep = Endpoints {
            src_mac,
            dst_mac: a.dst_mac.unwrap_or([0xff; 6]),
            src_ip: a.src_ip,
            src_ips: a.src_ips,
            dst_ip: a.dst_ip,
            dst_port: a.dst_port,
            flows: a.flows,
        };
        let mut g = Generator { q, tpl: Template::new(&ep, size), ep: ep.clone(), hz: tsc_hz() };
        if a.dst_mac.is_none() {
            let hop = a.gateway.unwrap_or(a.dst_ip);
            ep.dst_mac = g.resolve(u32::from(hop), 3000).ok_or_else(|| {
                anyhow::anyhow!("no ARP reply from {hop} on {}: give --dst-mac or check the path", a.port)
            })?;
            g.tpl = Template::new(&ep, size);
            g.ep = ep.clone();
        }
        let mut trial = 0u16;
        if !a.no_learning {
            // Learning: every flow once, slowly enough for any DUT, not reported.
            let rate = a.rate.min(50_000.0).min(a.flows as f64 * 10.0);
            g.run(Plan { rate_pps: rate, seconds: a.flows as f64 / rate, drain_ms: a.drain_ms, trial });
            trial += 1;
        }
        let plan = |rate, trial| Plan { rate_pps: rate, seconds: a.seconds, drain_ms: a.drain_ms, trial };
        let context = serde_json::json!({
            "port": a.port, "frame_bytes": size, "flows": a.flows, "src_ips": a.src_ips,
            "dst": format!("{}:{}", a.dst_ip, a.dst_port), "dst_mac": fulcrum_config::bootstrap::MacAddr(ep.dst_mac).to_string(),
        });
        let emit = |o: &trial::Outcome| {
            let mut v = o.json(size);
            merge(&mut v, &context);
            v["loadavg"] = report::loadavg().into();
            report::print(v);
        };
        if !a.search {
            let o = g.run(plan(a.rate, trial));
            emit(&o);
            return Ok(());
        }
        // RFC 2544 26.1: the highest offered rate with loss within tolerance.
        // A rate the generator itself could not offer fails too (and says so in its line).
        let ok = |o: &trial::Outcome| o.loss_ratio() <= a.loss_tolerance && !o.generator_limited();
        let (mut lo, mut hi) = (0.0f64, a.rate);
        let mut best: Option<trial::Outcome> = None;
        let mut rate = a.rate;
        let mut trials = 0;
        let mut limited = 0u32;
        loop {
            let o = g.run(plan(rate, trial));
            trial = trial.wrapping_add(1);
            trials += 1;
            emit(&o);
            limited += o.generator_limited() as u32;
            if ok(&o) {
                lo = rate;
                best = Some(o);
            } else {
                hi = rate;
            }
            if lo >= a.rate || hi - lo <= a.precision * hi || trials >= 30 {
                break;
            }
            // Halve the interval; below --min-rate only once, to say whether even that fails.
            let next = (lo + hi) / 2.0;
            rate = if next >= a.min_rate {
                next
            } else if lo == 0.0 && hi > a.min_rate {
                a.min_rate
            } else {
                break;
            };
        }
        let mut v = serde_json::json!({
            "bench": "pktgen-rfc2544",
            "throughput_pps": best.as_ref().map(|o| o.plan.rate_pps),
            "loss_tolerance": a.loss_tolerance,
            "searched": [a.min_rate, a.rate],
            "trials": trials,
            "generator_limited_trials": limited,
            "at_throughput": best.as_ref().map(|o| o.json(size)),
        });
        merge(&mut v, &context);
        v["loadavg"] = report::loadavg().into();
        report::print(v);
        Ok(())
    })();
    drop(eal);
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    result
}

fn merge(v: &mut serde_json::Value, extra: &serde_json::Value) {
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_told_from_vdevs() {
        assert!(is_pci("0000:03:00.0"));
        assert!(is_pci("03:00.1"));
        assert!(!is_pci("net_ring0"));
        assert!(!is_pci("net_af_packet0,iface=veth-client"));
        assert_eq!(parse_mac("02:f1:00:00:00:01"), Ok([2, 0xf1, 0, 0, 0, 1]));
        assert!(parse_mac("02:f1").is_err());
    }
}
