//! `fulcrum check`: validate the bootstrap file (and manifests), then print what the appliance
//! would be: the bootstrap summary and, with manifests, the VIP table of the compiled snapshot.

use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::ingress::{host_name, translate_ingresses, ClassSelection, L7State, PathType, DEFAULT_CLASS};
use fulcrum_config::model::EndpointState;
use fulcrum_dataplane::l4::conntrack::Conntrack;
use fulcrum_dataplane::l4::snat::SnatPorts;
use fulcrum_dataplane::snapshot::{BackendEntry, Mode, ServiceEntry, Snapshot};
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bootstrap file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Kubernetes manifests: a YAML file or a directory of them (Services, EndpointSlices).
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Print the result as one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    // With manifests: the snapshot, and the Ingress routes when they hold any Ingress (those
    // of the bootstrap's class; without an `l7` section, of the default class, for reference).
    let (boot, snap, l7) = match &a.manifests {
        Some(m) => {
            let input = super::InputArgs { manifests: Some(m.clone()), kubeconfig: None };
            let (boot, objects, state, snap) = super::compile(&a.config, &input)?;
            let l7 = match &boot.l7 {
                _ if objects.ingresses.is_empty() => None,
                Some(c) => Some((c.ingress_class.clone(), state.l7)),
                None => Some((DEFAULT_CLASS.to_string(), translate_ingresses(&objects, &ClassSelection::default())?)),
            };
            (boot, Some(snap), l7)
        }
        None => (Bootstrap::load(&a.config)?, None, None),
    };
    let mem = ConntrackMemory::of(&boot)?;
    if a.json {
        let mut v = json!({
            "config": a.config,
            "bootstrap": boot,
            "conntrack_memory": mem.to_json(),
            "snat_ports": snat_ranges(&boot).iter().map(|(c, lo, hi)| json!({"core": c, "first": lo, "last": hi})).collect::<Vec<_>>(),
        });
        if let (Some(m), Some(s)) = (&a.manifests, &snap) {
            v["manifests"] = json!(m);
            v["vips"] = vip_json(s);
        }
        if let Some((_, l7)) = &l7 {
            v["ingress"] = json!(l7);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let mut out = String::new();
        writeln!(out, "{}: ok", a.config.display())?;
        bootstrap_summary(&mut out, &boot, &mem)?;
        if let (Some(m), Some(s)) = (&a.manifests, &snap) {
            let n_backends = s.backends.len();
            writeln!(out)?;
            writeln!(out, "{}: ok: {} VIP ports, {} backends", m.display(), s.services.len(), n_backends)?;
            vip_table(&mut out, s)?;
        }
        if let Some((class, l7)) = &l7 {
            ingress_table(&mut out, class, l7)?;
        }
        print!("{out}");
    }
    Ok(())
}

/// What the per-core conntrack tables take, as the tables compute it (all of it is committed
/// when a worker starts, so that no page fault happens on the fast path).
struct ConntrackMemory {
    v4_per_core: usize,
    v6_per_core: usize,
    cores: usize,
}

