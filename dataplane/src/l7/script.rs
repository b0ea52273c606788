//! A proxy session scripted by bytes: up to four clients (plain HTTP on port 80, or TLS on
//! 443) and one backend, each free to send anything (or well-formed messages from a small
//! table; a TLS client's raw bytes bypass its TLS, as hostile records), close, reset, stop
//! reading; the backend's link cut (its packets lost, no RST) and restored; new routing tables
//! published mid-session (the backend, no endpoint, no route); and time that moves a
//! millisecond at a time or jumps past the timeouts. The `proxy_session` fuzz
//! target runs it on libFuzzer's inputs and a test runs it on random ones; the packets are
//! real TCP (smoltcp stacks for the peers, as in [`super::sim`]). Not used by the appliance.
//!
//! What must hold whatever the script (`run` returns `Err` naming what did not):
//! - nothing panics (a panic is the fuzzer's find);
//! - everything a client receives (decrypted, for TLS) starts with an HTTP/1.1 status line:
//!   the proxy's own answer or its restatement of the backend's head, never the backend's
//!   bytes as they came;
//! - on a connection whose client sent only canned requests (so the client knows their
//!   methods, HEAD's bodiless answers included), the bytes frame as a sequence of HTTP/1.1 responses, each head where
//!   the last body ended (until a 101 or a body that ends with the connection): whatever the
//!   backend sends, the proxy never lets a response run into the next (no desync);
//! - a TLS session fails only where its client sent hostile records: a well-behaved TLS
//!   client never sees an error from the proxy's TLS, and the proxy counts no more failed
//!   sessions (`ProxyStats::tls`) than there were hostile clients;
//! - once every peer has closed and the timeouts have passed, the proxy holds no client, no
//!   socket, no upstream and no deadline entry beyond what it held before the script, and no
//!   more socket buffers lent than the sockets left have rings (no leak); with debug
//!   assertions an idle ring's stand-in is unreadable, so a byte smoltcp placed in a ring
//!   that was not lent a buffer is a crash;
//! - the access log has one record for every request head the proxy read, no record without
//!   a valid status (or 0, no response), and as many responses of each class as the proxy
//!   counted.

use super::access_log::{AccessLog, Reader};
use super::http::body::BodyReader;
use super::http::head::{parse_response, Framing};
use super::http::Limits;
use super::proxy::{Proxy, ProxyConfig, FIN_TIMEOUT_MS};
use super::router::Router;
use super::sim::{test_pki, Host, TlsClient};
use fulcrum_config::ingress::{HostMatch, L7Backend, L7Host, L7Path, L7State, PathType};
use fulcrum_config::model::ObjectRef;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

const L7: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
const OWN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
const CLIENTS: usize = 4;
/// Peers' socket buffers: small, so that flow control and full windows come up.
const PEER_BUFFER: usize = 4096;
/// Short timeouts, so that a script reaches them in few jumps.
const HEADER_TIMEOUT_MS: u64 = 300;
const UPSTREAM_TIMEOUT_MS: u64 = 500;
const IDLE_TIMEOUT_MS: u64 = 1_000;
/// The longest the proxy may take to let everything go once the peers have closed: its
/// FIN timeout for a peer that half-closed, plus the timeouts above, with room.
const SETTLE_LIMIT_MS: u64 = FIN_TIMEOUT_MS + 10_000;

/// Well-formed (or deliberately borderline) requests a script can send by number, so that the
/// fuzzer reaches bodies, pipelining and upgrades without having to find the syntax first.
const REQUESTS: [&[u8]; 9] = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    // A response to HEAD has no body, whatever its Content-Length says (and whatever a
    // backend sends after it).
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
];

/// Responses a script's backend can send by number.
const RESPONSES: [&[u8]; 8] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil the close",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
];

/// What a script did (for the test's summary).
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub connections: u64,
    pub requests: u64,
    /// Responses by class (2xx, 3xx, 4xx, 5xx), relayed or made by the proxy.
    pub responses: [u64; 4],
    pub bytes_to_clients: usize,
    /// Simulated milliseconds until everything was let go.
    pub settle_ms: u64,
}

