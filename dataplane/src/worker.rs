//! The per-core worker: one burst in, one burst out, run to completion.
//!
//! A burst is processed in three stages so that the cache misses of a whole burst overlap
//! (DESIGN.md: at 67 ns per packet a miss must be overlapped, never waited for):
//! 1. classify every packet (L2/L3/L4 checks, VIP lookup), answer ARP/NDP/ping on the spot, and
//!    hash the flow key and prefetch its conntrack bucket;
//! 2. read the buckets, pick the candidate record by signature and prefetch it;
//! 3. confirm the key, create flows on a miss (Maglev pick, SNAT port), rewrite, pick the MAC.
//!
//! Packets leave in the order they came. Nothing here locks, allocates or makes a syscall.

use crate::l4::conntrack::{tcp_flags, tcp_next_state, Addr, Conntrack, Dir, Flow, FlowKey, FlowState, TimeoutsMs};
use crate::l4::hash::mix64;
use crate::l4::icmp_error;
use crate::l4::snat::{self, SnatAddrs, SnatPorts};
use crate::l4::unanswered::{self, UnansweredSyns};
use crate::l7::proxy::{Proxy, ProxyConfig};
use crate::l7::stack::ConnKey;
use crate::neigh::{self, Interface, NeighborRef, NeighborTable, RefState, Verdict};
use crate::packet::PacketBuf;
use crate::port::{Burst, Port, BURST};
use crate::snapshot::{v4_u128, Mode, Snapshot, VipMatch};
use crate::stats::{CoreStats, DropReason};
use crate::wire::checksum::{self, Delta};
use crate::wire::ether::{self, parse_l2, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use arrayvec::ArrayVec;
use fulcrum_config::bootstrap::Bootstrap;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// Seed of the Maglev flow hash: fixed, so that every core and every appliance behind the same
/// ECMP group picks the same backend for a flow.
const MAGLEV_SEED: u64 = 0x666c_6f77_6861_7368; // "flowhash"

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const PROTO_IPIP: u8 = 4;
const PROTO_IPV6_ENCAP: u8 = 41;

/// How a worker is set up: its place among the workers, its port, its tables.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub core_index: u16,
    pub cores: u16,
    pub iface: Interface,
    pub ct_capacity: u32,
    pub ct_capacity_v6: u32,
    pub timeouts: TimeoutsMs,
    /// DSR outer source prefix (network, host mask).
    pub dsr_src_v4: (u32, u32),
    pub dsr_src_v6: (u128, u128),
    /// Conntrack hash seed (random per process in production; fixed in tests).
    pub seed: u64,
    /// How far into its range each SNAT port round robin starts: random per process in
    /// production, so that a restarted appliance does not begin with the 4-tuples the last one
    /// used (a backend that closed first still holds them in TIME-WAIT, and answers a SYN from
    /// another client's timestamps with an ACK: a second's wait); 0 where tests expect the
    /// range's first port.
    pub snat_offset: u64,
    /// Entries of the ClientIP affinity table.
    pub affinity_capacity: usize,
    /// FullNAT source addresses (`ports[].snat_addresses`); empty: the port's own address of
    /// each family.
    pub snat_addresses: Vec<IpAddr>,
    /// Whether the runtime has worker 0 announce the appliance's own addresses when it starts
    /// (`Worker::announce_own_addresses`). On in `from_bootstrap`.
    pub announce_at_start: bool,
    /// Static neighbours (the next hop's MAC when configured).
    pub static_neighbors: Vec<(IpAddr, [u8; 6])>,
    /// The bootstrap file's `neighbors` section.
    pub neighbors: fulcrum_config::bootstrap::NeighborsConfig,
    /// The bootstrap file's `passive_health` section.
    pub passive_health: fulcrum_config::bootstrap::PassiveHealthConfig,
    /// The HTTP proxy's settings, when the bootstrap file has an `l7` section and the port an
    /// IPv4 address (upstream connections come from it).
    pub l7: Option<L7Settings>,
}

/// The bootstrap file's `l7` section as a worker uses it.
#[derive(Clone, Debug)]
pub struct L7Settings {
    pub addr: std::net::Ipv4Addr,
    pub http_ports: Vec<u16>,
    pub https_ports: Vec<u16>,
    pub limits: crate::l7::http::Limits,
    /// Client connections per core (`l7.limits.max_connections`).
    pub max_connections: usize,
    pub header_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub upstream_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub socket_buffer: usize,
}

/// Ports of each core's SNAT range kept for the proxy's upstream connections: at most this
/// many connections from one core to one endpoint at a time.
pub const L7_UPSTREAM_PORTS: u16 = 4096;

impl WorkerConfig {
    /// Worker `core_index` of `cores` on the bootstrap file's first port.
    pub fn from_bootstrap(boot: &Bootstrap, core_index: u16, cores: u16) -> WorkerConfig {
        let port = &boot.ports[0];
        let f = &boot.forwarding;
        let host4 = u32::MAX.checked_shr(f.dsr_source_v4.prefix_len() as u32).unwrap_or(0);
        let host6 = u128::MAX.checked_shr(f.dsr_source_v6.prefix_len() as u32).unwrap_or(0);
        let mut static_neighbors = Vec::new();
        if let Some(mac) = port.next_hop.mac {
            if let Some(ip) = port.next_hop.ipv4 {
                static_neighbors.push((IpAddr::V4(ip), mac.0));
            }
            if let Some(ip) = port.next_hop.ipv6 {
                static_neighbors.push((IpAddr::V6(ip), mac.0));
            }
        }
        let seed = random_seed();
        WorkerConfig {
            core_index,
            cores,
            iface: Interface::from_config(port),
            ct_capacity: boot.conntrack.capacity,
            ct_capacity_v6: boot.conntrack.v6_capacity(),
            timeouts: TimeoutsMs::from_config(&boot.conntrack.timeouts),
            dsr_src_v4: (u32::from(f.dsr_source_v4.network()), host4),
            dsr_src_v6: (u128::from(f.dsr_source_v6.network()), host6),
            seed,
            snat_offset: seed.rotate_left(29),
            affinity_capacity: 65536,
            snat_addresses: port.snat_addresses.clone(),
            announce_at_start: true,
            static_neighbors,
            neighbors: boot.neighbors.clone(),
            passive_health: boot.passive_health.clone(),
            l7: boot.l7.as_ref().map(|c| L7Settings {
                addr: c.address,
                http_ports: c.http_ports.clone(),
                https_ports: c.https_ports.clone(),
                limits: crate::l7::http::Limits {
                    max_header_bytes: c.limits.max_header_bytes,
                    max_headers: c.limits.max_headers,
                    max_uri_bytes: c.limits.max_uri_bytes,
                    max_body_bytes: c.limits.max_body_bytes,
                },
                max_connections: c.limits.max_connections,
                header_timeout_ms: c.timeouts.header_ms,
                connect_timeout_ms: c.timeouts.connect_ms,
                upstream_timeout_ms: c.timeouts.upstream_ms,
                idle_timeout_ms: c.timeouts.idle_ms,
                socket_buffer: c.socket_buffer,
            }),
        }
    }
}

/// A family's FullNAT source addresses: those of `listed` in the family, else the port's own.
fn snat_sources<A: Addr>(listed: &[IpAddr], own: Option<A>) -> Vec<A> {
    let mine: Vec<A> = listed.iter().filter_map(|&ip| A::from_ip(ip)).collect();
    if mine.is_empty() {
        own.into_iter().collect()
    } else {
        mine
    }
}

/// Whether the neighbour code answers ARP/NDP (and ping) for `ip` besides the port's own
/// address: the FullNAT source addresses always (they are this appliance's own), the VIPs and
/// the L7 address while this appliance holds them.
fn answers_for(snap: &Snapshot, l7: Option<u32>, s4: &SnatAddrs<u32>, s6: &SnatAddrs<u128>, ip: IpAddr) -> bool {
    let held = snap.answers_vips && (snap.is_vip(ip) || l7.map(|a| IpAddr::V4(a.into())) == Some(ip));
    held || match ip {
        IpAddr::V4(a) => s4.contains(a.into()),
        IpAddr::V6(a) => s6.contains(a.into()),
    }
}

/// A per-process random seed without a syscall per use (read once at start).
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // getrandom(2) through libc; falls back to the clock if it fails.
    // SAFETY: writes at most 8 bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    }
}

/// One address family's header layout and tables, so the L4 path is written once.
pub trait Family: Addr {
    const IP_HLEN: usize;
    const SRC_OFF: usize;
    const DST_OFF: usize;
    const HAS_IP_CSUM: bool;
    fn ct(w: &mut Worker) -> &mut Conntrack<Self>;
    fn ct_ref(w: &Worker) -> &Conntrack<Self>;
    /// The next FullNAT source (address, port) of this core; None without an address.
    fn next_snat_tuple(w: &mut Worker) -> Option<(Self, u16)>;
    fn as_u128(self) -> u128;
}

impl Family for u32 {
    const IP_HLEN: usize = 20;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const HAS_IP_CSUM: bool = true;
    #[inline(always)]
    fn ct(w: &mut Worker) -> &mut Conntrack<u32> {
        &mut w.ct4
    }
    #[inline(always)]
    fn ct_ref(w: &Worker) -> &Conntrack<u32> {
        &w.ct4
    }
    #[inline(always)]
    fn next_snat_tuple(w: &mut Worker) -> Option<(u32, u16)> {
        w.snat_addrs4.next_tuple(&mut w.snat4)
    }
    #[inline(always)]
    fn as_u128(self) -> u128 {
        v4_u128(self)
    }
}

