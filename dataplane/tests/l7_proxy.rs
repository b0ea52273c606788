//! The L7 proxy with real TCP on both sides, in memory: clients and backends are smoltcp stacks
//! of their own, IP packets go between them and the proxy by destination address, as the
//! worker would carry them. Checks routing, streaming, keep-alive reuse, error statuses and
//! timeouts.

use fulcrum_config::ingress::{HostMatch, L7Backend, L7Certificate, L7Host, L7Path, L7State, PathType};
use fulcrum_config::model::ObjectRef;
use fulcrum_dataplane::l7::access_log::{AccessLog, Reader};
use fulcrum_dataplane::l7::http::Limits;
use fulcrum_dataplane::l7::proxy::{Proxy, ProxyConfig, ProxyStats};
use fulcrum_dataplane::l7::router::Router;
use fulcrum_dataplane::l7::sim::{is_pure_ack, response_complete, tcp_syn, Backend, Host, TlsClient};
use rustls::pki_types::pem::PemObject;
use smoltcp::iface::SocketHandle;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

const L7: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
const OWN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 10);
const BE1: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
const BE2: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 12);

fn route(host: &str, path: &str, backends: &[SocketAddr]) -> L7Host {
    L7Host {
        host: if host.is_empty() { HostMatch::Any } else { HostMatch::Exact(host.into()) },
        paths: vec![L7Path {
            path: path.into(),
            path_type: PathType::Prefix,
            backend: L7Backend {
                service: ObjectRef { namespace: "shop".into(), name: "web".into() },
                port: Some(80),
                unresolved: None,
                endpoints: backends.to_vec(),
            },
            ingress: ObjectRef { namespace: "shop".into(), name: "i".into() },
        }],
        ..Default::default()
    }
}

struct Lab {
    proxy: Proxy,
    client: Host,
    backends: Vec<Backend>,
    now: u64,
    /// Hosts taken off the link: packets to and from them are lost (no RST, no ICMP).
    cut: Vec<Ipv4Addr>,
    /// Ticks that backends' packets take to reach the proxy (a slow upstream), and those on
    /// their way: (tick due, packet).
    backend_latency: u64,
    from_backends: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// Segments the proxy sent with no data and only ACK set: to the client, to backends.
    pure_acks: (usize, usize),
}

impl Lab {
    fn new(hosts: Vec<L7Host>, limits: Limits) -> Lab {
        Lab::with_config(hosts, limits, |_| {})
    }

    /// `new` with the proxy's configuration changed by `adjust` first.
    fn with_config(hosts: Vec<L7Host>, limits: Limits, adjust: impl FnOnce(&mut ProxyConfig)) -> Lab {
        let router = Arc::new(Router::compile(&L7State { hosts, ..Default::default() }));
        let mut cfg = ProxyConfig {
            l7_addr: L7,
            http_ports: vec![80],
            https_ports: vec![443],
            own_addr: OWN,
            upstream_ports: (60000, 60999),
            limits,
            max_connections: 1000,
            header_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            upstream_timeout_ms: 3_000,
            idle_timeout_ms: 10_000,
            socket_buffer: 8192,
            mtu: 1500,
            seed: 42,
        };
        adjust(&mut cfg);
        let mut proxy = Proxy::new(cfg, router);
        proxy.set_tls(tls_config());
        Lab {
            proxy,
            client: Host::new(CLIENT, 7),
            backends: vec![Backend::new(BE1, "be1"), Backend::new(BE2, "be2")],
            now: 1,
            cut: vec![],
            backend_latency: 0,
            from_backends: Default::default(),
            pure_acks: (0, 0),
        }
    }

    /// One round: every host polls, packets are carried to their destinations.
    fn tick(&mut self) {
        self.now += 1;
        let now = self.now;
        self.client.poll(now);
        for b in &mut self.backends {
            b.host.poll(now);
            b.serve();
            b.host.poll(now);
        }
        let client_lost = self.cut.contains(&self.client.addr);
        let mut to_proxy: Vec<Vec<u8>> = self.client.dev.tx.drain(..).filter(|_| !client_lost).collect();
        for b in &mut self.backends {
            let lost = self.cut.contains(&b.host.addr);
            let due = now + self.backend_latency;
            self.from_backends.extend(b.host.dev.tx.drain(..).filter(|_| !lost).map(|p| (due, p)));
        }
        while self.from_backends.front().is_some_and(|(due, _)| *due <= now) {
            to_proxy.push(self.from_backends.pop_front().unwrap().1);
        }
        for p in &to_proxy {
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let dport = u16::from_be_bytes([p[22], p[23]]);
            if self.proxy.wants(dst, dport) {
                let _ = self.proxy.ingress(p, now);
            }
        }
        let mut out = Vec::new();
        self.proxy.run(now, |p| out.push(p.to_vec()));
        for p in out {
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if is_pure_ack(&p) {
                if dst == self.client.addr {
                    self.pure_acks.0 += 1;
                } else {
                    self.pure_acks.1 += 1;
                }
            }
            if dst == self.client.addr {
                if !client_lost {
                    self.client.dev.rx.push_back(p);
                }
            } else if let Some(b) = self.backends.iter_mut().find(|b| b.host.addr == dst && !self.cut.contains(&dst)) {
                b.host.dev.rx.push_back(p);
            }
        }
    }

    /// Ticks until the clock reads `t`.
    fn run_until(&mut self, t: u64) {
        while self.now < t {
            self.tick();
        }
    }

    /// Ticks for `ms` and returns how many connection steps the proxy ran meanwhile.
    fn steps_during(&mut self, ms: u64) -> u64 {
        let before = self.proxy.stats.steps;
        self.run_until(self.now + ms);
        self.proxy.stats.steps - before
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        self.client.connect((L7, 80), port, 65536)
    }

    /// A TLS exchange on a new connection to port 443: the handshake for `sni`, then `req`;
    /// returns the certificate the server showed (its DER) and the response.
    fn tls_exchange(&mut self, local_port: u16, sni: &str, req: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let tls = TlsClient::new(&std::fs::read(fixture("ca.crt")).unwrap(), sni);
        let (cert, got, _) = self.tls_exchange_with(local_port, tls, req);
        (cert, got)
    }

    /// As `tls_exchange`, with a given client; also returns it (version, resumption).
    fn tls_exchange_with(&mut self, local_port: u16, mut tls: TlsClient, req: &[u8]) -> (Vec<u8>, Vec<u8>, TlsClient) {
        let h = self.client.connect((L7, 443), local_port, 65536);
        tls.send(req);
        let mut got = Vec::new();
        for _ in 0..2000 {
            tls.pump(self.client.tcp(h), &mut got);
            if complete(&got) {
                break;
            }
            self.tick();
        }
        let cert = tls.conn.peer_certificates().map(|c| c[0].to_vec()).unwrap_or_default();
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN http/1.1");
        (cert, got, tls)
    }