impl ConntrackMemory {
    fn of(boot: &Bootstrap) -> anyhow::Result<Self> {
        // Same sizes as the worker builds (one IPv4 and one IPv6 table per core).
        let v4 = Conntrack::<u32>::bytes_for(boot.conntrack.capacity);
        let v6 = Conntrack::<u128>::bytes_for(boot.conntrack.v6_capacity());
        Ok(ConntrackMemory { v4_per_core: v4, v6_per_core: v6, cores: boot.workers.cores.len() })
    }
    fn per_core(&self) -> usize {
        self.v4_per_core + self.v6_per_core
    }
    fn to_json(&self) -> serde_json::Value {
        json!({
            "ipv4_bytes_per_core": self.v4_per_core,
            "ipv6_bytes_per_core": self.v6_per_core,
            "bytes_per_core": self.per_core(),
            "bytes_total": self.per_core() * self.cores,
        })
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn snat_ranges(boot: &Bootstrap) -> Vec<(usize, u16, u16)> {
    let n = boot.workers.cores.len() as u16;
    boot.workers
        .cores
        .iter()
        .enumerate()
        .map(|(i, &core)| {
            let (lo, hi) = SnatPorts::for_core(i as u16, n).range();
            (core, lo, hi)
        })
        .collect()
}

fn opt<T: std::fmt::Display>(o: &Option<T>) -> String {
    o.as_ref().map_or("-".to_string(), |v| v.to_string())
}

fn bootstrap_summary(out: &mut String, boot: &Bootstrap, mem: &ConntrackMemory) -> std::fmt::Result {
    if !boot.eal_args.is_empty() {
        writeln!(out, "  EAL args:   {}", boot.eal_args.join(" "))?;
    }
    for p in &boot.ports {
        writeln!(out, "  port {}:  device {}  mac {}  mtu {}", p.name, p.device, p.mac, p.mtu)?;
        writeln!(
            out,
            "    ipv4 {}  ipv6 {}  next hop {} / {}{}",
            opt(&p.ipv4),
            opt(&p.ipv6),
            opt(&p.next_hop.ipv4),
            opt(&p.next_hop.ipv6),
            p.next_hop.mac.map(|m| format!(" (mac {m})")).unwrap_or_default()
        )?;
        if !p.snat_addresses.is_empty() {
            let a: Vec<String> = p.snat_addresses.iter().map(|a| a.to_string()).collect();
            writeln!(out, "    FullNAT source addresses {}", a.join(", "))?;
        }
    }
    let cores: Vec<String> = boot.workers.cores.iter().map(|c| c.to_string()).collect();
    writeln!(
        out,
        "  workers:    {} on cores {}{}",
        cores.len(),
        cores.join(", "),
        if boot.workers.idle_backoff { " (idle backoff)" } else { " (busy polling)" }
    )?;
    let snat: Vec<String> = snat_ranges(boot).iter().map(|(c, lo, hi)| format!("core {c}: {lo}-{hi}")).collect();
    writeln!(out, "  SNAT ports: {}", snat.join(", "))?;
    for pool in &boot.vip_pools {
        let cidrs: Vec<String> = pool.cidrs.iter().map(|c| c.to_string()).collect();
        writeln!(out, "  VIP pool {}: {}", pool.name, cidrs.join(", "))?;
    }
    let f = &boot.forwarding;
    writeln!(
        out,
        "  forwarding: default {}; DSR outer sources {} / {}",
        f.default_mode, f.dsr_source_v4, f.dsr_source_v6
    )?;
    let t = &boot.conntrack.timeouts;
    writeln!(
        out,
        "  conntrack:  {} flows per core; reserves {} per core (IPv4 {} + IPv6 {}), {} for {} core(s)",
        boot.conntrack.capacity,
        mib(mem.per_core()),
        mib(mem.v4_per_core),
        mib(mem.v6_per_core),
        mib(mem.per_core() * mem.cores),
        mem.cores
    )?;
    writeln!(
        out,
        "    timeouts: tcp syn {}s, established {}s, fin {}s, closed {}s, time-wait {}s; udp {}s",
        t.tcp_syn, t.tcp_established, t.tcp_fin, t.tcp_closed, t.tcp_time_wait, t.udp
    )?;
    writeln!(out, "  maglev:     table size {}", boot.maglev.table_size)?;
    let n = &boot.neighbors;
    writeln!(
        out,
        "  neighbors:  {} per core; re-checked {} ms after an answer while in use, given up after {} unanswered",
        n.capacity, n.reachable_ms, n.probes
    )?;
    let h = &boot.passive_health;
    if h.unanswered_syns == 0 {
        writeln!(out, "  passive health: off")?;
    } else {
        writeln!(
            out,
            "  passive health: a TCP endpoint passed over by new flows for {} ms after {} SYNs sent again unanswered (FullNAT)",
            h.pass_over_ms, h.unanswered_syns
        )?;
    }
    if let Some(l7) = &boot.l7 {
        let ports = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let (t, l) = (&l7.timeouts, &l7.limits);
        writeln!(
            out,
            "  l7:         {} (class {}); http {}; https {}; socket buffers {} bytes",
            l7.address,
            l7.ingress_class,
            ports(&l7.http_ports),
            ports(&l7.https_ports),
            l7.socket_buffer
        )?;
        writeln!(
            out,
            "    timeouts: header {} ms, connect {} ms, upstream {} ms, idle {} ms, drain {} ms; limits: head {} bytes, \
             {} headers, URI {} bytes, body {} bytes, {} connections per core",
            t.header_ms,
            t.connect_ms,
            t.upstream_ms,
            t.idle_ms,
            t.drain_ms,
            l.max_header_bytes,
            l.max_headers,
            l.max_uri_bytes,
            l.max_body_bytes,
            l.max_connections
        )?;
        match &l7.access_log {
            Some(log) => {
                // Only a warning: the file is opened where `fulcrum run` runs, maybe elsewhere.
                let dir = std::path::Path::new(&log.path).parent().filter(|d| !d.as_os_str().is_empty());
                let missing = match dir {
                    Some(d) if log.path != "-" && !d.is_dir() => {
                        format!("; warning: {} is not a directory here, so fulcrum run would not start", d.display())
                    }
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "    access log: {} (a ring of {} bytes per worker){missing}",
                    if log.path == "-" { "standard output" } else { &log.path },
                    log.ring_bytes
                )?
            }
            None => writeln!(out, "    access log: off")?,
        }
    }
    Ok(())
}

fn proto_name(p: u8) -> &'static str {
    if p == 6 {
        "TCP"
    } else {
        "UDP"
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::FullNat => "fullnat",
        Mode::DsrIpip => "dsr-ipip",
    }
}

fn state_name(s: EndpointState) -> &'static str {
    match s {
        EndpointState::Ready => "ready",
        EndpointState::Terminating => "terminating",
        EndpointState::NotReady => "not-ready",
    }
}