impl Family for u128 {
    const IP_HLEN: usize = 40;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const HAS_IP_CSUM: bool = false;
    #[inline(always)]
    fn ct(w: &mut Worker) -> &mut Conntrack<u128> {
        &mut w.ct6
    }
    #[inline(always)]
    fn ct_ref(w: &Worker) -> &Conntrack<u128> {
        &w.ct6
    }
    #[inline(always)]
    fn next_snat_tuple(w: &mut Worker) -> Option<(u128, u16)> {
        w.snat_addrs6.next_tuple(&mut w.snat6)
    }
    #[inline(always)]
    fn as_u128(self) -> u128 {
        self
    }
}

/// A neighbour's address and its entry in the neighbour table.
type NeighborSlot = (IpAddr, NeighborRef);

/// What stage 1 decided for a packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Class {
    #[default]
    Tx,
    Drop(DropReason),
    /// Nothing to send, nothing dropped (e.g. a learned ARP reply).
    Consumed,
    /// FullNAT return traffic whose SNAT port belongs to another core: hand it to that core.
    Handoff(u16),
    /// Client -> VIP, to service `svc`.
    Fwd4 {
        svc: u16,
    },
    /// Backend -> our address (FullNAT return).
    Rev4,
    Fwd6 {
        svc: u16,
    },
    Rev6,
    /// A segment for the HTTP proxy's TCP stack (its socket's shard prefetched in stage 1).
    Proxy,
}

#[derive(Clone, Copy, Default)]
struct Meta {
    class: Class,
    l3: u16,
    l4: u16,
    tcp_flags: u8,
    hash: u64,
    /// The conntrack candidate (stage 2).
    cand: u32,
    /// IPv4 key; IPv6 keys live in `Worker::keys6` (keeps this array small to initialise).
    key4: FlowKey<u32>,
}

/// ClientIP session affinity: which backend a client was last sent to, per service. Maglev on
/// the client address alone already sends a client to one backend while the table is stable;
/// this remembers the choice across table changes for the configured timeout.
struct Affinity {
    map: HashMap<(u16, u128), (u128, u16, u32)>,
    capacity: usize,
}

/// Gratuitous ARP / unsolicited NA rounds on taking the addresses, one second apart (a lost
/// frame is sent again; MetalLB and keepalived also repeat them).
const ANNOUNCE_ROUNDS: u8 = 3;
const ANNOUNCE_INTERVAL_MS: u64 = 1000;

pub struct Worker {
    pub cfg: WorkerConfig,
    snap: Arc<Snapshot>,
    ct4: Conntrack<u32>,
    ct6: Conntrack<u128>,
    pub neigh: NeighborTable,
    pub stats: CoreStats,
    snat4: SnatPorts,
    snat6: SnatPorts,
    /// FullNAT source addresses, each paired with every port in turn (the port's own address
    /// unless the bootstrap file lists others).
    snat_addrs4: SnatAddrs<u32>,
    snat_addrs6: SnatAddrs<u128>,
    own4: Option<u32>,
    own6: Option<u128>,
    affinity: Affinity,
    /// TCP endpoints that left clients' SYNs unanswered (FullNAT): passed over by new flows.
    /// The runtime passes its verdicts between workers.
    pub(crate) unanswered: UnansweredSyns,
    /// The last millisecond `unanswered` was cleared of stale endpoints.
    unanswered_swept_ms: u64,
    /// The neighbour slots of the IPv4 and IPv6 next hops, once looked up.
    next_hop_slot: (Option<NeighborSlot>, Option<NeighborSlot>),
    /// IPv6 flow keys of the burst being processed, by packet index.
    keys6: [FlowKey<u128>; BURST],
    /// Neighbours the snapshot's backends are reached through, still to resolve: solicited a
    /// few per loop iteration, so that the first packet to a backend finds its MAC known.
    to_resolve: Vec<u16>,
    /// After a snapshot switch: the next backend whose neighbour to check (a few thousand per
    /// loop iteration, so a switch to 100,000 backends does not stall a burst).
    resolve_cursor: Option<usize>,
    /// Destinations of the proxy's packets dropped in its run because their neighbour is
    /// unreachable (see `Proxy::host_unreachable`).
    unreachable_upstreams: ArrayVec<u32, 8>,
    /// Neighbours to solicit after this burst (indices into `neigh`).
    solicit: ArrayVec<u16, 16>,
    /// Announcements of the claimed addresses still to send, and when the next is due.
    announce_rounds: u8,
    next_announce_ms: u64,
    /// Rounds left announcing the appliance's own addresses (see `announce_own_addresses`).
    own_announce_rounds: u8,
    next_own_announce_ms: u64,
    /// The HTTP reverse proxy (Ingress), when configured.
    proxy: Option<Box<Proxy>>,
    l7_addr: Option<u32>,
    /// Milliseconds, wrapping.
    now: u32,
    now_ms: u64,
    /// The last millisecond the neighbour table was aged in.
    aged_ms: u64,
    /// The neighbour table as `stats_copy` hands it out, and when it was taken.
    neigh_view: Arc<Vec<neigh::NeighborView>>,
    neigh_view_ms: Option<u64>,
    /// A flow was created earlier in this burst: later misses must re-check the table, since
    /// their stage-2 candidate predates it.
    inserted_this_burst: bool,
}

impl Worker {
    pub fn new(cfg: WorkerConfig, snap: Arc<Snapshot>) -> std::io::Result<Worker> {
        let cap4 = cfg.ct_capacity;
        let ct4 = Conntrack::new(cap4, cfg.timeouts, cfg.seed)?;
        let ct6 = Conntrack::new(cfg.ct_capacity_v6, cfg.timeouts, cfg.seed ^ 0x5555)?;
        let n = &cfg.neighbors;
        let mut neigh = NeighborTable::with_reachability(n.capacity as usize, n.reachable_ms as u64, n.probes)
            .with_jitter(cfg.seed ^ 0x6e65_6967_6862_6f72);
        for &(ip, mac) in &cfg.static_neighbors {
            neigh.add_static(ip, mac);
        }
        let mut stats = CoreStats::default();
        stats.resize(snap.stat_slots.0, snap.stat_slots.1);
        let mut snat4 = SnatPorts::for_core(cfg.core_index, cfg.cores);
        let proxy = match (&cfg.l7, cfg.iface.ipv4) {
            (Some(l7), Some((own, _))) => {
                let upstream_ports = snat4.reserve_top(L7_UPSTREAM_PORTS);
                let pc = ProxyConfig {
                    l7_addr: l7.addr,
                    http_ports: l7.http_ports.clone(),
                    https_ports: l7.https_ports.clone(),
                    own_addr: own,
                    upstream_ports,
                    limits: l7.limits.clone(),
                    max_connections: l7.max_connections,
                    header_timeout_ms: l7.header_timeout_ms,
                    connect_timeout_ms: l7.connect_timeout_ms,
                    upstream_timeout_ms: l7.upstream_timeout_ms,
                    idle_timeout_ms: l7.idle_timeout_ms,
                    socket_buffer: l7.socket_buffer,
                    mtu: cfg.iface.mtu as usize,
                    seed: cfg.seed ^ 0x7e57,
                };
                let mut p = Box::new(Proxy::new(pc, snap.l7.clone()));
                p.set_tls(snap.tls.clone());
                // Health probes: from worker 0 only, one probe per endpoint per appliance.
                if cfg.core_index == 0 {
                    p.set_health_targets(&snap.health);
                }
                Some(p)
            }
            _ => None,
        };
        snat4.start_at(cfg.snat_offset);
        let mut snat6 = SnatPorts::for_core(cfg.core_index, cfg.cores);
        snat6.start_at(cfg.snat_offset);
        let mut w = Worker {
            l7_addr: proxy.as_ref().map(|p| u32::from(p.config().l7_addr)),
            proxy,
            snat4,
            snat6,
            snat_addrs4: SnatAddrs::new(snat_sources(&cfg.snat_addresses, cfg.iface.ipv4.map(|(a, _)| u32::from(a)))),
            snat_addrs6: SnatAddrs::new(snat_sources(&cfg.snat_addresses, cfg.iface.ipv6.map(|(a, _)| u128::from(a)))),
            own4: cfg.iface.ipv4.map(|(a, _)| u32::from(a)),
            own6: cfg.iface.ipv6.map(|(a, _)| u128::from(a)),
            affinity: Affinity { map: HashMap::with_capacity(cfg.affinity_capacity), capacity: cfg.affinity_capacity },
            unanswered: UnansweredSyns::new(cfg.passive_health.unanswered_syns, cfg.passive_health.pass_over_ms as u64),
            unanswered_swept_ms: 0,
            cfg,
            snap,
            ct4,
            ct6,
            neigh,
            stats,
            next_hop_slot: (None, None),
            keys6: [FlowKey::default(); BURST],
            to_resolve: Vec::new(),
            resolve_cursor: None,
            solicit: ArrayVec::new(),
            unreachable_upstreams: ArrayVec::new(),
            // Only on taking the addresses over (a pair starts as standby and is told when it
            // leads); a lone appliance answers ARP from the start and announces nothing.
            announce_rounds: 0,
            next_announce_ms: 0,
            own_announce_rounds: 0,
            next_own_announce_ms: 0,
            now: 0,
            now_ms: 0,
            aged_ms: 0,
            neigh_view: Arc::default(),
            neigh_view_ms: None,
            inserted_this_burst: false,
        };
        w.queue_backend_neighbors();
        Ok(w)
    }

