//! The HTTP/1.1 reverse proxy of one worker: client connections accepted on the L7 address by
//! the worker's TCP stack, requests routed by the Ingress rules, forwarded over upstream
//! connections the stack opens from the appliance's address and this core's ports (so replies
//! come back to this core), kept alive and reused per endpoint. Bodies stream through, never
//! buffered whole: bytes move from one socket's receive buffer to the other's send buffer only as
//! far as there is room, and the body framing (`http::body`) says where each message ends.
//!
//! Per connection, in order: read the request head (408 if it does not come in time; 400, 413,
//! 414, 431, 501, 505 for what `http::head` refuses), route it (404; 503 without a ready
//! endpoint), pick the endpoint with fewer requests in flight of two chosen at random, send the
//! head and stream the body, read the response head (502 if the upstream refuses, resets or
//! sends garbage; 504 if it does not answer in time), stream the response, then read the next
//! request or close. `Upgrade` requests (WebSocket) become a byte tunnel after `101`.
//!
//! An upstream that fails before a byte of the request reached it (its connection refused, or
//! not answered within the connect timeout; a pooled connection closed under it) is not the
//! client's error: the request goes to another endpoint of its route, at most `MAX_RESENDS`
//! times (nginx's `proxy_next_upstream error timeout`, HAProxy's `retries` with `redispatch`),
//! and an endpoint whose connection failed is passed over by new requests for
//! `FAILED_ENDPOINT_MS` (nginx's `max_fails=1 fail_timeout=10s`). A request some of which was
//! sent is never sent again: the upstream may have acted on it.

mod health;
use super::access_log::AccessLog;
use super::ack_pace::AckPace;
use super::client_io::{self as io, TlsSide};
use super::http::body::BodyReader;
use super::http::head::{self, ClientInfo};
use super::http::Limits;
use super::router::{Route, Router};
use super::spare::SpareBufs;
use super::stack::{prefetch_socket, ConnKey, SockRef, SocketAt, Stack, StackConfig};
use super::timer_wheel::{DeadlineWheel, TimerHandle};
use crate::stats::DropReason;
use ahash::AHashMap;
use smallvec::SmallVec;
use smoltcp::socket::tcp::State;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// How the proxy is set up on one worker.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub l7_addr: Ipv4Addr,
    pub http_ports: Vec<u16>,
    /// Ports served with TLS (when there is a certificate).
    pub https_ports: Vec<u16>,
    pub own_addr: Ipv4Addr,
    /// This core's local ports for upstream connections.
    pub upstream_ports: (u16, u16),
    pub limits: Limits,
    /// Client connections open at once, handshakes included: a SYN beyond is dropped and
    /// counted (`ProxyStats::connections_over_limit`).
    pub max_connections: usize,
    pub header_timeout_ms: u64,
    /// How long a new upstream connection may take to be answered (SYN to SYN-ACK) before
    /// the request goes to another endpoint.
    pub connect_timeout_ms: u64,
    pub upstream_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub socket_buffer: usize,
    pub mtu: usize,
    pub seed: u64,
}

/// Counters (per worker; the worker folds them into its stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub connections: u64,
    pub requests: u64,
    /// Responses by class: 2xx, 3xx, 4xx, 5xx (relayed or made here).
    pub responses: [u64; 4],
    /// Made here: 400/404/408/413/414/431/501/502/503/504/505.
    pub errors_local: u64,
    pub upstream_connects: u64,
    pub upstream_reused: u64,
    /// Requests answered 503 because every upstream port of this core was in use towards
    /// their endpoint (`upstream_ports` wide per endpoint and core): raise the endpoints or the
    /// cores, not the timeouts.
    pub upstream_ports_exhausted: u64,
    /// Upstream connections refused, or not answered within the connect timeout.
    pub upstream_connect_failures: u64,
    /// Requests sent to another endpoint because theirs failed before taking a byte.
    pub upstream_resends: u64,
    pub segments_unwanted: u64,
    /// SYNs dropped because `max_connections` client connections were open, none of them
    /// still in its handshake.
    pub connections_over_limit: u64,
    /// Client connections still in their handshake (SYN received, no ACK yet) given up to
    /// make room for a new one at `max_connections`: the oldest first, as BSD's SYN cache
    /// does, so that spoofed SYNs cannot keep real clients out (see `ingress`).
    pub handshakes_evicted: u64,
    /// Access log records handed to the writer, and dropped because its ring was full.
    pub access_log_records: u64,
    pub access_log_dropped: u64,
    /// Health probes completed, failed, and endpoint up/down changes.
    pub health_probes: u64,
    pub health_failures: u64,
    pub health_transitions: u64,
    /// Bytes held for socket buffers, lent or kept for reuse (a gauge: the peak of rings
    /// holding bytes at once times the buffer size, in 2 MiB steps), and the buffers lent now
    /// (a ring holds one only while it has bytes in it; idle connections hold none). Filled
    /// in the worker's copy of its counters for the control thread, not per loop.
    pub socket_buffer_bytes: u64,
    pub socket_buffers_lent: u64,
    /// Gauges filled in the same copy (`Proxy::fill_gauges`): client connections open (plain
    /// and TLS), upstream connections open (carrying a request or pooled) and of those
    /// pooled, and the stack's sockets (closing ones and health probes' included).
    pub clients_open: u64,
    pub upstreams_open: u64,
    pub upstreams_idle: u64,
    pub sockets: u64,
    /// Entries in the deadline wheel: one per client connection open.
    pub deadline_entries: u64,
    /// Connection steps run: the proxy's work, which should follow segments and deadlines,
    /// not the number of connections or the time they stay open.
    pub steps: u64,
    pub tls: io::TlsCounters,
}

impl ProxyStats {
    pub fn merge(&mut self, o: &ProxyStats) {
        self.connections += o.connections;
        self.requests += o.requests;
        for (a, b) in self.responses.iter_mut().zip(o.responses) {
            *a += b;
        }
        self.errors_local += o.errors_local;
        self.upstream_connects += o.upstream_connects;
        self.upstream_reused += o.upstream_reused;
        self.upstream_ports_exhausted += o.upstream_ports_exhausted;
        self.upstream_connect_failures += o.upstream_connect_failures;
        self.upstream_resends += o.upstream_resends;
        self.segments_unwanted += o.segments_unwanted;
        self.connections_over_limit += o.connections_over_limit;
        self.handshakes_evicted += o.handshakes_evicted;
        self.access_log_records += o.access_log_records;
        self.access_log_dropped += o.access_log_dropped;
        self.health_probes += o.health_probes;
        self.health_failures += o.health_failures;
        self.health_transitions += o.health_transitions;
        self.socket_buffer_bytes += o.socket_buffer_bytes;
        self.socket_buffers_lent += o.socket_buffers_lent;
        self.clients_open += o.clients_open;
        self.upstreams_open += o.upstreams_open;
        self.upstreams_idle += o.upstreams_idle;
        self.sockets += o.sockets;
        self.deadline_entries += o.deadline_entries;
        self.steps += o.steps;
        self.tls.merge(&o.tls);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (or idle between requests).
    Head,
    /// The request is going upstream; waiting for the response head.
    Request,
    /// The response body is coming back.
    Response,
    /// Upgraded: bytes both ways until either side closes.
    Tunnel,
    /// Flushing what is left to send, then closing.
    Closing,
}

struct Client {
    /// Its index in `Proxy::clients`.
    idx: usize,
    sock: SockRef,
    /// Where `sock` lies, to prefetch it (see `run`).
    sock_at: SocketAt,
    /// TLS, on an HTTPS port.
    tls: io::Tls,
    key: ConnKey,
    peer: Ipv4Addr,
    phase: Phase,
    /// Request head bytes received so far (and, after a head, the bytes that followed it).
    buf: Vec<u8>,
    /// Bytes to send the client before anything else (a response head, an error).
    out: Vec<u8>,
    out_off: usize,
    deadline: u64,
    up: Option<usize>,
    req_body: Option<BodyReader>,
    resp_body: Option<BodyReader>,
    keep_alive: bool,
    head_request: bool,
    upgrade: bool,
    endpoint: Option<SocketAddrV4>,
    /// Bytes from the upstream sent to the client in this response (0: a reset may be a 502).
    relayed: u64,
    /// When the current request's head was complete (for the latency histogram).
    started: Option<std::time::Instant>,
    /// Closing: when the connection is aborted if the client has not finished the close by
    /// then (set when closing starts).
    close_by: Option<u64>,
    /// Times the current request was sent to another endpoint (see `Proxy::resend`).
    resends: u8,
    /// How long its socket holds ACKs: longer once its requests are seen to come whole.
    ack: AckPace,
    /// Streaming a response body or tunnelling: when bytes last moved (ms). The deadline
    /// follows it lazily (moved when it comes, not on every byte), so a transfer that stalls
    /// for the idle timeout is cut and one that moves costs no timer work per step.
    progress_ms: u64,
    /// The time of its one entry in `Proxy::deadlines`, and the handle that takes it out.
    wake_at: u64,
    timer: TimerHandle,
}

struct Upstream {
    sock: SockRef,
    /// Where `sock` lies, to prefetch it (see `run`).
    sock_at: SocketAt,
    key: ConnKey,
    endpoint: SocketAddrV4,
    /// The request head to send, then nothing.
    out: Vec<u8>,
    out_off: usize,
    /// Response head bytes received so far.
    buf: Vec<u8>,
    /// Idle in the pool since (ms), when not in use.
    idle_since: Option<u64>,
    /// How long its socket holds ACKs: longer once its responses are seen to come whole.
    ack: AckPace,
    /// Opened and not yet answered (SYN sent): a failure now is the endpoint's, not the
    /// request's.
    connecting: bool,
}

impl Client {
    /// The client's address and port, as the access log shows them.
    fn peer_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.peer, self.key.1)
    }
}