fn backends<'a>(snap: &'a Snapshot, s: &ServiceEntry) -> &'a [BackendEntry] {
    &snap.backends[s.backends.start as usize..s.backends.end as usize]
}

fn counts(bs: &[BackendEntry]) -> [usize; 3] {
    let n = |st| bs.iter().filter(|b| b.state == st).count();
    [n(EndpointState::Ready), n(EndpointState::Terminating), n(EndpointState::NotReady)]
}

fn service_name(s: &ServiceEntry) -> String {
    if s.port_name.is_empty() {
        s.service.to_string()
    } else {
        format!("{} ({})", s.service, s.port_name)
    }
}

fn affinity(s: &ServiceEntry) -> String {
    s.affinity_ms.map_or("-".to_string(), |ms| format!("ClientIP {}s", ms / 1000))
}

/// `spec.loadBalancerSourceRanges`, or `any`.
fn sources(s: &ServiceEntry) -> String {
    if s.source_ranges.is_empty() {
        "any".to_string()
    } else {
        s.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }
}

fn vip_table(out: &mut String, snap: &Snapshot) -> std::fmt::Result {
    let header =
        ["VIP", "PORT", "MODE", "SERVICE (PORT NAME)", "AFFINITY", "READY", "TERMINATING", "NOT-READY", "SOURCES"];
    let rows: Vec<[String; 9]> = snap
        .services
        .iter()
        .map(|s| {
            let [r, t, n] = counts(backends(snap, s));
            [
                s.vip.to_string(),
                format!("{}/{}", s.port, proto_name(s.proto)),
                mode_name(s.mode).to_string(),
                service_name(s),
                affinity(s),
                r.to_string(),
                t.to_string(),
                n.to_string(),
                sources(s),
            ]
        })
        .collect();
    let mut w = header.map(str::len);
    for r in &rows {
        for (wi, c) in w.iter_mut().zip(r) {
            *wi = (*wi).max(c.len());
        }
    }
    let line = |out: &mut String, cells: &[&str]| -> std::fmt::Result {
        let mut l = String::new();
        for (i, (c, wi)) in cells.iter().zip(&w).enumerate() {
            // Counts (READY to NOT-READY) right-aligned, text left-aligned.
            if (5..8).contains(&i) {
                write!(l, "{c:>wi$}  ")?;
            } else {
                write!(l, "{c:<wi$}  ")?;
            }
        }
        writeln!(out, "{}", l.trim_end())
    };
    line(out, &header)?;
    let m = snap.maglev_size as f64;
    for (s, r) in snap.services.iter().zip(&rows) {
        line(out, &r.iter().map(String::as_str).collect::<Vec<_>>())?;
        let bs = backends(snap, s);
        if bs.is_empty() {
            writeln!(out, "    (no endpoints: new flows to this VIP port are dropped)")?;
        }
        if s.terminating_fallback {
            writeln!(out, "    (no ready endpoint: serving, terminating endpoints take new flows)")?;
        }
        for b in bs {
            let addr = match b.addr {
                std::net::IpAddr::V6(a) => format!("[{a}]:{}", b.port),
                a => format!("{a}:{}", b.port),
            };
            writeln!(
                out,
                "    -> {addr:<24} {:<12} weight {:<3} maglev {:>5} slots ({:>5.1}%){}",
                state_name(b.state),
                b.weight,
                b.maglev_slots,
                100.0 * b.maglev_slots as f64 / m,
                b.target.as_ref().map(|t| format!("  {t}")).unwrap_or_default()
            )?;
        }
    }
    Ok(())
}