    /// Switches to a new snapshot; called between bursts. Established flows keep their backends.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        if snap.answers_vips && !self.snap.answers_vips {
            self.announce_rounds = ANNOUNCE_ROUNDS;
            self.next_announce_ms = 0;
        }
        self.stats.resize(snap.stat_slots.0, snap.stat_slots.1);
        if let Some(p) = self.proxy.as_mut() {
            p.set_router(snap.l7.clone());
            p.set_tls(snap.tls.clone());
            if self.cfg.core_index == 0 {
                p.set_health_targets(&snap.health);
            }
        }
        self.snap = snap;
        self.to_resolve.clear();
        self.resolve_cursor = Some(0);
    }

    /// Queues the neighbours of every backend, and with the proxy of every Ingress endpoint, for
    /// resolution (the kernel would hold the first packet while it resolves; we resolve ahead
    /// instead, so it is never dropped).
    fn queue_backend_neighbors(&mut self) {
        self.to_resolve.clear();
        self.resolve_cursor = Some(0);
        while self.resolve_cursor.is_some() {
            self.queue_some_backend_neighbors();
        }
    }

    /// Backends checked per call of `queue_some_backend_neighbors`.
    const RESOLVE_STEP: usize = 4096;

    /// Checks the next `RESOLVE_STEP` backends' (then Ingress endpoints') neighbours (see
    /// `resolve_cursor`).
    fn queue_some_backend_neighbors(&mut self) {
        let Some(from) = self.resolve_cursor else { return };
        let snap = self.snap_ref();
        // The L4 backends, then (with the proxy) the Ingress routes' endpoints.
        let l7: &[IpAddr] = if self.proxy.is_some() { &snap.l7_endpoints } else { &[] };
        let all = snap.backends.len() + l7.len();
        let to = (from + Self::RESOLVE_STEP).min(all);
        self.resolve_cursor = (to < all).then_some(to);
        for k in from..to {
            let addr = snap.backends.get(k).map_or_else(|| l7[k - snap.backends.len()], |b| b.addr);
            let Some(hop) = self.cfg.iface.route(addr) else { continue };
            let idx = self.neigh.reserve(hop, self.now_ms).idx;
            if idx != NeighborTable::NONE && self.neigh.mac_at(idx).is_none() && !self.to_resolve.contains(&idx) {
                self.to_resolve.push(idx);
            }
        }
    }

    /// The current snapshot, borrowed apart from `self` so that the flow-creation path can
    /// read it while updating tables: cloning the Arc there would be an atomic
    /// read-modify-write on a line every worker shares, once per new flow.
    #[inline(always)]
    fn snap_ref<'a>(&self) -> &'a Snapshot {
        // SAFETY: `self.snap` is replaced only by `set_snapshot(&mut self)`, between bursts; the
        // reference is used only within the method that took it, which holds `&mut self`, so
        // the Arc it points into stays alive and unchanged for as long as the reference is used.
        unsafe { &*Arc::as_ptr(&self.snap) }
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    pub fn conntrack_v4(&self) -> &Conntrack<u32> {
        &self.ct4
    }

    pub fn conntrack_v6(&self) -> &Conntrack<u128> {
        &self.ct6
    }

    /// Receives a burst, processes it, sends the results, solicits missing neighbours and
    /// reclaims a few expired flows. Returns the number of packets received.
    pub fn poll<P: Port>(&mut self, port: &mut P, now_ms: u64) -> usize {
        let mut rx: Burst<P::Buf> = Burst::new();
        let n = port.rx_burst(&mut rx);
        let mut tx: Burst<P::Buf> = Burst::new();
        if n > 0 {
            self.process_burst(now_ms, &mut rx, &mut tx);
            self.send(port, &mut tx);
        }
        self.housekeeping(port, now_ms);
        n
    }

    /// The counters with the proxy's latency histogram, for the control thread (every ~100 ms).
    pub fn stats_copy(&self) -> CoreStats {
        let mut s = self.stats.clone();
        s.neighbors = self.neigh.len() as u64;
        s.neighbors_capacity = self.neigh.capacity() as u64;
        s.neighbor_evictions = self.neigh.counters.evictions;
        s.neighbor_probes = self.neigh.counters.probes;
        s.neighbor_failures = self.neigh.counters.failures;
        s.neighbor_table = self.neigh_view.clone();
        s.l7_latency_us = self.proxy.as_ref().map(|p| p.latency_us.clone());
        s.health_down = self.proxy.as_ref().map(|p| p.health_down()).unwrap_or_default();
        s.passed_over = self.unanswered.passed_over_now(self.now_ms);
        if let Some(p) = self.proxy.as_ref() {
            p.fill_gauges(&mut s.l7);
        }
        s
    }

    /// After the bursts of a loop iteration: solicit missing neighbours, reclaim a few expired
    /// flows, refresh the conntrack gauges.
    pub fn housekeeping<P: Port>(&mut self, port: &mut P, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.now = self.now_ms as u32;
        self.queue_some_backend_neighbors();
        while !self.solicit.is_full() {
            let Some(idx) = self.to_resolve.pop() else { break };
            // (Resolved meanwhile: not due; `should_solicit` is false for an entry with a MAC.)
            self.solicit_if_due(idx);
        }
        if self.now_ms != self.aged_ms {
            // Once a millisecond: a few entries past their reachable time asked again.
            self.aged_ms = self.now_ms;
            let solicit = &mut self.solicit;
            self.neigh.age(self.now_ms, |idx| solicit.try_push(idx).is_ok());
        }
        if self.now_ms >= self.unanswered_swept_ms + 1000 {
            self.unanswered_swept_ms = self.now_ms;
            self.unanswered.forget_stale(self.now_ms);
        }
        if self.neigh_view_ms.is_none_or(|t| self.now_ms >= t + 1000) {
            // For `/neighbors`: once a second, off the packet path (it allocates).
            self.neigh_view_ms = Some(self.now_ms);
            self.neigh_view = Arc::new(self.neigh.view(self.now_ms));
        }
        self.send_solicitations(port);
        if self.announce_rounds > 0 && self.now_ms >= self.next_announce_ms {
            self.announce(port);
        }
        if self.own_announce_rounds > 0 && self.now_ms >= self.next_own_announce_ms {
            self.announce_own(port);
        }
        self.run_proxy(port);
        let now = self.now;
        self.ct4.sweep(now, 8);
        self.ct6.sweep(now, 8);
        self.sync_ct_stats();
    }

    /// Runs the HTTP proxy's connections and sends the segments they produce, each in an
    /// Ethernet frame to the next hop of its destination.
    fn run_proxy<P: Port>(&mut self, port: &mut P) {
        let Some(mut proxy) = self.proxy.take() else { return };
        let mut tx: Burst<P::Buf> = Burst::new();
        proxy.run(self.now_ms, |ip| self.emit_proxy_packet(port, &mut tx, ip));
        self.send(port, &mut tx);
        for addr in self.unreachable_upstreams.drain(..) {
            proxy.host_unreachable(std::net::Ipv4Addr::from(addr));
        }
        let st = proxy.stats;
        self.stats.l7 = st;
        self.proxy = Some(proxy);
    }

    /// The worker is stopping: resets every connection of the HTTP proxy and sends the resets
    /// (see `Proxy::abort_all`).
    pub fn abort_connections<P: Port>(&mut self, port: &mut P) {
        let Some(mut proxy) = self.proxy.take() else { return };
        let mut tx: Burst<P::Buf> = Burst::new();
        proxy.abort_all(self.now_ms, |ip| self.emit_proxy_packet(port, &mut tx, ip));
        self.send(port, &mut tx);
        self.proxy = Some(proxy);
    }

    /// One IP packet of the proxy's, in an Ethernet frame to the next hop of its destination.
    #[inline(always)]
    fn emit_proxy_packet<P: Port>(&mut self, port: &mut P, tx: &mut Burst<P::Buf>, ip: &[u8]) {
        if tx.is_full() {
            self.send(port, tx);
        }
        let dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
        let r = match self.neighbor_index(dst.to_ip()) {
            Ok(r) => r,
            Err(e) => return self.stats.drop(e),
        };
        let mac = match self.neighbor_mac(r, dst) {
            Ok(m) => m,
            Err(e) => {
                if self.neigh.unreachable(r, self.now_ms) && !self.unreachable_upstreams.contains(&dst) {
                    // Told to the proxy after its run (it is busy emitting): its connections
                    // being opened there fail now rather than at their connect timeout.
                    let _ = self.unreachable_upstreams.try_push(dst);
                }
                return self.stats.drop(e);
            }
        };
        let Some(mut b) = port.alloc() else { return self.stats.drop(DropReason::TxFull) };
        if !b.set_len(14 + ip.len()) {
            return self.stats.drop(DropReason::TooBigForEncap);
        }
        let f = b.data_mut();
        ether::set_macs(f, mac, self.cfg.iface.mac);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14..].copy_from_slice(ip);
        tx.push(b);
    }

    /// Starts the HTTP proxy's graceful stop (`Proxy::drain`); nothing without an `l7` section.
    pub fn drain_l7(&mut self) {
        if let Some(p) = self.proxy.as_mut() {
            p.drain();
        }
    }

    /// The HTTP proxy's counters (None without an `l7` section).
    pub fn proxy_stats(&self) -> Option<crate::l7::proxy::ProxyStats> {
        self.proxy.as_ref().map(|p| p.stats)
    }

    /// Hands `tx` to the port; what it does not take is dropped and counted as `tx_full`.
    pub fn send<P: Port>(&mut self, port: &mut P, tx: &mut Burst<P::Buf>) {
        let mut lens = [0u32; BURST];
        for (l, b) in lens.iter_mut().zip(tx.iter()) {
            *l = b.len() as u32;
        }
        let sent = port.tx_burst(tx);
        for &l in &lens[..sent] {
            self.stats.tx.add(l as usize);
        }
        for _ in tx.drain(..) {
            self.stats.drop(DropReason::TxFull);
        }
    }

    /// Announces the claimed addresses (worker 0 only: one announcement per appliance), so
    /// that clients and routers move them here at once after a takeover instead of when their
    /// ARP/NDP entries expire.
    fn announce<P: Port>(&mut self, port: &mut P) {
        self.announce_rounds -= 1;
        self.next_announce_ms = self.now_ms + ANNOUNCE_INTERVAL_MS;
        if self.cfg.core_index != 0 || !self.snap.answers_vips {
            return;
        }
        let snap = self.snap_ref();
        self.send_announcements(port, snap.claimed_addresses(self.l7_addr.map(Into::into)));
    }

    /// A gratuitous ARP (IPv4) or an unsolicited neighbour advertisement (IPv6) for each address.
    fn send_announcements<P: Port>(&mut self, port: &mut P, addrs: impl IntoIterator<Item = IpAddr>) {
        let mut tx: Burst<P::Buf> = Burst::new();
        for ip in addrs {
            if tx.is_full() {
                self.send(port, &mut tx);
            }
            let Some(mut b) = port.alloc() else { break };
            let ok = match ip {
                IpAddr::V4(a) => neigh::gratuitous_arp(&mut b, &self.cfg.iface, a),
                IpAddr::V6(a) => neigh::unsolicited_na(&mut b, &self.cfg.iface, a),
            };
            if ok {
                tx.push(b);
                self.stats.announcements += 1;
            }
        }
        self.send(port, &mut tx);
    }

    /// Hands the proxy's requests to an access log from now on (no proxy: nothing to log).
    pub fn set_access_log(&mut self, log: crate::l7::access_log::AccessLog) {
        if let Some(p) = self.proxy.as_mut() {
            p.set_access_log(log);
        }
    }

    /// Announces the appliance's own addresses, the port's and the FullNAT source addresses,
    /// by gratuitous ARP and unsolicited neighbour advertisement, three rounds a second apart
    /// from the next poll on (worker 0 only: one announcement per appliance). Neighbours that
    /// hold another MAC for one of them (a replaced appliance, source addresses moved from
    /// another) follow at once instead of sending to the old MAC until their entry is
    /// re-checked; those without an entry create none (Linux's default). `fulcrum run` calls it
    /// at start.
    pub fn announce_own_addresses(&mut self) {
        if self.cfg.core_index == 0 {
            self.own_announce_rounds = ANNOUNCE_ROUNDS;
            self.next_own_announce_ms = 0;
        }
    }

    fn announce_own<P: Port>(&mut self, port: &mut P) {
        self.own_announce_rounds -= 1;
        self.next_own_announce_ms = self.now_ms + ANNOUNCE_INTERVAL_MS;
        let v4 =
            self.own4.into_iter().chain(self.snat_addrs4.addrs().iter().copied().filter(|&a| Some(a) != self.own4));
        let v6 =
            self.own6.into_iter().chain(self.snat_addrs6.addrs().iter().copied().filter(|&a| Some(a) != self.own6));
        // Collected first: the addresses are the worker's own fields (three rounds at start).
        let addrs: Vec<IpAddr> = v4.map(|a| IpAddr::V4(a.into())).chain(v6.map(|a| IpAddr::V6(a.into()))).collect();
        self.send_announcements(port, addrs);
    }

    fn send_solicitations<P: Port>(&mut self, port: &mut P) {
        if self.solicit.is_empty() {
            return;
        }
        let mut tx: Burst<P::Buf> = Burst::new();
        for idx in self.solicit.drain(..) {
            let Some(mut b) = port.alloc() else { break };
            // A neighbour with a MAC is being probed: asked at that MAC alone.
            let unicast = self.neigh.mac_at(idx);
            let ok = match self.neigh.ip_at(idx) {
                IpAddr::V4(a) => neigh::build_arp_request(&mut b, &self.cfg.iface, a, unicast),
                IpAddr::V6(a) => neigh::build_neighbor_solicitation(&mut b, &self.cfg.iface, a, unicast),
            };
            if ok {
                tx.push(b);
            }
        }
        self.send(port, &mut tx);
    }

    fn sync_ct_stats(&mut self) {
        let (a, b) = (self.ct4.counters, self.ct6.counters);
        self.stats.ct_flows = (self.ct4.len() + self.ct6.len()) as u64;
        self.stats.ct_inserts = a.inserts + b.inserts;
        self.stats.ct_expired = a.expired + b.expired;
        self.stats.ct_evictions = a.evictions + b.evictions;
    }

    /// Processes one burst: every packet of `rx` is either moved to `tx` (in order) or dropped
    /// and counted. `tx` must have room for `rx.len()` packets.
    pub fn process_burst<B: PacketBuf>(&mut self, now_ms: u64, rx: &mut Burst<B>, tx: &mut Burst<B>) {
        self.process_burst_handoff(now_ms, rx, tx, None)
    }

    /// `process_burst`, with FullNAT return traffic that belongs to another core moved to
    /// `handoff` as (owner core, packet) instead of dropped as `wrong_core`.
    pub fn process_burst_handoff<B: PacketBuf>(
        &mut self,
        now_ms: u64,
        rx: &mut Burst<B>,
        tx: &mut Burst<B>,
        mut handoff: Option<&mut Burst<(u16, B)>>,
    ) {
        self.now_ms = now_ms;
        self.now = now_ms as u32;
        self.inserted_this_burst = false;
        let n = rx.len();
        let mut meta = [Meta::default(); BURST];

        // Stage 1: classify, answer the slow-path protocols, hash and prefetch buckets.
        let mut rx_bytes = 0;
        for i in 0..n {
            rx_bytes += rx[i].len() as u64;
            self.classify(&mut rx[i], i, &mut meta[i]);
            match meta[i].class {
                Class::Fwd4 { .. } | Class::Rev4 => self.ct4.prefetch_bucket(meta[i].hash),
                Class::Fwd6 { .. } | Class::Rev6 => self.ct6.prefetch_bucket(meta[i].hash),
                _ => {}
            }
        }
        self.stats.rx.packets += n as u64;
        self.stats.rx.bytes += rx_bytes;
        // The proxy segments' look-ups and prefetches, in a loop of their own: short enough
        // that the core runs several iterations' look-ups at once, where between two
        // packets' classifications it ran one at a time.
        if let Some(p) = self.proxy.as_ref() {
            for m in meta[..n].iter().filter(|m| matches!(m.class, Class::Proxy)) {
                p.prefetch((m.key4.src, m.key4.sport, m.key4.dport));
            }
        }
        // Stage 2: signature match in the bucket, prefetch the flow record.
        for m in meta[..n].iter_mut() {
            m.cand = match m.class {
                Class::Fwd4 { .. } | Class::Rev4 => self.ct4.candidate(m.hash),
                Class::Fwd6 { .. } | Class::Rev6 => self.ct6.candidate(m.hash),
                _ => continue,
            };
        }
        // Stage 3: confirm, create, rewrite.
        for i in 0..n {
            let m = meta[i];
            let c = match m.class {
                Class::Fwd4 { svc } => self.forward::<u32, B>(&mut rx[i], &m, m.key4, svc),
                Class::Rev4 => self.reverse::<u32>(rx[i].data_mut(), &m, m.key4),
                Class::Fwd6 { svc } => self.forward::<u128, B>(&mut rx[i], &m, self.keys6[i], svc),
                Class::Rev6 => self.reverse::<u128>(rx[i].data_mut(), &m, self.keys6[i]),
                Class::Proxy => {
                    self.hand_to_proxy(&mut rx[i], m.l3 as usize, &mut meta[i]);
                    continue;
                }
                c => c,
            };
            meta[i].class = c;
        }
        for (m, buf) in meta.iter().zip(rx.drain(..)) {
            match m.class {
                Class::Tx => tx.push(buf),
                Class::Drop(r) => self.stats.drop(r),
                Class::Handoff(core) => match handoff.as_deref_mut() {
                    Some(h) => {
                        self.stats.handed_off += 1;
                        h.push((core, buf));
                    }
                    None => self.stats.drop(DropReason::WrongCore),
                },
                _ => {}
            }
        }
    }

    /// Stage 1 for one packet.
    #[inline(always)]
    fn classify<B: PacketBuf>(&mut self, buf: &mut B, i: usize, m: &mut Meta) {
        let frame = buf.data();
        let l2 = match parse_l2(frame) {
            Ok(l2) => l2,
            Err(r) => return drop(m, r),
        };
        let dst_mac = ether::dst_mac(frame);
        if dst_mac != self.cfg.iface.mac && dst_mac[0] & 1 == 0 {
            return drop(m, DropReason::NotOurMac);
        }
        m.l3 = l2.l3_off as u16;
        match l2.ethertype {
            ETHERTYPE_IPV4 => self.classify_v4(buf, &l2, m),
            ETHERTYPE_IPV6 => self.classify_v6(buf, &l2, m, i),
            ETHERTYPE_ARP => verdict(m, self.arp(buf, &l2)),
            _ => drop(m, DropReason::UnsupportedEthertype),
        }
    }

    #[inline(always)]
    fn classify_v4<B: PacketBuf>(&mut self, buf: &mut B, l2: &ether::L2Info, m: &mut Meta) {
        let l3 = l2.l3_off;
        let f = buf.data();
        let Some(ip) = f.get(l3..l3 + 20) else { return drop(m, DropReason::Ipv4Malformed) };
        // A fixed-size view: one bounds check here, none per field below.
        let ip: &[u8; 20] = ip.try_into().unwrap();
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl || tot > f.len() - l3 {
            return drop(m, DropReason::Ipv4Malformed);
        }
        let csum_ok = if ihl == 20 { ipv4_header_checksum_ok(ip) } else { checksum_ok_generic(&f[l3..l3 + ihl]) };
        if !csum_ok {
            return drop(m, DropReason::Ipv4BadChecksum);
        }
        let proto = ip[9];
        let src = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
        let dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if l3 + tot < f.len() {
            // Ethernet padding: keep it out of rewrites and encapsulation.
            buf.set_len(l3 + tot);
        }
        let l4 = l3 + ihl;
        m.l4 = l4 as u16;
        let seg = &buf.data()[l4..l3 + tot];
        if (proto == PROTO_TCP || proto == PROTO_UDP) && frag == 0 && seg.len() >= 4 {
            let sport = u16::from_be_bytes([seg[0], seg[1]]);
            let dport = u16::from_be_bytes([seg[2], seg[3]]);
            let class = match self.snap.lookup_v4(dst, proto, dport) {
                VipMatch::Service(svc) => Class::Fwd4 { svc },
                VipMatch::OtherPort => return drop(m, DropReason::UnknownVipPort),
                VipMatch::NotVip if self.ours4(dst) => {
                    if !self.snat4.owns(dport) {
                        return handoff(m, snat::owner(dport, self.cfg.cores));
                    }
                    if proto == PROTO_TCP && self.proxy.as_ref().is_some_and(|p| p.wants(dst.into(), dport)) {
                        return self.proxy_later((src, sport, dport), seg, m);
                    }
                    Class::Rev4
                }
                VipMatch::NotVip if self.l7_addr == Some(dst) && proto == PROTO_TCP => {
                    return self.proxy_later((src, sport, dport), seg, m);
                }
                VipMatch::NotVip => return drop(m, DropReason::NotForUs),
            };
            match check_l4(seg, proto) {
                Ok(flags) => m.tcp_flags = flags,
                Err(r) => return drop(m, r),
            }
            m.key4 = FlowKey { src, dst, sport, dport, proto };
            m.hash = self.ct4.hash(&m.key4);
            m.class = class;
            return;
        }
        self.classify_v4_other(buf, l2, ihl, proto, dst, frag, seg.len(), m)
    }

    /// A segment for the HTTP proxy's TCP stack: its connection's key is kept for the prefetch
    /// loop after stage 1 and the segment handed over in stage 3, so that with many
    /// connections the cache misses of one burst's segments overlap instead of each stalling
    /// the stack in turn.
    #[inline(always)]
    fn proxy_later(&mut self, key: ConnKey, seg: &[u8], m: &mut Meta) {
        m.key4 = FlowKey { src: key.0, dst: 0, sport: key.1, dport: key.2, proto: PROTO_TCP };
        // The stack checks the segment; the flags are kept for what follows its hand-over.
        m.tcp_flags = seg.get(13).copied().unwrap_or(0);
        m.class = Class::Proxy;
    }

    /// Stage 3 for a proxy segment: handed over, nothing left to send.
    #[inline(never)]
    fn hand_to_proxy<B: PacketBuf>(&mut self, buf: &mut B, l3: usize, m: &mut Meta) {
        let now = self.now_ms;
        let p = self.proxy.as_mut().expect("checked by the caller");
        m.class = match p.ingress(&buf.data()[l3..], now) {
            Ok(()) => {
                self.stats.l7_segments += 1;
                Class::Consumed
            }
            Err(reason) => Class::Drop(reason),
        };
        if m.class == Class::Consumed && m.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
            self.hint_on_link_client(IpAddr::V4(m.key4.src.into()), ether::src_mac(buf.data()));
        }
    }

    /// A connection opened from `src`: if it is on-link and not resolved, the frame's source
    /// MAC is its MAC (checked by unicast at once), so that our answer is not dropped while we
    /// ask (the client had our MAC from before: a restart, a takeover, an entry evicted).
    #[cold]
    fn hint_on_link_client(&mut self, src: IpAddr, mac: [u8; 6]) {
        if self.cfg.iface.on_link(src) {
            let r = self.neigh.index_of(src, self.now_ms);
            self.neigh.hint(r, mac, self.now_ms);
        }
    }

    /// The rest of IPv4: fragments, truncated L4 headers, ICMP, other protocols.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn classify_v4_other<B: PacketBuf>(
        &mut self,
        buf: &mut B,
        l2: &ether::L2Info,
        ihl: usize,
        proto: u8,
        dst: u32,
        frag: u16,
        seg_len: usize,
        m: &mut Meta,
    ) {
        let local = self.ours4(dst) || self.l7_addr == Some(dst) || self.snap.is_vip(IpAddr::V4(dst.into()));
        if !local {
            return drop(m, DropReason::NotForUs);
        }
        match proto {
            PROTO_TCP | PROTO_UDP if frag != 0 => drop(m, DropReason::Ipv4Fragment),
            PROTO_TCP if seg_len < 4 => drop(m, DropReason::TcpMalformed),
            PROTO_UDP if seg_len < 4 => drop(m, DropReason::UdpMalformed),
            PROTO_ICMP => self.icmp_v4(buf, l2, ihl, frag, m),
            _ => drop(m, DropReason::UnsupportedProtocol),
        }
    }

    /// ARP: answered or learned from by the neighbour code.
    #[inline(never)]
    fn arp<B: PacketBuf>(&mut self, buf: &mut B, l2: &ether::L2Info) -> Verdict {
        let (snap, l7, s4, s6) = (&self.snap, self.l7_addr, &self.snat_addrs4, &self.snat_addrs6);
        let answers = |ip| answers_for(snap, l7, s4, s6, ip);
        neigh::handle_arp(buf, l2, &self.cfg.iface, &answers, &mut self.neigh, self.now_ms, &mut self.stats)
    }

    /// ICMPv4 to a VIP or to us: errors about flows, else echo.
    #[inline(never)]
    fn icmp_v4<B: PacketBuf>(&mut self, buf: &mut B, l2: &ether::L2Info, ihl: usize, frag: u16, m: &mut Meta) {
        let (l3, l4) = (l2.l3_off, l2.l3_off + ihl);
        let f = buf.data();
        let tot = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) as usize;
        if frag != 0 {
            return drop(m, DropReason::Ipv4Fragment);
        }
        if tot - ihl >= 1 && matches!(f[l4], 3 | 11 | 12) {
            m.class = icmp_error::handle_v4(self, buf, l3, ihl);
            return;
        }
        verdict(m, neigh::handle_icmpv4_local(buf, l2, self.cfg.iface.mac, &mut self.stats))
    }

    #[inline(never)]
    fn classify_v6<B: PacketBuf>(&mut self, buf: &mut B, l2: &ether::L2Info, m: &mut Meta, i: usize) {
        let l3 = l2.l3_off;
        let f = buf.data();
        if f.len() < l3 + 40 || f[l3] >> 4 != 6 {
            return drop(m, DropReason::Ipv6Malformed);
        }
        let plen = u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]) as usize;
        if l3 + 40 + plen > f.len() {
            return drop(m, DropReason::Ipv6Malformed);
        }
        if l3 + 40 + plen < f.len() {
            buf.set_len(l3 + 40 + plen);
        }
        let f = buf.data();
        let nh = f[l3 + 6];
        let src = u128::from_be_bytes(f[l3 + 8..l3 + 24].try_into().unwrap());
        let dst = u128::from_be_bytes(f[l3 + 24..l3 + 40].try_into().unwrap());
        let dst_ip = Ipv6Addr::from(dst);
        let ours = self.ours6(dst);
        let local = ours || dst_ip == self.cfg.iface.ipv6_link_local || self.snap.is_vip(IpAddr::V6(dst_ip));
        let l4 = l3 + 40;
        m.l4 = l4 as u16;
        match nh {
            PROTO_TCP | PROTO_UDP => {
                let malformed = if nh == PROTO_TCP { DropReason::TcpMalformed } else { DropReason::UdpMalformed };
                if plen < 4 {
                    return drop(m, if local { malformed } else { DropReason::NotForUs });
                }
                let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
                let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
                let class = match self.snap.lookup(dst, nh, dport) {
                    VipMatch::Service(svc) => Class::Fwd6 { svc },
                    VipMatch::OtherPort => return drop(m, DropReason::UnknownVipPort),
                    VipMatch::NotVip if ours => {
                        if !self.snat6.owns(dport) {
                            return handoff(m, snat::owner(dport, self.cfg.cores));
                        }
                        Class::Rev6
                    }
                    VipMatch::NotVip => return drop(m, DropReason::NotForUs),
                };
                match check_l4(&f[l4..l4 + plen], nh) {
                    Ok(flags) => m.tcp_flags = flags,
                    Err(r) => return drop(m, r),
                }
                let key = FlowKey { src, dst, sport, dport, proto: nh };
                m.hash = self.ct6.hash(&key);
                self.keys6[i] = key;
                m.class = class;
            }
            PROTO_ICMPV6 => {
                let multicast_for_us = dst_ip.segments()[0] == 0xff02
                    && (dst_ip == Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)
                        || dst_ip.segments()[..6] == [0xff02, 0, 0, 0, 0, 1]);
                if !(local || multicast_for_us) {
                    return drop(m, DropReason::NotForUs);
                }
                if plen >= 1 && matches!(f[l4], 1..=4) && local {
                    m.class = icmp_error::handle_v6(self, buf, l3);
                    return;
                }
                let (snap, l7, s4, s6) = (&self.snap, self.l7_addr, &self.snat_addrs4, &self.snat_addrs6);
                let answers = |ip| answers_for(snap, l7, s4, s6, ip);
                let v = neigh::handle_icmpv6_local(
                    buf,
                    l2,
                    &self.cfg.iface,
                    &answers,
                    &mut self.neigh,
                    self.now_ms,
                    &mut self.stats,
                );
                verdict(m, v)
            }
            0 | 43 | 44 | 60 if local => drop(m, DropReason::Ipv6ExtensionHeader),
            _ if local => drop(m, DropReason::UnsupportedProtocol),
            _ => drop(m, DropReason::NotForUs),
        }
    }

    /// Stage 3, client -> VIP.
    #[inline(always)]
    fn forward<A: Family, B: PacketBuf>(&mut self, buf: &mut B, m: &Meta, key: FlowKey<A>, svc: u16) -> Class {
        let now = self.now;
        let mut hit = A::ct_ref(self).verify(m.cand, &key);
        if hit.is_none() && (self.inserted_this_burst || A::ct_ref(self).needs_full_lookup(m.hash, m.cand)) {
            hit = A::ct_ref(self).lookup(&key, m.hash);
        }
        let mut created = None;
        let live = hit.filter(|&(idx, dir)| dir == Dir::Fwd && !A::ct_ref(self).is_expired(idx, now));
        let flow = match live {
            Some((idx, _)) if !(syn_only(m.tcp_flags) && self.syn_unanswered::<A>(idx)) => {
                A::ct(self).refresh(idx, Dir::Fwd, key.proto, m.tcp_flags, now)
            }
            _ => {
                match (live, hit) {
                    // The SYN again of a flow whose endpoint is now passed over: the flow goes
                    // and the SYN picks again.
                    (Some((idx, _)), _) => A::ct(self).remove(idx),
                    (None, Some((idx, _))) => A::ct(self).remove_expired(idx),
                    (None, None) => {}
                }
                match self.new_flow::<A>(&key, m, svc, ether::src_mac(buf.data())) {
                    Ok(idx) => {
                        created = Some(idx);
                        *A::ct_ref(self).flow(idx)
                    }
                    Err(r) => return Class::Drop(r),
                }
            }
        };
        let len = buf.len();
        if let Some(c) = self.stats.per_vip.get_mut(flow.service as usize) {
            c.add(len);
        }
        if let Some(c) = self.stats.per_backend.get_mut(flow.backend as usize) {
            c.add(len);
        }
        let mac = match self.neighbor_mac(flow.neigh_fwd, flow.rev.src) {
            Ok(mac) => mac,
            Err(r) => {
                if let Some(idx) = created {
                    // A flow whose first packet went nowhere is not kept: the client's
                    // retransmission picks again, and passes over the backend if its neighbour
                    // has turned out unreachable meanwhile (a kept flow would pin the client
                    // to it until the client gave up).
                    A::ct(self).remove(idx);
                }
                return Class::Drop(r);
            }
        };
        let (l3, l4) = (m.l3 as usize, m.l4 as usize);
        if flow.mode == Mode::DsrIpip as u8 {
            return self.encap::<A, B>(buf, l3, &key, &flow, mac);
        }
        let f = buf.data_mut();
        rewrite::<A>(
            f,
            l3,
            l4,
            key.proto,
            (flow.rev.dst, flow.rev.src, flow.rev.dport, flow.rev.sport),
            Delta(flow.ip_delta),
            Delta(flow.l4_delta),
        );
        ether::set_macs(f, mac, self.cfg.iface.mac);
        Class::Tx
    }

    /// A client's SYN again on live flow `idx`. When the flow is FullNAT and still in SYN-SENT
    /// with its last SYN `MIN_RESEND_MS` or more ago, its endpoint never answered (its SYN-ACK
    /// or RST would have moved the flow on): a miss for the endpoint (`UnansweredSyns`).
    /// Returns whether new flows pass over that endpoint now, so that this SYN picks again.
    #[inline(never)]
    fn syn_unanswered<A: Family>(&mut self, idx: u32) -> bool {
        if !self.unanswered.enabled() {
            return false;
        }
        let ct = A::ct_ref(self);
        let f = ct.flow(idx);
        if f.state != FlowState::TcpSynSent || f.mode != Mode::FullNat as u8 {
            return false;
        }
        // The deadline is the last SYN's time plus the SYN-SENT timeout.
        let last_syn = f.deadline.wrapping_sub(ct.timeouts().0[FlowState::TcpSynSent as usize]);
        if self.now.wrapping_sub(last_syn) < unanswered::MIN_RESEND_MS {
            return false;
        }
        let endpoint = (f.rev.src.to_ip(), f.rev.sport);
        self.stats.unanswered_syns += 1;
        self.unanswered.missed(endpoint, self.now_ms)
    }

    /// Creates the flow for a miss: Maglev (or affinity) pick, SNAT port, neighbours, insert.
    #[inline(never)]
    fn new_flow<A: Family>(
        &mut self,
        key: &FlowKey<A>,
        m: &Meta,
        svc: u16,
        src_mac: [u8; 6],
    ) -> Result<u32, DropReason> {
        let snap = self.snap_ref();
        let s = &snap.services[svc as usize];
        if !s.admits(key.src.as_u128()) {
            // Outside spec.loadBalancerSourceRanges: no flow, as a cloud load balancer's
            // firewall (checked per new flow only: a flow exists only if admitted).
            return Err(DropReason::SourceNotAllowed);
        }
        if key.proto == PROTO_TCP && s.mode == Mode::FullNat && !syn_only(m.tcp_flags) {
            // Mid-stream TCP without state: under FullNAT the backend cannot know the new
            // SNAT port anyway, and creating state for stray ACKs would let a flood fill the
            // table. DSR creates it: Maglev sends it to the same backend as before.
            return Err(DropReason::NoFlow);
        }
        let (mut bi, hash) = self.pick_backend(s, key).ok_or(DropReason::NoBackend)?;
        let tcp = key.proto == PROTO_TCP;
        let (mut neigh_fwd, reachable) = self.neighbor_for_new_flow(snap.backends[bi as usize].addr)?;
        let passed_over = reachable && tcp && self.passed_over(bi);
        if !reachable || passed_over {
            // With no usable one the pick stands: its packets are dropped as unresolved, or
            // sent to the endpoint that missed SYNs (it may answer after all).
            if let Some((other, r)) = self.usable_alternative(s, hash, bi, tcp)? {
                (bi, neigh_fwd) = (other, r);
                if passed_over {
                    self.stats.unanswered_backend_repicks += 1;
                } else {
                    self.stats.unreachable_backend_repicks += 1;
                }
                if s.affinity_ms.is_some() {
                    self.remember_affinity(s, key, bi);
                }
            }
        }
        let b = &snap.backends[bi as usize];
        let baddr = A::from_ip(b.addr).ok_or(DropReason::NoBackend)?;
        let mut flow = Flow::<A> {
            fwd: *key,
            state: if key.proto == PROTO_TCP {
                let mut fins = 0;
                tcp_next_state(FlowState::Free, &mut fins, Dir::Fwd, m.tcp_flags)
            } else {
                FlowState::Udp
            },
            mode: s.mode as u8,
            service: s.stat_id,
            backend: b.stat_id,
            ..Default::default()
        };
        if flow.state == FlowState::Free {
            flow.state = FlowState::TcpEstablished;
        }
        flow.neigh_fwd = neigh_fwd;
        match s.mode {
            Mode::FullNat => {
                let rev = self.free_snat_tuple(baddr, b.port, key.proto)?;
                flow.rev = rev;
                flow.has_rev = true;
                flow.neigh_rev = self.neighbor_index(key.src.to_ip())?;
                if self.cfg.iface.on_link(key.src.to_ip()) {
                    // The frame came from the client itself (see hint_on_link_client).
                    self.neigh.hint(flow.neigh_rev, src_mac, self.now_ms);
                }
                let (old_a, new_a) = (addr_pair(key.src, key.dst), addr_pair(rev.dst, rev.src));
                flow.ip_delta = Delta::between(&old_a.0[..old_a.1], &new_a.0[..new_a.1]).0;
                let old_l4 = with_ports(old_a, key.sport, key.dport);
                let new_l4 = with_ports(new_a, rev.dport, rev.sport);
                flow.l4_delta = Delta::between(&old_l4.0[..old_l4.1], &new_l4.0[..new_l4.1]).0;
            }
            Mode::DsrIpip => {
                flow.rev = FlowKey { src: baddr, dst: key.src, sport: b.port, dport: key.sport, proto: key.proto };
            }
        }
        let now = self.now;
        let (idx, _) = A::ct(self).insert(flow, now);
        self.inserted_this_burst = true;
        Ok(idx)
    }

    /// The reverse key of a new FullNAT flow to `backend:bport`: the next SNAT address and port
    /// (round robin, so the tuple tried first is the one this backend saw longest ago) that no
    /// flow holds. Tuples the backend still holds in TIME-WAIT are passed over; only when every
    /// tuple tried is held, and one of them only by TIME-WAIT, is the oldest of those taken back
    /// (counted): a stale ACK for some new connections beats refusing them. No address of the
    /// family: `NoRoute`.
    #[inline(always)]
    fn free_snat_tuple<A: Family>(&mut self, backend: A, bport: u16, proto: u8) -> Result<FlowKey<A>, DropReason> {
        const TRIES: usize = 64;
        let now = self.now;
        // Its address and port (dst, dport) are each tuple tried below.
        let mut rev = FlowKey { src: backend, dst: backend, sport: bport, dport: 0, proto };
        let mut time_wait = None;
        for _ in 0..TRIES {
            (rev.dst, rev.dport) = A::next_snat_tuple(self).ok_or(DropReason::NoRoute)?;
            let ct = A::ct_ref(self);
            let Some((idx, _)) = ct.lookup(&rev, ct.hash(&rev)) else {
                return Ok(rev);
            };
            if ct.is_expired(idx, now) {
                A::ct(self).remove_expired(idx);
                return Ok(rev);
            }
            if time_wait.is_none() && ct.flow(idx).state == FlowState::TcpTimeWait {
                time_wait = Some((rev.dst, rev.dport, idx));
            }
        }
        let (src, port, idx) = time_wait.ok_or(DropReason::SnatPortsExhausted)?;
        A::ct(self).remove(idx);
        self.stats.snat_time_wait_reuses += 1;
        (rev.dst, rev.dport) = (src, port);
        Ok(rev)
    }

    /// The backend for a new flow, and the hash Maglev picked it by (the flow's, or with
    /// ClientIP affinity the client address's).
    fn pick_backend<A: Family>(&mut self, s: &crate::snapshot::ServiceEntry, key: &FlowKey<A>) -> Option<(u32, u64)> {
        let Some(timeout) = s.affinity_ms else {
            let hash = key.hash(MAGLEV_SEED);
            return s.maglev.pick(hash).map(|o| (s.backends.start + o, hash));
        };
        let client = key.src.as_u128();
        let (w0, w1) = key.src.words();
        let hash = mix64(w0 ^ mix64(w1 ^ MAGLEV_SEED));
        let now = self.now;
        let snap = self.snap_ref();
        if let Some(&(addr, port, deadline)) = self.affinity.map.get(&(s.stat_id, client)) {
            if (now.wrapping_sub(deadline) as i32) < 0 {
                // Still valid if that backend still takes new flows in this service.
                let found = (s.backends.start..s.backends.end).find(|&i| {
                    let b = &snap.backends[i as usize];
                    b.maglev_slots > 0 && b.port == port && ip_to_u128(b.addr) == addr
                });
                if let Some(i) = found {
                    self.affinity.map.insert((s.stat_id, client), (addr, port, now.wrapping_add(timeout)));
                    return Some((i, hash));
                }
            }
        }
        let bi = s.maglev.pick(hash)? + s.backends.start;
        self.remember_affinity(s, key, bi);
        Some((bi, hash))
    }

    /// Keeps `key`'s client on backend `bi` of service `s` for the affinity timeout.
    fn remember_affinity<A: Family>(&mut self, s: &crate::snapshot::ServiceEntry, key: &FlowKey<A>, bi: u32) {
        let Some(timeout) = s.affinity_ms else { return };
        let now = self.now;
        let b = &self.snap_ref().backends[bi as usize];
        if self.affinity.map.len() >= self.affinity.capacity {
            // Full: drop expired entries once (rare; bounded by capacity), else forget nothing
            // new: Maglev on the client address still keeps the client on one backend.
            self.affinity.map.retain(|_, v| (now.wrapping_sub(v.2) as i32) < 0);
        }
        if self.affinity.map.len() < self.affinity.capacity {
            let entry = (ip_to_u128(b.addr), b.port, now.wrapping_add(timeout));
            self.affinity.map.insert((s.stat_id, key.src.as_u128()), entry);
        }
    }

    /// The neighbour entry for sending to `addr`, and whether it is reachable (see
    /// `NeighborTable::unreachable`). An unreachable one is still asked once a second, as
    /// traffic would ask it, so that new flows go back to it once it answers.
    fn neighbor_for_new_flow(&mut self, addr: IpAddr) -> Result<(NeighborRef, bool), DropReason> {
        let r = self.neighbor_index(addr)?;
        if !self.neigh.unreachable(r, self.now_ms) {
            return Ok((r, true));
        }
        self.solicit_if_due(r.idx);
        Ok((r, false))
    }

    /// Queues a solicitation for unresolved entry `idx` if its last one is a second old (and
    /// the queue has room: a solicitation counted as sent must be sent).
    fn solicit_if_due(&mut self, idx: u16) {
        if !self.solicit.is_full() && self.neigh.should_solicit(idx, self.now_ms) {
            self.solicit.push(idx);
        }
    }

    /// Whether new TCP flows pass over backend `bi` (its endpoint left SYNs unanswered).
    #[inline(always)]
    fn passed_over(&self, bi: u32) -> bool {
        if self.unanswered.is_empty() {
            return false;
        }
        let b = &self.snap_ref().backends[bi as usize];
        self.unanswered.passed_over((b.addr, b.port), self.now_ms)
    }

    /// For a new flow whose backend `gone` is behind an unreachable neighbour or (`tcp`) passed
    /// over for unanswered SYNs: the first other backend in the Maglev slots after the flow's
    /// own (`MaglevTable::after`) that is neither, with its neighbour entry. The same hash finds
    /// the same backend on every core and appliance that sees the same neighbours, so a
    /// client's retransmissions and its later flows agree. Looks at most `REPICK_SLOTS` slots (a
    /// rare path, but bounded: a flood of new flows while most backends are gone must not scan
    /// the table each).
    fn usable_alternative(
        &mut self,
        s: &crate::snapshot::ServiceEntry,
        hash: u64,
        gone: u32,
        tcp: bool,
    ) -> Result<Option<(u32, NeighborRef)>, DropReason> {
        const REPICK_SLOTS: usize = 64;
        let snap = self.snap_ref();
        // Backends found unusable on the way, so each is looked up once.
        let mut unusable = [gone; 4];
        let mut known = 1;
        for o in s.maglev.after(hash).take(REPICK_SLOTS) {
            let bi = s.backends.start + o;
            if unusable[..known].contains(&bi) {
                continue;
            }
            if !(tcp && self.passed_over(bi)) {
                if let (r, true) = self.neighbor_for_new_flow(snap.backends[bi as usize].addr)? {
                    return Ok(Some((bi, r)));
                }
            }
            if known < unusable.len() {
                unusable[known] = bi;
                known += 1;
            }
        }
        Ok(None)
    }

    /// Stage 3, backend -> our address (FullNAT return).
    #[inline(always)]
    fn reverse<A: Family>(&mut self, f: &mut [u8], m: &Meta, key: FlowKey<A>) -> Class {
        let now = self.now;
        let mut hit = A::ct_ref(self).verify(m.cand, &key);
        if hit.is_none() && (self.inserted_this_burst || A::ct_ref(self).needs_full_lookup(m.hash, m.cand)) {
            hit = A::ct_ref(self).lookup(&key, m.hash);
        }
        let flow = match hit {
            Some((idx, Dir::Rev)) if !A::ct_ref(self).is_expired(idx, now) => {
                let answering = A::ct_ref(self).flow(idx).state == FlowState::TcpSynSent;
                let flow = A::ct(self).refresh(idx, Dir::Rev, key.proto, m.tcp_flags, now);
                if answering {
                    // The endpoint answered a SYN (SYN-ACK or RST): it is alive.
                    self.unanswered.answered((flow.rev.src.to_ip(), flow.rev.sport));
                }
                flow
            }
            _ => return Class::Drop(DropReason::NoFlow),
        };
        if let Some(c) = self.stats.per_vip.get_mut(flow.service as usize) {
            c.add(f.len());
        }
        if let Some(c) = self.stats.per_backend.get_mut(flow.backend as usize) {
            c.add(f.len());
        }
        let mac = match self.neighbor_mac(flow.neigh_rev, flow.fwd.src) {
            Ok(mac) => mac,
            Err(r) => return Class::Drop(r),
        };
        rewrite::<A>(
            f,
            m.l3 as usize,
            m.l4 as usize,
            key.proto,
            (flow.fwd.dst, flow.fwd.src, flow.fwd.dport, flow.fwd.sport),
            Delta(!flow.ip_delta),
            Delta(!flow.l4_delta),
        );
        ether::set_macs(f, mac, self.cfg.iface.mac);
        Class::Tx
    }

    /// The neighbour-table entry for reaching `dst` (itself on-link, else the next hop). The
    /// next hops' entries are remembered, so the common off-link case costs no table lookup.
    fn neighbor_index(&mut self, dst: IpAddr) -> Result<NeighborRef, DropReason> {
        let hop = self.cfg.iface.route(dst).ok_or(DropReason::NoRoute)?;
        let cached = match hop {
            IpAddr::V4(_) => &mut self.next_hop_slot.0,
            IpAddr::V6(_) => &mut self.next_hop_slot.1,
        };
        if let Some((ip, r)) = *cached {
            if ip == hop && self.neigh.is_current(r) {
                return Ok(r);
            }
        }
        let r = self.neigh.index_of(hop, self.now_ms);
        if Some(hop) == self.cfg.iface.next_hop_v4.map(IpAddr::V4)
            || Some(hop) == self.cfg.iface.next_hop_v6.map(IpAddr::V6)
        {
            *cached = Some((hop, r));
        }
        Ok(r)
    }

    /// The MAC to send to for a flow that took entry `r` for reaching `dst`. When the full
    /// table has since given the entry to another address, `dst` is looked up again (the flow
    /// keeps its old reference: this is rare, and costs a look-up per packet only while the
    /// table is too small).
    #[inline(always)]
    fn neighbor_mac<D: Addr>(&mut self, r: NeighborRef, dst: D) -> Result<[u8; 6], DropReason> {
        let mut r = r;
        let mut state = self.neigh.use_ref(r, self.now_ms);
        if state == RefState::Moved {
            r = self.neighbor_index(dst.to_ip())?;
            state = self.neigh.use_ref(r, self.now_ms);
        }
        match state {
            RefState::Resolved(mac) => Ok(mac),
            _ => {
                self.solicit_if_due(r.idx);
                Err(DropReason::NeighborUnresolved)
            }
        }
    }

    /// DSR: prepend an outer IP header to the backend; the inner packet is untouched.
    #[inline(never)]
    fn encap<A: Family, B: PacketBuf>(
        &mut self,
        buf: &mut B,
        l3: usize,
        key: &FlowKey<A>,
        flow: &Flow<A>,
        mac: [u8; 6],
    ) -> Class {
        let inner_len = buf.len() - l3;
        let outer = A::IP_HLEN;
        if inner_len + outer > self.cfg.iface.mtu as usize {
            return Class::Drop(DropReason::TooBigForEncap);
        }
        if !buf.prepend(outer) {
            return Class::Drop(DropReason::TooBigForEncap);
        }
        let f = buf.data_mut();
        f.copy_within(outer..outer + l3, 0);
        // Outer source varied per flow so backends spread the tunnel over their RSS queues.
        let x = (key.sport ^ (key.src.words().0 as u16)) as u128;
        let inner_hdr: [u8; 8] = f[l3 + outer..l3 + outer + 8].try_into().unwrap();
        if A::LEN == 4 {
            let (net, host) = self.cfg.dsr_src_v4;
            let src = net | (x as u32 & host);
            let tos = inner_hdr[1];
            let df = inner_hdr[6] & 0x40;
            let h = &mut f[l3..l3 + 20];
            h[0] = 0x45;
            h[1] = tos;
            h[2..4].copy_from_slice(&((inner_len + 20) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&[0, 0]);
            h[6] = df;
            h[7] = 0;
            h[8] = 64;
            h[9] = PROTO_IPIP;
            h[10..12].copy_from_slice(&[0, 0]);
            h[12..16].copy_from_slice(&src.to_be_bytes());
            flow.rev.src.write_be(&mut h[16..20]);
            let c = checksum::checksum(h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            let (net, host) = self.cfg.dsr_src_v6;
            let src = net | (x & host);
            let tc = ((inner_hdr[0] & 0x0f) << 4) | (inner_hdr[1] >> 4);
            let label = (key.hash(MAGLEV_SEED) as u32) & 0x000f_ffff;
            let h = &mut f[l3..l3 + 40];
            let w0 = (6u32 << 28) | ((tc as u32) << 20) | label;
            h[0..4].copy_from_slice(&w0.to_be_bytes());
            h[4..6].copy_from_slice(&(inner_len as u16).to_be_bytes());
            h[6] = PROTO_IPV6_ENCAP;
            h[7] = 64;
            h[8..24].copy_from_slice(&src.to_be_bytes());
            flow.rev.src.write_be(&mut h[24..40]);
        }
        ether::set_macs(f, mac, self.cfg.iface.mac);
        Class::Tx
    }

    // --- used by the ICMP error path ---

    /// Whether `dst` is one of our addresses that return traffic comes to: the port's own, or a
    /// FullNAT source address.
    #[inline(always)]
    pub(crate) fn ours4(&self, dst: u32) -> bool {
        self.own4 == Some(dst) || self.snat_addrs4.contains(dst)
    }

    #[inline(always)]
    pub(crate) fn ours6(&self, dst: u128) -> bool {
        self.own6 == Some(dst) || self.snat_addrs6.contains(dst)
    }

    pub(crate) fn iface(&self) -> &Interface {
        &self.cfg.iface
    }

    pub(crate) fn lookup_flow<A: Family>(&self, key: &FlowKey<A>) -> Option<(u32, Dir, Flow<A>)> {
        let ct = A::ct_ref(self);
        let h = ct.hash(key);
        let (idx, dir) = ct.lookup(key, h)?;
        if ct.is_expired(idx, self.now) {
            return None;
        }
        Some((idx, dir, *ct.flow(idx)))
    }

    pub(crate) fn mac_for<D: Addr>(&mut self, r: NeighborRef, dst: D) -> Result<[u8; 6], DropReason> {
        self.neighbor_mac(r, dst)
    }

    pub(crate) fn encap_to_backend<A: Family, B: PacketBuf>(
        &mut self,
        buf: &mut B,
        l3: usize,
        flow: &Flow<A>,
    ) -> Class {
        let mac = match self.neighbor_mac(flow.neigh_fwd, flow.rev.src) {
            Ok(m) => m,
            Err(r) => return Class::Drop(r),
        };
        let key = flow.fwd;
        self.encap::<A, B>(buf, l3, &key, flow, mac)
    }
}

/// A SYN without ACK or RST: a client opening (or re-opening) a connection.
#[inline(always)]
fn syn_only(flags: u8) -> bool {
    flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
}

/// Return traffic for another core's SNAT port; below the SNAT range nobody owns it.
#[cold]
fn handoff(m: &mut Meta, owner: Option<u16>) {
    m.class = match owner {
        Some(c) => Class::Handoff(c),
        None => Class::Drop(DropReason::NoFlow),
    };
}

#[inline(always)]
fn drop(m: &mut Meta, r: DropReason) {
    m.class = Class::Drop(r);
}

fn verdict(m: &mut Meta, v: Verdict) {
    m.class = match v {
        Verdict::Tx => Class::Tx,
        Verdict::Drop(r) => Class::Drop(r),
        Verdict::Consumed => Class::Consumed,
    };
}

fn checksum_ok_generic(h: &[u8]) -> bool {
    checksum::fold(checksum::ones_sum(h)) == 0xffff
}

/// Verifies an IPv4 header checksum. The common 20-byte header is summed as five 32-bit words
/// (one's-complement sums may use any word size, RFC 1071), a quarter of the generic loop's work.
#[inline(always)]
fn ipv4_header_checksum_ok(h: &[u8; 20]) -> bool {
    // Summed in native byte order: the one's-complement sum is byte-order independent
    // (RFC 1071 2.B) and the all-ones result reads the same either way.
    let w = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as u64;
    let mut s = w(0) + w(4) + w(8) + w(12) + w(16);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    checksum::fold(s as u32) == 0xffff
}

/// Checks the L4 header within the IP payload `seg`: TCP's data offset, UDP's length field
/// (equal to the payload). Returns the TCP flags (0 for UDP).
#[inline(always)]
fn check_l4(seg: &[u8], proto: u8) -> Result<u8, DropReason> {
    if proto == PROTO_TCP {
        let Some(h) = seg.get(..20) else { return Err(DropReason::TcpMalformed) };
        let doff = (h[12] >> 4) as usize * 4;
        if doff < 20 || doff > seg.len() {
            return Err(DropReason::TcpMalformed);
        }
        Ok(h[13])
    } else {
        let Some(h) = seg.get(..8) else { return Err(DropReason::UdpMalformed) };
        if u16::from_be_bytes([h[4], h[5]]) as usize != seg.len() {
            return Err(DropReason::UdpMalformed);
        }
        Ok(0)
    }
}

/// Writes new addresses and ports and updates the checksums incrementally.
#[inline(always)]
fn rewrite<A: Family>(
    f: &mut [u8],
    l3: usize,
    l4: usize,
    proto: u8,
    to: (A, A, u16, u16),
    ip_delta: Delta,
    l4_delta: Delta,
) {
    let (src, dst, sport, dport) = to;
    src.write_be(&mut f[l3 + A::SRC_OFF..]);
    dst.write_be(&mut f[l3 + A::DST_OFF..]);
    f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
    if A::HAS_IP_CSUM {
        let c = u16::from_be_bytes([f[l3 + 10], f[l3 + 11]]);
        f[l3 + 10..l3 + 12].copy_from_slice(&ip_delta.apply(c).to_be_bytes());
    }
    let off = if proto == PROTO_TCP { l4 + 16 } else { l4 + 6 };
    let c = u16::from_be_bytes([f[off], f[off + 1]]);
    if proto == PROTO_UDP && c == 0 && A::HAS_IP_CSUM {
        return; // IPv4 UDP without a checksum stays without one.
    }
    let mut n = l4_delta.apply(c);
    if proto == PROTO_UDP && n == 0 {
        n = 0xffff;
    }
    f[off..off + 2].copy_from_slice(&n.to_be_bytes());
}

/// Two addresses as big-endian bytes (for checksum deltas): (bytes, length used).
fn addr_pair<A: Addr>(a: A, b: A) -> ([u8; 36], usize) {
    let mut out = [0u8; 36];
    a.write_be(&mut out[0..]);
    b.write_be(&mut out[A::LEN..]);
    (out, 2 * A::LEN)
}

fn with_ports(p: ([u8; 36], usize), a: u16, b: u16) -> ([u8; 36], usize) {
    let (mut out, n) = p;
    out[n..n + 2].copy_from_slice(&a.to_be_bytes());
    out[n + 2..n + 4].copy_from_slice(&b.to_be_bytes());
    (out, n + 4)
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => v4_u128(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}
