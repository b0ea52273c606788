//! `fulcrum-bench l7`: the real worker (Ethernet in, classification, the sharded TCP stack, the
//! HTTP proxy, Ethernet out) on an in-memory port, one pinned core, with N keep-alive client
//! connections and a few backends that are real TCP stacks of their own (smoltcp, in memory).
//! The clients are hosts of 64 connections each on their own addresses behind a router (the
//! port's next hop), as a load balancer sees them.
//! Only the worker's time is counted for requests per second; the latency percentiles are
//! round trips through the whole simulation (clients and backends included), in wall time.
//! Timing starts after a warm-up (`--warmup` requests per connection): connection set-up and the
//! first touch of every socket's buffers are not what a keep-alive rate measures (at 10,000
//! connections and 30 requests each they were a fifth of the worker's time).

use crate::report;
use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::ingress::L7State;
use fulcrum_config::model::{DesiredState, ObjectRef};
use fulcrum_dataplane::l7::access_log::{AccessLog, Reader};
use fulcrum_dataplane::l7::sim::{
    ethernet_frame, is_pure_ack, mac_of, one_route, response_complete, tcp_syn, test_pki, Backend, Host, TlsClient,
    APPLIANCE_BOOTSTRAP, APPLIANCE_MAC,
};
use fulcrum_dataplane::port::MemoryPort;
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use hdrhistogram::Histogram;
use smoltcp::iface::SocketHandle;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct L7Args {
    /// Client connections (keep-alive, one request in flight each).
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Requests to complete in the timed phase.
    #[arg(long, default_value_t = 50_000)]
    pub requests: u64,
    /// Requests per connection before the timed phase starts (0: time from the first SYN).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Backends behind the route.
    #[arg(long, default_value_t = 4)]
    pub backends: usize,
    /// Clients speak TLS 1.3 (ECDSA P-256) to port 443; the line also carries raw rustls's
    /// server handshake rate on the same core, measured in the same run.
    #[arg(long)]
    pub tls: bool,
    /// One request per connection (with --tls: a full handshake per request).
    #[arg(long)]
    pub new_conn: bool,
    /// With --tls: each connection does its handshake, sends close_notify and closes, no
    /// request (what raw rustls's figure counts, plus TCP). Implies --new-conn.
    #[arg(long, requires = "tls")]
    pub handshake_only: bool,
    #[arg(long)]
    pub core: Option<usize>,
    /// What the worker's millisecond clock follows. `rounds`: one millisecond every 4 rounds
    /// of all clients (the figures so far); per-millisecond work (stack timers, pooled
    /// connections, the proxy's deadlines) then runs far less often per request than on a real
    /// core, the more so with more connections. `worker`: the worker's own busy time, as if it
    /// ran alone on a saturated core with its peers elsewhere.
    #[arg(long, value_enum, default_value_t = Clock::Rounds)]
    pub clock: Clock,
    /// The proxy records every request for an access log (`l7.access_log`): the worker's
    /// share, events handed to a ring, is timed; the bench reads the ring outside the worker's
    /// time (in `fulcrum run` a writer thread on a control CPU reads, formats and writes).
    #[arg(long)]
    pub access_log: bool,
    /// Spoofed SYNs to the L7 address's port per round of all clients, from random addresses
    /// in 198.18.0.0/15 that never answer: a SYN flood beside the clients (handled in the
    /// worker's timed time).
    #[arg(long, default_value_t = 0)]
    pub syn_flood: u64,
    /// `l7.limits.max_connections` for the worker (client connections at once).
    #[arg(long, default_value_t = fulcrum_config::bootstrap::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    Rounds,
    Worker,
}

// The proxy tests' certificate (test-only key, `sim::test_pki`): clients ask for shop.example.
const CA: &[u8] = test_pki::CA;
const HOST: &str = test_pki::SHOP_HOST;

/// How long a closed simulated client socket stays in TIME-WAIT (simulated ms): past smoltcp's
/// 10 ms delayed ACK, so that its last ACK is out before it goes.
const TIME_WAIT_MS: u64 = 20;

const LB_MAC: [u8; 6] = APPLIANCE_MAC;
const L7_ADDR: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
/// The router the clients are behind (the port's next hop).
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
/// Client connections per simulated client host. smoltcp scans every socket of a host for each
/// segment it takes in: one host with 10,000 sockets cost O(connections) per segment, swept
/// megabytes through the worker core's cache between its polls (the worker's own state evicted
/// by the simulator's), and took most of the bench's wall time. Clients on many addresses
/// behind a router are also what a load balancer sees.
const CONNS_PER_CLIENT_HOST: usize = 64;