struct Client {
    sock: SocketHandle,
    /// A TLS client (port 443), and whether its session failed.
    tls: Option<(TlsClient, bool)>,
    /// Stopped reading (its window fills; the proxy must hold back, not buffer without end).
    paused: bool,
    got: Vec<u8>,
    /// Sent raw bytes, or part of a canned request (methods unknown to the client: its
    /// responses are not framed).
    raw: bool,
    /// A TLS client that sent raw bytes past its TLS: the only way a session may fail.
    tls_raw: bool,
    /// Per canned request sent whole and not yet answered: whether it was a HEAD.
    heads: std::collections::VecDeque<bool>,
    /// How far `got` is framed as responses, the body being read, and whether framing stopped
    /// (a tunnel, or a body that ends with the connection).
    framed: usize,
    body: Option<BodyReader>,
    unframed: bool,
}

struct Session {
    proxy: Proxy,
    client: Host,
    backend: Host,
    clients: [Option<Client>; CLIENTS],
    /// The backend's sockets past Listen, oldest first.
    accepted: Vec<SocketHandle>,
    listening: Vec<SocketHandle>,
    next_port: u16,
    now: u64,
    bytes_to_clients: usize,
    /// The backend's link is cut: packets to and from it are lost.
    cut: bool,
    /// TLS clients that sent raw bytes past their TLS (hostile records).
    tls_hostile: u64,
    /// A TLS client that sent nothing hostile had its session fail: the proxy spoke bad TLS.
    tls_error: Option<String>,
    /// The proxy's access log, read every tick: records with a request (method), records by
    /// status class (0, 1xx-5xx), and the first status out of range.
    log: (rtrb::Consumer<u8>, Reader),
    logged_requests: u64,
    logged_classes: [u64; 6],
    bad_status: Option<u16>,
}

/// Runs `script` (any bytes) as a session; see the module's doc for what is checked.
pub fn run(script: &[u8]) -> Result<Outcome, String> {
    let mut s = Session::new();
    s.tick(1);
    let baseline = s.proxy.stack.sockets_in_use();
    let mut r = script;
    while let Some((&op, rest)) = r.split_first() {
        let (&arg, rest) = rest.split_first().unwrap_or((&0, &[]));
        r = rest;
        match op % 12 {
            0 => s.connect(arg as usize % CLIENTS, arg & 4 != 0),
            1 => {
                let n = (arg as usize).min(r.len());
                s.client_send(arg as usize % CLIENTS, &r[..n]);
                r = &r[n..];
            }
            2 => s.client_request(arg as usize % CLIENTS, REQUESTS[(arg as usize / CLIENTS) % REQUESTS.len()]),
            3 => s.with_client(arg as usize % CLIENTS, |t| t.close()),
            4 => s.with_client(arg as usize % CLIENTS, |t| t.abort()),
            5 => {
                if let Some(c) = s.clients[arg as usize % CLIENTS].as_mut() {
                    c.paused = !c.paused;
                }
            }
            6 => {
                let n = (arg as usize).min(r.len());
                s.backend_send(arg as usize, &r[..n]);
                r = &r[n..];
            }
            7 => s.backend_send(arg as usize, RESPONSES[(arg as usize / 4) % RESPONSES.len()]),
            8 => s.with_backend(arg as usize, |t| if arg & 0x80 == 0 { t.close() } else { t.abort() }),
            9 if arg >= 240 => s.tick(u64::from(arg - 239) * 250),
            9 => {
                for _ in 0..=arg % 16 {
                    s.tick(1);
                }
            }
            10 => s.proxy.set_router(router(arg % 3)),
            _ => s.cut = !s.cut,
        }
        s.check_clients()?;
    }
    s.settle(baseline)
}