impl Upstream {
    /// Its byte buffers while it carries a request (see `SpareBufs`).
    fn lend_buffers(&mut self, spare: &mut SpareBufs) {
        spare.lend(&mut self.buf);
        spare.lend(&mut self.out);
    }

    fn settle_buffers(&mut self, spare: &mut SpareBufs) {
        spare.settle(&mut self.buf);
        spare.settle_sent(&mut self.out, &mut self.out_off);
    }
}

pub struct Proxy {
    cfg: ProxyConfig,
    pub stack: Stack,
    router: Arc<Router>,
    tls: Option<Arc<rustls::ServerConfig>>,
    clients: Vec<Option<Client>>,
    ups: Vec<Option<Upstream>>,
    /// Slots of `clients` and `ups` freed for good (a slot is also empty while its client is
    /// being run): the next new connection takes one instead of searching.
    free_clients: Vec<usize>,
    free_ups: Vec<usize>,
    /// Client connections in the order they were made, from the oldest whose handshake may
    /// not be complete (entries behind it may be stale: checked when they come up): the
    /// connection given up when a SYN finds `max_connections` open (`evict_oldest_handshake`).
    accepting: VecDeque<(usize, ConnKey)>,
    /// Stopping (`drain`): no new connection, none kept alive past its current request.
    draining: bool,
    /// Per shard, the clients with a socket there (theirs or their upstream's): the ones to
    /// run when that shard received segments. Pooled upstreams are filed here too, as
    /// `IDLE_UPSTREAM | index`, so that one closed by its server is found when its FIN arrives.
    /// A shard holds `SHARD_SOCKETS` (1) socket, so a list is one or two entries (the socket's
    /// client, or a pooled upstream's mark, and the client using that upstream): kept inline,
    /// one cache miss to reach them with thousands of connections instead of two.
    by_shard: Vec<SmallVec<[usize; 2]>>,
    /// (when, client): deadlines to look at (head, upstream and idle timeouts); a wheel, since
    /// every request files one. A client holds one entry: a deadline moved later is filed
    /// when the entry there comes up (a client run early finds nothing due); one moved earlier
    /// replaces it; a client that goes takes its entry out.
    deadlines: DeadlineWheel,
    /// `run`'s lists, kept between runs so that a run allocates nothing.
    busy: Vec<u32>,
    todo: Vec<usize>,
    due: Vec<u32>,
    /// `reap_idle`'s list, kept between calls.
    gone_idle: Vec<usize>,
    last_reap_ms: u64,
    /// When the stack's timers were last checked.
    last_timers_ms: u64,
    /// Per endpoint, pooled keep-alive upstreams, oldest first: taken from and given back at
    /// the back (the warmest first), timed out from the front.
    idle: AHashMap<SocketAddrV4, VecDeque<usize>>,
    in_flight: AHashMap<SocketAddrV4, u32>,
    /// Endpoints whose upstream connection failed (refused, or not answered in time), and
    /// until when (ms) new requests pass them over. Empty almost always: the per-request pick
    /// looks at it only when it is not.
    failed: AHashMap<SocketAddrV4, u64>,
    /// Per endpoint, live upstream connections (each holds one of this core's upstream ports
    /// towards it): with all of them in use a request fails at once, instead of every request
    /// probing the whole port range (4,096 look-ups each) while the endpoint is saturated.
    ports_held: AHashMap<SocketAddrV4, u32>,
    next_port: u16,
    rng: u64,
    scratch: Box<[u8]>,
    /// Head and output buffers lent to connections step by step.
    spare: SpareBufs,
    pub stats: ProxyStats,
    /// Request latency (head in to response head out), microseconds. A clock read per request
    /// (vDSO, no syscall), recorded into this core's own histogram.
    pub latency_us: hdrhistogram::Histogram<u64>,
    probes: Vec<health::Probe>,
    last_probe_ms: u64,
    /// Requests' records for the access log, when there is one (off: a branch per request).
    access_log: Option<Box<AccessLog>>,
    /// The clock's latest reading in the step under way (a request's start, a response's
    /// head for the latency histogram; None outside a step): a request that ends in the step
    /// its response head went out in is logged with it instead of reading the clock again
    /// (that read was half the access log's cost).
    step_clock: Option<std::time::Instant>,
}

const SCRATCH: usize = 16 * 1024;

/// Marks a pooled upstream's index in `Proxy::by_shard` (client indices never reach it).
const IDLE_UPSTREAM: usize = 1 << (usize::BITS - 1);

/// How long a connection may take to close once the proxy has closed it: a client that never
/// sends its own FIN (or never acknowledges ours) would otherwise keep the socket in FIN-WAIT
/// for ever. Linux's `tcp_fin_timeout` default.
pub const FIN_TIMEOUT_MS: u64 = 60_000;

/// How often pooled upstreams are checked for their idle timeout: the timeout is kept to
/// within this.
const REAP_EVERY_MS: u64 = 100;

impl Proxy {
    pub fn new(cfg: ProxyConfig, router: Arc<Router>) -> Proxy {
        let stack = Stack::new(StackConfig {
            l7_addr: cfg.l7_addr,
            own_addr: cfg.own_addr,
            mtu: cfg.mtu,
            rx_buffer: cfg.socket_buffer,
            tx_buffer: cfg.socket_buffer,
            seed: cfg.seed,
        });
        // Upstream ports start at a place of this process's own: after a restart, the first
        // connections do not take the 4-tuples of the last run's, which a backend may still
        // hold (half-open after a crash, TIME-WAIT), costing a retransmission each.
        let first_port = crate::l4::snat::port_in(cfg.upstream_ports, cfg.seed);
        Proxy {
            next_port: first_port,
            rng: cfg.seed | 1,
            cfg,
            stack,
            router,
            tls: None,
            clients: Vec::new(),
            ups: Vec::new(),
            free_clients: Vec::new(),
            accepting: VecDeque::new(),
            draining: false,
            free_ups: Vec::new(),
            by_shard: Vec::new(),
            deadlines: DeadlineWheel::new(0),
            busy: Vec::new(),
            todo: Vec::new(),
            due: Vec::new(),
            gone_idle: Vec::new(),
            last_reap_ms: 0,
            last_timers_ms: 0,
            idle: AHashMap::new(),
            ports_held: AHashMap::new(),
            in_flight: AHashMap::new(),
            failed: AHashMap::new(),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            spare: SpareBufs::default(),
            stats: ProxyStats::default(),
            latency_us: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds"),
            probes: Vec::new(),
            last_probe_ms: 0,
            access_log: None,
            step_clock: None,
        }
    }

    /// Fills `st`'s gauges (connections and sockets open, buffer memory held) from the
    /// proxy's state now; for the control thread's copy of the counters, not per loop.
    pub fn fill_gauges(&self, st: &mut ProxyStats) {
        // Outside `run` no slot is empty but a freed one: no walk over every slot (a miss per
        // connection, every 100 ms). The tests' builds check it against the walk.
        st.clients_open = (self.clients.len() - self.free_clients.len()) as u64;
        st.upstreams_open = (self.ups.len() - self.free_ups.len()) as u64;
        debug_assert_eq!(st.clients_open as usize, self.client_count());
        debug_assert_eq!(st.upstreams_open as usize, self.ups.iter().flatten().count());
        st.upstreams_idle = self.idle.values().map(|q| q.len() as u64).sum();
        st.sockets = self.stack.sockets_in_use() as u64;
        st.deadline_entries = self.deadlines.len() as u64;
        st.socket_buffer_bytes = self.stack.buffer_bytes() as u64;
        let (rx, tx) = self.stack.buffers_lent();
        st.socket_buffers_lent = (rx + tx) as u64;
        if let Some(log) = &self.access_log {
            (st.access_log_records, st.access_log_dropped) = (log.written, log.dropped);
        }
    }

    /// Records every request from now on into `log` (see `access_log`).
    pub fn set_access_log(&mut self, log: AccessLog) {
        self.access_log = Some(Box::new(log));
    }

