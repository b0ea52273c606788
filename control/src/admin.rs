//! The management endpoint: a small HTTP/1.1 server on a kernel socket (default
//! 127.0.0.1:9100, never a data port) with `/metrics` (Prometheus text format 0.0.4),
//! `/healthz`, `/readyz`, `/snapshot` (the live tables as JSON) and `/neighbors` (each
//! worker's neighbour table as JSON).
//!
//! Written on std's TcpListener and httparse rather than an async HTTP stack: it serves a
//! scraper every few seconds, one request per connection, and must never share a thread or a
//! runtime with anything on the packet path.

use crate::k8s::Mirror;
use fulcrum_dataplane::neigh::NeighborView;
use fulcrum_dataplane::runtime::Shared;
use fulcrum_dataplane::snapshot::ServiceEntry;
use fulcrum_dataplane::stats::{CoreStats, DropReason, LoopTimes};
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the control loop reports about itself, for `/metrics`, `/healthz` and `/readyz`.
pub struct ControlState {
    pub shared: Mutex<Option<Arc<Shared>>>,
    pub kube: Option<Arc<Mirror>>,
    started: Instant,
    /// Milliseconds since `started` of the control loop's last tick.
    last_tick_ms: AtomicU64,
    pub snapshots_published: AtomicU64,
    pub snapshots_rejected: AtomicU64,
    /// Objects left out of the last snapshot (each has an Event / a log line).
    pub objects_with_problems: AtomicU64,
    /// Microseconds: translate + compile of the last snapshot.
    pub last_build_us: AtomicU64,
    /// From publish until every worker runs the new snapshot, microseconds.
    pub publish_latency_us: Mutex<Histogram<u64>>,
    /// Snapshot build (translate + compile), microseconds.
    pub build_us: Mutex<Histogram<u64>>,
}

impl ControlState {
    pub fn new(kube: Option<Arc<Mirror>>) -> Arc<ControlState> {
        let h = || Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"));
        Arc::new(ControlState {
            shared: Mutex::new(None),
            kube,
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            snapshots_published: AtomicU64::new(0),
            snapshots_rejected: AtomicU64::new(0),
            objects_with_problems: AtomicU64::new(0),
            last_build_us: AtomicU64::new(0),
            publish_latency_us: h(),
            build_us: h(),
        })
    }

    /// A snapshot was built (translate + compile) in `took`, leaving `problems` objects out.
    pub fn record_build(&self, took: Duration, problems: usize) {
        let us = took.as_micros() as u64;
        self.last_build_us.store(us, Ordering::Relaxed);
        self.build_us.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(us);
        self.objects_with_problems.store(problems as u64, Ordering::Relaxed);
    }

    pub fn tick(&self) {
        self.last_tick_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// The workers' shared state, once they run.
    pub fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Alive: the control loop ticked within the last 5 seconds.
    fn healthy(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_tick_ms.load(Ordering::Acquire)) < 5_000
    }

    /// Ready for traffic: every worker runs the current snapshot (or a newer one being picked up).
    fn ready(&self) -> Result<String, String> {
        let Some(shared) = self.shared() else { return Err("workers not started".into()) };
        // Stopping: health checkers (a Kubernetes readiness probe, an upstream load balancer)
        // take the appliance out while its connections finish.
        if shared.drain.load(Ordering::Acquire) {
            return Err("draining: stopping on SIGTERM, new connections refused".into());
        }
        let g = shared.snapshot.generation();
        let behind = shared.running_generation.iter().filter(|r| r.load(Ordering::Acquire) == 0).count();
        if behind > 0 {
            return Err(format!("{behind} worker(s) have not taken a snapshot yet"));
        }
        let api = match &self.kube {
            Some(m) if !m.connected() => {
                format!(
                    ", Kubernetes API unreachable ({}): serving the last snapshot",
                    m.last_error().unwrap_or_default()
                )
            }
            _ => String::new(),
        };
        Ok(format!("ok: snapshot {g} on {} worker(s){api}", shared.running_generation.len()))
    }
}