impl Session {
    fn new() -> Session {
        let cfg = ProxyConfig {
            l7_addr: L7,
            http_ports: vec![80],
            https_ports: vec![443],
            own_addr: OWN,
            upstream_ports: (60000, 60015),
            limits: Limits { max_header_bytes: 2048, max_headers: 32, max_uri_bytes: 1024, max_body_bytes: 1 << 20 },
            // Three of the four clients: a script can meet the limit.
            max_connections: 3,
            header_timeout_ms: HEADER_TIMEOUT_MS,
            connect_timeout_ms: UPSTREAM_TIMEOUT_MS,
            upstream_timeout_ms: UPSTREAM_TIMEOUT_MS,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
            socket_buffer: 2048,
            mtu: 1500,
            seed: 7,
        };
        let mut proxy = Proxy::new(cfg, router(0));
        proxy.set_tls(Some(server_tls()));
        let (ring, events) = rtrb::RingBuffer::new(1 << 20);
        proxy.set_access_log(AccessLog::new(ring, std::time::Instant::now()));
        let mut s = Session {
            proxy,
            client: Host::new(CLIENT, 3),
            backend: Host::new(BACKEND, 5),
            clients: Default::default(),
            accepted: Vec::new(),
            listening: Vec::new(),
            next_port: 40000,
            now: 0,
            bytes_to_clients: 0,
            cut: false,
            tls_hostile: 0,
            tls_error: None,
            log: (events, Reader::new(0)),
            logged_requests: 0,
            logged_classes: [0; 6],
            bad_status: None,
        };
        s.keep_listening();
        s
    }

    /// A backend with no backlog (smoltcp's) answers a SYN with RST unless a socket listens:
    /// two are kept ready.
    fn keep_listening(&mut self) {
        let backend = &mut self.backend;
        let mut i = 0;
        while i < self.listening.len() {
            let h = self.listening[i];
            if backend.tcp(h).is_listening() {
                i += 1;
            } else {
                self.accepted.push(self.listening.swap_remove(i));
            }
        }
        while self.listening.len() < 2 {
            let h = backend.socket(PEER_BUFFER);
            backend.tcp(h).listen(8080).expect("listen");
            self.listening.push(h);
        }
        // Closed sockets go (TIME-WAIT ones too: the proxy does not care how long they wait).
        self.accepted.retain(|&h| {
            let gone = matches!(backend.tcp(h).state(), tcp::State::Closed | tcp::State::TimeWait);
            if gone {
                backend.sockets.remove(h);
            }
            !gone
        });
    }

    fn connect(&mut self, k: usize, tls: bool) {
        if self.clients[k].is_some() {
            return;
        }
        let port = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(40000);
        let sock = self.client.connect((L7, if tls { 443 } else { 80 }), port, PEER_BUFFER);
        let tls = tls.then(|| (TlsClient::with_config(client_tls(), test_pki::SHOP_HOST), false));
        self.clients[k] = Some(Client {
            sock,
            tls,
            paused: false,
            got: Vec::new(),
            raw: false,
            tls_raw: false,
            heads: Default::default(),
            framed: 0,
            body: None,
            unframed: false,
        });
    }

    /// A canned request: through TLS on a TLS client, else straight to TCP; one the socket
    /// takes only in part makes the client's responses unframed.
    fn client_request(&mut self, k: usize, req: &[u8]) {
        let Some(c) = self.clients[k].as_mut() else { return };
        let whole = match c.tls.as_mut() {
            Some((tls, false)) => {
                use std::io::Write;
                tls.conn.writer().write_all(req).is_ok()
            }
            Some((_, true)) => false,
            None => {
                let t = self.client.tcp(c.sock);
                t.may_send() && t.send_slice(req).is_ok_and(|n| n == req.len())
            }
        };
        if whole {
            c.heads.push_back(req.starts_with(b"HEAD "));
        } else {
            c.raw = true;
        }
    }

    /// Raw bytes, straight to TCP (past a TLS client's TLS).
    fn client_send(&mut self, k: usize, data: &[u8]) {
        if let Some(c) = self.clients[k].as_mut() {
            c.raw = true;
            if c.tls.is_some() && !c.tls_raw {
                c.tls_raw = true;
                self.tls_hostile += 1;
            }
        }
        self.send_tcp(k, data);
    }

    fn send_tcp(&mut self, k: usize, data: &[u8]) {
        if let Some(c) = &self.clients[k] {
            let t = self.client.tcp(c.sock);
            if t.may_send() {
                let _ = t.send_slice(data);
            }
        }
    }