    /// The client ends the TLS connection `tls_exchange_with` made from `local_port`:
    /// close_notify first when `notify`, then its FIN.
    fn tls_close(&mut self, local_port: u16, tls: &mut TlsClient, notify: bool) {
        let handles: Vec<SocketHandle> = self.client.sockets.iter().map(|(h, _)| h).collect();
        let h = handles
            .into_iter()
            .find(|&h| self.client.tcp(h).local_endpoint().is_some_and(|e| e.port == local_port))
            .expect("the connection's socket");
        if notify {
            tls.conn.send_close_notify();
        }
        tls.pump(self.client.tcp(h), &mut Vec::new());
        self.client.tcp(h).close();
    }

    /// Sends `req` on `h` and reads until `done(response so far)` or `ticks` rounds pass.
    fn exchange(&mut self, h: SocketHandle, req: &[u8], ticks: usize, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        for _ in 0..ticks {
            let s = self.client.tcp(h);
            if sent < req.len() && s.may_send() {
                sent += s.send_slice(&req[sent..]).unwrap();
            }
            if s.can_recv() {
                s.recv(|d| {
                    got.extend_from_slice(d);
                    (d.len(), ())
                })
                .unwrap();
            }
            if done(&got) {
                break;
            }
            self.tick();
        }
        got
    }
}

fn complete(resp: &[u8]) -> bool {
    response_complete(resp).is_some()
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

fn certificate(name: &str, hosts: &[&str]) -> L7Certificate {
    L7Certificate {
        secret: ObjectRef { namespace: "shop".into(), name: format!("{name}-tls") },
        hosts: hosts.iter().map(|h| fulcrum_config::ingress::parse_host(h).unwrap()).collect(),
        cert_pem: std::fs::read(fixture(&format!("{name}.crt"))).unwrap(),
        key_pem: std::fs::read(fixture(&format!("{name}.key"))).unwrap(),
    }
}

fn tls_config() -> Option<Arc<rustls::ServerConfig>> {
    let (cfg, warnings) = fulcrum_dataplane::l7::tls::server_config(&[
        certificate("shop", &["shop.example", "*.shop.example"]),
        certificate("other", &["other.example"]),
    ]);
    assert!(warnings.is_empty(), "{warnings:?}");
    cfg
}

fn eps() -> Vec<SocketAddr> {
    vec![SocketAddr::new(BE1.into(), 8080), SocketAddr::new(BE2.into(), 8080)]
}

#[test]
fn requests_are_routed_streamed_and_upstreams_reused() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let h = lab.connect(40000);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        let req = format!("GET /item/{i} HTTP/1.1\r\nHost: shop.example\r\n\r\n");
        let resp = lab.exchange(h, req.as_bytes(), 200, complete);
        let text = String::from_utf8_lossy(&resp).to_string();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "request {i}: {text:?}");
        assert!(text.contains(&format!("GET /item/{i} HTTP/1.1")), "{text}");
        assert!(text.contains("X-Forwarded-For: 10.10.0.10"), "{text}");
        seen.insert(text.split("\r\n\r\n").nth(1).unwrap()[..3].to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["be1", "be2"], "both endpoints used");
    let st = lab.proxy.stats;
    assert_eq!(st.requests, 10);
    assert_eq!(st.responses[0], 10);
    assert!(st.upstream_connects <= 4 && st.upstream_reused >= 6, "kept-alive upstreams reused: {st:?}");
    assert_eq!(lab.proxy.client_count(), 1, "one keep-alive client connection");
    // A handful of sockets: one 2 MiB chunk of receive buffers and one of transmit buffers.
    assert_eq!(lab.proxy.stack.buffer_bytes(), 2 * (2 << 20));
    // The gauges for /metrics: between requests every upstream is pooled.
    let mut g = ProxyStats::default();
    lab.proxy.fill_gauges(&mut g);
    assert_eq!(g.clients_open, 1, "{g:?}");
    assert!((1..=4).contains(&g.upstreams_open) && g.upstreams_idle == g.upstreams_open, "{g:?}");
    assert_eq!(g.sockets, 1 + g.upstreams_open, "{g:?}");
    assert_eq!(g.socket_buffer_bytes, 2 * (2 << 20));
    // Every request answered and read, every response acknowledged: no ring holds bytes, no
    // socket holds a buffer.
    lab.run_until(lab.now + 50);
    lab.proxy.fill_gauges(&mut g);
    assert_eq!(g.socket_buffers_lent, 0, "{g:?}");
}

/// `max_connections`: a SYN past the limit is dropped and counted, the connections open are
/// served as before, and once one closes the waiting client's next SYN (its own
/// retransmission) gets in and is served.
#[test]
fn syns_past_max_connections_wait_until_a_connection_closes() {
    let mut lab = Lab::with_config(vec![route("shop.example", "/", &eps())], Limits::default(), |c| {
        c.max_connections = 2;
    });
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    let (a, b) = (lab.connect(40500), lab.connect(40501));
    for h in [a, b] {
        assert!(lab.exchange(h, req, 200, complete).starts_with(b"HTTP/1.1 200"));
    }
    let c = lab.connect(40502);
    lab.run_until(lab.now + 100);
    assert_eq!(lab.client.tcp(c).state(), smoltcp::socket::tcp::State::SynSent, "not accepted");
    assert_eq!(lab.proxy.stats.connections_over_limit, 1, "its SYN dropped and counted");
    assert_eq!(lab.proxy.client_count(), 2);
    assert!(lab.exchange(a, req, 200, complete).starts_with(b"HTTP/1.1 200"), "the open ones go on");
    lab.client.tcp(a).close();
    lab.run_until(lab.now + 100);
    assert_eq!(lab.proxy.client_count(), 1, "the closed one went");
    // smoltcp sends its SYN again 1 s, then 2 s more, after the first.
    let resp = lab.exchange(c, req, 4000, complete);
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    assert!(lab.proxy.stats.connections_over_limit >= 1);
    assert_eq!(lab.proxy.stats.connections, 3);
}

/// A SYN to the L7 address's port 80 from `src:sport` that no host will follow up (spoofed):
/// the proxy's SYN-ACK goes nowhere.
fn spoofed_syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    tcp_syn((src, sport), (L7, 80))
}