/// Serves until `stop` is set. Returns once the socket is bound, so that a bad address is an error
/// at start-up and not a silent absence.
pub fn start(
    addr: SocketAddr,
    state: Arc<ControlState>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener =
        TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("admin endpoint: cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    eprintln!("fulcrum: admin endpoint on http://{addr}/ (/metrics /healthz /readyz /snapshot)");
    Ok(std::thread::Builder::new().name("fulcrum-admin".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = handle(stream, &state) {
                        tracing::debug!("admin request: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    tracing::warn!("admin endpoint: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?)
}

fn handle(mut stream: TcpStream, state: &ControlState) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let (method, path) = loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break (req.method.unwrap_or("").to_string(), req.path.unwrap_or("/").to_string());
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n"),
        }
    };
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n");
    }
    let path = path.split('?').next().unwrap_or("/");
    match path {
        "/metrics" => respond(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &render_metrics(state)),
        "/healthz" if state.healthy() => respond(&mut stream, 200, "text/plain", "ok\n"),
        "/healthz" => respond(&mut stream, 503, "text/plain", "control loop stalled\n"),
        "/readyz" => match state.ready() {
            Ok(m) => respond(&mut stream, 200, "text/plain", &format!("{m}\n")),
            Err(m) => respond(&mut stream, 503, "text/plain", &format!("{m}\n")),
        },
        "/snapshot" => match state.shared() {
            Some(s) => {
                let body = serde_json::to_string_pretty(&s.snapshot.current().to_json(false)).unwrap_or_default();
                respond(&mut stream, 200, "application/json", &(body + "\n"))
            }
            None => respond(&mut stream, 503, "text/plain", "no snapshot yet\n"),
        },
        "/neighbors" => match state.shared() {
            Some(_) => respond(&mut stream, 200, "application/json", &(render_neighbors(state) + "\n")),
            None => respond(&mut stream, 503, "text/plain", "no workers yet\n"),
        },
        "/" => respond(&mut stream, 200, "text/plain", "/metrics /healthz /readyz /snapshot /neighbors\n"),
        _ => respond(&mut stream, 404, "text/plain", "not found\n"),
    }
}

fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// A label value escaped as the text format requires (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one metric family: HELP, TYPE and its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    /// A summary from a histogram of microseconds, in seconds.
    fn summary_us(&mut self, name: &str, help: &str, h: &Histogram<u64>) {
        self.family(name, "summary", help);
        for q in [0.5, 0.9, 0.99] {
            let v = if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1e6 };
            self.sample(name, &[("quantile", q.to_string())], v);
        }
        let sum: f64 = h.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum();
        self.sample(&format!("{name}_sum"), &[], sum / 1e6);
        self.sample(&format!("{name}_count"), &[], h.len());
    }
}

/// The labels naming a VIP port: its Service, port name, address, port and protocol.
fn vip_labels(e: &ServiceEntry) -> Vec<(&'static str, String)> {
    vec![
        ("service", e.service.to_string()),
        ("port_name", e.port_name.clone()),
        ("vip", e.vip.to_string()),
        ("port", e.port.to_string()),
        ("protocol", if e.proto == 6 { "TCP" } else { "UDP" }.to_string()),
    ]
}