    fn with_client(&mut self, k: usize, f: impl FnOnce(&mut tcp::Socket<'static>)) {
        if let Some(c) = &self.clients[k] {
            f(self.client.tcp(c.sock));
        }
    }

    fn backend_send(&mut self, k: usize, data: &[u8]) {
        self.with_backend(k, |t| {
            if t.may_send() {
                let _ = t.send_slice(data);
            }
        });
    }

    fn with_backend(&mut self, k: usize, f: impl FnOnce(&mut tcp::Socket<'static>)) {
        if !self.accepted.is_empty() {
            let h = self.accepted[k % self.accepted.len()];
            f(self.backend.tcp(h));
        }
    }

    /// `ms` milliseconds pass (one step of the clock), then every host polls and the packets
    /// go where they are addressed, until nobody has anything more to send.
    fn tick(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for _ in 0..8 {
            self.client.poll(now);
            self.backend.poll(now);
            let mut moved = false;
            let cut = self.cut;
            let from_backend = self.backend.dev.tx.drain(..).filter(|_| !cut);
            let from_peers: Vec<Vec<u8>> = self.client.dev.tx.drain(..).chain(from_backend).collect();
            for p in &from_peers {
                moved = true;
                let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
                let dport = u16::from_be_bytes([p[22], p[23]]);
                if self.proxy.wants(dst, dport) {
                    let _ = self.proxy.ingress(p, now);
                }
            }
            let (client, backend) = (&mut self.client, &mut self.backend);
            self.proxy.run(now, |p| {
                moved = true;
                let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
                if dst == CLIENT {
                    client.dev.rx.push_back(p.to_vec());
                } else if dst == BACKEND && !cut {
                    backend.dev.rx.push_back(p.to_vec());
                }
            });
            if !moved {
                break;
            }
        }
        self.read_clients();
        self.keep_listening();
        self.read_log();
    }

    fn read_log(&mut self) {
        let (events, reader) = &mut self.log;
        let (requests, classes, bad) = (&mut self.logged_requests, &mut self.logged_classes, &mut self.bad_status);
        reader.drain(events, |r| {
            *requests += u64::from(!r.method.is_empty());
            match r.status {
                0 | 100..=599 => classes[usize::from(r.status / 100)] += 1,
                s => *bad = bad.or(Some(s)),
            }
        });
    }

    /// Clients that are not paused read what came; closed ones go from their slot.
    fn read_clients(&mut self) {
        for slot in self.clients.iter_mut() {
            let Some(c) = slot else { continue };
            let t = self.client.tcp(c.sock);
            if let Some((tls, failed)) = c.tls.as_mut() {
                // After a TLS error (the server's alert, following hostile records) what
                // arrives is dropped unread.
                if *failed {
                    while t.recv(|d| (d.len(), d.len())).is_ok_and(|n| n > 0) {}
                } else if !c.paused {
                    match tls.try_pump(t, &mut c.got) {
                        Ok(n) => self.bytes_to_clients += n,
                        Err(e) => {
                            *failed = true;
                            if !c.tls_raw {
                                self.tls_error.get_or_insert(format!(
                                    "a TLS client that sent nothing hostile saw its session fail: {e}"
                                ));
                            }
                        }
                    }
                }
            } else if !c.paused {
                while let Ok(n) = t.recv(|d| {
                    c.got.extend_from_slice(d);
                    (d.len(), d.len())
                }) {
                    self.bytes_to_clients += n;
                    if n == 0 {
                        break;
                    }
                }
            }
            let gone = matches!(t.state(), tcp::State::Closed | tcp::State::TimeWait);
            if gone {
                self.client.sockets.remove(c.sock);
                *slot = None;
            }
        }
    }

    fn check_clients(&mut self) -> Result<(), String> {
        if let Some(e) = self.tls_error.take() {
            return Err(e);
        }
        for c in self.clients.iter_mut().flatten() {
            if !c.raw {
                frame_responses(c)?;
            } else if !starts_a_status_line(&c.got) {
                return Err(format!(
                    "a client received bytes that are not an HTTP/1.1 response: {:?}",
                    String::from_utf8_lossy(&c.got[..c.got.len().min(80)])
                ));
            }
        }
        Ok(())
    }

    /// The backend's link comes back and every peer closes (clients read on, so that nothing
    /// waits on a full window); time passes until the proxy has let everything go.
    fn settle(mut self, baseline: usize) -> Result<Outcome, String> {
        let start = self.now;
        self.cut = false;
        for c in self.clients.iter_mut().flatten() {
            c.paused = false;
            self.client.tcp(c.sock).close();
        }
        for &h in &self.accepted {
            self.backend.tcp(h).close();
        }
        loop {
            self.check_clients()?;
            let clients = self.proxy.client_count();
            let sockets = self.proxy.stack.sockets_in_use();
            if clients == 0 && sockets <= baseline {
                break;
            }
            if self.now - start > SETTLE_LIMIT_MS {
                return Err(format!(
                    "{} ms after every peer closed the proxy still holds {clients} clients and {sockets} sockets \
                     (it held {baseline} sockets before the script)",
                    self.now - start
                ));
            }
            // Fine steps first (a close's segments and ACKs), then coarse ones (timeouts).
            self.tick(if self.now - start < 200 { 1 } else { 50 });
        }
        let settle_ms = self.now - start;
        // Every socket that went gave back the buffers lent to its rings.
        let (sockets, (rx, tx)) = (self.proxy.stack.sockets_in_use(), self.proxy.stack.buffers_lent());
        if rx > sockets || tx > sockets {
            return Err(format!("{rx} receive and {tx} transmit buffers lent to {sockets} sockets"));
        }
        // Every client takes its deadline entry with it: none is left with no client.
        if self.proxy.deadline_entries() != 0 {
            return Err(format!("{} deadline entries left with no connection", self.proxy.deadline_entries()));
        }
        let st = self.proxy.stats;
        self.read_log();
        let mut gauges = st;
        self.proxy.fill_gauges(&mut gauges);
        if let Some(s) = self.bad_status {
            return Err(format!("an access log record with status {s}"));
        }
        if gauges.access_log_dropped > 0 || self.logged_requests != st.requests {
            return Err(format!(
                "the access log has {} records of requests ({} dropped); the proxy read {} request heads",
                self.logged_requests, gauges.access_log_dropped, st.requests
            ));
        }
        if self.logged_classes[2..] != st.responses {
            return Err(format!(
                "the access log's responses by class (2xx-5xx) are {:?}; the proxy counted {:?}",
                &self.logged_classes[2..],
                st.responses
            ));
        }
        if st.tls.failures > self.tls_hostile {
            return Err(format!(
                "the proxy counted {} failed TLS sessions; only {} clients sent hostile records",
                st.tls.failures, self.tls_hostile
            ));
        }
        Ok(Outcome {
            connections: st.connections,
            requests: st.requests,
            responses: st.responses,
            bytes_to_clients: self.bytes_to_clients,
            settle_ms,
        })
    }
}

/// Whether `b` is, or begins like, the start of an HTTP/1.1 status line (all of `b` that is
/// there yet).
fn starts_a_status_line(b: &[u8]) -> bool {
    let n = b.len().min(9);
    b[..n] == b"HTTP/1.1 "[..n]
}

/// Frames what a client received as HTTP/1.1 responses (heads by httparse, bodies by their
/// framing), from where the last call stopped; an error names the offset and the bytes.
fn frame_responses(c: &mut Client) -> Result<(), String> {
    let limits =
        Limits { max_header_bytes: 1 << 16, max_headers: 100, max_uri_bytes: 1 << 16, max_body_bytes: u64::MAX };
    while !c.unframed {
        if let Some(b) = c.body.as_mut() {
            let n =
                b.feed(&c.got[c.framed..]).map_err(|e| format!("a response body the client cannot frame: {e:?}"))?;
            c.framed += n;
            if !b.is_done() {
                return Ok(());
            }
            c.body = None;
        }
        let rest = &c.got[c.framed..];
        let bad = |why: &str| {
            format!(
                "{why} {} bytes into a client's responses: {:?}",
                c.framed,
                String::from_utf8_lossy(&rest[..rest.len().min(80)])
            )
        };
        if !starts_a_status_line(rest) {
            return Err(bad("no HTTP/1.1 status line"));
        }
        let mut storage = [httparse::EMPTY_HEADER; 100];
        let method = if c.heads.front() == Some(&true) { "HEAD" } else { "GET" };
        let head = match parse_response(rest, method, &limits, &mut storage) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(e) => return Err(bad(&format!("{e:?}"))),
        };
        c.framed += head.head_len;
        if head.status >= 200 || head.status == 101 {
            c.heads.pop_front(); // answered (an interim 1xx answers nothing)
        }
        match head.framing {
            _ if head.status == 101 => c.unframed = true,
            Framing::UntilClose => c.unframed = true,
            f => c.body = Some(BodyReader::new(f, u64::MAX)),
        }
    }
    Ok(())
}

/// The routing tables a script publishes: 0 sends `/` to the backend, 1 has the route with no
/// endpoint (503), 2 routes only `/elsewhere` (404 for the rest).
fn router(which: u8) -> Arc<Router> {
    let endpoints = if which == 1 { vec![] } else { vec![SocketAddr::from((BACKEND, 8080))] };
    let backend = L7Backend {
        service: ObjectRef { namespace: "fuzz".into(), name: "be".into() },
        port: Some(8080),
        unresolved: None,
        endpoints,
    };
    let host = L7Host {
        host: HostMatch::Any,
        paths: vec![L7Path {
            path: if which == 2 { "/elsewhere".into() } else { "/".into() },
            path_type: PathType::Prefix,
            backend,
            ingress: ObjectRef { namespace: "fuzz".into(), name: "i".into() },
        }],
        ..Default::default()
    };
    Arc::new(Router::compile(&L7State { hosts: vec![host], ..Default::default() }))
}

/// The test certificate for `shop.example` (the proxy tests' fixtures), built once.
fn server_tls() -> Arc<rustls::ServerConfig> {
    static C: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let cert = test_pki::shop_certificate(ObjectRef { namespace: "fuzz".into(), name: "shop-tls".into() });
        super::tls::server_config(&[cert]).0.expect("the fixture certificate loads")
    })
    .clone()
}