    pub fn set_router(&mut self, router: Arc<Router>) {
        self.router = router;
    }

    /// New TLS handshakes use `tls`; open connections keep the config they started with.
    pub fn set_tls(&mut self, tls: Option<Arc<rustls::ServerConfig>>) {
        self.tls = tls;
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Whether a TCP segment to `dst:dport` is the proxy's: a client of the L7 address, or a
    /// reply on one of this core's upstream ports.
    pub fn wants(&self, dst: Ipv4Addr, dport: u16) -> bool {
        (dst == self.cfg.l7_addr && (self.cfg.http_ports.contains(&dport) || self.cfg.https_ports.contains(&dport)))
            || (dst == self.cfg.own_addr && (self.cfg.upstream_ports.0..=self.cfg.upstream_ports.1).contains(&dport))
    }

    /// Starts loading the state `ingress` will touch for a segment of connection `key` (peer
    /// address, peer port, local port: the caller has parsed them already), so that a burst's
    /// look-ups overlap. No effect on what `ingress` does.
    #[inline]
    pub fn prefetch(&self, key: ConnKey) {
        self.stack.prefetch(key);
    }

    /// Takes one IPv4 packet carrying TCP (`ip` from the IP header on). The reason to drop it
    /// (for the caller to count) if no connection wants it (`NoFlow`; no RST is sent) or it
    /// is a SYN past `max_connections` (`L7ConnectionLimit`) or while draining (`L7Draining`).
    pub fn ingress(&mut self, ip: &[u8], now_ms: u64) -> Result<(), DropReason> {
        self.stack.set_now(now_ms);
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ip.len() < ihl + 20 {
            return Err(DropReason::NoFlow);
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let t = &ip[ihl..];
        let (sport, dport, flags) = (u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]), t[13]);
        let syn = flags & 0x12 == 0x02;
        let https = self.cfg.https_ports.contains(&dport);
        if dst == self.cfg.l7_addr && https && self.tls.is_none() && syn {
            // No certificate at all: nothing to serve on the HTTPS port.
            self.stats.segments_unwanted += 1;
            return Err(DropReason::NoFlow);
        }
        let listen = dst == self.cfg.l7_addr && (self.cfg.http_ports.contains(&dport) || https);
        let key = (u32::from(src), sport, dport);
        // Draining (`drain`): no new connection. (Here and below, a SYN again for a connection
        // being accepted is the stack's to answer.)
        if syn && listen && self.draining && self.stack.lookup(key).is_none() {
            return Err(DropReason::L7Draining);
        }
        // At the limit, a new connection takes the place of the oldest one still in its
        // handshake, if any. A flood of spoofed SYNs then holds at most the limit, each for as
        // long as it takes the flood to make that many more (100,000 at a million SYNs a
        // second: 0.1 s), while a real client completes its handshake in a round trip; where
        // every connection is established, the SYN is dropped and the client sends it again.
        if syn
            && listen
            && self.clients.len() - self.free_clients.len() >= self.cfg.max_connections
            && self.stack.lookup(key).is_none()
            && !self.evict_oldest_handshake()
        {
            self.stats.connections_over_limit += 1;
            return Err(DropReason::L7ConnectionLimit);
        }
        let Some((sock, made)) = self.stack.ingress(ip, key, syn, listen) else {
            self.stats.segments_unwanted += 1;
            return Err(DropReason::NoFlow);
        };
        if made {
            // A new connection: the stack made its listening socket.
            self.stats.connections += 1;
            let tls = if self.cfg.https_ports.contains(&dport) {
                match &self.tls {
                    Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                        Ok(conn) => Some(Box::new(TlsSide::new(conn))),
                        Err(_) => None,
                    },
                    None => None,
                }
            } else {
                None
            };
            let c = Client {
                idx: usize::MAX,
                sock,
                sock_at: self.stack.socket_at(sock),
                tls,
                key,
                peer: src,
                phase: Phase::Head,
                // Lent for each step (`SpareBufs`): none held while idle.
                buf: Vec::new(),
                out: Vec::new(),
                out_off: 0,
                deadline: now_ms + self.cfg.header_timeout_ms,
                up: None,
                req_body: None,
                resp_body: None,
                keep_alive: true,
                head_request: false,
                upgrade: false,
                endpoint: None,
                relayed: 0,
                started: None,
                close_by: None,
                resends: 0,
                ack: AckPace::Quick,
                progress_ms: now_ms,
                wake_at: 0,
                timer: TimerHandle::NONE,
            };
            let idx = insert(&mut self.clients, &mut self.free_clients, c);
            self.attach(sock.shard, idx);
            self.accepting.push_back((idx, key));
            // Connections established (or gone) since leave the front.
            while let Some(&(i, k)) = self.accepting.front() {
                if i == idx || self.in_handshake(i, k) {
                    break;
                }
                self.accepting.pop_front();
            }
            let (wake_at, timer) = self.deadlines.schedule(now_ms + self.cfg.header_timeout_ms, idx as u32);
            let c = self.clients[idx].as_mut().unwrap();
            c.idx = idx;
            (c.wake_at, c.timer) = (wake_at, timer);
        }
        Ok(())
    }

    /// Runs the connections: after a burst's segments went in, and on every loop for timers.
    /// `emit` gets every IP packet to send.
    pub fn run(&mut self, now_ms: u64, emit: impl FnMut(&[u8])) {
        self.stack.set_now(now_ms);
        let mut busy = std::mem::take(&mut self.busy);
        let mut todo = std::mem::take(&mut self.todo);
        busy.clear();
        todo.clear();
        self.stack.busy_shards(&mut busy);
        // Only the clients whose shards got segments and those with a deadline due: the cost
        // of a loop follows the traffic, not the connections. Every phase has a deadline (head,
        // idle, upstream, progress, close), so a connection that nothing wakes is looked at when
        // its timeout is up at the latest. (A sweep over every client once a second did that
        // before: O(connections) a second, ~10 ms of a core for 10,000 idle ones.)
        todo.extend(busy.iter().flat_map(|&s| self.by_shard.get(s as usize).into_iter().flatten().copied()));
        let clients = &self.clients;
        self.deadlines.expire(now_ms, |at, i| {
            if clients[i as usize].as_ref().is_some_and(|c| c.wake_at == at) {
                todo.push(i as usize);
            }
        });
        todo.sort_unstable();
        todo.dedup();
        // Pooled upstreams whose shards got segments sort last: looked at, not run.
        while todo.last().is_some_and(|&i| i & IDLE_UPSTREAM != 0) {
            let u = todo.pop().unwrap() & !IDLE_UPSTREAM;
            self.check_pooled(u);
        }
        for (j, &i) in todo.iter().enumerate() {
            self.prefetch_ahead(&todo[j + 1..]);
            if let Some(mut c) = self.clients[i].take() {
                let before = c.deadline;
                let keep = self.step(&mut c, now_ms);
                if keep {
                    if c.deadline != before || c.wake_at <= now_ms {
                        // A new deadline, or the time watched has passed without an outcome.
                        // Only an earlier time is filed now: a later one is filed when the
                        // entry already there comes up, so that a connection holds about one
                        // entry however many requests it carries (a deadline moves 2-3 times
                        // a request, each 10-60 s out).
                        let wake = self.wake_time(&c, now_ms);
                        if wake < c.wake_at || c.wake_at <= now_ms {
                            self.deadlines.cancel(c.timer);
                            (c.wake_at, c.timer) = self.deadlines.schedule(wake, i as u32);
                        }
                    }
                    self.clients[i] = Some(c);
                } else {
                    self.finish(c);
                }
            }
        }
        self.busy = busy;
        self.todo = todo;
        self.run_probes(now_ms);
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        if now_ms != self.last_timers_ms {
            self.last_timers_ms = now_ms;
            if now_ms >= self.last_reap_ms + REAP_EVERY_MS {
                self.last_reap_ms = now_ms;
                self.reap_idle(now_ms);
                if !self.failed.is_empty() {
                    // Passed-over endpoints whose time is up: the per-request pick looks at
                    // the list only while it is not empty.
                    self.failed.retain(|_, until| *until > now_ms);
                }
            }
            self.stack.due_shards(&mut due);
        }
        self.stack.poll_egress(&due, emit);
        self.due = due;
        // After egress, so that an aborted socket's RST went out first.
        self.stack.flush_removals();
    }

    /// The worker could not send to `addr`: the neighbour in front of it (the host itself when
    /// on-link, else the next hop) has stopped answering ARP (`NeighborTable::unreachable`).
    /// Connections being opened there are given up now, as a kernel's `connect` fails with
    /// EHOSTUNREACH, so their requests go to another endpoint at once (and the endpoints are
    /// passed over for `FAILED_ENDPOINT_MS`, as for a refused connection) instead of after the
    /// connect timeout. Rare (a connection's packet to a dead host), so a walk over the
    /// upstream connections is fine.
    pub fn host_unreachable(&mut self, addr: Ipv4Addr) {
        for up in self.ups.iter().flatten() {
            if up.connecting && *up.endpoint.ip() == addr && self.stack.state(up.sock) == State::SynSent {
                self.stack.tcp(up.sock).abort();
            }
        }
    }

    /// Starts loading what the steps of the clients `next` in `run`'s list will touch, in
    /// stages so that each load finds the address it needs already in cache: a client's slot
    /// eight steps ahead, its socket and upstream slot four ahead, the upstream's socket two
    /// ahead. With thousands of connections each of these is a miss to memory; taken in turn,
    /// a step waited for them one after another.
    #[inline(always)]
    fn prefetch_ahead(&self, next: &[usize]) {
        if let Some(&n) = next.get(7) {
            crate::mem::prefetch_all(self.clients.as_ptr().wrapping_add(n));
        }
        if let Some(c) = next.get(3).and_then(|&n| self.clients[n].as_ref()) {
            prefetch_socket(c.sock_at);
            if let Some(u) = c.up {
                crate::mem::prefetch_all(self.ups.as_ptr().wrapping_add(u));
            }
        }
        if let Some(up) = next.get(1).and_then(|&n| self.clients[n].as_ref()).and_then(|c| self.ups[c.up?].as_ref()) {
            prefetch_socket(up.sock_at);
        }
    }

    /// When `run` next looks at a client if nothing else wakes it: an idle keep-alive
    /// connection (established, no TLS handshake going on, nothing of a next request received)
    /// when its idle time is up; one still being accepted when `read_head` gives up on it;
    /// anything else at its deadline, or in a millisecond if that has passed without an
    /// outcome yet.
    fn wake_time(&self, c: &Client, now: u64) -> u64 {
        let state = self.stack.state(c.sock);
        let idle_end = c.deadline + self.cfg.idle_timeout_ms.saturating_sub(self.cfg.header_timeout_ms);
        let idle = c.phase == Phase::Head
            && c.buf.is_empty()
            && !c.tls.as_ref().is_some_and(|t| t.handshaking())
            && state == State::Established;
        let accepting = c.phase == Phase::Head && matches!(state, State::Listen | State::SynReceived);
        if idle && idle_end > now {
            idle_end
        } else if c.deadline > now {
            c.deadline
        } else if accepting {
            (c.deadline + self.cfg.header_timeout_ms).max(now + 1)
        } else {
            now + 1
        }
    }

    fn attach(&mut self, shard: u32, client: usize) {
        let s = shard as usize;
        if self.by_shard.len() <= s {
            self.by_shard.resize_with(s + 1, SmallVec::new);
        }
        self.by_shard[s].push(client);
    }

    fn detach(&mut self, shard: u32, client: usize) {
        if let Some(v) = self.by_shard.get_mut(shard as usize) {
            if let Some(k) = v.iter().position(|&x| x == client) {
                v.swap_remove(k);
            }
        }
    }

    /// Entries in the deadline wheel: one per client connection open.
    pub fn deadline_entries(&self) -> usize {
        self.deadlines.len()
    }

    /// Connections open to clients.
    pub fn client_count(&self) -> usize {
        self.clients.iter().flatten().count()
    }

    /// Resets every connection, to clients and to upstreams, and sends the resets: the
    /// appliance is stopping. A kernel does this for a process that exits; our stack must do
    /// it itself, or clients wait for their timeouts, and backends keep pooled connections
    /// half-open until theirs (a restarted appliance's first connection from the same port
    /// then waits for a retransmission).
    pub fn abort_all(&mut self, now_ms: u64, emit: impl FnMut(&[u8])) {
        self.stack.set_now(now_ms);
        let socks: Vec<SockRef> =
            self.clients.iter().flatten().map(|c| c.sock).chain(self.ups.iter().flatten().map(|u| u.sock)).collect();
        for s in socks {
            self.stack.tcp(s).abort();
        }
        self.stack.poll_egress(&[], emit);
    }

    fn step(&mut self, c: &mut Client, now: u64) -> bool {
        self.stats.steps += 1;
        self.lend_buffers(c);
        self.step_clock = None;
        let keep = self.step_with_buffers(c, now);
        self.step_clock = None;
        if keep {
            self.note_pieces(c);
        }
        self.settle_buffers(c);
        keep
    }

    /// After a step: a message the client or its upstream is sending that is still incomplete
    /// with everything received read makes that side's ACKs quick for good (see `ack_pace`).
    /// Also when the other side's buffer was full: a whole message then looks cut, which only
    /// costs the longer delay.
    fn note_pieces(&mut self, c: &mut Client) {
        let request_cut = c.req_body.as_ref().is_some_and(|b| !b.is_done());
        let (client_pieces, upstream_pieces) = match c.phase {
            Phase::Head => (!c.buf.is_empty(), false),
            Phase::Request => {
                (request_cut, c.up.and_then(|u| self.ups[u].as_ref()).is_some_and(|up| !up.buf.is_empty()))
            }
            Phase::Response => (request_cut, c.resp_body.as_ref().is_some_and(|b| !b.is_done())),
            // Bytes both ways, in whatever pieces the application writes them.
            Phase::Tunnel => (true, true),
            Phase::Closing => (false, false),
        };
        if client_pieces {
            set_pace(&mut self.stack, c.sock, &mut c.ack, AckPace::after_pieces);
        }
        if upstream_pieces {
            if let Some(up) = c.up.and_then(|u| self.ups[u].as_mut()) {
                set_pace(&mut self.stack, up.sock, &mut up.ack, AckPace::after_pieces);
            }
        }
    }

    /// The connection's byte buffers for this step, from the shared spares (see `SpareBufs`).
    fn lend_buffers(&mut self, c: &mut Client) {
        self.spare.lend(&mut c.buf);
        self.spare.lend(&mut c.out);
        if let Some(up) = c.up.and_then(|u| self.ups[u].as_mut()) {
            up.lend_buffers(&mut self.spare);
        }
    }

    /// Takes back the buffers the step left empty.
    fn settle_buffers(&mut self, c: &mut Client) {
        self.spare.settle(&mut c.buf);
        self.spare.settle_sent(&mut c.out, &mut c.out_off);
        if let Some(up) = c.up.and_then(|u| self.ups[u].as_mut()) {
            up.settle_buffers(&mut self.spare);
        }
    }

    fn step_with_buffers(&mut self, c: &mut Client, now: u64) -> bool {
        io::pump(&mut self.stack, c.sock, &mut c.tls, &mut self.stats.tls);
        if c.tls.as_ref().is_some_and(|t| t.failed) {
            // A failed handshake or a bad record: rustls queued the alert; send it and close.
            io::pump(&mut self.stack, c.sock, &mut c.tls, &mut self.stats.tls);
            c.phase = Phase::Closing;
        }
        // Anything owed to the client goes first.
        let keep = if !self.flush_client(c) {
            self.closing(c)
        } else {
            match c.phase {
                Phase::Head => self.read_head(c, now),
                Phase::Request => self.request(c, now),
                Phase::Response => self.response(c),
                Phase::Tunnel => self.tunnel(c),
                Phase::Closing => self.closing(c),
            }
        };
        if keep {
            io::pump(&mut self.stack, c.sock, &mut c.tls, &mut self.stats.tls);
        }
        keep
    }

    /// Sends `c.out`; false if the client is gone.
    fn flush_client(&mut self, c: &mut Client) -> bool {
        if c.out_off < c.out.len() {
            if !io::may_send(&mut self.stack, c.sock, &c.tls) {
                let st = self.stack.state(c.sock);
                return st == State::SynReceived || st == State::Listen;
            }
            let n = io::send(&mut self.stack, c.sock, &mut c.tls, &c.out[c.out_off..]);
            if n > 0 {
                c.out_off += n;
                self.stack.mark_dirty(c.sock);
            }
            if c.out_off == c.out.len() {
                c.out.clear();
                c.out_off = 0;
            }
        }
        !matches!(self.stack.state(c.sock), State::Closed | State::TimeWait)
    }

    fn read_head(&mut self, c: &mut Client, now: u64) -> bool {
        let s = self.stack.tcp(c.sock);
        if matches!(s.state(), State::Listen | State::SynReceived) {
            return now < c.deadline + self.cfg.header_timeout_ms;
        }
        let room = self.cfg.limits.max_header_bytes.saturating_sub(c.buf.len());
        if io::can_recv(&mut self.stack, c.sock, &c.tls) && room > 0 {
            io::recv_into(&mut self.stack, c.sock, &mut c.tls, &mut c.buf, room);
            self.stack.mark_dirty(c.sock);
        }
        if c.buf.is_empty() {
            if c.tls.as_ref().is_some_and(|t| t.handshaking()) && now >= c.deadline {
                // A handshake that does not finish in time: closed like a slow head.
                return self.close(c);
            }
            if !io::may_recv(&self.stack, c.sock, &c.tls)
                || now >= c.deadline + self.cfg.idle_timeout_ms.saturating_sub(self.cfg.header_timeout_ms)
            {
                // Closed by the client, or idle too long between requests: close quietly.
                return self.close(c);
            }
            return true;
        }
        let mut storage = [httparse::EMPTY_HEADER; 128];
        let buf = std::mem::take(&mut c.buf);
        // Until this head parses, an error answers a request of unknown method (not the last
        // one's): with a body.
        c.head_request = false;
        let parsed = head::parse_request(&buf, &self.cfg.limits, &mut storage);
        let r = match parsed {
            Ok(Some(r)) => r,
            Ok(None) => {
                c.buf = buf;
                if now >= c.deadline {
                    return self.fail(c, 408);
                }
                if !io::may_recv(&self.stack, c.sock, &c.tls) {
                    return self.fail(c, 400);
                }
                return true;
            }
            Err(e) => {
                let status = e.status();
                c.buf = buf;
                return self.fail(c, status);
            }
        };
        self.stats.requests += 1;
        let started = std::time::Instant::now();
        c.started = Some(started);
        self.step_clock = Some(started);
        c.keep_alive = r.keep_alive && !self.draining;
        c.head_request = r.method.eq_ignore_ascii_case("HEAD");
        c.upgrade = r.upgrade.is_some();
        let host = r.host.unwrap_or("");
        if let Some(log) = self.access_log.as_deref_mut() {
            log.start(c.idx, started, c.peer_addr(), c.tls.is_some(), r.method, host, r.target);
        }
        if c.tls.is_none() && self.router.https_redirect(host) {
            // A host with TLS: plain HTTP is sent to HTTPS (308 keeps the method and body).
            let location = format!("https://{host}{}", r.target);
            self.count_response(308);
            let before = c.out.len();
            head::redirect_response(&location, &mut c.out);
            self.log_answered(c, 308, c.out.len() - before);
            c.buf.clear();
            c.phase = Phase::Closing;
            return self.closing(c);
        }
        // The router is borrowed field by field beside the picker's state, not cloned: an
        // `Arc` clone and drop per request are two atomic read-modify-writes, and each waits
        // for the core's earlier stores (to lines that are cold with many connections) to land.
        let picked = match self.router.route(host, r.target) {
            Route::Backend(t) => {
                pick(&mut self.rng, &self.in_flight, &t.endpoints_v4, (&self.failed, now), false).ok_or(503)
            }
            Route::NotFound => Err(404),
            Route::BadRequest(_) => Err(400),
        };
        let ep = match picked {
            Ok(ep) => ep,
            Err(status) => {
                // The head is answered and goes; a body the request announced is not read, so
                // the connection is then not kept (it would be taken for the next request).
                if r.framing != head::Framing::Empty {
                    c.keep_alive = false;
                }
                let head_len = r.head_len;
                c.buf = buf;
                c.buf.drain(..head_len);
                return self.fail(c, status);
            }
        };
        let Some(u) = self.upstream_for(ep) else {
            c.buf = buf;
            return self.fail(c, 503);
        };
        // The client's address as text on the stack: no String per request.
        let mut peer = arrayvec::ArrayString::<16>::new();
        let _ = write!(peer, "{}", c.peer);
        let up = self.ups[u].as_mut().expect("live upstream");
        up.lend_buffers(&mut self.spare);
        let proto = if c.tls.is_some() { "https" } else { "http" };
        head::write_upstream_request(&r, ClientInfo { addr: &peer, proto }, &mut up.out);
        up.out_off = 0;
        up.buf.clear();
        c.req_body = Some(BodyReader::new(r.framing, self.cfg.limits.max_body_bytes));
        let head_len = r.head_len;
        // What followed the head: the start of the body, perhaps the next request.
        c.buf = buf;
        c.buf.drain(..head_len);
        c.resends = 0;
        self.send_upstream(c, u, ep, now)
    }

    /// Puts client `c`'s request on upstream `u` (to `ep`, its head in the upstream's `out`)
    /// and runs it.
    fn send_upstream(&mut self, c: &mut Client, u: usize, ep: SocketAddrV4, now: u64) -> bool {
        c.up = Some(u);
        if let Some(log) = self.access_log.as_deref_mut() {
            log.upstream(c.idx, ep, c.resends);
        }
        let up = self.ups[u].as_ref().unwrap();
        let (ushard, connecting) = (up.sock.shard, up.connecting);
        self.attach(ushard, c.idx);
        c.endpoint = Some(ep);
        c.relayed = 0;
        *self.in_flight.entry(ep).or_default() += 1;
        // A new connection is looked at again when its connect timeout is up.
        let timeout = match connecting {
            true => self.cfg.connect_timeout_ms.min(self.cfg.upstream_timeout_ms),
            false => self.cfg.upstream_timeout_ms,
        };
        c.deadline = now + timeout;
        c.progress_ms = now;
        c.phase = Phase::Request;
        self.request(c, now)
    }

    /// Client `c`'s upstream failed before the request reached it (nothing of it was sent), so
    /// the request goes to another endpoint, routed again from its head as it would be now;
    /// with none left (or after `MAX_RESENDS`), the client gets `status`. `connect_failed`:
    /// the endpoint refused or did not answer the connection, and new requests pass it over
    /// for `FAILED_ENDPOINT_MS`; else (a connection closed before it took a byte) the same
    /// endpoint may be taken again, on another connection.
    fn resend(&mut self, c: &mut Client, now: u64, status: u16, connect_failed: bool) -> bool {
        let (Some(u), Some(ep)) = (c.up, c.endpoint) else { return self.upstream_failed(c, status) };
        if connect_failed {
            self.stats.upstream_connect_failures += 1;
            self.failed.insert(ep, now + FAILED_ENDPOINT_MS);
        }
        if c.resends >= MAX_RESENDS {
            return self.upstream_failed(c, status);
        }
        let head = std::mem::take(&mut self.ups[u].as_mut().expect("live upstream").out);
        self.release_upstream(c, false);
        let next = {
            let mut storage = [httparse::EMPTY_HEADER; 128];
            // The head as written for the upstream: our forwarding headers added, limits
            // already enforced on the client's.
            let limits = Limits {
                max_header_bytes: head.len(),
                max_headers: storage.len(),
                max_uri_bytes: head.len(),
                max_body_bytes: u64::MAX,
            };
            match head::parse_request(&head, &limits, &mut storage) {
                Ok(Some(r)) => match self.router.route(r.host.unwrap_or(""), r.target) {
                    Route::Backend(t) => {
                        pick(&mut self.rng, &self.in_flight, &t.endpoints_v4, (&self.failed, now), true)
                    }
                    _ => None,
                },
                _ => None,
            }
        };
        let Some(next) = next else { return self.upstream_failed(c, status) };
        let Some(u) = self.upstream_for(next) else { return self.upstream_failed(c, status) };
        let up = self.ups[u].as_mut().expect("live upstream");
        self.spare.lend(&mut up.buf);
        up.out = head;
        up.out_off = 0;
        up.buf.clear();
        c.resends += 1;
        self.stats.upstream_resends += 1;
        self.send_upstream(c, u, next, now)
    }

    /// The next of this core's upstream ports not in use towards `ep`, and the connection's key.
    fn free_upstream_port(&mut self, ep: SocketAddrV4) -> Option<(u16, ConnKey)> {
        let (lo, hi) = self.cfg.upstream_ports;
        for _ in 0..=(hi - lo) {
            let port = self.next_port;
            self.next_port = if port >= hi { lo } else { port + 1 };
            let key = (u32::from(*ep.ip()), ep.port(), port);
            if self.stack.lookup(key).is_none() {
                return Some((port, key));
            }
        }
        None
    }

    /// An idle pooled connection to `ep`, or a new one.
    fn upstream_for(&mut self, ep: SocketAddrV4) -> Option<usize> {
        while let Some(u) = self.idle.get_mut(&ep).and_then(VecDeque::pop_back) {
            // Its socket loads while its shard list is updated and the head is written out (a
            // miss that cannot be started sooner: the endpoint is known only once the request
            // is routed).
            let (sock, at) = self.ups[u].as_ref().map(|up| (up.sock, up.sock_at)).expect("pooled upstream");
            prefetch_socket(at);
            self.unfile_pooled(u);
            if clean_keep_alive(self.stack.view(sock)) {
                self.ups[u].as_mut().unwrap().idle_since = None;
                self.stats.upstream_reused += 1;
                return Some(u);
            }
            self.drop_upstream(u, true);
        }
        let (lo, hi) = self.cfg.upstream_ports;
        let held = self.ports_held.get(&ep).copied().unwrap_or(0);
        // Ports of closed connections stay taken until their sockets go (TIME-WAIT), so a
        // count below the range can still find none: then the probe says so.
        let free = if held > u32::from(hi - lo) { None } else { self.free_upstream_port(ep) };
        let Some((port, key)) = free else {
            self.stats.upstream_ports_exhausted += 1;
            return None;
        };
        let sock = self.stack.connect((*ep.ip(), ep.port()), port)?;
        self.stats.upstream_connects += 1;
        *self.ports_held.entry(ep).or_default() += 1;
        let up = Upstream {
            sock,
            sock_at: self.stack.socket_at(sock),
            key,
            endpoint: ep,
            out: Vec::new(),
            out_off: 0,
            buf: Vec::new(),
            idle_since: None,
            ack: AckPace::Quick,
            connecting: true,
        };
        Some(insert(&mut self.ups, &mut self.free_ups, up))
    }

    fn request(&mut self, c: &mut Client, now: u64) -> bool {
        let u = c.up.expect("a request has an upstream");
        let (usock, state, connecting, unsent) = {
            let up = self.ups[u].as_mut().unwrap();
            let state = self.stack.state(up.sock);
            if up.connecting && state != State::SynSent {
                up.connecting = state == State::Closed;
            }
            (up.sock, state, up.connecting, up.out_off == 0)
        };
        // The upstream refused or reset before answering: another endpoint if none of the
        // request was sent.
        if matches!(state, State::Closed | State::TimeWait | State::CloseWait | State::LastAck)
            && self.ups[u].as_ref().unwrap().buf.is_empty()
            && !self.stack.view(usock).can_recv()
        {
            return match unsent {
                true => self.resend(c, now, 502, connecting),
                false => self.upstream_failed(c, 502),
            };
        }
        if connecting && now >= c.progress_ms + self.cfg.connect_timeout_ms {
            return self.resend(c, now, 504, true);
        }
        // 1. The head, then the body the client sends (as far as the upstream takes it).
        {
            let up = self.ups[u].as_mut().unwrap();
            if up.out_off < up.out.len() {
                let s = self.stack.tcp_to_send(up.sock);
                if s.may_send() {
                    if let Ok(n) = s.send_slice(&up.out[up.out_off..]) {
                        up.out_off += n;
                    }
                }
            }
        }
        let head_sent = {
            let up = self.ups[u].as_ref().unwrap();
            up.out_off >= up.out.len()
        };
        if head_sent && !c.req_body.as_ref().is_some_and(BodyReader::is_done) {
            match self.request_body(c, usock) {
                Ok(()) => {}
                Err(status) => return self.upstream_failed(c, status),
            }
        }
        self.stack.mark_dirty(usock);
        self.stack.mark_dirty(c.sock);
        // 2. The response head.
        {
            let up = self.ups[u].as_mut().unwrap();
            let s = self.stack.tcp(up.sock);
            let room = self.cfg.limits.max_header_bytes.saturating_sub(up.buf.len());
            if s.can_recv() && room > 0 {
                io::recv_tcp_into(s, &mut up.buf, room);
            }
        }
        loop {
            let up = self.ups[u].as_mut().unwrap();
            if up.buf.is_empty() {
                break;
            }
            let method = if c.head_request { "HEAD" } else { "GET" };
            let mut storage = [httparse::EMPTY_HEADER; 128];
            let buf = std::mem::take(&mut up.buf);
            let parsed = head::parse_response(&buf, method, &self.cfg.limits, &mut storage);
            let res = match parsed {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.ups[u].as_mut().unwrap().buf = buf;
                    break;
                }
                Err(_) => {
                    return self.upstream_failed(c, 502);
                }
            };
            let status = res.status;
            let head_len = res.head_len;
            let framing = res.framing;
            let up_keep = res.keep_alive;
            if (100..200).contains(&status) && status != 101 {
                // Interim (100 Continue): relay and read on.
                let before = c.out.len();
                head::write_client_response(&res, true, &mut c.out);
                if let Some(log) = self.access_log.as_deref_mut() {
                    log.response_head(c.idx, status, c.out.len() - before);
                }
                let mut rest = buf;
                rest.drain(..head_len);
                self.ups[u].as_mut().unwrap().buf = rest;
                continue;
            }
            let client_keep = c.keep_alive && up_keep;
            let before = c.out.len();
            head::write_client_response(&res, client_keep, &mut c.out);
            if let Some(log) = self.access_log.as_deref_mut() {
                log.response_head(c.idx, status, c.out.len() - before);
            }
            c.keep_alive = client_keep;
            self.count_response(status);
            self.record_latency(c);
            let mut rest = buf;
            rest.drain(..head_len);
            // From here the upstream timeout no longer applies: the idle timeout does, to bytes
            // that stop moving.
            c.progress_ms = now;
            c.deadline = now + self.cfg.idle_timeout_ms;
            if status == 101 && c.upgrade {
                // Logged as it starts: a tunnel's bytes are not a response's.
                self.log_done(c, 0);
                c.out.extend_from_slice(&rest);
                c.phase = Phase::Tunnel;
                return self.flush_client(c) && self.tunnel(c);
            }
            let mut body = BodyReader::new(framing, u64::MAX);
            // Body bytes that came with the head.
            match body.feed(&rest) {
                Ok(n) => {
                    c.out.extend_from_slice(&rest[..n]);
                    c.relayed += n as u64;
                }
                Err(_) => return self.upstream_failed(c, 502),
            }
            c.resp_body = Some(body);
            c.phase = Phase::Response;
            return self.flush_client(c) && self.response(c);
        }
        // The upstream timeout counts from the request's last byte sent upstream: an upload
        // that keeps moving is not cut however long it takes.
        if !self.still_moving(c, now, self.cfg.upstream_timeout_ms) {
            return self.upstream_failed(c, 504);
        }
        true
    }

    /// Moves request body bytes from the client to the upstream; Err(status) if they are bad.
    /// Notes the time in `progress_ms` when bytes moved.
    fn request_body(&mut self, c: &mut Client, usock: SockRef) -> Result<(), u16> {
        let moved = self.move_request_body(c, usock)?;
        if moved > 0 {
            c.progress_ms = self.stack.now_ms();
        }
        Ok(())
    }

    /// `request_body`'s work; Ok(bytes sent upstream).
    fn move_request_body(&mut self, c: &mut Client, usock: SockRef) -> Result<usize, u16> {
        let mut moved = 0;
        let reader = c.req_body.as_mut().expect("request body reader");
        // First what came with the head.
        if !c.buf.is_empty() {
            let s = self.stack.tcp_to_send(usock);
            let room = s.send_capacity() - s.send_queue();
            let take = c.buf.len().min(room);
            let n = reader.feed(&c.buf[..take]).map_err(body_status)?;
            let sent = s.send_slice(&c.buf[..n]).unwrap_or(0);
            debug_assert_eq!(sent, n);
            c.buf.drain(..n);
            moved += n;
            if !reader.is_done() && n < take {
                return Ok(moved);
            }
        }
        while !reader.is_done() {
            let room = {
                let s = self.stack.tcp(usock);
                if !s.may_send() {
                    break;
                }
                s.send_capacity() - s.send_queue()
            };
            if room == 0 {
                break;
            }
            let n = io::peek(&mut self.stack, c.sock, &c.tls, &mut self.scratch[..room.min(SCRATCH)]);
            if n == 0 {
                break;
            }
            let take = reader.feed(&self.scratch[..n]).map_err(body_status)?;
            io::discard(&mut self.stack, c.sock, &mut c.tls, take);
            let _ = self.stack.tcp_to_send(usock).send_slice(&self.scratch[..take]);
            moved += take;
            if take < n {
                break; // the next request's bytes stay in the socket
            }
        }
        Ok(moved)
    }

    fn response(&mut self, c: &mut Client) -> bool {
        let u = c.up.expect("a response has an upstream");
        let usock = self.ups[u].as_ref().unwrap().sock;
        let now = self.stack.now_ms();
        loop {
            let body = c.resp_body.as_mut().expect("response body reader");
            if body.is_done() {
                break;
            }
            if !io::may_send(&mut self.stack, c.sock, &c.tls) {
                return self.close(c);
            }
            let room = io::room(&mut self.stack, c.sock, &c.tls);
            if room == 0 {
                break;
            }
            let us = self.stack.tcp(usock);
            let n = match us.peek_slice(&mut self.scratch[..room.min(SCRATCH)]) {
                Ok(n) if n > 0 => n,
                _ => {
                    if !us.may_recv() {
                        // The upstream closed: the end of an until-close body, else a cut one.
                        let complete = c.resp_body.as_ref().is_some_and(BodyReader::until_close);
                        self.release_upstream(c, false);
                        if !complete {
                            return self.abort(c);
                        }
                        self.log_done(c, c.relayed);
                        c.keep_alive = false;
                        c.resp_body = None;
                        c.phase = Phase::Closing;
                        return self.closing(c);
                    }
                    break;
                }
            };
            let take = match body.feed(&self.scratch[..n]) {
                Ok(t) => t,
                Err(_) => {
                    // A broken response mid-way: nothing honest can be sent; cut the client.
                    self.release_upstream(c, false);
                    return self.abort(c);
                }
            };
            io::discard_tcp(self.stack.tcp(usock), take);
            io::send(&mut self.stack, c.sock, &mut c.tls, &self.scratch[..take]);
            c.relayed += take as u64;
            c.progress_ms = now;
        }
        self.stack.mark_dirty(usock);
        self.stack.mark_dirty(c.sock);
        if !c.resp_body.as_ref().is_some_and(BodyReader::is_done)
            && !self.still_moving(c, now, self.cfg.idle_timeout_ms)
        {
            // Nothing moved for the idle timeout (a client that stopped reading, a server that
            // stopped sending): nothing honest is left to send; cut both.
            self.release_upstream(c, false);
            return self.abort(c);
        }
        if c.resp_body.as_ref().is_some_and(BodyReader::is_done) {
            self.log_done(c, c.relayed);
            let req_done = c.req_body.as_ref().is_none_or(BodyReader::is_done);
            self.release_upstream(c, req_done);
            c.resp_body = None;
            c.req_body = None;
            if c.keep_alive && req_done {
                set_pace(&mut self.stack, c.sock, &mut c.ack, AckPace::after_whole_exchange);
                c.phase = Phase::Head;
                c.deadline = now + self.cfg.header_timeout_ms;
                return if c.buf.is_empty() { true } else { self.read_head(c, now) };
            }
            c.phase = Phase::Closing;
            return self.closing(c);
        }
        true
    }

    fn tunnel(&mut self, c: &mut Client) -> bool {
        let u = c.up.expect("a tunnel has an upstream");
        let usock = self.ups[u].as_ref().unwrap().sock;
        // Client -> upstream.
        let mut a = 0;
        let room = {
            let s = self.stack.tcp(usock);
            if s.may_send() {
                s.send_capacity() - s.send_queue()
            } else {
                0
            }
        };
        if room > 0 {
            a = io::peek(&mut self.stack, c.sock, &c.tls, &mut self.scratch[..room.min(SCRATCH)]);
            if a > 0 {
                io::discard(&mut self.stack, c.sock, &mut c.tls, a);
                let _ = self.stack.tcp_to_send(usock).send_slice(&self.scratch[..a]);
            }
        }
        // Upstream -> client.
        let mut b = 0;
        let room =
            if io::may_send(&mut self.stack, c.sock, &c.tls) { io::room(&mut self.stack, c.sock, &c.tls) } else { 0 };
        if room > 0 {
            b = self.stack.tcp(usock).recv_slice(&mut self.scratch[..room.min(SCRATCH)]).unwrap_or(0);
            if b > 0 {
                io::send(&mut self.stack, c.sock, &mut c.tls, &self.scratch[..b]);
            }
        }
        self.stack.mark_dirty(usock);
        self.stack.mark_dirty(c.sock);
        let now = self.stack.now_ms();
        if a + b > 0 {
            c.progress_ms = now;
        }
        let (cs_open, us_open) = (io::may_recv(&self.stack, c.sock, &c.tls), self.stack.view(usock).may_recv());
        if (!cs_open || !us_open) && a == 0 && b == 0 || !self.still_moving(c, now, self.cfg.idle_timeout_ms) {
            self.release_upstream(c, false);
            c.phase = Phase::Closing;
            return self.closing(c);
        }
        true
    }

    /// Whether bytes moved within `timeout_ms` (a request body going upstream, a response body
    /// or a tunnel); when the deadline comes with more recent progress, it moves to that
    /// progress plus `timeout_ms`.
    fn still_moving(&self, c: &mut Client, now: u64, timeout_ms: u64) -> bool {
        if now < c.deadline {
            return true;
        }
        let until = c.progress_ms + timeout_ms;
        c.deadline = until;
        now < until
    }

    fn record_latency(&mut self, c: &mut Client) {
        if let Some(t) = c.started.take() {
            let now = std::time::Instant::now();
            self.step_clock = Some(now);
            self.latency_us.saturating_record(now.duration_since(t).as_micros().max(1) as u64);
        }
    }

    /// Client `c`'s request is over, for the access log (`body_bytes` sent after its head):
    /// it ended at the step's latest clock reading when there is one (`step_clock`; None
    /// outside a step, as when a finished connection goes).
    fn log_done(&mut self, c: &Client, body_bytes: u64) {
        if let Some(log) = self.access_log.as_deref_mut() {
            log.done(c.idx, c.peer_addr(), c.tls.is_some(), body_bytes, self.step_clock);
        }
    }

    /// The proxy answered client `c`'s request itself: `bytes` of response with `status`.
    fn log_answered(&mut self, c: &Client, status: u16, bytes: usize) {
        if let Some(log) = self.access_log.as_deref_mut() {
            log.answered(c.idx, c.peer_addr(), c.tls.is_some(), status, bytes, self.step_clock);
        }
    }

    fn count_response(&mut self, status: u16) {
        if (200..600).contains(&status) {
            self.stats.responses[(status / 100 - 2) as usize] += 1;
        }
    }

    /// Answers with an error made here and closes after it (keeps the connection for 404).
    fn fail(&mut self, c: &mut Client, status: u16) -> bool {
        self.stats.errors_local += 1;
        self.count_response(status);
        self.record_latency(c);
        let keep = status == 404 && c.keep_alive && c.buf.is_empty();
        let before = c.out.len();
        head::error_response(status, keep, c.head_request, &mut c.out);
        self.log_answered(c, status, c.out.len() - before);
        if keep {
            c.phase = Phase::Head;
            c.deadline = self.stack.now_ms() + self.cfg.header_timeout_ms;
            return self.flush_client(c);
        }
        c.buf.clear();
        c.phase = Phase::Closing;
        self.closing(c)
    }

    fn upstream_failed(&mut self, c: &mut Client, status: u16) -> bool {
        self.release_upstream(c, false);
        if c.relayed > 0 || !c.out.is_empty() && c.phase == Phase::Response {
            return self.abort(c);
        }
        c.req_body = None;
        c.resp_body = None;
        self.fail(c, status)
    }

    /// Ends the request's use of its upstream: back to the pool if it can carry another
    /// request, else closed.
    fn release_upstream(&mut self, c: &mut Client, reusable: bool) {
        if let Some(ep) = c.endpoint.take() {
            if let Some(n) = self.in_flight.get_mut(&ep) {
                *n = n.saturating_sub(1);
            }
        }
        let Some(u) = c.up.take() else { return };
        let ushard = self.ups[u].as_ref().expect("live upstream").sock.shard;
        self.detach(ushard, c.idx);
        let up = self.ups[u].as_mut().expect("live upstream");
        let s = self.stack.tcp(up.sock);
        if reusable && !self.draining && clean_keep_alive(s) {
            let now = self.stack.now_ms();
            up.idle_since = Some(now);
            set_pace(&mut self.stack, up.sock, &mut up.ack, AckPace::after_whole_exchange);
            up.buf.clear();
            up.settle_buffers(&mut self.spare);
            let (ep, shard) = (up.endpoint, up.sock.shard);
            self.idle.entry(ep).or_default().push_back(u);
            self.attach(shard, IDLE_UPSTREAM | u);
        } else {
            self.drop_upstream(u, false);
        }
    }

    fn drop_upstream(&mut self, u: usize, from_pool: bool) {
        let up = self.ups[u].take().expect("live upstream");
        self.free_ups.push(u);
        if let Some(n) = self.ports_held.get_mut(&up.endpoint) {
            *n -= 1;
            if *n == 0 {
                self.ports_held.remove(&up.endpoint);
            }
        }
        if !from_pool {
            if let Some(v) = self.idle.get_mut(&up.endpoint) {
                v.retain(|&x| x != u);
            }
        }
        let s = self.stack.tcp(up.sock);
        s.abort();
        self.stack.mark_dirty(up.sock);
        // Sent on the next egress poll; the socket is forgotten after it.
        self.stack.remove_later(up.sock, up.key);
    }

    /// Pooled connections idle for their timeout go. Each endpoint's pool is oldest first, so
    /// only its front is looked at: the cost follows the endpoints and what expires, not the
    /// pool. (It scanned every pooled connection every millisecond, touching each socket: with
    /// 10,000 clients about 6,000 of them, each a cold socket and a shard to poll.) One that
    /// its server closed went when its FIN arrived (`check_pooled`), or goes when taken
    /// (`upstream_for` checks each).
    fn reap_idle(&mut self, now: u64) {
        let timeout = self.cfg.idle_timeout_ms;
        let mut gone = std::mem::take(&mut self.gone_idle);
        for list in self.idle.values_mut() {
            while let Some(&u) = list.front() {
                let up = self.ups.get(u).and_then(Option::as_ref);
                if up.is_some_and(|up| up.idle_since.is_some_and(|t| now < t + timeout)) {
                    break;
                }
                list.pop_front();
                if up.is_some() {
                    gone.push(u);
                }
            }
        }
        for &u in &gone {
            self.unfile_pooled(u);
            self.drop_upstream(u, true);
        }
        gone.clear();
        self.gone_idle = gone;
    }

    /// A pooled upstream whose shard received segments: kept if it is still a clean
    /// keep-alive connection, else it goes (its server closed it, reset it, or sent bytes
    /// nobody asked for).
    fn check_pooled(&mut self, u: usize) {
        let Some(up) = self.ups.get(u).and_then(Option::as_ref) else { return };
        if up.idle_since.is_none() {
            return;
        }
        let sock = up.sock;
        if clean_keep_alive(self.stack.view(sock)) {
            return;
        }
        self.unfile_pooled(u);
        self.drop_upstream(u, false);
    }

    /// Takes a pooled upstream's entry out of `by_shard` (it is being reused or dropped).
    fn unfile_pooled(&mut self, u: usize) {
        if let Some(shard) = self.ups.get(u).and_then(Option::as_ref).map(|up| up.sock.shard) {
            self.detach(shard, IDLE_UPSTREAM | u);
        }
    }

    fn close(&mut self, c: &mut Client) -> bool {
        c.phase = Phase::Closing;
        self.closing(c)
    }

    fn closing(&mut self, c: &mut Client) -> bool {
        if c.up.is_some() {
            self.release_upstream(c, false);
        }
        let now = self.stack.now_ms();
        let close_by = *c.close_by.get_or_insert(now + FIN_TIMEOUT_MS);
        if now >= close_by {
            return self.abort(c);
        }
        // `run` wakes the client then, if nothing else does first.
        c.deadline = close_by;
        if c.out_off < c.out.len() && io::may_send(&mut self.stack, c.sock, &c.tls) {
            c.out_off += io::send(&mut self.stack, c.sock, &mut c.tls, &c.out[c.out_off..]);
        }
        if c.out_off >= c.out.len() {
            // TLS: close_notify once, encrypted and out before the FIN.
            if c.tls.as_ref().is_some_and(|t| !t.failed && !t.handshaking()) && c.phase == Phase::Closing {
                io::close_notify(&mut c.tls);
                if let Some(t) = c.tls.as_mut() {
                    t.failed = true; // nothing more to send on it
                }
            }
            io::pump(&mut self.stack, c.sock, &mut c.tls, &mut self.stats.tls);
            let s = self.stack.tcp(c.sock);
            if io::drained(&c.tls) && s.is_open() && s.state() != State::FinWait1 && s.state() != State::FinWait2 {
                s.close();
            }
        }
        self.stack.mark_dirty(c.sock);
        let st = self.stack.tcp(c.sock).state();
        !matches!(st, State::Closed | State::TimeWait)
    }

    fn abort(&mut self, c: &mut Client) -> bool {
        if c.up.is_some() {
            self.release_upstream(c, false);
        }
        self.stack.tcp(c.sock).abort();
        self.stack.mark_dirty(c.sock);
        false
    }

    /// Starts a graceful stop, as nginx's on SIGQUIT: new connections are refused (their SYNs
    /// dropped, `DropReason::L7Draining`), connections idle between requests (or still being
    /// accepted) are closed now, and the others after the response under way (sent with
    /// `Connection: close`). Pooled upstream connections are closed now, and those of the
    /// requests under way when their request is done. The caller stops the worker once
    /// `client_count` is 0, or at its deadline.
    pub fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let pooled: Vec<usize> = self.idle.values_mut().flat_map(|q| q.drain(..)).collect();
        for u in pooled {
            self.unfile_pooled(u);
            self.drop_upstream(u, true);
        }
        for i in 0..self.clients.len() {
            let Some(mut c) = self.clients[i].take() else { continue };
            c.keep_alive = false;
            let idle = c.phase == Phase::Head && c.buf.is_empty() && !io::can_recv(&mut self.stack, c.sock, &c.tls);
            let keep = !idle || self.close(&mut c);
            if keep {
                self.clients[i] = Some(c);
            } else {
                self.finish(c);
            }
        }
    }

    /// Whether `drain` was called.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether client slot `i` holds connection `key` and its handshake is not complete.
    fn in_handshake(&self, i: usize, key: ConnKey) -> bool {
        self.clients[i]
            .as_ref()
            .is_some_and(|c| c.key == key && matches!(self.stack.state(c.sock), State::Listen | State::SynReceived))
    }

    /// Gives up the oldest client connection still in its handshake (its socket reset, its
    /// slot freed); false if there is none.
    fn evict_oldest_handshake(&mut self) -> bool {
        while let Some((i, key)) = self.accepting.pop_front() {
            if self.in_handshake(i, key) {
                let c = self.clients[i].take().expect("checked above");
                self.finish(c);
                self.stats.handshakes_evicted += 1;
                return true;
            }
        }
        false
    }

    /// A client connection is over: its socket goes once its last segment is out.
    fn finish(&mut self, mut c: Client) {
        if c.up.is_some() {
            self.release_upstream(&mut c, false);
        }
        // A request still under way: the connection ended first (status 0 if no response head
        // went out, else the part of the response sent).
        self.log_done(&c, c.relayed);
        let s = self.stack.tcp(c.sock);
        if !matches!(s.state(), State::Closed | State::TimeWait) {
            s.abort();
            self.stack.mark_dirty(c.sock);
        }
        self.deadlines.cancel(c.timer);
        self.detach(c.sock.shard, c.idx);
        self.stack.remove_later(c.sock, c.key);
        self.free_clients.push(c.idx);
    }
}