/// At `max_connections`, a new connection takes the place of the oldest one still in its
/// handshake (a spoofed SYN's), not of an established one; with none in a handshake, the SYN
/// is dropped. So spoofed SYNs cannot keep a real client out.
#[test]
fn at_max_connections_the_oldest_handshake_makes_room() {
    let mut lab = Lab::with_config(vec![route("shop.example", "/", &eps())], Limits::default(), |c| {
        c.max_connections = 3;
    });
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    let a = lab.connect(40600);
    assert!(lab.exchange(a, req, 200, complete).starts_with(b"HTTP/1.1 200"));
    let now = lab.now;
    let spoofer = Ipv4Addr::new(198, 51, 100, 7);
    for port in [1000, 1001] {
        lab.proxy.ingress(&spoofed_syn(spoofer, port), now).unwrap();
    }
    assert_eq!(lab.proxy.client_count(), 3, "at the limit: one established, two in their handshake");
    // A real client gets in, in the place of the first spoofed SYN; then another, in the
    // place of the second.
    for (i, port) in [40601, 40602].into_iter().enumerate() {
        let h = lab.connect(port);
        let resp = lab.exchange(h, req, 200, complete);
        assert!(resp.starts_with(b"HTTP/1.1 200"), "client {i}: {}", String::from_utf8_lossy(&resp));
        assert_eq!(lab.proxy.stats.handshakes_evicted, i as u64 + 1);
        assert_eq!(lab.proxy.client_count(), 3);
    }
    assert_eq!(lab.proxy.stats.connections_over_limit, 0);
    // All three established: a spoofed SYN now is dropped, and the three go on.
    let now = lab.now;
    let refused = lab.proxy.ingress(&spoofed_syn(spoofer, 1002), now);
    assert_eq!(refused, Err(fulcrum_dataplane::stats::DropReason::L7ConnectionLimit));
    assert_eq!((lab.proxy.stats.connections_over_limit, lab.proxy.stats.handshakes_evicted), (1, 2));
    assert!(lab.exchange(a, req, 200, complete).starts_with(b"HTTP/1.1 200"), "the first client goes on");
}

/// `drain` (a graceful stop): a connection idle between requests is closed at once, the
/// request under way is answered in full with `Connection: close` and its connection closed
/// after it, and new connections are refused; once the clients close their side, none is left.
#[test]
fn drain_closes_idle_connections_finishes_the_request_under_way_and_refuses_new_ones() {
    use smoltcp::socket::tcp::State;
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    let idle = lab.connect(40700);
    assert!(lab.exchange(idle, req, 200, complete).starts_with(b"HTTP/1.1 200"));
    // The busy client's request waits 30 ms at the backend.
    lab.backend_latency = 30;
    let busy = lab.connect(40701);
    while lab.client.tcp(busy).state() != State::Established {
        lab.tick();
    }
    lab.client.tcp(busy).send_slice(req).unwrap();
    for _ in 0..10 {
        lab.tick();
    }
    assert!(!lab.client.tcp(busy).can_recv(), "no response yet");
    let mut g = ProxyStats::default();
    lab.proxy.fill_gauges(&mut g);
    assert!(g.upstreams_idle >= 1, "the idle client's upstream is pooled: {g:?}");
    lab.proxy.drain();
    assert!(lab.proxy.draining());
    lab.proxy.fill_gauges(&mut g);
    assert_eq!(g.upstreams_idle, 0, "pooled upstreams closed at once: {g:?}");
    let resp = lab.exchange(busy, b"", 200, complete);
    let text = String::from_utf8_lossy(&resp).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    for _ in 0..20 {
        lab.tick();
    }
    for (name, h) in [("idle", idle), ("busy", busy)] {
        assert_eq!(lab.client.tcp(h).state(), State::CloseWait, "{name}: the proxy closed its side");
    }
    let now = lab.now;
    assert_eq!(
        lab.proxy.ingress(&spoofed_syn(Ipv4Addr::new(10, 10, 0, 10), 40702), now),
        Err(fulcrum_dataplane::stats::DropReason::L7Draining),
        "a new connection is refused"
    );
    lab.client.tcp(idle).close();
    lab.client.tcp(busy).close();
    for _ in 0..50 {
        lab.tick();
    }
    assert_eq!(lab.proxy.client_count(), 0, "every client connection ended");
    lab.proxy.fill_gauges(&mut g);
    assert_eq!((g.upstreams_open, g.upstreams_idle), (0, 0), "the busy client's upstream was not pooled: {g:?}");
}

#[test]
fn pooled_upstreams_go_when_their_server_closes_them_or_they_idle_out() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let h = lab.connect(40100);
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    let run = |lab: &mut Lab| {
        for _ in 0..4 {
            let resp = lab.exchange(h, req, 200, complete);
            assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
        }
    };
    run(&mut lab);
    // The client's socket and a pooled upstream per backend.
    let with_pool = lab.proxy.stack.sockets_in_use();
    assert!(with_pool >= 2, "{with_pool} sockets: no pooled upstream");

    // The backends close their idle keep-alive connections (as servers do after their own
    // keep-alive timeout): each pooled upstream goes when its FIN arrives, long before the
    // proxy's idle timeout (10 s here), instead of waiting in CLOSE-WAIT.
    for b in &mut lab.backends {
        let open: Vec<_> = b
            .host
            .sockets
            .iter()
            .filter(|(_, s)| matches!(s, smoltcp::socket::Socket::Tcp(t) if t.state() == smoltcp::socket::tcp::State::Established))
            .map(|(h, _)| h)
            .collect();
        for h in open {
            b.host.tcp(h).close();
        }
    }
    for _ in 0..50 {
        lab.tick();
    }
    assert_eq!(lab.proxy.stack.sockets_in_use(), 1, "only the client's socket is left");
    let mut g = ProxyStats::default();
    lab.proxy.fill_gauges(&mut g);
    assert_eq!((g.clients_open, g.upstreams_open, g.upstreams_idle, g.sockets), (1, 0, 0, 1), "{g:?}");
    // New requests open new upstreams.
    let connects = lab.proxy.stats.upstream_connects;
    run(&mut lab);
    assert!(lab.proxy.stats.upstream_connects > connects, "closed upstreams were not reused");

    // Idle: the pooled upstreams stay through the idle timeout and go soon after it. (The
    // client's connection is closed at its own idle timeout too; its socket waits in
    // FIN-WAIT-2 for a client that never closes its half, so it is counted apart: see
    // `a_client_that_never_finishes_the_close_is_aborted`.)
    let pooled_at = lab.now;
    let upstream_sockets = |lab: &Lab| lab.proxy.stack.sockets_in_use() - lab.proxy.client_count();
    while lab.now < pooled_at + 9_500 {
        lab.tick();
    }
    assert!(upstream_sockets(&lab) >= 1, "pooled upstreams went before their idle timeout");
    while lab.now < pooled_at + 10_300 {
        lab.tick();
    }
    assert_eq!(upstream_sockets(&lab), 0, "pooled upstreams kept past their idle timeout");
}

/// The appliance stopping: every connection, the client's and the pooled upstreams, is reset
/// (a kernel does it for a process that exits), so neither side waits for its own timeout.
/// Before, backends kept the pooled connections half-open, and a restarted appliance's first
/// connection from the same port waited a second for its retransmission.
#[test]
fn stopping_resets_client_and_upstream_connections() {
    use smoltcp::socket::tcp::State;
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let h = lab.connect(40150);
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    for _ in 0..4 {
        let resp = lab.exchange(h, req, 200, complete);
        assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    }
    let established = |host: &Host| {
        host.sockets
            .iter()
            .filter(|(_, s)| matches!(s, smoltcp::socket::Socket::Tcp(t) if t.state() == State::Established))
            .count()
    };
    let upstreams: usize = lab.backends.iter().map(|b| established(&b.host)).sum();
    assert!(upstreams >= 2, "{upstreams} upstream connections");
    assert_eq!(established(&lab.client), 1);

    let mut out = Vec::new();
    lab.proxy.abort_all(lab.now, |p| out.push(p.to_vec()));
    assert_eq!(out.len(), upstreams + 1, "one segment per connection");
    for p in &out {
        let flags = p[20 + 13];
        assert_eq!(flags & 0x04, 0x04, "an RST: {flags:#x}");
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        if dst == lab.client.addr {
            lab.client.dev.rx.push_back(p.clone());
        } else {
            let b = lab.backends.iter_mut().find(|b| b.host.addr == dst).expect("a backend");
            b.host.dev.rx.push_back(p.clone());
        }
    }
    let now = lab.now + 1;
    lab.client.poll(now);
    for b in &mut lab.backends {
        b.host.poll(now);
    }
    assert_eq!(established(&lab.client), 0, "the client's connection was reset");
    assert_eq!(lab.backends.iter().map(|b| established(&b.host)).sum::<usize>(), 0, "upstreams were reset");
    assert_eq!(lab.client.tcp(h).state(), State::Closed);
}