/// Each worker's neighbour table (as of its last copy, within about a second), as JSON:
/// `{"cores":[{"core":0,"entries":[{"ip":..,"mac":..,"state":..,"used_ms_ago":..}]}]}`.
pub fn render_neighbors(state: &ControlState) -> String {
    let cores: Vec<serde_json::Value> = state
        .shared()
        .map(|s| {
            s.stats
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let table = m.lock().unwrap_or_else(|e| e.into_inner()).neighbor_table.clone();
                    serde_json::json!({"core": i, "entries": *table})
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::to_string_pretty(&serde_json::json!({ "cores": cores })).unwrap_or_default()
}

/// Every counter, per core where the data plane keeps it per core.
pub fn render_metrics(state: &ControlState) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    let shared = state.shared();
    let cores: Vec<CoreStats> = shared
        .as_ref()
        .map(|s| s.stats.iter().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect())
        .unwrap_or_default();
    let core = |i: usize| vec![("core", i.to_string())];
    type Get = fn(&CoreStats) -> u64;
    let per_core: [(&str, &str, &str, Get); 42] = [
        ("fulcrum_rx_packets_total", "counter", "Packets received.", |c| c.rx.packets),
        ("fulcrum_rx_bytes_total", "counter", "Bytes received.", |c| c.rx.bytes),
        ("fulcrum_tx_packets_total", "counter", "Packets sent.", |c| c.tx.packets),
        ("fulcrum_tx_bytes_total", "counter", "Bytes sent.", |c| c.tx.bytes),
        ("fulcrum_arp_replies_total", "counter", "ARP replies sent.", |c| c.arp_replies),
        ("fulcrum_ndp_replies_total", "counter", "Neighbour advertisements sent.", |c| c.ndp_replies),
        ("fulcrum_echo_replies_total", "counter", "ICMP echo replies sent.", |c| c.echo_replies),
        ("fulcrum_handed_off_total", "counter", "Packets handed to the core owning their flow.", |c| c.handed_off),
        ("fulcrum_conntrack_flows", "gauge", "Flows tracked.", |c| c.ct_flows),
        ("fulcrum_conntrack_inserts_total", "counter", "Flows created.", |c| c.ct_inserts),
        ("fulcrum_conntrack_expired_total", "counter", "Flows expired.", |c| c.ct_expired),
        ("fulcrum_conntrack_evictions_total", "counter", "Flows evicted because the table was full.", |c| {
            c.ct_evictions
        }),
        (
            "fulcrum_snat_time_wait_reuses_total",
            "counter",
            "New FullNAT flows given a SNAT tuple the backend may still hold in TIME-WAIT (every port tried was in use).",
            |c| c.snat_time_wait_reuses,
        ),
        (
            "fulcrum_unreachable_backend_repicks_total",
            "counter",
            "New flows whose Maglev backend was behind an unreachable neighbour, sent to the next reachable backend instead.",
            |c| c.unreachable_backend_repicks,
        ),
        (
            "fulcrum_unanswered_syns_total",
            "counter",
            "Client SYNs sent again on FullNAT flows whose endpoint never answered (passive_health).",
            |c| c.unanswered_syns,
        ),
        (
            "fulcrum_unanswered_backend_repicks_total",
            "counter",
            "New TCP flows whose Maglev backend was passed over for unanswered SYNs, sent to the next usable backend instead.",
            |c| c.unanswered_backend_repicks,
        ),
        ("fulcrum_neighbors", "gauge", "Neighbour table entries, resolved or being resolved.", |c| c.neighbors),
        (
            "fulcrum_neighbors_capacity",
            "gauge",
            "Neighbour table entries a core can hold (full: the least recently used entry makes room).",
            |c| c.neighbors_capacity,
        ),
        (
            "fulcrum_neighbor_evictions_total",
            "counter",
            "Neighbour entries given to another address because the table was full.",
            |c| c.neighbor_evictions,
        ),
        (
            "fulcrum_neighbor_probes_total",
            "counter",
            "Unicast ARP/NDP re-checks of neighbours in use past their reachable time.",
            |c| c.neighbor_probes,
        ),
        (
            "fulcrum_neighbor_failures_total",
            "counter",
            "Neighbours given up after unanswered re-checks (then asked by broadcast).",
            |c| c.neighbor_failures,
        ),
        ("fulcrum_l7_connections_total", "counter", "Client connections accepted by the HTTP proxy.", |c| {
            c.l7.connections
        }),
        ("fulcrum_l7_requests_total", "counter", "HTTP requests received.", |c| c.l7.requests),
        (
            "fulcrum_l7_upstream_ports_exhausted_total",
            "counter",
            "Requests answered 503 because every upstream port of the core towards their endpoint was in use.",
            |c| c.l7.upstream_ports_exhausted,
        ),
        (
            "fulcrum_l7_upstream_connect_failures_total",
            "counter",
            "Upstream connections refused, or not answered within l7.timeouts.connect_ms.",
            |c| c.l7.upstream_connect_failures,
        ),
        (
            "fulcrum_l7_upstream_resends_total",
            "counter",
            "Requests sent to another endpoint because theirs failed before taking a byte of them.",
            |c| c.l7.upstream_resends,
        ),
        (
            "fulcrum_l7_access_log_records_total",
            "counter",
            "Requests handed to the access log's writer.",
            |c| c.l7.access_log_records,
        ),
        (
            "fulcrum_l7_access_log_dropped_total",
            "counter",
            "Access log records dropped because the worker's ring to the writer was full (l7.access_log.ring_bytes).",
            |c| c.l7.access_log_dropped,
        ),
        (
            "fulcrum_l7_socket_buffer_bytes",
            "gauge",
            "Bytes held for TCP socket buffers (lent to sockets or kept for reuse).",
            |c| c.l7.socket_buffer_bytes,
        ),
        (
            "fulcrum_l7_handshakes_evicted_total",
            "counter",
            "Client connections still in their TCP handshake given up, oldest first, to make room for a new one at l7.limits.max_connections.",
            |c| c.l7.handshakes_evicted,
        ),
        (
            "fulcrum_l7_socket_buffers_lent",
            "gauge",
            "TCP socket buffers lent now: one per receive or transmit ring with bytes in it (idle connections hold none).",
            |c| c.l7.socket_buffers_lent,
        ),
        ("fulcrum_l7_client_connections", "gauge", "Client connections open on the proxy, plain and TLS.", |c| {
            c.l7.clients_open
        }),
        ("fulcrum_l7_upstream_connections", "gauge", "Upstream connections open, carrying a request or pooled.", |c| {
            c.l7.upstreams_open
        }),
        ("fulcrum_l7_upstream_idle_connections", "gauge", "Upstream connections pooled for reuse.", |c| {
            c.l7.upstreams_idle
        }),
        ("fulcrum_l7_sockets", "gauge", "TCP sockets of the proxy's stack, closing ones included.", |c| c.l7.sockets),
        ("fulcrum_l7_tls_handshakes_total", "counter", "TLS handshakes completed, full and resumed.", |c| {
            c.l7.tls.handshakes
        }),
        ("fulcrum_l7_tls_resumed_total", "counter", "TLS handshakes resumed (ticket or session cache).", |c| {
            c.l7.tls.resumed
        }),
        (
            "fulcrum_l7_tls_failures_total",
            "counter",
            "TLS sessions ended by an error: a failed handshake or a bad record.",
            |c| c.l7.tls.failures,
        ),
        ("fulcrum_health_probes_total", "counter", "Active health probes completed.", |c| c.l7.health_probes),
        ("fulcrum_health_probe_failures_total", "counter", "Active health probes failed.", |c| c.l7.health_failures),
        ("fulcrum_health_transitions_total", "counter", "Endpoints going down or up by their checks.", |c| {
            c.l7.health_transitions
        }),
        ("fulcrum_health_endpoints_down", "gauge", "Endpoints out of the tables by their checks.", |c| {
            c.health_down.len() as u64
        }),
    ];
    for (name, kind, help, get) in per_core {
        o.family(name, kind, help);
        for (i, c) in cores.iter().enumerate() {
            o.sample(name, &core(i), get(c));
        }
    }
    o.family(
        "fulcrum_neighbor_entries",
        "gauge",
        "Neighbour table entries by state (Linux's names), as of the worker's last copy (about once a second); incomplete ones that traffic needs are endpoints or next hops not answering ARP/NDP.",
    );
    for (i, c) in cores.iter().enumerate() {
        for state in NeighborView::STATES {
            let n = c.neighbor_table.iter().filter(|e| e.state == state).count();
            o.sample("fulcrum_neighbor_entries", &[("core", i.to_string()), ("state", state.to_string())], n);
        }
    }
    o.family(
        "fulcrum_backend_passed_over",
        "gauge",
        "TCP endpoints new flows pass over on a core, for SYNs they left unanswered (1 while passed over; absent otherwise).",
    );
    for (i, c) in cores.iter().enumerate() {
        for (addr, port) in &c.passed_over {
            let endpoint = std::net::SocketAddr::new(*addr, *port).to_string();
            o.sample("fulcrum_backend_passed_over", &[("core", i.to_string()), ("endpoint", endpoint)], 1);
        }
    }
    o.family(
        "fulcrum_worker_loop_seconds",
        "histogram",
        "A worker's loop iterations, from one poll of its port to the next, less the pauses an idle worker chose; milliseconds mean the worker did not run (another thread on its CPU, or the host).",
    );
    for (i, c) in cores.iter().enumerate() {
        let t = &c.loop_times;
        let mut below = 0;
        for (k, bound) in LoopTimes::BOUNDS_NS.iter().enumerate() {
            below += t.counts[k];
            o.sample(
                "fulcrum_worker_loop_seconds_bucket",
                &[("core", i.to_string()), ("le", (*bound as f64 / 1e9).to_string())],
                below,
            );
        }
        o.sample("fulcrum_worker_loop_seconds_bucket", &[("core", i.to_string()), ("le", "+Inf".into())], t.count());
        o.sample("fulcrum_worker_loop_seconds_sum", &core(i), t.sum_ns as f64 / 1e9);
        o.sample("fulcrum_worker_loop_seconds_count", &core(i), t.count());
    }
    o.family("fulcrum_drops_total", "counter", "Packets dropped, by reason.");
    for (i, c) in cores.iter().enumerate() {
        for r in DropReason::ALL {
            o.sample("fulcrum_drops_total", &[("core", i.to_string()), ("reason", r.name().into())], c.dropped(*r));
        }
    }
    o.family("fulcrum_l7_responses_total", "counter", "HTTP responses sent to clients, by status class.");
    for (i, c) in cores.iter().enumerate() {
        for (k, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            o.sample(
                "fulcrum_l7_responses_total",
                &[("core", i.to_string()), ("class", class.to_string())],
                c.l7.responses[k],
            );
        }
    }
    let mut total = CoreStats::default();
    for c in &cores {
        total.merge(c);
    }
    if let Some(h) = total.l7_latency_us.as_ref() {
        o.summary_us(
            "fulcrum_l7_request_duration_seconds",
            "From a request's head to its response's head, as the proxy saw it.",
            h,
        );
    }

    if let Some(s) = shared.as_ref() {
        let snap = s.snapshot.current();
        for (name, help, bytes) in [
            ("fulcrum_vip_packets_total", "Packets to a VIP port (client to service).", false),
            ("fulcrum_vip_bytes_total", "Bytes to a VIP port (client to service).", true),
        ] {
            o.family(name, "counter", help);
            for e in &snap.services {
                let c = total.per_vip.get(e.stat_id as usize).copied().unwrap_or_default();
                o.sample(name, &vip_labels(e), if bytes { c.bytes } else { c.packets });
            }
        }
        for (name, help, bytes) in [
            ("fulcrum_backend_packets_total", "Packets sent to an endpoint.", false),
            ("fulcrum_backend_bytes_total", "Bytes sent to an endpoint.", true),
        ] {
            o.family(name, "counter", help);
            for e in &snap.services {
                for b in &snap.backends[e.backends.start as usize..e.backends.end as usize] {
                    let c = total.per_backend.get(b.stat_id as usize).copied().unwrap_or_default();
                    let mut labels = vip_labels(e);
                    labels.push(("endpoint", SocketAddr::new(b.addr, b.port).to_string()));
                    o.sample(name, &labels, if bytes { c.bytes } else { c.packets });
                }
            }
        }
        o.family("fulcrum_snapshot_generation", "gauge", "Generation of the published snapshot.");
        o.sample("fulcrum_snapshot_generation", &[], s.snapshot.generation());
        o.family("fulcrum_worker_snapshot_generation", "gauge", "Generation each worker runs.");
        for (i, g) in s.running_generation.iter().enumerate() {
            o.sample("fulcrum_worker_snapshot_generation", &core(i), g.load(Ordering::Acquire));
        }
        o.family("fulcrum_vip_ports", "gauge", "VIP:port entries served.");
        o.sample("fulcrum_vip_ports", &[], snap.services.len());
    }
    o.family("fulcrum_snapshots_published_total", "counter", "Snapshots published to the workers.");
    o.sample("fulcrum_snapshots_published_total", &[], state.snapshots_published.load(Ordering::Relaxed));
    o.family(
        "fulcrum_snapshots_rejected_total",
        "counter",
        "Inputs that did not compile (the last snapshot kept serving).",
    );
    o.sample("fulcrum_snapshots_rejected_total", &[], state.snapshots_rejected.load(Ordering::Relaxed));
    o.family("fulcrum_objects_with_problems", "gauge", "Objects left out of the last snapshot (see Events and logs).");
    o.sample("fulcrum_objects_with_problems", &[], state.objects_with_problems.load(Ordering::Relaxed));
    o.family("fulcrum_snapshot_last_build_seconds", "gauge", "Translate and compile time of the last snapshot.");
    o.sample("fulcrum_snapshot_last_build_seconds", &[], state.last_build_us.load(Ordering::Relaxed) as f64 / 1e6);
    {
        let h = state.build_us.lock().unwrap_or_else(|e| e.into_inner());
        o.summary_us("fulcrum_snapshot_build_seconds", "Translate and compile time of snapshots.", &h);
    }
    {
        let h = state.publish_latency_us.lock().unwrap_or_else(|e| e.into_inner());
        o.summary_us("fulcrum_snapshot_publish_seconds", "From publish until every worker runs the snapshot.", &h);
    }
    if let Some(m) = &state.kube {
        o.family("fulcrum_kubernetes_connected", "gauge", "1 while every watch on the API server is up.");
        o.sample("fulcrum_kubernetes_connected", &[], u8::from(m.connected()));
        o.family("fulcrum_kubernetes_watch_events_total", "counter", "Watch events received.");
        o.sample("fulcrum_kubernetes_watch_events_total", &[], m.changes());
        o.family("fulcrum_kubernetes_watch_errors_total", "counter", "Watch errors (each followed by a retry).");
        o.sample("fulcrum_kubernetes_watch_errors_total", &[], m.errors());
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_dataplane::snapshot::Snapshot;
    use std::path::Path;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// `/neighbors`: each core's table as its worker last copied it, entries with their states.
    #[test]
    fn neighbors_render_per_core_as_json() {
        use fulcrum_dataplane::neigh::NeighborTable;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let boot = fulcrum_config::Bootstrap::load(&root.join("config/examples/bootstrap.yaml")).unwrap();
        let state = fulcrum_config::load_desired(&boot, &root.join("config/examples/lab/manifests.yaml")).unwrap();
        let shared = Shared::new(Arc::new(Snapshot::compile(&boot, &state, 1).unwrap()), 2);
        let mut t = NeighborTable::new(16);
        t.add_static("10.10.0.1".parse().unwrap(), [2, 0xf1, 0, 0, 0, 0xfe]);
        let be = t.index_of("10.10.0.11".parse().unwrap(), 5_000);
        t.learn("10.10.0.11".parse().unwrap(), [2, 0xf1, 0, 0, 2, 1], 5_000);
        t.use_ref(be, 5_200);
        t.index_of("fd00:10::12".parse().unwrap(), 5_300);
        shared.stats[1].lock().unwrap().neighbor_table = Arc::new(t.view(6_000));
        let control = ControlState::new(None);
        *control.shared.lock().unwrap() = Some(shared);
        let v: serde_json::Value = serde_json::from_str(&render_neighbors(&control)).unwrap();
        assert_eq!(v["cores"][0], serde_json::json!({"core": 0, "entries": []}));
        assert_eq!(
            v["cores"][1]["entries"],
            serde_json::json!([
                {"ip": "10.10.0.1", "mac": "02:f1:00:00:00:fe", "state": "permanent", "used_ms_ago": null},
                {"ip": "10.10.0.11", "mac": "02:f1:00:00:02:01", "state": "reachable", "used_ms_ago": 800},
                {"ip": "fd00:10::12", "mac": null, "state": "incomplete", "used_ms_ago": 700},
            ])
        );
    }

    /// /readyz: not before every worker runs a snapshot, ready then, not ready again once the
    /// workers drain for a stop (so that health checkers take the appliance out meanwhile).
    #[test]
    fn ready_once_every_worker_runs_a_snapshot_and_not_while_draining() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let boot = fulcrum_config::Bootstrap::load(&root.join("config/examples/bootstrap.yaml")).unwrap();
        let state = fulcrum_config::load_desired(&boot, &root.join("config/examples/lab/manifests.yaml")).unwrap();
        let shared = Shared::new(Arc::new(Snapshot::compile(&boot, &state, 3).unwrap()), 2);
        let control = ControlState::new(None);
        assert_eq!(control.ready(), Err("workers not started".into()));
        *control.shared.lock().unwrap() = Some(shared.clone());
        shared.running_generation[0].store(3, Ordering::Release);
        assert!(control.ready().unwrap_err().contains("1 worker(s) have not taken a snapshot"));
        shared.running_generation[1].store(3, Ordering::Release);
        assert_eq!(control.ready(), Ok("ok: snapshot 3 on 2 worker(s)".into()));
        shared.drain();
        assert!(control.ready().unwrap_err().starts_with("draining"), "{:?}", control.ready());
    }

    /// The lab's tables with some traffic counted, rendered, and read back by a Prometheus text
    /// parser; every sample line is also checked against the format by hand (the parser skips
    /// what it does not understand).
    #[test]
    fn metrics_parse_as_prometheus_text() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let boot = fulcrum_config::Bootstrap::load(&root.join("config/examples/bootstrap.yaml")).unwrap();
        let state = fulcrum_config::load_desired(&boot, &root.join("config/examples/lab/manifests.yaml")).unwrap();
        let snap = Snapshot::compile(&boot, &state, 7).unwrap();
        let web = snap.services.iter().find(|s| s.service.name == "web" && s.vip.is_ipv4()).unwrap().clone();
        let shared = Shared::new(Arc::new(snap), 2);
        {
            let mut c = shared.stats[1].lock().unwrap();
            c.resize(64, 256);
            c.per_vip[web.stat_id as usize].packets = 42;
            c.rx.packets = 1000;
            c.neighbors = 3;
            c.neighbors_capacity = 4096;
            c.neighbor_probes = 7;
            c.unanswered_syns = 4;
            c.passed_over = vec![("10.10.0.13".parse().unwrap(), 8080), ("fd00:10::13".parse().unwrap(), 8080)];
            let mut t = fulcrum_dataplane::neigh::NeighborTable::new(8);
            t.add_static("10.10.0.1".parse().unwrap(), [2, 0, 0, 0, 0, 1]);
            t.index_of("10.10.0.11".parse().unwrap(), 10);
            t.index_of("10.10.0.12".parse().unwrap(), 10);
            c.neighbor_table = Arc::new(t.view(20));
            c.loop_times.record(5_000);
            c.loop_times.record(50_000);
            c.loop_times.record(2_000_000_000);
            CoreStats::drop(&mut c, DropReason::NoBackend);
            let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap();
            h.record(250).unwrap();
            c.l7_latency_us = Some(h);
        }
        shared.running_generation[0].store(7, Ordering::Release);
        let state = ControlState::new(None);
        *state.shared.lock().unwrap() = Some(shared);
        state.build_us.lock().unwrap().record(1500).unwrap();
        let text = render_metrics(&state);

        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let find = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| s.value.clone())
        };
        use prometheus_parse::Value;
        assert!(matches!(find("fulcrum_rx_packets_total", &[("core", "1")]), Some(Value::Counter(v)) if v == 1000.0));
        assert!(matches!(find("fulcrum_neighbors", &[("core", "1")]), Some(Value::Gauge(v)) if v == 3.0));
        assert!(matches!(find("fulcrum_neighbors_capacity", &[("core", "1")]), Some(Value::Gauge(v)) if v == 4096.0));
        assert!(matches!(find("fulcrum_neighbor_probes_total", &[("core", "1")]), Some(Value::Counter(v)) if v == 7.0));
        assert!(matches!(find("fulcrum_unanswered_syns_total", &[("core", "1")]), Some(Value::Counter(v)) if v == 4.0));
        for endpoint in ["10.10.0.13:8080", "[fd00:10::13]:8080"] {
            let passed_over = find("fulcrum_backend_passed_over", &[("core", "1"), ("endpoint", endpoint)]);
            assert!(matches!(passed_over, Some(Value::Gauge(v)) if v == 1.0), "{endpoint}: {passed_over:?}");
        }
        assert!(find("fulcrum_backend_passed_over", &[("core", "0")]).is_none());
        let entries = |state| find("fulcrum_neighbor_entries", &[("core", "1"), ("state", state)]);
        assert!(matches!(entries("incomplete"), Some(Value::Gauge(v)) if v == 2.0));
        assert!(matches!(entries("permanent"), Some(Value::Gauge(v)) if v == 1.0));
        assert!(matches!(entries("reachable"), Some(Value::Gauge(v)) if v == 0.0));
        assert!(
            matches!(find("fulcrum_neighbor_failures_total", &[("core", "1")]), Some(Value::Counter(v)) if v == 0.0)
        );
        assert!(matches!(
            find("fulcrum_drops_total", &[("core", "1"), ("reason", "no_backend")]),
            Some(Value::Counter(v)) if v == 1.0
        ));
        assert!(matches!(
            find("fulcrum_vip_packets_total", &[("service", "lab/web"), ("vip", "10.20.0.10"), ("protocol", "TCP")]),
            Some(Value::Counter(v)) if v == 42.0
        ));
        assert!(matches!(find("fulcrum_snapshot_generation", &[]), Some(Value::Gauge(v)) if v == 7.0));
        match find("fulcrum_l7_request_duration_seconds", &[]) {
            Some(Value::Summary(q)) => {
                let p50 = q.iter().find(|c| c.quantile == 0.5).unwrap().count;
                assert!((p50 - 0.00025).abs() < 0.00001, "{p50}");
            }
            other => panic!("latency summary: {other:?}"),
        }
        match find("fulcrum_worker_loop_seconds", &[("core", "1")]) {
            Some(Value::Histogram(b)) => {
                let at = |le: f64| b.iter().find(|c| c.less_than == le).unwrap().count;
                assert_eq!((at(0.00001), at(0.0001), at(0.1), at(f64::INFINITY)), (1.0, 2.0, 2.0, 3.0), "{b:?}");
            }
            other => panic!("loop histogram: {other:?}"),
        }
        assert!(scrape.docs.contains_key("fulcrum_backend_bytes_total"));

        // By hand: names, label syntax, a float value, and a TYPE before each family's samples.
        let mut typed = std::collections::HashSet::new();
        let mut samples = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                typed.insert(it.next().unwrap().to_string());
                assert!(matches!(it.next(), Some("counter" | "gauge" | "summary" | "histogram")), "{line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            samples += 1;
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !name.starts_with(|c: char| c.is_ascii_digit()),
                "{line}"
            );
            let family = name.trim_end_matches("_sum").trim_end_matches("_count").trim_end_matches("_bucket");
            assert!(typed.contains(name) || typed.contains(family), "no TYPE before {line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        assert!(samples > 100, "{samples} samples");
    }
}