/// Clients trust the fixtures' CA and do not resume (a session stored by one script would
/// change what the next one does).
fn client_tls() -> Arc<rustls::ClientConfig> {
    static C: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let mut cfg =
            Arc::unwrap_or_clone(TlsClient::config(test_pki::CA, &[&rustls::version::TLS13, &rustls::version::TLS12]));
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script of well-formed exchanges goes through and settles.
    #[test]
    fn a_well_formed_script_gets_responses_and_settles() {
        // Client 0 connects and sends a GET; time passes; the backend answers; time passes.
        let script = [0, 0, 9, 15, 2, 0, 9, 15, 9, 15, 7, 0, 9, 15, 9, 15];
        let out = run(&script).expect("settles");
        assert_eq!(out.connections, 1);
        assert_eq!(out.requests, 1);
        assert!(out.bytes_to_clients > 40, "{out:?}");
    }

    /// The same over TLS: the request goes through the handshake and comes back decrypted.
    #[test]
    fn a_tls_exchange_gets_its_response_and_settles() {
        let script = [0, 4, 9, 15, 9, 15, 2, 0, 9, 15, 9, 15, 7, 0, 9, 15, 9, 15];
        let out = run(&script).expect("settles");
        assert_eq!((out.connections, out.requests), (1, 1), "{out:?}");
        assert!(out.bytes_to_clients > 40, "{out:?}");
    }

    /// A routing table published between two requests of a keep-alive connection applies to
    /// the next: the table without `/` answers 404, the route without endpoints 503.
    #[test]
    fn routing_tables_published_mid_session_apply_to_the_next_request() {
        let ticks = [9, 15, 9, 15];
        let mut script = vec![0, 0];
        script.extend(ticks);
        script.extend([2, 0]); // GET /
        script.extend(ticks);
        script.extend([7, 0]); // 200
        script.extend(ticks);
        script.extend([10, 2, 2, 0]); // no route, GET / (404 keeps the connection)
        script.extend(ticks);
        script.extend([10, 1, 2, 0]); // no endpoint, GET /
        script.extend(ticks);
        let out = run(&script).expect("settles");
        assert_eq!(out.responses, [1, 0, 1, 1], "{out:?}");
    }

    /// A 404 keeps a keep-alive connection only when no body follows the head: an unread body
    /// would be taken for the next request. (Found by these scripts: the head was left in the
    /// buffer, so 404 closed every connection.)
    #[test]
    fn a_404_keeps_the_connection_unless_a_body_follows() {
        let ticks = [9, 15, 9, 15];
        let mut script = vec![0, 0, 10, 2];
        script.extend(ticks);
        script.extend([2, 4]); // POST /p with a 10-byte body: 404, closed
        script.extend(ticks);
        script.extend([2, 0]); // GET /: not read
        script.extend(ticks);
        let out = run(&script).expect("settles");
        assert_eq!((out.requests, out.responses), (1, [0, 0, 1, 0]), "{out:?}");
    }

    /// The proxy's own error answers a HEAD with its head alone: a body there would be read as
    /// the next response (found by the framing check: a 404 to HEAD carried "404 Not Found").
    #[test]
    fn an_error_answering_head_has_no_body() {
        let ticks = [9, 15, 9, 15];
        let mut script = vec![0, 0, 10, 2];
        script.extend(ticks);
        script.extend([2, 32]); // HEAD /: 404, kept
        script.extend(ticks);
        script.extend([2, 0]); // GET /: 404 with its body
        script.extend(ticks);
        let out = run(&script).expect("frames and settles");
        assert_eq!((out.requests, out.responses), (2, [0, 0, 2, 0]), "{out:?}");
    }

    /// What `check_clients` says of a client that received `got`.
    fn check(got: &[u8]) -> Result<(), String> {
        let mut s = Session::new();
        s.connect(0, false);
        s.clients[0].as_mut().unwrap().got.extend_from_slice(got);
        s.check_clients()
    }

    /// The checks can fail: bytes that are not HTTP, and a body longer than its Content-Length
    /// running into the next response (a desync), are caught; a response still arriving is not.
    #[test]
    fn bytes_that_are_not_a_response_are_caught() {
        assert!(check(b"garbage").is_err());
        assert!(check(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcHTTP/1.1 200 OK\r\n").is_err());
        assert!(check(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 20").is_ok());
    }

    /// The op whose share of 100 holds `pick` (< 100).
    fn weighted(ops: &[(u8, u64)], mut pick: u64) -> u8 {
        for &(op, w) in ops {
            if pick < w {
                return op;
            }
            pick -= w;
        }
        9
    }

    /// Random scripts (a fixed seed, so a failure is repeatable), weighted towards the
    /// operations that make progress: uniform bytes rarely connect before they send.
    #[test]
    fn random_scripts_never_panic_or_leak() {
        const SCRIPTS: usize = 300;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // (op, share in 100): connect, tick or jump, request, response, raw bytes either
        // way, close / reset / pause either side, a new routing table, the backend's link.
        const OPS: [(u8, u64); 12] =
            [(0, 12), (9, 25), (2, 18), (7, 14), (1, 4), (6, 4), (3, 5), (4, 3), (5, 3), (8, 7), (10, 3), (11, 2)];
        let (mut requests, mut bytes) = (0, 0);
        for i in 0..SCRIPTS {
            let mut script = Vec::new();
            for _ in 0..4 + next() % 40 {
                let op = weighted(&OPS, next() % 100);
                let arg = next() as u8;
                script.extend_from_slice(&[op, if op == 9 && arg >= 240 && next() % 4 != 0 { arg % 16 } else { arg }]);
                if op == 1 || op == 6 {
                    script.extend((0..arg).map(|_| next() as u8));
                }
            }
            match run(&script) {
                Ok(o) => {
                    requests += o.requests;
                    bytes += o.bytes_to_clients;
                }
                Err(e) => panic!("script {i} {script:?}: {e}"),
            }
        }
        eprintln!("{SCRIPTS} scripts: {requests} requests, {bytes} bytes to clients");
        // The scripts reached the proxy's request path, not only its accept path.
        assert!(requests > 50 && bytes > 5_000, "{requests} requests, {bytes} bytes");
    }
}