#[test]
fn a_client_that_never_finishes_the_close_is_aborted() {
    // A keep-alive client idles out: the proxy closes (FIN). The client acknowledges it but
    // never closes its own half (its socket sits in CLOSE-WAIT, as a buggy or hostile client's
    // would), leaving the proxy's socket in FIN-WAIT-2. It must not stay there for ever.
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let h = lab.connect(40200);
    let resp = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", 200, complete);
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    let start = lab.now;
    while lab.client.tcp(h).state() != smoltcp::socket::tcp::State::CloseWait {
        assert!(lab.now - start < 11_000, "not closed at the idle timeout (10 s)");
        lab.tick();
    }
    let closed_at = lab.now;
    while lab.proxy.client_count() > 0 {
        assert!(lab.now - closed_at < 61_000, "the proxy still holds the connection 61 s after closing it");
        lab.tick();
    }
    assert!(lab.now - closed_at >= 59_000, "aborted early, {} ms after the close", lab.now - closed_at);
    for _ in 0..10 {
        lab.tick();
    }
    assert_eq!(lab.client.tcp(h).state(), smoltcp::socket::tcp::State::Closed, "the client got the RST");
}

#[test]
fn heads_that_straddle_the_end_of_a_socket_ring_are_read_whole() {
    // 600 requests one after another on one connection, through 8 KiB socket rings: request
    // heads (client side) and response heads (upstream side) land across the rings' ends many
    // times. Each must be answered in a few ticks; a head read only up to the ring's end looked
    // incomplete and waited for the once-a-second sweep (1,000 ticks).
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40002);
    for i in 0..600 {
        let req = format!("GET /item/{i}?pad={} HTTP/1.1\r\nHost: shop.example\r\n\r\n", "p".repeat(i % 37));
        let before = lab.now;
        let resp = lab.exchange(h, req.as_bytes(), 1500, complete);
        assert!(resp.starts_with(b"HTTP/1.1 200 OK"), "request {i}: {:?}", String::from_utf8_lossy(&resp));
        assert!(lab.now - before < 20, "request {i} took {} ticks", lab.now - before);
    }
}

/// A POST of 200 KiB (the sim backends echo it back), and its body.
fn upload_200k() -> (Vec<u8>, Vec<u8>) {
    let body: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let mut req = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    (req, body)
}

#[test]
fn a_large_body_streams_through_small_buffers() {
    let mut lab = Lab::new(vec![route("", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40001);
    // 200 KiB through 8 KiB socket buffers: it can only pass by streaming.
    let (req, body) = upload_200k();
    let resp = lab.exchange(h, &req, 20_000, complete);
    assert!(resp.starts_with(b"HTTP/1.1 200 OK"), "{:?}", String::from_utf8_lossy(&resp[..resp.len().min(200)]));
    assert!(resp.ends_with(&body), "the echoed body came back whole");
    // Each side's window is 8 KiB and every tick is a round trip: 400 KiB in and out takes
    // ~50 ticks when a poll sends all a window allows (it took 307 when smoltcp was asked for
    // one segment per socket per poll and the rest waited for an ACK or the next millisecond).
    assert!(lab.now < 120, "{} ms for 200 KiB each way", lab.now);
}

#[test]
fn errors_made_by_the_proxy() {
    let mut lab = Lab::new(
        vec![
            route("shop.example", "/", &eps()),
            route("empty.example", "/", &[]),
            route("dead.example", "/", &[SocketAddr::new(Ipv4Addr::new(10, 10, 0, 99).into(), 8080)]),
        ],
        Limits { max_header_bytes: 1024, ..Limits::default() },
    );
    let cases: &[(&str, &str)] = &[
        ("GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n", "HTTP/1.1 404 "),
        ("GET / HTTP/1.1\r\nHost: empty.example\r\n\r\n", "HTTP/1.1 503 "),
        ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400 "),
        (
            "POST / HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
    ];
    for (i, (req, want)) in cases.iter().enumerate() {
        let h = lab.connect(41000 + i as u16);
        let resp = lab.exchange(h, req.as_bytes(), 300, complete);
        assert!(String::from_utf8_lossy(&resp).starts_with(want), "{req:?}: {:?}", String::from_utf8_lossy(&resp));
    }
    // Oversized headers: 431.
    let h = lab.connect(41100);
    let big = format!("GET / HTTP/1.1\r\nHost: shop.example\r\nX: {}\r\n\r\n", "v".repeat(2000));
    let resp = lab.exchange(h, big.as_bytes(), 300, complete);
    assert!(resp.starts_with(b"HTTP/1.1 431 "), "{:?}", String::from_utf8_lossy(&resp));
    // A slow client that never finishes its head: 408 after the header timeout.
    let h = lab.connect(41101);
    let resp = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: sho", 3_000, complete);
    assert!(resp.starts_with(b"HTTP/1.1 408 "), "{:?}", String::from_utf8_lossy(&resp));
    assert!(lab.now >= 2_000, "not before the timeout");
    // An endpoint nobody answers for: 504 after the upstream timeout.
    let h = lab.connect(41102);
    let resp = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: dead.example\r\n\r\n", 5_000, complete);
    assert!(
        resp.starts_with(b"HTTP/1.1 504 ") || resp.starts_with(b"HTTP/1.1 502 "),
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
}

#[test]
fn every_request_is_logged_once_with_its_outcome() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let (ring, mut events) = rtrb::RingBuffer::new(1 << 16);
    lab.proxy.set_access_log(AccessLog::new(ring, std::time::Instant::now()));
    let (mut reader, mut records) = (Reader::new(2), std::collections::VecDeque::new());
    let mut next = || {
        reader.drain(&mut events, |r| records.push_back(r.clone()));
        records.pop_front()
    };
    let client = |port| Some(SocketAddrV4::new(CLIENT, port));
    let h = lab.connect(40000);
    let got = lab.exchange(h, b"GET /item?x=1 HTTP/1.1\r\nHost: shop.example:80\r\n\r\n", 300, complete);
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{:?}", String::from_utf8_lossy(&got));
    let r = next().expect("the 200's record");
    assert_eq!((&r.method[..], &r.host[..], &r.target[..]), (&b"GET"[..], &b"shop.example:80"[..], &b"/item?x=1"[..]));
    assert_eq!((r.core, r.client, r.tls, r.status, r.resends, r.cut), (2, client(40000), false, 200, 0, false));
    assert_eq!(r.bytes_sent, got.len() as u64, "head and body, as the client got them");
    assert!(r.upstream.is_some_and(|u| [BE1, BE2].contains(u.ip()) && u.port() == 8080), "{:?}", r.upstream);
    // Answered here, on the same connection: no upstream.
    let got = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n", 300, complete);
    assert!(got.starts_with(b"HTTP/1.1 404 "));
    let r = next().expect("the 404's record");
    assert_eq!(
        (r.status, r.upstream, r.bytes_sent, &r.host[..]),
        (404, None, got.len() as u64, &b"nowhere.example"[..])
    );
    // A head that never comes whole: 408, with no request to show.
    let h = lab.connect(40001);
    let got = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: sho", 3_000, complete);
    assert!(got.starts_with(b"HTTP/1.1 408 "));
    let r = next().expect("the 408's record");
    assert_eq!((r.status, r.method.len(), r.target.len(), r.client), (408, 0, 0, client(40001)));
    // The client goes while its request waits for a slow backend: status 0, nothing sent.
    lab.backend_latency = 100;
    let h = lab.connect(40002);
    let got = lab.exchange(h, b"GET /slow HTTP/1.1\r\nHost: shop.example\r\n\r\n", 20, |_| false);
    assert!(got.is_empty());
    assert!(next().is_none(), "nothing before the request is over");
    lab.client.tcp(h).abort();
    lab.run_until(lab.now + 300);
    let r = next().expect("the abandoned request's record");
    assert_eq!((r.status, r.bytes_sent, &r.target[..]), (0, 0, &b"/slow"[..]));
    assert!(r.upstream.is_some(), "it had gone upstream");
    assert!(next().is_none(), "one record per request");
    let mut st = ProxyStats::default();
    lab.proxy.fill_gauges(&mut st);
    assert_eq!((st.access_log_records, st.access_log_dropped), (4, 0));
}

#[test]
fn tls_by_sni_with_alpn_and_the_default_certificate() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()), route("", "/", &eps())], Limits::default());
    let shop = rustls::pki_types::CertificateDer::from_pem_file(fixture("shop.crt")).unwrap().to_vec();
    let other = rustls::pki_types::CertificateDer::from_pem_file(fixture("other.crt")).unwrap().to_vec();
    let (cert, resp) = lab.tls_exchange(42000, "shop.example", b"GET /secure HTTP/1.1\r\nHost: shop.example\r\n\r\n");
    assert_eq!(cert, shop, "the certificate for the SNI name");
    let text = String::from_utf8_lossy(&resp).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK") && text.contains("GET /secure HTTP/1.1"), "{text}");
    let (cert, _) = lab.tls_exchange(42001, "other.example", b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n");
    assert_eq!(cert, other);
    let (cert, _) = lab.tls_exchange(42002, "api.shop.example", b"GET / HTTP/1.1\r\nHost: api.shop.example\r\n\r\n");
    assert_eq!(cert, shop, "one-label wildcard");
}

