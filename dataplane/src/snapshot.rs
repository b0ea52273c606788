//! The compiled, immutable tables the workers read: VIP lookup, per-service Maglev tables and
//! backends. Built off the data path from a `DesiredState`; a new one replaces the old whole.

use crate::l4::hash::mix64;
use crate::l4::maglev::{MaglevInput, MaglevTable};
use crate::l7::router::Router;
use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::model::{DesiredState, EndpointState, ForwardingMode, ObjectRef, VipService};
use serde::Serialize;
// Keyed by strings and addresses the control thread made itself: no need for SipHash's DoS
// resistance, and hashing was a fifth of compiling 10,000 services.
use ahash::AHashMap as HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

/// Forwarding mode as stored in flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum Mode {
    FullNat = 0,
    DsrIpip = 1,
}

impl From<ForwardingMode> for Mode {
    fn from(m: ForwardingMode) -> Mode {
        match m {
            ForwardingMode::FullNat => Mode::FullNat,
            ForwardingMode::DsrIpip => Mode::DsrIpip,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntry {
    /// Counter slot (and ClientIP-affinity key), stable across snapshots like
    /// `BackendEntry::stat_id`.
    pub stat_id: u16,
    pub service: ObjectRef,
    pub port_name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub mode: Mode,
    /// ClientIP session affinity timeout, if any.
    pub affinity_ms: Option<u32>,
    /// `spec.loadBalancerSourceRanges`: the clients that may open flows; empty: any.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// The same as (network, mask, IPv4) over addresses as `u128` (IPv4 mapped into IPv6, as
    /// the fast path has them), checked once per new flow.
    #[serde(skip)]
    pub sources: Vec<(u128, u128, bool)>,
    /// This service's backends: a range of `Snapshot::backends`.
    pub backends: Range<u32>,
    /// True when no endpoint is ready and the table was built from serving, terminating ones
    /// (kube-proxy's fallback), so that a rolling update never black-holes new connections.
    pub terminating_fallback: bool,
    /// Slot -> offset within `backends`.
    #[serde(skip)]
    pub maglev: MaglevTable,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendEntry {
    /// Counter slot: stable across snapshots for the same (service, port, address, port), so
    /// flows created under an older snapshot count under the right backend.
    pub stat_id: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub state: EndpointState,
    pub weight: u32,
    pub target: Option<String>,
    /// Slots this backend holds in its service's Maglev table.
    pub maglev_slots: u32,
}

/// Which service a (VIP, protocol, port) is, found with one probe in the common case.
/// Written by hand because this runs per packet: std's SipHash HashMap costs ~20 ns here.
#[derive(Clone, Debug, Default)]
struct VipTable {
    slots: Vec<VipSlot>,
    mask: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct VipSlot {
    /// IPv4 as ::ffff:a.b.c.d.
    ip: u128,
    /// proto << 16 | port; 0 for the "this address is a VIP" marker.
    pp: u32,
    /// Service index, or `ANY_PORT` for the marker.
    svc: u16,
    used: bool,
}

const ANY_PORT: u16 = u16::MAX;

/// A CIDR as (network, mask, IPv4) over `ip_u128`'s addresses.
fn mapped_range(net: ipnet::IpNet) -> (u128, u128, bool) {
    let (addr, len) = match net {
        ipnet::IpNet::V4(n) => (IpAddr::V4(n.network()), 96 + u32::from(n.prefix_len())),
        ipnet::IpNet::V6(n) => (IpAddr::V6(n.network()), u32::from(n.prefix_len())),
    };
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    (ip_u128(addr) & mask, mask, net.addr().is_ipv4())
}

/// Whether `ip_u128`'s address is an IPv4 one (mapped: `::ffff:a.b.c.d`).
#[inline(always)]
fn is_mapped_v4(a: u128) -> bool {
    a >> 32 == 0xffff
}

impl ServiceEntry {
    /// Whether a client at `src` (as `ip_u128` has it) may open a flow.
    #[inline(always)]
    pub fn admits(&self, src: u128) -> bool {
        self.sources.is_empty() || self.in_ranges(src)
    }

    /// Out of line: a service without ranges pays one test, not the loop's code in its path
    /// (inlined, it cost 3.5% of `fulcrum-bench l4`'s new flows per second).
    #[inline(never)]
    fn in_ranges(&self, src: u128) -> bool {
        // A range admits its own family only (::/0 is not every IPv4 client too).
        let v4 = is_mapped_v4(src);
        self.sources.iter().any(|&(net, mask, fam4)| fam4 == v4 && src & mask == net)
    }
}

#[inline(always)]
fn ip_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The same for an IPv4 address as a u32 (the fast path has it in that form).
#[inline(always)]
pub fn v4_u128(a: u32) -> u128 {
    0xffff_0000_0000u128 | a as u128
}

impl VipTable {
    fn new(entries: &[(u128, u32, u16)]) -> Self {
        let n = (entries.len() * 2).next_power_of_two().max(8);
        let mut t = VipTable { slots: vec![VipSlot::default(); n], mask: n - 1 };
        for &(ip, pp, svc) in entries {
            let mut i = Self::hash(ip, pp) as usize & t.mask;
            while t.slots[i].used {
                if t.slots[i].ip == ip && t.slots[i].pp == pp {
                    break; // duplicate marker
                }
                i = (i + 1) & t.mask;
            }
            t.slots[i] = VipSlot { ip, pp, svc, used: true };
        }
        t
    }

    /// One multiply: keys are the operator's VIPs, at most half the slots are used, and an
    /// unknown destination ends at the first empty slot, so a multiplicative hash does, read
    /// from the product's upper half (its low bits depend only on the key's low bits: sequential
    /// VIPs made runs of 41 probes).
    #[inline(always)]
    fn hash(ip: u128, pp: u32) -> u64 {
        let x = ((ip as u64) ^ ((ip >> 64) as u64).rotate_left(29) ^ ((pp as u64) << 40) ^ pp as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x.rotate_left(32)
    }

    #[inline(always)]
    fn get(&self, ip: u128, pp: u32) -> Option<u16> {
        let mut i = Self::hash(ip, pp) as usize & self.mask;
        loop {
            let s = &self.slots[i];
            if !s.used {
                return None;
            }
            if s.ip == ip && s.pp == pp {
                return Some(s.svc);
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// The IPv4 fast-path twin of `VipTable`: (address, protocol, port) packed in one u64, so a
/// probe is one multiply and one compare.
#[derive(Clone, Debug, Default)]
struct Vip4Table {
    /// (key, service); key 0 marks an empty slot (0.0.0.0 is never a VIP).
    slots: Vec<(u64, u16)>,
    shift: u32,
}

impl Vip4Table {
    #[inline(always)]
    fn key(addr: u32, pp: u32) -> u64 {
        ((addr as u64) << 32) | pp as u64
    }

    #[inline(always)]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn new(entries: &[(u128, u32, u16)]) -> Self {
        let v4: Vec<(u64, u16)> = entries
            .iter()
            .filter(|(ip, _, _)| ip >> 32 == 0xffff)
            .map(|&(ip, pp, svc)| (Self::key(ip as u32, pp), svc))
            .collect();
        let n = (v4.len() * 2).next_power_of_two().max(8);
        let mut t = Vip4Table { slots: vec![(0, 0); n], shift: 64 - n.trailing_zeros() };
        for (k, svc) in v4 {
            let mut i = t.slot(k);
            while t.slots[i].0 != 0 && t.slots[i].0 != k {
                i = (i + 1) & (n - 1);
            }
            t.slots[i] = (k, svc);
        }
        t
    }

    #[inline(always)]
    fn get(&self, addr: u32, pp: u32) -> Option<u16> {
        let k = Self::key(addr, pp);
        let mask = self.slots.len() - 1;
        let mut i = self.slot(k);
        loop {
            let (sk, svc) = self.slots[i & mask];
            if sk == k {
                return Some(svc);
            }
            if sk == 0 {
                return None;
            }
            i += 1;
        }
    }
}

/// What successive compiles share, kept by whoever compiles them (the control thread): stable
/// counter ids, so that per-VIP and per-backend counters and affinity entries survive a table
/// change (ids are not reused: a backend that comes back gets its old id); and the last
/// snapshot's Maglev tables by their inputs, so that a change to one service rebuilds one table.
#[derive(Clone, Debug, Default)]
pub struct StatIds {
    counters: CounterIds,
    tables: HashMap<MaglevKey, BuiltTable>,
}

/// Counter ids by Service, then by port name: looked up once per VIP port with borrowed keys
/// (a map keyed by the cloned names cost three allocations per backend, a fifth of compiling
/// 10,000 services).
#[derive(Clone, Debug, Default)]
struct CounterIds {
    ports: HashMap<ObjectRef, Vec<PortIds>>,
    services: usize,
    backends: u32,
}

/// The ids of one Service port's VIP entries and backends.
#[derive(Clone, Debug)]
struct PortIds {
    port_name: String,
    /// (VIP, port, protocol) -> service counter slot.
    vips: Vec<(IpAddr, u16, u8, u16)>,
    /// (endpoint address, port) -> backend counter slot.
    backends: HashMap<(IpAddr, u16), u32>,
}

/// What a Maglev table is built from: its size and each backend's address, port and weight, in
/// order (the backend's Maglev key is `addr:port`, formatted only when a table is built).
type MaglevKey = (u32, Vec<(IpAddr, u16, u32)>);

/// A Maglev table and the slots each of its backends holds.
#[derive(Clone, Debug)]
struct BuiltTable {
    table: MaglevTable,
    shares: Vec<u32>,
}

fn health_targets(state: &DesiredState) -> Vec<HealthTarget> {
    let mut v: Vec<HealthTarget> = state
        .services
        .iter()
        .filter_map(|s| s.health.as_ref().map(|c| (s, c)))
        .flat_map(|(s, c)| {
            s.endpoints.iter().filter_map(move |e| match e.addr {
                IpAddr::V4(a) => {
                    Some(HealthTarget { endpoint: std::net::SocketAddrV4::new(a, e.port), check: c.clone() })
                }
                IpAddr::V6(_) => None,
            })
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Appends a backend's Maglev key, `addr:port` exactly as `format!("{addr}:{port}")` writes it.
/// IPv4 by hand: formatting 100,000 keys through `Display` was a tenth of building the tables.
fn push_maglev_key(out: &mut Vec<u8>, addr: IpAddr, port: u16) {
    fn decimal(out: &mut Vec<u8>, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
    }
    match addr {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                decimal(out, o as u32);
            }
        }
        IpAddr::V6(a) => {
            use std::io::Write;
            write!(out, "{a}").expect("writing to a Vec cannot fail");
        }
    }
    out.push(b':');
    decimal(out, port as u32);
}

/// Builds the tables not found in `cache`, on several threads when there are many.
fn build_tables(keys: &[MaglevKey], cache: &HashMap<MaglevKey, BuiltTable>) -> Vec<BuiltTable> {
    let build = |k: &MaglevKey| -> BuiltTable {
        if let Some(t) = cache.get(k) {
            return t.clone();
        }
        // One buffer for all the keys of this table, each key a range of it.
        let mut names = Vec::with_capacity(k.1.len() * 24);
        let mut ends = Vec::with_capacity(k.1.len());
        for &(a, p, _) in &k.1 {
            push_maglev_key(&mut names, a, p);
            ends.push(names.len());
        }
        let inputs: Vec<MaglevInput> =
            k.1.iter()
                .enumerate()
                .map(|(i, &(_, _, weight))| {
                    let start = if i == 0 { 0 } else { ends[i - 1] };
                    MaglevInput { key: &names[start..ends[i]], weight }
                })
                .collect();
        let (table, shares) = MaglevTable::build_with_shares(&inputs, k.0);
        BuiltTable { table, shares }
    };
    let misses = keys.iter().filter(|k| !cache.contains_key(*k)).count();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if misses < 256 || threads < 2 {
        return keys.iter().map(build).collect();
    }
    // Chunks of 64 tables taken in turn by every thread, this one included: threads that get
    // less of a core (other work, a busy VM) take fewer chunks instead of holding up the rest.
    const CHUNK: usize = 64;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(chunk) = keys.chunks(CHUNK).nth(i) else { return done };
            done.push((i, chunk.iter().map(build).collect::<Vec<_>>()));
        }
    };
    let mut parts = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut parts = work();
        for h in helpers {
            parts.extend(h.join().expect("Maglev build thread panicked"));
        }
        parts
    });
    parts.sort_unstable_by_key(|p| p.0);
    parts.into_iter().flat_map(|p| p.1).collect()
}

impl CounterIds {
    /// The ids of a Service port (created on first sight).
    fn port(&mut self, s: &VipService) -> &mut PortIds {
        if !self.ports.contains_key(&s.service) {
            // One lookup more for a new Service, none for a known one (no key cloned to look).
            self.ports.insert(s.service.clone(), Vec::with_capacity(1));
        }
        let ports = self.ports.get_mut(&s.service).expect("inserted above");
        let i = match ports.iter().position(|p| p.port_name == s.port_name) {
            Some(i) => i,
            None => {
                let backends = HashMap::with_capacity(s.endpoints.len());
                ports.push(PortIds { port_name: s.port_name.clone(), vips: Vec::new(), backends });
                ports.len() - 1
            }
        };
        &mut ports[i]
    }
    /// A Service port's counter ids, with one lookup of the port: its endpoints' in order (into
    /// `backends`), then its VIP entry's (returned).
    fn ids(&mut self, s: &VipService, proto: u8, backends: &mut Vec<u32>) -> u16 {
        let mut next_backend = self.backends;
        // Past 65535 distinct VIP ports, the last slot is shared (counters only blur).
        let next_service = self.services.min(u16::MAX as usize) as u16;
        let ids = self.port(s);
        backends.clear();
        for e in &s.endpoints {
            backends.push(*ids.backends.entry((e.addr, e.port)).or_insert_with(|| {
                next_backend += 1;
                next_backend - 1
            }));
        }
        let known = ids.vips.iter().find(|v| (v.0, v.1, v.2) == (s.vip, s.port, proto)).map(|v| v.3);
        let service = known.unwrap_or_else(|| {
            ids.vips.push((s.vip, s.port, proto, next_service));
            next_service
        });
        self.backends = next_backend;
        self.services += known.is_none() as usize;
        service
    }
}

impl StatIds {
    /// Counter slots needed: (services, backends).
    pub fn len(&self) -> (usize, usize) {
        (self.counters.services, self.counters.backends as usize)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// A compiled snapshot's service and backend entries and its VIP table entries, before the
/// Maglev tables are in: they are built meanwhile, on other threads.
struct Entries {
    services: Vec<ServiceEntry>,
    backends: Vec<BackendEntry>,
    vip_entries: Vec<(u128, u32, u16)>,
}

/// The entries of every service (Maglev fields left empty).
/// `terminating_fallback[i]`: service i sends new flows to its terminating endpoints (pass 1).
fn entries(state: &DesiredState, terminating_fallback: &[bool], ids: &mut CounterIds) -> Entries {
    let mut e = Entries {
        services: Vec::with_capacity(state.services.len()),
        backends: Vec::with_capacity(state.services.iter().map(|s| s.endpoints.len()).sum()),
        vip_entries: Vec::with_capacity(2 * state.services.len()),
    };
    let mut backend_ids = Vec::new();
    for (si, s) in state.services.iter().enumerate() {
        let start = e.backends.len() as u32;
        let proto = s.protocol.ip_number();
        let service_id = ids.ids(s, proto, &mut backend_ids);
        for (ep, &stat_id) in s.endpoints.iter().zip(&backend_ids) {
            e.backends.push(BackendEntry {
                stat_id,
                addr: ep.addr,
                port: ep.port,
                state: ep.state,
                weight: ep.weight,
                target: ep.target.clone(),
                maglev_slots: 0,
            });
        }
        e.vip_entries.push((ip_u128(s.vip), ((proto as u32) << 16) | s.port as u32, si as u16));
        e.vip_entries.push((ip_u128(s.vip), 0, ANY_PORT));
        e.services.push(ServiceEntry {
            stat_id: service_id,
            service: s.service.clone(),
            port_name: s.port_name.clone(),
            vip: s.vip,
            port: s.port,
            proto,
            mode: s.mode.into(),
            affinity_ms: s.affinity.as_ref().map(|a| a.timeout_seconds.saturating_mul(1000)),
            source_ranges: s.source_ranges.clone(),
            sources: s.source_ranges.iter().map(|&n| mapped_range(n)).collect(),
            backends: start..e.backends.len() as u32,
            terminating_fallback: terminating_fallback[si],
            maglev: MaglevTable::default(),
        });
    }
    e
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// Counter slots the workers need: (services, backends).
    pub stat_slots: (usize, usize),
    pub maglev_size: u32,
    pub services: Vec<ServiceEntry>,
    pub backends: Vec<BackendEntry>,
    vips: VipTable,
    vips4: Vip4Table,
    /// HTTP routes of the Ingresses of our class (empty without an `l7` bootstrap section).
    pub l7: Arc<Router>,
    /// The routes' endpoint addresses (IPv4, the proxy's upstreams), each once: the workers
    /// resolve their neighbours ahead, as for the L4 backends, so that a first request's SYN is
    /// not dropped while its neighbour is asked (a second's wait for the retransmission). An
    /// Ingress usually points at ClusterIP Services, whose endpoints no L4 VIP has.
    pub l7_endpoints: Vec<IpAddr>,
    /// TLS for the HTTPS ports: the certificates of the Ingresses' TLS Secrets (None: none).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Certificates that could not be used, and why.
    pub tls_warnings: Vec<String>,
    /// Whether this appliance answers ARP/NDP for the VIPs and the Ingress address: true alone,
    /// only on the leader of a pair (the standby forwards what reaches it but does not claim
    /// the addresses). Turning true makes worker 0 announce them (gratuitous ARP, unsolicited NA).
    pub answers_vips: bool,
    /// Endpoints to probe (Services with an active health check; IPv4 endpoints: the probes
    /// use the proxy's TCP stack), each (endpoint, check) once.
    pub health: Vec<HealthTarget>,
}

/// Every IPv4 endpoint address of the Ingress routes and the default backend, sorted, each once.
fn l7_endpoint_addrs(l7: &fulcrum_config::ingress::L7State) -> Vec<IpAddr> {
    let backends = l7.hosts.iter().flat_map(|h| h.paths.iter().map(|p| &p.backend)).chain(&l7.default_backend);
    let mut v: Vec<IpAddr> =
        backends.flat_map(|b| b.endpoints.iter().map(|e| e.ip())).filter(IpAddr::is_ipv4).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// One endpoint and the check to run against it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HealthTarget {
    pub endpoint: std::net::SocketAddrV4,
    pub check: fulcrum_config::model::HealthCheck,
}

/// What `lookup` found for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipMatch {
    Service(u16),
    /// The address is a VIP, but not on this protocol and port.
    OtherPort,
    NotVip,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("too many services ({0}); at most 65534 VIP:port entries per snapshot")]
    TooManyServices(usize),
    #[error("service {service} has {backends} endpoints; the Maglev table size {m} must exceed that (ideally 100x)")]
    TableTooSmall { service: String, backends: usize, m: u32 },
}

impl Snapshot {
    /// An empty snapshot: every VIP unknown.
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            stat_slots: (0, 0),
            maglev_size: 65537,
            services: vec![],
            backends: vec![],
            vips: VipTable::new(&[]),
            vips4: Vip4Table::new(&[]),
            l7: Arc::new(Router::default()),
            l7_endpoints: vec![],
            tls: None,
            tls_warnings: vec![],
            answers_vips: true,
            health: vec![],
        }
    }

    /// Compiles a first snapshot (fresh counter ids).
    pub fn compile(boot: &Bootstrap, state: &DesiredState, generation: u64) -> Result<Snapshot, CompileError> {
        Self::compile_with(boot, state, generation, &mut StatIds::default())
    }

    /// Compiles a snapshot that follows others: `ids` carries the counter ids over.
    pub fn compile_with(
        boot: &Bootstrap,
        state: &DesiredState,
        generation: u64,
        ids: &mut StatIds,
    ) -> Result<Snapshot, CompileError> {
        let m = boot.maglev.table_size;
        if state.services.len() >= ANY_PORT as usize {
            return Err(CompileError::TooManyServices(state.services.len()));
        }
        // Pass 1: each service's Maglev inputs. New flows go to ready endpoints, or to serving
        // terminating ones when none is ready (kube-proxy's fallback).
        let mut keys: Vec<MaglevKey> = Vec::with_capacity(state.services.len());
        let mut terminating_fallback = Vec::with_capacity(state.services.len());
        for s in &state.services {
            let ready = s.endpoints.iter().any(|e| e.state == EndpointState::Ready);
            let takes_new = |st: EndpointState| {
                if ready {
                    st == EndpointState::Ready
                } else {
                    st == EndpointState::Terminating
                }
            };
            let inputs: Vec<(IpAddr, u16, u32)> =
                s.endpoints.iter().map(|e| (e.addr, e.port, if takes_new(e.state) { e.weight } else { 0 })).collect();
            let n = inputs.iter().filter(|i| i.2 > 0).count();
            if n >= m as usize {
                return Err(CompileError::TableTooSmall { service: s.service.to_string(), backends: n, m });
            }
            keys.push((m, inputs));
            terminating_fallback.push(!ready && n > 0);
        }
        // Pass 2: the tables (reused when unchanged since the last compile), and meanwhile on
        // another thread everything that does not depend on them: the entries, the router, the
        // TLS configuration and the prober's targets.
        let StatIds { counters, tables: cache } = ids;
        let (tables, (mut entries, l7, (tls, tls_warnings), health)) = std::thread::scope(|scope| {
            let rest = scope.spawn(|| {
                (
                    entries(state, &terminating_fallback, counters),
                    Arc::new(Router::compile(&state.l7)),
                    crate::l7::tls::server_config(&state.l7.certificates),
                    health_targets(state),
                )
            });
            let tables = build_tables(&keys, cache);
            (tables, rest.join().expect("snapshot compile thread panicked"))
        });
        // Pass 3: the tables into the entries.
        for (service, built) in entries.services.iter_mut().zip(&tables) {
            let range = service.backends.start as usize..service.backends.end as usize;
            for (b, &n) in entries.backends[range].iter_mut().zip(&built.shares) {
                b.maglev_slots = n;
            }
            service.maglev = built.table.clone();
        }
        // Keep exactly this snapshot's tables for the next compile.
        *cache = keys.into_iter().zip(tables).collect();
        let Entries { services, backends, vip_entries } = entries;
        Ok(Snapshot {
            generation,
            stat_slots: ids.len(),
            maglev_size: m,
            services,
            backends,
            vips: VipTable::new(&vip_entries),
            vips4: Vip4Table::new(&vip_entries),
            l7,
            l7_endpoints: l7_endpoint_addrs(&state.l7),
            tls,
            tls_warnings,
            answers_vips: true,
            health,
        })
    }

    /// This snapshot as the next generation, with the VIPs claimed or not (a change of leader
    /// needs no recompile).
    pub fn with_vip_owner(&self, owner: bool, generation: u64) -> Snapshot {
        Snapshot { generation, answers_vips: owner, ..self.clone() }
    }

    /// Every address this appliance claims when it answers for the VIPs: each VIP once, and the
    /// Ingress address.
    pub fn claimed_addresses(&self, l7: Option<std::net::Ipv4Addr>) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.services.iter().map(|s| s.vip).chain(l7.map(IpAddr::V4)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Per packet: which service a destination (as ::ffff:v4 or v6 u128) and port are.
    #[inline(always)]
    pub fn lookup(&self, dst: u128, proto: u8, port: u16) -> VipMatch {
        match self.vips.get(dst, ((proto as u32) << 16) | port as u32) {
            Some(s) => VipMatch::Service(s),
            None if self.vips.get(dst, 0).is_some() => VipMatch::OtherPort,
            None => VipMatch::NotVip,
        }
    }

    /// `lookup` for an IPv4 destination (host order): the per-packet common case.
    #[inline(always)]
    pub fn lookup_v4(&self, dst: u32, proto: u8, port: u16) -> VipMatch {
        match self.vips4.get(dst, ((proto as u32) << 16) | port as u32) {
            Some(s) => VipMatch::Service(s),
            None if self.vips4.get(dst, 0).is_some() => VipMatch::OtherPort,
            None => VipMatch::NotVip,
        }
    }

    /// Whether an address is a VIP of any service (ARP/NDP and ping answer for it).
    #[inline]
    pub fn is_vip(&self, ip: IpAddr) -> bool {
        self.vips.get(ip_u128(ip), 0).is_some()
    }

    /// The compiled tables as JSON (`fulcrum snapshot`). With `full_tables`, every Maglev slot.
    pub fn to_json(&self, full_tables: bool) -> serde_json::Value {
        let services: Vec<serde_json::Value> = self
            .services
            .iter()
            .map(|s| {
                let bs = &self.backends[s.backends.start as usize..s.backends.end as usize];
                let mut v = serde_json::json!({
                    "service": s.service.to_string(),
                    "port_name": s.port_name,
                    "vip": s.vip,
                    "port": s.port,
                    "protocol": if s.proto == 6 { "TCP" } else { "UDP" },
                    "mode": match s.mode { Mode::FullNat => "fullnat", Mode::DsrIpip => "dsr-ipip" },
                    "session_affinity_timeout_s": s.affinity_ms.map(|ms| ms / 1000),
                    "source_ranges": s.source_ranges,
                    "terminating_fallback": s.terminating_fallback,
                    "maglev_fingerprint": format!("{:016x}", fingerprint(s.maglev.slots())),
                    "backends": bs,
                });
                if full_tables {
                    v["maglev_table"] = serde_json::json!(s.maglev.slots());
                }
                v
            })
            .collect();
        serde_json::json!({
            "generation": self.generation,
            "maglev_table_size": self.maglev_size,
            "services": services,
        })
    }
}

fn fingerprint(slots: &[u32]) -> u64 {
    slots.iter().fold(0x1234_5678u64, |h, &s| mix64(h ^ s as u64))
}

#[cfg(test)]
mod tests {
    /// Longest run of probes any key of the table needs.
    fn longest_probe(t: &super::VipTable, entries: &[(u128, u32, u16)]) -> usize {
        entries
            .iter()
            .map(|&(ip, pp, _)| {
                let mut i = super::VipTable::hash(ip, pp) as usize & t.mask;
                let mut n = 1;
                while !(t.slots[i].ip == ip && t.slots[i].pp == pp) {
                    i = (i + 1) & t.mask;
                    n += 1;
                }
                n
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn source_ranges_match_their_family_and_prefix_only() {
        let admits = |ranges: &[&str], src: &str| {
            let sources = ranges.iter().map(|r| mapped_range(r.parse().unwrap())).collect();
            let entry = ServiceEntry {
                stat_id: 0,
                service: ObjectRef { namespace: "t".into(), name: "s".into() },
                port_name: String::new(),
                vip: "10.20.0.10".parse().unwrap(),
                port: 80,
                proto: 6,
                mode: Mode::FullNat,
                affinity_ms: None,
                source_ranges: Vec::new(),
                sources,
                backends: 0..0,
                terminating_fallback: false,
                maglev: MaglevTable::default(),
            };
            entry.admits(ip_u128(src.parse().unwrap()))
        };
        assert!(admits(&["0.0.0.0/0"], "203.0.113.9"));
        assert!(!admits(&["0.0.0.0/0"], "2001:db8::1"), "an IPv4 range admits no IPv6 client");
        assert!(admits(&["::/0"], "2001:db8::1"));
        assert!(!admits(&["::/0"], "203.0.113.9"), "nor an IPv6 range an IPv4 client");
        assert!(admits(&["203.0.113.9/32"], "203.0.113.9") && !admits(&["203.0.113.9/32"], "203.0.113.8"));
        assert!(admits(&["2001:db8::1/128"], "2001:db8::1") && !admits(&["2001:db8::1/128"], "2001:db8::2"));
        assert!(admits(&["10.0.0.0/8"], "10.255.0.1") && !admits(&["10.0.0.0/8"], "11.0.0.1"));
    }

    #[test]
    fn maglev_keys_are_formatted_as_display_writes_them() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng = super::mix64(rng);
            rng
        };
        let mut addrs: Vec<IpAddr> = vec![
            Ipv4Addr::new(0, 0, 0, 0).into(),
            Ipv4Addr::new(255, 255, 255, 255).into(),
            Ipv4Addr::new(10, 0, 9, 100).into(),
            Ipv6Addr::LOCALHOST.into(),
            "fd00::1:0:0:2".parse().unwrap(),
        ];
        for _ in 0..1000 {
            addrs.push(Ipv4Addr::from(next() as u32).into());
            addrs.push(Ipv6Addr::from((next() as u128) << 64 | next() as u128).into());
        }
        for (i, a) in addrs.into_iter().enumerate() {
            let port = [0u16, 1, 9, 10, 80, 65535][i % 6].wrapping_add(i as u16 % 3);
            let mut out = b"prefix".to_vec();
            super::push_maglev_key(&mut out, a, port);
            assert_eq!(out, format!("prefix{a}:{port}").into_bytes());
        }
    }

    /// Operators number VIPs sequentially; the tables must not cluster them (a cluster costs
    /// every packet to a VIP in it, and compiling).
    #[test]
    fn sequential_vips_do_not_cluster() {
        for v6 in [false, true] {
            let mut entries = Vec::new();
            for i in 0..10_000u128 {
                let ip = if v6 { 0xfd00_0020_u128 << 96 | i } else { 0xffff_0a80_0000 | i };
                entries.push((ip, (6 << 16) | 80, i as u16));
                entries.push((ip, 0, super::ANY_PORT));
            }
            let t = super::VipTable::new(&entries);
            let longest = longest_probe(&t, &entries);
            eprintln!("v6={v6}: longest probe run {longest}");
            assert!(longest <= 32, "v6={v6}: a key needs {longest} probes");
        }
    }

    use super::*;
    use fulcrum_config::model::*;
    use std::net::Ipv4Addr;

    fn boot() -> Bootstrap {
        let yaml = r#"
ports: [{name: p0, device: "net_null0", mac: "02:00:00:00:00:01", ipv4: 10.0.0.2/24}]
workers: {cores: [0]}
vip_pools: [{name: a, cidrs: [10.20.0.0/24]}]
maglev: {table_size: 1009}
"#;
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn svc(eps: &[(u8, EndpointState)]) -> VipService {
        VipService {
            service: ObjectRef { namespace: "default".into(), name: "web".into() },
            port_name: "http".into(),
            vip: "10.20.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            mode: ForwardingMode::FullNat,
            affinity: None,
            health: None,
            source_ranges: Vec::new(),
            endpoints: eps
                .iter()
                .map(|&(i, st)| Endpoint {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 30, 0, i)),
                    port: 8080,
                    state: st,
                    weight: 1,
                    target: None,
                })
                .collect(),
        }
    }

    #[test]
    fn lookup_by_vip_proto_port() {
        let st = DesiredState { services: vec![svc(&[(1, EndpointState::Ready)])], ..Default::default() };
        let s = Snapshot::compile(&boot(), &st, 1).unwrap();
        let vip = v4_u128(u32::from(Ipv4Addr::new(10, 20, 0, 10)));
        assert_eq!(s.lookup(vip, 6, 80), VipMatch::Service(0));
        assert_eq!(s.lookup(vip, 17, 80), VipMatch::OtherPort);
        assert_eq!(s.lookup(vip, 6, 81), VipMatch::OtherPort);
        assert_eq!(s.lookup(v4_u128(1), 6, 80), VipMatch::NotVip);
        let vip4 = u32::from(Ipv4Addr::new(10, 20, 0, 10));
        assert_eq!(s.lookup_v4(vip4, 6, 80), VipMatch::Service(0));
        assert_eq!(s.lookup_v4(vip4, 17, 80), VipMatch::OtherPort);
        assert_eq!(s.lookup_v4(vip4 + 1, 6, 80), VipMatch::NotVip);
        assert!(s.is_vip("10.20.0.10".parse().unwrap()));
        assert!(!s.is_vip("10.20.0.11".parse().unwrap()));
    }

    #[test]
    fn terminating_endpoints_take_no_new_flows_unless_none_ready() {
        use EndpointState::*;
        let st =
            DesiredState { services: vec![svc(&[(1, Ready), (2, Terminating), (3, NotReady)])], ..Default::default() };
        let s = Snapshot::compile(&boot(), &st, 1).unwrap();
        let slots: Vec<u32> = s.backends.iter().map(|b| b.maglev_slots).collect();
        assert_eq!(slots, vec![1009, 0, 0]);
        assert!(!s.services[0].terminating_fallback);

        let st = DesiredState { services: vec![svc(&[(2, Terminating), (3, NotReady)])], ..Default::default() };
        let s = Snapshot::compile(&boot(), &st, 2).unwrap();
        assert_eq!(s.backends[0].maglev_slots, 1009);
        assert_eq!(s.backends[1].maglev_slots, 0);
        assert!(s.services[0].terminating_fallback);

        let st = DesiredState { services: vec![svc(&[(3, NotReady)])], ..Default::default() };
        let s = Snapshot::compile(&boot(), &st, 3).unwrap();
        assert!(s.services[0].maglev.is_empty());
    }
}