/// Moves a connection's ACK pace on by `next`, telling its socket when the delay changes.
fn set_pace(stack: &mut Stack, sock: SockRef, pace: &mut AckPace, next: fn(AckPace) -> AckPace) {
    let to = next(*pace);
    if to.delay_ms() != pace.delay_ms() {
        stack.set_ack_delay(sock, to.delay_ms());
    }
    *pace = to;
}

/// Whether an upstream connection can take the next request: open both ways (ESTABLISHED,
/// which can also send) with nothing unread from the server. The one test for pooling a
/// connection, keeping it pooled and taking it from the pool.
fn clean_keep_alive(s: &smoltcp::socket::tcp::Socket) -> bool {
    s.state() == State::Established && !s.can_recv()
}

fn body_status(e: super::http::body::BodyError) -> u16 {
    match e {
        super::http::body::BodyError::TooLarge => 413,
        super::http::body::BodyError::Malformed(_) => 400,
    }
}

/// Puts `x` in a slot freed for good (most recently freed first: its memory is warm), or at the
/// end.
fn insert<T>(v: &mut Vec<Option<T>>, free: &mut Vec<usize>, x: T) -> usize {
    while let Some(i) = free.pop() {
        if v[i].is_none() {
            v[i] = Some(x);
            return i;
        }
    }
    v.push(Some(x));
    v.len() - 1
}