#[test]
fn plain_http_to_a_tls_host_is_redirected() {
    let mut host = route("shop.example", "/", &eps());
    host.ssl_redirect = true;
    let mut lab = Lab::new(vec![host], Limits::default());
    let h = lab.connect(43000);
    let resp = lab.exchange(h, b"GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\n\r\n", 300, complete);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 308 ") && text.contains("Location: https://shop.example/a?b=1\r\n"), "{text}");
}

#[test]
fn tls_1_2_and_resumption() {
    let mut lab = Lab::new(vec![route("", "/", &eps())], Limits::default());
    let ca = std::fs::read(fixture("ca.crt")).unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    // TLS 1.2 only.
    let cfg12 = TlsClient::config(&ca, &[&rustls::version::TLS12]);
    let (_, resp, c) = lab.tls_exchange_with(44000, TlsClient::with_config(cfg12, "shop.example"), req);
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&resp));
    assert_eq!(c.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    // TLS 1.3: a second connection with the same client config resumes (a ticket).
    let cfg = TlsClient::config(&ca, &[&rustls::version::TLS13]);
    let (_, _, c) = lab.tls_exchange_with(44001, TlsClient::with_config(cfg.clone(), "shop.example"), req);
    assert_eq!(c.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let (_, resp, c) = lab.tls_exchange_with(44002, TlsClient::with_config(cfg, "shop.example"), req);
    assert!(resp.starts_with(b"HTTP/1.1 200"));
    assert_eq!(c.conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "resumed from a ticket");
    let tls = lab.proxy.stats.tls;
    assert_eq!((tls.handshakes, tls.resumed, tls.failures), (3, 1, 0), "{tls:?}");
}

/// A client that speaks no TLS to port 443 gets an alert and is counted as a failure, not as
/// a handshake; a good client after it is unaffected.
#[test]
fn tls_failures_are_counted() {
    let mut lab = Lab::new(vec![route("", "/", &eps())], Limits::default());
    let h = lab.client.connect((L7, 443), 44100, 65536);
    let alert = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", 200, |r| !r.is_empty());
    assert_eq!(alert.first(), Some(&21), "a TLS alert record: {alert:?}");
    let tls = lab.proxy.stats.tls;
    assert_eq!((tls.handshakes, tls.failures), (0, 1), "{tls:?}");
    let (_, resp) = lab.tls_exchange(44101, "shop.example", b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n");
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&resp));
    let tls = lab.proxy.stats.tls;
    assert_eq!((tls.handshakes, tls.resumed, tls.failures), (1, 0, 1), "{tls:?}");
}

/// Active health checks from the proxy's stack: an HTTP check of a backend that answers passes;
/// a TCP check of a port nobody listens on fails (RST) and, after `fall` probes, is down; when
/// the targets change, probes of targets that stay keep their state.
#[test]
fn health_probes_mark_a_refusing_endpoint_down() {
    use fulcrum_config::model::HealthCheck;
    use fulcrum_dataplane::snapshot::HealthTarget;
    use std::net::SocketAddrV4;
    let mut lab = Lab::new(vec![], Limits::default());
    let check = |http: bool| HealthCheck {
        http_path: http.then(|| "/healthz".to_string()),
        interval_ms: 50,
        timeout_ms: 40,
        fall: 2,
        rise: 2,
    };
    let good = HealthTarget { endpoint: SocketAddrV4::new(BE1, 8080), check: check(true) };
    let refused = HealthTarget { endpoint: SocketAddrV4::new(BE2, 9999), check: check(false) };
    lab.proxy.set_health_targets(&[good.clone(), refused.clone()]);
    for _ in 0..10 {
        lab.tick();
    }
    assert!(lab.proxy.health_down().is_empty(), "one failure is not enough (fall 2)");
    // The second, confirming probe follows half an interval after the first.
    for _ in 0..30 {
        lab.tick();
    }
    assert_eq!(lab.proxy.health_down(), vec![refused.clone()]);
    for _ in 0..200 {
        lab.tick();
    }
    assert_eq!(lab.proxy.health_down(), vec![refused.clone()]);
    assert!(lab.backends[0].requests >= 3, "the HTTP check reached be1: {}", lab.backends[0].requests);
    assert!(lab.proxy.stats.health_probes >= 8 && lab.proxy.stats.health_failures >= 2, "{:?}", lab.proxy.stats);
    // The refused target stays down across a change of targets; a dropped one is forgotten.
    lab.proxy.set_health_targets(std::slice::from_ref(&refused));
    assert_eq!(lab.proxy.health_down(), vec![refused]);
    lab.proxy.set_health_targets(&[]);
    assert!(lab.proxy.health_down().is_empty());
}