fn vip_json(snap: &Snapshot) -> serde_json::Value {
    let m = snap.maglev_size as f64;
    snap.services
        .iter()
        .map(|s| {
            let bs = backends(snap, s);
            let [r, t, n] = counts(bs);
            json!({
                "vip": s.vip,
                "port": s.port,
                "protocol": proto_name(s.proto),
                "mode": mode_name(s.mode),
                "service": s.service.to_string(),
                "port_name": s.port_name,
                "session_affinity_timeout_s": s.affinity_ms.map(|ms| ms / 1000),
                "source_ranges": s.source_ranges,
                "endpoints": {"ready": r, "terminating": t, "not_ready": n},
                "terminating_fallback": s.terminating_fallback,
                "backends": bs.iter().map(|b| json!({
                    "addr": b.addr,
                    "port": b.port,
                    "state": state_name(b.state),
                    "weight": b.weight,
                    "target": b.target,
                    "maglev_slots": b.maglev_slots,
                    "maglev_share": b.maglev_slots as f64 / m,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// The Ingress routes: host, path and type, where they go; then what was ignored.
fn ingress_table(out: &mut String, class: &str, l7: &L7State) -> std::fmt::Result {
    writeln!(out)?;
    let n: usize = l7.hosts.iter().map(|h| h.paths.len()).sum();
    writeln!(out, "Ingress (class {class}): {} Ingresses, {} routes", l7.ingresses.len(), n)?;
    for h in &l7.hosts {
        for p in &h.paths {
            let kind = match p.path_type {
                PathType::Exact => "Exact",
                PathType::Prefix => "Prefix",
            };
            let to = match (p.backend.port, &p.backend.unresolved) {
                (Some(port), None) => format!("{}:{port}", p.backend.service),
                (_, why) => format!("503 ({})", why.as_deref().unwrap_or("unresolved")),
            };
            writeln!(
                out,
                "  {:<28} {:<24} {:<7} -> {}   (Ingress {})",
                host_name(&h.host),
                p.path,
                kind,
                to,
                p.ingress
            )?;
        }
    }
    if let Some(b) = &l7.default_backend {
        writeln!(out, "  default backend -> {}:{}", b.service, opt(&b.port))?;
    }
    for h in l7.hosts.iter().filter(|h| h.tls_secret.is_some()) {
        writeln!(
            out,
            "  TLS {:<24} Secret {}{}",
            host_name(&h.host),
            opt(&h.tls_secret),
            if h.ssl_redirect { ", HTTP redirected to HTTPS" } else { "" }
        )?;
    }
    // Certificates that do not load (bad PEM, key not matching) are left out by the workers.
    let (_, cert_warnings) = fulcrum_dataplane::l7::tls::server_config(&l7.certificates);
    for w in cert_warnings {
        writeln!(out, "  warning: {w}")?;
    }
    for w in &l7.warnings {
        writeln!(out, "  warning: {w}")?;
    }
    Ok(())
}