/// The address of simulated client host `k`, in 10.30.0.0/16 (behind the router).
fn client_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 30, (k / 250) as u8, (k % 250 + 1) as u8)
}

/// Which client host an address in 10.30.0.0/16 is.
fn client_host_of(a: Ipv4Addr) -> Option<usize> {
    let o = a.octets();
    (o[0] == 10 && o[1] == 30 && (1..=250).contains(&o[3])).then(|| o[2] as usize * 250 + o[3] as usize - 1)
}

pub fn run(a: &L7Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.conns > 0 && a.backends > 0 && a.conns < 30_000,
        "--conns (1-29999) and --backends must be positive"
    );
    // Every client keeps a request in flight, each on its own upstream connection: past the
    // core's upstream ports per endpoint the proxy answers 503 (and counts it).
    let per_endpoint = usize::from(fulcrum_dataplane::worker::L7_UPSTREAM_PORTS);
    anyhow::ensure!(
        a.conns <= a.backends * per_endpoint,
        "--conns {} needs at least {} --backends: one core holds at most {per_endpoint} upstream \
         connections to one endpoint",
        a.conns,
        a.conns.div_ceil(per_endpoint)
    );
    let core = crate::pin(a.core);
    let boot = Bootstrap::parse(Path::new("bench.yaml"), APPLIANCE_BOOTSTRAP)?;
    let backend_addrs: Vec<Ipv4Addr> = (0..a.backends).map(|i| Ipv4Addr::new(10, 10, 0, 100 + i as u8)).collect();
    let endpoints: Vec<SocketAddr> = backend_addrs.iter().map(|&b| SocketAddr::new(b.into(), 8080)).collect();
    let l7 = L7State {
        certificates: vec![test_pki::shop_certificate(ObjectRef { namespace: "bench".into(), name: "tls".into() })],
        ..one_route(HOST, endpoints)
    };
    let snap = Arc::new(Snapshot::compile(&boot, &DesiredState { l7, ..Default::default() }, 1)?);
    let mut cfg = WorkerConfig::from_bootstrap(&boot, 0, 1);
    if let Some(l7) = cfg.l7.as_mut() {
        l7.max_connections = a.max_connections;
    }
    cfg.ct_capacity = 1024;
    cfg.ct_capacity_v6 = 1024;
    cfg.static_neighbors.push((IpAddr::V4(ROUTER), mac_of(ROUTER)));
    for &b in &backend_addrs {
        cfg.static_neighbors.push((IpAddr::V4(b), mac_of(b)));
    }
    let mut w = Worker::new(cfg, snap)?;
    let mut log_ring = a.access_log.then(|| {
        let (ring, events) = rtrb::RingBuffer::new(4 << 20);
        w.set_access_log(AccessLog::new(ring, Instant::now()));
        (events, Reader::new(0))
    });
    let mut logged = 0u64;
    let mut port = MemoryPort::new();
    let mut clients: Vec<Host> =
        (0..a.conns.div_ceil(CONNS_PER_CLIENT_HOST)).map(|k| Host::new(client_addr(k), 99 + k as u64)).collect();
    let mut backends: Vec<Backend> = backend_addrs
        .iter()
        .map(|&b| {
            // Listeners for the upstream connections opened in one round: at the start every
            // client's first request opens one, spread evenly by the proxy's least-outstanding
            // choice (a SYN finding no listener is reset and the bench fails on the 502). Not
            // one per client on every backend: each listener is one more socket smoltcp scans
            // for every segment.
            let mut be = Backend::with_listeners(b, "be", 64);
            be.buffer = 16384;
            be.listeners = a.conns / a.backends * 3 / 2 + 64;
            be
        })
        .collect();

    let new_conn = a.new_conn || a.handshake_only;
    let port_no = if a.tls { 443 } else { 80 };
    let mut next_port = 20000u16;
    let mut open = |client: &mut Host| -> (SocketHandle, Option<TlsClient>) {
        next_port = if next_port >= 60000 { 20000 } else { next_port + 1 };
        let h = client.connect((L7_ADDR, port_no), next_port, 16384);
        (h, a.tls.then(|| TlsClient::new(CA, HOST)))
    };
    // Connection i is on client host i / CONNS_PER_CLIENT_HOST.
    let mut conns: Vec<(SocketHandle, Option<TlsClient>)> =
        (0..a.conns).map(|i| open(&mut clients[i / CONNS_PER_CLIENT_HOST])).collect();
    // Per connection: when its request went out (wall ns), and what came back so far.
    let mut sent_at: Vec<Option<Instant>> = vec![None; a.conns];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); a.conns];
    let request = format!("GET /item HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: fulcrum-bench\r\n\r\n").into_bytes();
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut done = 0u64;
    let mut warm_left = a.warmup * a.conns as u64;
    let mut worker_ns = 0u128;
    let (mut frames_in, mut frames_out) = (0u64, 0u64);
    // Frames out that carry nothing but an acknowledgement, to the client and to the backends.
    let (mut acks_to_client, mut acks_to_backends) = (0u64, 0u64);
    let mut now_ms = 1u64;
    // The worker's busy time since the start, warm-up included (`--clock worker`).
    let mut busy_ns = 0u128;
    let mut rounds = 0u64;
    let mut closing: Vec<(usize, SocketHandle, Option<u64>)> = Vec::new();
    let (mut flood_rng, mut spoofed) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
    let wall = Instant::now();
    // When the timed requests began (the warm-up's end).
    let mut timed_from = wall;
    while done < a.requests {
        rounds += 1;
        match a.clock {
            Clock::Rounds if rounds.is_multiple_of(4) => now_ms += 1,
            Clock::Rounds => {}
            Clock::Worker => now_ms = now_ms.max(1 + (busy_ns / 1_000_000) as u64),
        }
        anyhow::ensure!(rounds < 50_000_000, "no progress: {done} requests done");
        // Clients: read responses, send the next request on idle connections.
        for i in 0..conns.len() {
            let k = i / CONNS_PER_CLIENT_HOST;
            let client = &mut clients[k];
            let (h, tls) = &mut conns[i];
            let s = client.tcp(*h);
            match tls {
                Some(t) => t.pump(s, &mut got[i]),
                None => {
                    if s.can_recv() {
                        let _ = s.recv(|d| {
                            got[i].extend_from_slice(d);
                            (d.len(), ())
                        });
                    }
                }
            }
            let finished = match tls {
                Some(t) if a.handshake_only => (!t.conn.is_handshaking()).then_some(0),
                _ => response_complete(&got[i]),
            };
            if let Some(n) = finished {
                anyhow::ensure!(
                    a.handshake_only || got[i].starts_with(b"HTTP/1.1 200"),
                    "bad response: {:?}",
                    String::from_utf8_lossy(&got[i])
                );
                got[i].drain(..n);
                if let Some(t) = sent_at[i].take() {
                    if warm_left > 0 {
                        warm_left -= 1;
                        if warm_left == 0 {
                            worker_ns = 0;
                            timed_from = Instant::now();
                            (frames_in, frames_out) = (0, 0);
                            (acks_to_client, acks_to_backends) = (0, 0);
                        }
                    } else {
                        lat.record(t.elapsed().as_nanos().max(1) as u64)?;
                        done += 1;
                    }
                }
                if new_conn {
                    if let Some(t) = tls.as_mut().filter(|_| a.handshake_only) {
                        // As curl and openssl s_client end a connection.
                        t.conn.send_close_notify();
                        t.pump(client.tcp(*h), &mut got[i]);
                    }
                    client.close(*h);
                    closing.push((k, *h, None));
                    conns[i] = open(client);
                }
            }
            let (h, tls) = &mut conns[i];
            if sent_at[i].is_none() {
                match tls {
                    Some(t) => {
                        if !a.handshake_only {
                            t.send(&request);
                        }
                        t.pump(client.tcp(*h), &mut got[i]);
                        sent_at[i] = Some(Instant::now());
                    }
                    None => {
                        let s = client.tcp(*h);
                        if s.may_send() && s.send_queue() == 0 {
                            s.send_slice(&request)?;
                            sent_at[i] = Some(Instant::now());
                        }
                    }
                }
            }
        }
        // A closed client socket goes when Closed, or some milliseconds into TIME-WAIT: by
        // then it has acknowledged the proxy's FIN. (Dropped at once, it never did, and every
        // TLS connection's proxy socket, closed gracefully after close_notify, sat in LAST-ACK
        // with its buffers for the rest of the run: 667 MB after 20,000 handshakes.)
        closing.retain_mut(|(k, h, since)| {
            let client = &mut clients[*k];
            let st = client.sockets.get::<smoltcp::socket::tcp::Socket>(*h).state();
            let gone = match st {
                smoltcp::socket::tcp::State::Closed => true,
                smoltcp::socket::tcp::State::TimeWait => now_ms >= *since.get_or_insert(now_ms) + TIME_WAIT_MS,
                _ => false,
            };
            if gone {
                client.sockets.remove(*h);
            }
            !gone
        });
        for c in clients.iter_mut() {
            c.poll(now_ms);
        }
        for b in backends.iter_mut() {
            b.host.poll(now_ms);
            b.serve();
            b.host.poll(now_ms);
        }
        // Hosts -> the worker's port, as Ethernet frames.
        for c in clients.iter_mut() {
            for p in c.dev.tx.drain(..) {
                port.push_rx(&ethernet_frame(&p, LB_MAC, mac_of(ROUTER)));
                frames_in += 1;
            }
        }
        for b in backends.iter_mut() {
            let mac = mac_of(b.host.addr);
            for p in b.host.dev.tx.drain(..) {
                port.push_rx(&ethernet_frame(&p, LB_MAC, mac));
                frames_in += 1;
            }
        }
        for _ in 0..a.syn_flood {
            // xorshift64: a source address in 198.18.0.0/15 and a port, each SYN its own.
            flood_rng ^= flood_rng << 13;
            flood_rng ^= flood_rng >> 7;
            flood_rng ^= flood_rng << 17;
            let src = Ipv4Addr::from(0xc612_0000 | (flood_rng as u32 & 0x1_ffff));
            let syn = tcp_syn((src, 1024 + (flood_rng >> 40) as u16 % 60000), (L7_ADDR, port_no));
            port.push_rx(&ethernet_frame(&syn, LB_MAC, mac_of(ROUTER)));
            spoofed += 1;
        }
        // The worker: everything received, then its housekeeping (the proxy runs there).
        let t = Instant::now();
        loop {
            let n = w.poll(&mut port, now_ms);
            if n == 0 && port.rx.is_empty() {
                break;
            }
        }
        let dt = t.elapsed().as_nanos();
        worker_ns += dt;
        busy_ns += dt;
        if let Some((events, reader)) = log_ring.as_mut() {
            reader.drain(events, |r| logged += u64::from(r.status == 200));
        }
        // The worker's frames -> the hosts.
        for f in port.take_tx() {
            frames_out += 1;
            if f.len() < 34 || f[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = f[14..].to_vec();
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let pure_ack = is_pure_ack(&ip);
            if let Some(c) = client_host_of(dst).and_then(|k| clients.get_mut(k)) {
                acks_to_client += pure_ack as u64;
                c.dev.rx.push_back(ip);
            } else if let Some(b) = backends.iter_mut().find(|b| b.host.addr == dst) {
                acks_to_backends += pure_ack as u64;
                b.host.dev.rx.push_back(ip);
            }
        }
    }
    let worker_s = worker_ns as f64 / 1e9;
    let st = w.proxy_stats().unwrap_or_default();
    let gauges = w.stats_copy().l7;
    // Raw rustls on the same core, same certificate: server-side handshake time only.
    let raw = if a.tls && new_conn {
        Some(raw_rustls_handshakes(w.snapshot().tls.clone().expect("TLS config"), 2000)?)
    } else {
        None
    };
    let rps = done as f64 / worker_s;
    // The SYN flood (the whole run): spoofed SYNs sent, connections in their handshake given
    // up for newer ones at the limit, SYNs dropped there.
    let flood = serde_json::json!({
        "per_round": a.syn_flood,
        "spoofed_syns": spoofed,
        "handshakes_evicted": st.handshakes_evicted,
        "syns_dropped_at_limit": st.connections_over_limit,
    });
    report::print(serde_json::json!({
        "bench": "l7",
        "conns": a.conns,
        "tls": a.tls,
        "new_conn": new_conn,
        "handshake_only": a.handshake_only,
        "handshakes_per_s_per_core": (a.tls && new_conn).then_some(rps),
        "raw_rustls_handshakes_per_s": raw,
        "ratio_to_raw_rustls": raw.map(|r| rps / r),
        "rps_per_core": rps,
        "p50_us": lat.value_at_quantile(0.5) as f64 / 1e3,
        "p99_us": lat.value_at_quantile(0.99) as f64 / 1e3,
        "latency_includes_simulated_peers": true,
        "requests": done,
        "warmup_requests_per_conn": a.warmup,
        "worker_seconds": worker_s,
        // Frames into and out of the worker per timed request: more at high latency when
        // delayed ACKs fire alone instead of riding on the next segment.
        "frames_in_per_request": frames_in as f64 / done.max(1) as f64,
        "frames_out_per_request": frames_out as f64 / done.max(1) as f64,
        "pure_acks_to_clients_per_request": acks_to_client as f64 / done.max(1) as f64,
        "pure_acks_to_backends_per_request": acks_to_backends as f64 / done.max(1) as f64,
        // The whole run, warm-up (connections opened, first requests) included, and the timed
        // part alone; both include the simulated peers' time.
        "wall_seconds": wall.elapsed().as_secs_f64(),
        "timed_wall_seconds": timed_from.elapsed().as_secs_f64(),
        "clock": match a.clock { Clock::Rounds => "rounds", Clock::Worker => "worker" },
        "clock_ms_at_end": now_ms,
        "backends": a.backends,
        "upstream_connects": st.upstream_connects,
        "upstream_reused": st.upstream_reused,
        "tls_handshakes": st.tls.handshakes,
        "tls_resumed": st.tls.resumed,
        "proxy_steps": st.steps,
        "errors_local": st.errors_local,
        "socket_buffer_bytes": boot.l7.as_ref().map(|l| l.socket_buffer),
        // What the worker's socket-buffer pools hold at the end (in use or kept for reuse).
        "socket_buffers_held_bytes": gauges.socket_buffer_bytes,
        "socket_buffers_lent_at_end": gauges.socket_buffers_lent,
        "max_connections": a.max_connections,
        "syn_flood": flood,
        // The proxy's sockets at the end: its clients and upstreams, and closing ones (a
        // socket waiting long for a peer's last ACK holds its buffers meanwhile).
        "proxy_sockets_at_end": gauges.sockets,
        "proxy_deadline_entries_at_end": gauges.deadline_entries,
        "access_log": a.access_log,
        "access_log_records": a.access_log.then_some(logged),
        "access_log_dropped": a.access_log.then_some(gauges.access_log_dropped),
        "core": core,
        "loadavg": report::loadavg(),
    }));
    if a.access_log && !a.handshake_only {
        // Every request answered 200 left a record (the warm-up's too); those still in flight
        // at the end have not.
        let answered = done + a.warmup * a.conns as u64;
        anyhow::ensure!(
            logged + a.conns as u64 >= answered && logged <= answered + a.conns as u64,
            "{logged} access log records of 200s for {answered} requests"
        );
    }
    anyhow::ensure!(st.errors_local == 0, "the proxy answered {} requests with errors", st.errors_local);
    anyhow::ensure!(st.tls.failures == 0, "{} TLS sessions failed", st.tls.failures);
    // The proxy's own count: a handshake is done on its side once the client's Finished is
    // read, after the client counted it (those still in flight at the end are the difference).
    if a.tls && new_conn {
        anyhow::ensure!(
            st.tls.handshakes + a.conns as u64 >= done + a.warmup * a.conns as u64,
            "the proxy completed {} handshakes, the clients {done}",
            st.tls.handshakes
        );
    }
    Ok(())
}