/// A backend taken off the link (no RST: its probes time out) is down within two intervals of
/// the cut, whatever the probes' phase at that moment, with fall 2 and the default timeout
/// (interval / fall); put back, it is up again within two intervals (rise 2).
#[test]
fn a_dead_endpoint_is_down_within_two_intervals() {
    use fulcrum_config::model::HealthCheck;
    use fulcrum_dataplane::snapshot::HealthTarget;
    use std::net::SocketAddrV4;
    let interval = 100;
    let check = HealthCheck { http_path: None, interval_ms: interval, timeout_ms: interval / 2, fall: 2, rise: 2 };
    let target = HealthTarget { endpoint: SocketAddrV4::new(BE1, 8080), check };
    let mut worst = (0, 0);
    for phase in [0, 7, 23, 49, 50, 51, 76, 93, 99] {
        let mut lab = Lab::new(vec![], Limits::default());
        lab.proxy.set_health_targets(std::slice::from_ref(&target));
        for _ in 0..300 + phase {
            lab.tick();
        }
        assert!(lab.proxy.health_down().is_empty(), "be1 answers: up");
        lab.cut.push(BE1);
        let cut_at = lab.now;
        while lab.proxy.health_down().is_empty() && lab.now < cut_at + 1000 {
            lab.tick();
        }
        let down_after = lab.now - cut_at;
        assert!(down_after <= 2 * interval as u64, "phase {phase}: down {down_after} ms after the cut");
        lab.cut.clear();
        let back_at = lab.now;
        while !lab.proxy.health_down().is_empty() && lab.now < back_at + 1000 {
            lab.tick();
        }
        let up_after = lab.now - back_at;
        assert!(up_after <= 2 * interval as u64, "phase {phase}: up {up_after} ms after the link came back");
        worst = (worst.0.max(down_after), worst.1.max(up_after));
    }
    eprintln!("interval {interval} ms: worst down {} ms, worst up {} ms after the change", worst.0, worst.1);
}

#[test]
fn tls_connections_that_close_give_their_sockets_back() {
    // Each TLS connection: a handshake, one keep-alive request, then the client closes, as a
    // browser or `curl` does (FIN with or without close_notify). The proxy's sockets must go
    // with them once the close is acknowledged.
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    for i in 0..40u16 {
        let tls = TlsClient::new(&std::fs::read(fixture("ca.crt")).unwrap(), "shop.example");
        let (_, got, mut tls) = lab.tls_exchange_with(41000 + i, tls, req);
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        lab.tls_close(41000 + i, &mut tls, i % 2 == 0);
        for _ in 0..50 {
            lab.tick();
        }
        // What stays: the pooled keep-alive upstreams, one per backend at most.
        let live = lab.proxy.stack.sockets_in_use();
        assert!(live <= 2, "connection {i}: {live} proxy sockets alive");
    }
}

#[test]
fn a_client_that_vanishes_while_closing_does_not_keep_its_socket() {
    // The client sends its FIN and drops off the network (a phone out of coverage): the
    // proxy's FIN is never acknowledged. Its socket must not wait in LAST-ACK for ever: it is
    // aborted once the idle timeout (10 s here) has passed.
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let req = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    let tls = TlsClient::new(&std::fs::read(fixture("ca.crt")).unwrap(), "shop.example");
    let (_, got, mut tls) = lab.tls_exchange_with(42000, tls, req);
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    for _ in 0..50 {
        lab.tick();
    }
    let before = lab.proxy.stack.sockets_in_use();
    lab.tls_close(42000, &mut tls, true);
    lab.tick(); // the close_notify and FIN reach the proxy
    lab.cut.push(CLIENT);
    let start = lab.now;
    while lab.proxy.stack.sockets_in_use() >= before {
        assert!(lab.now - start < 12_000, "the proxy still holds the vanished client's socket");
        lab.tick();
    }
    assert!(lab.now - start >= 9_000, "aborted early, after {} ms", lab.now - start);
    eprintln!("socket freed {} ms after the client vanished", lab.now - start);
}

/// Sends a GET for `path` on `h` and returns how many ticks the exchange took.
fn timed_get(lab: &mut Lab, h: SocketHandle, path: &str) -> u64 {
    let start = lab.now;
    let req = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n");
    let resp = lab.exchange(h, req.as_bytes(), 200, complete);
    assert!(resp.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&resp));
    lab.now - start
}

/// A POST whose head and body the client writes apart (its Nagle's algorithm then holds the
/// body until the head is acknowledged); returns how many ticks the exchange took.
fn timed_post_in_two_writes(lab: &mut Lab, h: SocketHandle) -> u64 {
    for _ in 0..10 {
        if lab.client.tcp(h).may_send() {
            break;
        }
        lab.tick(); // a new connection's handshake
    }
    let start = lab.now;
    let head = b"POST /form HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(lab.client.tcp(h).send_slice(head).unwrap(), head.len());
    lab.tick();
    let resp = lab.exchange(h, b"hello", 200, complete);
    assert!(resp.ends_with(b"hello"), "{}", String::from_utf8_lossy(&resp));
    lab.now - start
}

#[test]
fn acks_ride_on_the_answers_once_a_connection_sends_whole_messages() {
    // One endpoint 5 ms away: a 1 ms delayed ACK fires before the answer could carry it.
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()[..1])], Limits::default());
    lab.backend_latency = 5;
    let h = lab.connect(40000);
    let mut alone = Vec::new();
    for i in 0..6 {
        let before = lab.pure_acks;
        timed_get(&mut lab, h, &format!("/item/{i}"));
        alone.push((lab.pure_acks.0 - before.0, lab.pure_acks.1 - before.1));
    }
    // The first exchange is quick on both sides (a connection's start); after it the request's
    // ACK rides on the response, and the response's on the next request upstream.
    assert!(alone[0].0 >= 1 && alone[0].1 >= 1, "quick at the start: {alone:?}");
    assert_eq!(alone[1..], [(0, 0); 5], "ACKs sent alone (to the client, to the backend) per request: {alone:?}");
    assert_eq!(lab.proxy.stats.upstream_connects, 1);
}