/// Re-sends of one request to other endpoints (see the module documentation).
const MAX_RESENDS: u8 = 3;
/// How long new requests pass over an endpoint whose connection failed.
const FAILED_ENDPOINT_MS: u64 = 10_000;

/// An endpoint for a request: power of two choices by requests in flight, passing over the
/// endpoints that failed lately (`failed`, until when, and the time now) while others have
/// not. Every endpoint failed lately: a new request tries its pick anyway, a re-send
/// (`resend`) gets none.
fn pick(
    rng: &mut u64,
    in_flight: &AHashMap<SocketAddrV4, u32>,
    v4: &[SocketAddrV4],
    (failed, now): (&AHashMap<SocketAddrV4, u64>, u64),
    resend: bool,
) -> Option<SocketAddrV4> {
    let first = two_choices(rng, in_flight, v4)?;
    if failed.is_empty() {
        return Some(first);
    }
    let usable = |e: &SocketAddrV4| failed.get(e).is_none_or(|&until| until <= now);
    if usable(&first) {
        return Some(first);
    }
    // Rare (an endpoint failed in the last seconds): two more draws, then a scan.
    for _ in 0..2 {
        if let Some(e) = two_choices(rng, in_flight, v4).filter(usable) {
            return Some(e);
        }
    }
    let load = |e: &&SocketAddrV4| in_flight.get(*e).copied().unwrap_or(0);
    match v4.iter().filter(|e| usable(e)).min_by_key(load) {
        Some(e) => Some(*e),
        None => (!resend).then_some(first),
    }
}

/// Power of two choices, by requests in flight (`rng`: the proxy's xorshift state).
fn two_choices(rng: &mut u64, in_flight: &AHashMap<SocketAddrV4, u32>, v4: &[SocketAddrV4]) -> Option<SocketAddrV4> {
    match v4.len() {
        0 => None,
        1 => Some(v4[0]),
        n => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let a = (*rng % n as u64) as usize;
            let b = (a + 1 + ((*rng >> 32) % (n as u64 - 1)) as usize) % n;
            let load = |e: &SocketAddrV4| in_flight.get(e).copied().unwrap_or(0);
            Some(if load(&v4[b]) < load(&v4[a]) { v4[b] } else { v4[a] })
        }
    }
}