/// Full TLS 1.3 handshakes per second of rustls alone (no TCP, no HTTP): the server's share of
/// the time only, client and server exchanging records in memory.
fn raw_rustls_handshakes(cfg: Arc<rustls::ServerConfig>, n: usize) -> anyhow::Result<f64> {
    let mut server_ns = 0u128;
    for _ in 0..n {
        let mut client = TlsClient::new(CA, HOST);
        let mut server = rustls::ServerConnection::new(cfg.clone())?;
        let mut c2s = Vec::new();
        let mut s2c = Vec::new();
        while client.conn.is_handshaking() || server.is_handshaking() || server.wants_write() {
            c2s.clear();
            while client.conn.wants_write() {
                client.conn.write_tls(&mut c2s)?;
            }
            let t = Instant::now();
            let mut r: &[u8] = &c2s;
            while !r.is_empty() {
                server.read_tls(&mut r)?;
                server.process_new_packets()?;
            }
            s2c.clear();
            while server.wants_write() {
                server.write_tls(&mut s2c)?;
            }
            server_ns += t.elapsed().as_nanos();
            let mut r: &[u8] = &s2c;
            while !r.is_empty() {
                client.conn.read_tls(&mut r)?;
                client.conn.process_new_packets()?;
            }
            if c2s.is_empty() && s2c.is_empty() {
                break;
            }
        }
    }
    Ok(n as f64 / (server_ns as f64 / 1e9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_map_back_to_their_hosts() {
        // 29,999 connections (the bench's most) need 469 hosts.
        for k in 0..469 {
            assert_eq!(client_host_of(client_addr(k)), Some(k), "{}", client_addr(k));
        }
        assert_eq!(client_host_of(ROUTER), None);
        assert_eq!(client_host_of(L7_ADDR), None);
        assert_eq!(client_host_of(Ipv4Addr::new(10, 30, 0, 0)), None);
    }
}