#[test]
fn a_request_in_pieces_makes_the_clients_acks_quick_for_good() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()[..1])], Limits::default());
    // On a new connection ACKs are quick: the head's ACK soon releases the body.
    let fresh = lab.connect(40000);
    let t = timed_post_in_two_writes(&mut lab, fresh);
    assert!(t <= 8, "a request in pieces on a new connection took {t} ticks");
    // After whole requests the proxy holds ACKs for the response to carry: the first request
    // in pieces waits for that delayed ACK (40 ms) once, and then ACKs are quick again.
    let h = lab.connect(40001);
    for i in 0..3 {
        let t = timed_get(&mut lab, h, &format!("/item/{i}"));
        assert!(t <= 8, "GET {i} took {t} ticks");
    }
    let first = timed_post_in_two_writes(&mut lab, h);
    assert!((30..=48).contains(&first), "the first request in pieces after whole ones took {first} ticks");
    for _ in 0..3 {
        let t = timed_post_in_two_writes(&mut lab, h);
        assert!(t <= 8, "a request in pieces after that took {t} ticks");
    }
}

#[test]
fn a_response_in_pieces_makes_the_upstreams_acks_quick_for_good() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()[..1])], Limits::default());
    // A backend that writes heads and bodies apart from the first response on: never held up.
    lab.backends[0].split_writes = true;
    let h = lab.connect(40000);
    for i in 0..4 {
        let t = timed_get(&mut lab, h, &format!("/split/{i}"));
        assert!(t <= 8, "GET {i} from a backend writing in pieces took {t} ticks");
    }
    // A fresh upstream connection whose responses come whole gets delayed ACKs, until the
    // backend starts writing in pieces: that response waits once, the next ones do not.
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40000);
    for i in 0..3 {
        let t = timed_get(&mut lab, h, &format!("/whole/{i}"));
        assert!(t <= 8, "GET {i} took {t} ticks");
    }
    lab.backends[0].split_writes = true;
    let first = timed_get(&mut lab, h, "/now-split");
    assert!((30..=48).contains(&first), "the first response in pieces took {first} ticks");
    for i in 0..3 {
        let t = timed_get(&mut lab, h, &format!("/split/{i}"));
        assert!(t <= 8, "GET {i} after that took {t} ticks");
    }
    assert_eq!(lab.proxy.stats.upstream_connects, 1, "one upstream connection throughout");
}

#[test]
fn a_stalled_response_costs_no_work_until_it_is_cut() {
    let mut lab = Lab::new(vec![route("", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40001);
    // A 200 KiB echo that the client never reads: once its window and the buffers on the way
    // are full, nothing moves.
    let (req, _) = upload_200k();
    let mut sent = 0;
    while sent < req.len() {
        let s = lab.client.tcp(h);
        if s.may_send() {
            sent += s.send_slice(&req[sent..]).unwrap();
        }
        lab.tick();
        assert!(lab.now < 5_000, "the request went out");
    }
    for _ in 0..500 {
        lab.tick();
    }
    assert_eq!(lab.proxy.client_count(), 1);
    // Past the upstream timeout (3 s) and up to the idle timeout (10 s) of no progress: a few
    // steps for zero-window probes and deadlines, not one a millisecond.
    let start = lab.now;
    let stalled_steps = lab.steps_during(9_000);
    assert!(stalled_steps < 100, "{stalled_steps} steps in 9 s of a stalled response");
    assert_eq!(lab.proxy.client_count(), 1, "still within the idle timeout");
    // Then the idle timeout ends it: cut, the upstream connection dropped with it.
    lab.run_until(start + 12_000);
    assert_eq!(lab.proxy.client_count(), 0, "a response stalled for the idle timeout is cut");
    assert_eq!(lab.proxy.stack.sockets_in_use(), 0, "neither its socket nor the upstream's is left");
}

#[test]
fn a_tunnel_lives_while_bytes_move_and_closes_after_the_idle_timeout() {
    let mut lab = Lab::new(vec![route("", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40001);
    let up = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let resp = lab.exchange(h, up, 200, |r| r.windows(4).any(|w| w == b"\r\n\r\n"));
    assert!(resp.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&resp));
    // A message every 6 s: past the upstream timeout (3 s) and, in all, the idle timeout
    // (10 s); each moves the deadline.
    let steps = lab.proxy.stats.steps;
    for i in 0..4 {
        let start = lab.now;
        lab.run_until(start + 6_000);
        let msg = format!("ping {i}");
        let echo = lab.exchange(h, msg.as_bytes(), 50, |r| r.ends_with(msg.as_bytes()));
        assert_eq!(echo, msg.as_bytes(), "message {i} after {} ms", lab.now - start);
    }
    let busy_steps = lab.proxy.stats.steps - steps;
    assert!(busy_steps < 200, "{busy_steps} steps for 4 messages over 24 s");
    // Then silence: closed once nothing has moved for the idle timeout (10 s), not before.
    let start = lab.now;
    lab.run_until(start + 9_000);
    assert!(lab.client.tcp(h).may_recv(), "still open 9 s into the silence");
    lab.run_until(start + 11_000);
    assert!(!lab.client.tcp(h).may_recv(), "closed by the proxy after 10 s of silence");
    lab.client.tcp(h).close();
    for _ in 0..10 {
        lab.tick();
    }
    assert_eq!(lab.proxy.client_count(), 0);
    assert_eq!(lab.proxy.stack.sockets_in_use(), 0, "the upstream connection went with it");
}

#[test]
fn idle_keep_alive_connections_cost_no_work_until_their_idle_timeout() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let conns: Vec<SocketHandle> = (0..50).map(|i| lab.connect(41000 + i)).collect();
    for (i, &h) in conns.iter().enumerate() {
        timed_get(&mut lab, h, &format!("/item/{i}"));
    }
    for _ in 0..100 {
        lab.tick(); // the last ACKs and delayed ACKs settle
    }
    let start = lab.now;
    // At most one look each, when the last request's upstream deadline (3 s) comes up and the
    // next wake is filed (deadlines are filed lazily); no sweep over every connection.
    let idle_steps = lab.steps_during(8_000);
    assert!(idle_steps <= 50, "{idle_steps} steps for 50 idle connections in 8 s");
    assert_eq!(lab.proxy.client_count(), 50);
    // Each is looked at again when its idle timeout (10 s after its request) is up: closed.
    lab.run_until(start + 10_000);
    assert!(conns.iter().all(|&h| !lab.client.tcp(h).may_recv()), "all closed by the proxy at the idle timeout");
}

#[test]
fn a_keep_alive_connection_holds_about_one_deadline_however_many_requests_it_carries() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let h = lab.connect(40000);
    for i in 0..200 {
        timed_get(&mut lab, h, &format!("/item/{i}"));
    }
    // Each request moves the connection's deadline two or three times (upstream timeout,
    // response progress, idle time), each 3-10 s out here; filing each would leave ~500 entries.
    assert_eq!(lab.proxy.deadline_entries(), 1, "one entry for the one connection");
    // And the deadlines still hold: closed when idle for the idle timeout.
    lab.run_until(lab.now + 10_500);
    assert!(!lab.client.tcp(h).may_recv(), "closed after 10 s idle");
    // Once the client closes its half too the connection goes, and its entry (for the
    // 60 s FIN timeout) with it, not 60 s later.
    lab.client.tcp(h).close();
    lab.run_until(lab.now + 200);
    assert_eq!(lab.proxy.client_count(), 0);
    assert_eq!(lab.proxy.deadline_entries(), 0, "the gone connection's entry was left");
}

#[test]
fn a_half_open_connection_is_dropped_without_a_look_every_millisecond() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    let _h = lab.connect(40000);
    lab.tick(); // the SYN arrives: the proxy makes the connection and answers SYN-ACK
    assert_eq!(lab.proxy.client_count(), 1);
    lab.cut.push(CLIENT); // ... which never comes back: half open
    let start = lab.now;
    let waiting_steps = lab.steps_during(3_900);
    assert!(waiting_steps < 20, "{waiting_steps} steps for one half-open connection in 3.9 s");
    assert_eq!(lab.proxy.client_count(), 1, "kept for twice the header timeout (2 s)");
    lab.run_until(start + 4_100);
    assert_eq!(lab.proxy.client_count(), 0, "dropped after twice the header timeout");
}

#[test]
fn an_upload_longer_than_the_upstream_timeout_goes_through_while_it_moves() {
    let mut lab = Lab::new(vec![route("", "/", &eps()[..1])], Limits::default());
    let h = lab.connect(40001);
    // 20 KiB, 1 KiB every 500 ms: 10 s of upload against an upstream timeout of 3 s.
    let body: Vec<u8> = (0..20 * 1024).map(|i| (i % 251) as u8).collect();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    // `exchange` sends all of its bytes before `done` is asked; it reads what came meanwhile.
    let mut got = lab.exchange(h, head.as_bytes(), 20, |_| false);
    for piece in body.chunks(1024) {
        lab.run_until(lab.now + 500);
        assert!(got.is_empty(), "answered mid-upload at {} ms: {}", lab.now, String::from_utf8_lossy(&got));
        got.extend(lab.exchange(h, piece, 5, |_| false));
    }
    assert!(lab.now > 10_000, "the upload took {} ms", lab.now);
    let mut resp = got;
    resp.extend(lab.exchange(h, b"", 200, complete));
    assert!(resp.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&resp[..resp.len().min(200)]));
    assert!(resp.ends_with(&body), "the echoed body came back whole");
}

#[test]
fn requests_beyond_the_upstream_ports_of_an_endpoint_get_503_and_are_counted() {
    // Two upstream ports on this core: two requests in flight to the one endpoint hold both.
    let mut lab = Lab::with_config(vec![route("", "/", &eps()[..1])], Limits::default(), |cfg| {
        cfg.upstream_ports = (60000, 60001)
    });
    lab.backend_latency = 200;
    let conns: Vec<SocketHandle> = (0..3).map(|i| lab.connect(40001 + i)).collect();
    for _ in 0..20 {
        lab.tick();
    }
    let get = b"GET /slow HTTP/1.1\r\nHost: shop.example\r\n\r\n";
    for &h in &conns[..2] {
        lab.exchange(h, get, 5, |_| false);
    }
    let third = lab.exchange(conns[2], get, 50, complete);
    assert!(third.starts_with(b"HTTP/1.1 503 "), "{}", String::from_utf8_lossy(&third));
    assert_eq!(lab.proxy.stats.upstream_ports_exhausted, 1);
    assert_eq!(lab.proxy.stats.upstream_connects, 2);
    // The two in flight are answered; then their ports serve the next requests (kept alive).
    for &h in &conns[..2] {
        let got = lab.exchange(h, b"", 1_000, complete);
        assert!(got.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&got));
    }
    let again = lab.exchange(conns[0], b"GET /again HTTP/1.1\r\nHost: shop.example\r\n\r\n", 1_000, complete);
    assert!(again.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&again));
    assert_eq!(lab.proxy.stats.upstream_ports_exhausted, 1);
    assert_eq!(lab.proxy.stats.upstream_connects, 2, "the held ports were reused, not new ones");
}

/// An endpoint that refuses connections (nothing listens on its port): the request goes to the
/// other endpoint and is answered, the refusing one is passed over by new requests for 10 s,
/// then tried again. With no other endpoint: 502.
#[test]
fn a_refused_connection_sends_the_request_to_another_endpoint() {
    let closed = SocketAddr::new(BE2.into(), 9);
    let mut lab = Lab::new(
        vec![
            route("shop.example", "/", &[SocketAddr::new(BE1.into(), 8080), closed]),
            route("closed.example", "/", &[closed]),
        ],
        Limits::default(),
    );
    let get = |lab: &mut Lab, h: SocketHandle, host: &str| {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        String::from_utf8_lossy(&lab.exchange(h, req.as_bytes(), 300, complete)).to_string()
    };
    let h = lab.connect(40000);
    for i in 0..20 {
        let resp = get(&mut lab, h, "shop.example");
        assert!(resp.starts_with("HTTP/1.1 200 ") && resp.contains("\r\n\r\nbe1 "), "request {i}: {resp:?}");
    }
    let st = lab.proxy.stats;
    assert_eq!((st.upstream_connect_failures, st.upstream_resends), (1, 1), "refused once, then passed over: {st:?}");
    assert_eq!(st.responses[3], 0, "no 5xx");
    // Ten seconds on, the endpoint is tried again (and refuses again). (A new client
    // connection: the first one idled out meanwhile.)
    lab.run_until(lab.now + 10_000);
    let h = lab.connect(40001);
    for _ in 0..20 {
        assert!(get(&mut lab, h, "shop.example").starts_with("HTTP/1.1 200 "));
    }
    assert_eq!(lab.proxy.stats.upstream_connect_failures, 2, "{:?}", lab.proxy.stats);
    // Its only endpoint refuses: 502, nothing to send it to.
    assert!(get(&mut lab, h, "closed.example").starts_with("HTTP/1.1 502 "));
    assert_eq!(lab.proxy.stats.upstream_resends, 2);
}

/// An endpoint off the link (its SYNs go unanswered): a request sent there goes to the other
/// endpoint after the connect timeout (1 s here), long before the upstream timeout (3 s).
#[test]
fn an_unanswered_connection_sends_the_request_to_another_endpoint_after_the_connect_timeout() {
    let mut lab = Lab::new(vec![route("shop.example", "/", &eps())], Limits::default());
    lab.cut.push(BE2);
    let mut slow = 0;
    for i in 0..8u16 {
        let h = lab.connect(40000 + i);
        let start = lab.now;
        let resp = lab.exchange(h, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", 3_000, complete);
        let took = lab.now - start;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200 ") && text.contains("\r\n\r\nbe1 "), "{text:?}");
        assert!(took < 1_200, "request {i} took {took} ms");
        slow += (took >= 1_000) as usize;
    }
    let st = lab.proxy.stats;
    assert!(slow >= 1 && st.upstream_connect_failures >= 1, "be2 was tried and waited for: {slow} {st:?}");
    assert_eq!(st.upstream_resends, st.upstream_connect_failures);
    assert_eq!(slow as u64, st.upstream_resends, "only the requests that tried be2 waited");
}
