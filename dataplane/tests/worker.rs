//! Behaviour tests of the L4 worker through its public API: frames in through a `MemoryPort`,
//! frames out and drop counters checked field by field. Frames are built by hand here (with
//! checksums computed from scratch by the small helpers below, independently of the data
//! plane's incremental code) and every frame the worker sends is re-checked from scratch.
//!
//! Topology (as the golden fixtures): appliance 02:f1:00:00:00:01, 10.10.0.2/24,
//! fd00:10::2/64, next hop 10.10.0.1 / fd00:10::1 (02:f1:00:00:00:fe); clients and endpoints
//! are off-link, reached through the next hop.

use fulcrum_config::model::{
    ClientIpAffinity, DesiredState, Endpoint, EndpointState, ForwardingMode, ObjectRef, Protocol, VipService,
};
use fulcrum_config::Bootstrap;
use fulcrum_dataplane::l4::conntrack::FlowKey;
use fulcrum_dataplane::port::MemoryPort;
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::stats::DropReason;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;

const LB_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0xfe];
const LB4: &str = "10.10.0.2";
const LB6: &str = "fd00:10::2";
const GW4: &str = "10.10.0.1";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:100::7";

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// The seed of the worker's Maglev flow hash (worker.rs `MAGLEV_SEED`, "flowhash"): fixed so
/// that appliances behind one ECMP group agree. The DSR IPv6 flow label is taken from it.
const MAGLEV_SEED: u64 = 0x666c_6f77_6861_7368;

// Conntrack timeouts of BOOT, in ms.
const T_SYN: u64 = 5_000;
const T_EST: u64 = 60_000;
const T_FIN: u64 = 7_000;
const T_CLOSED: u64 = 3_000;
const T_TIME_WAIT: u64 = 9_000;
const T_UDP: u64 = 4_000;

const BOOT: &str = r#"
ports:
  - name: p0
    device: "net_null0"
    mac: "02:f1:00:00:00:01"
    ipv4: 10.10.0.2/24
    ipv6: fd00:10::2/64
    next_hop: {ipv4: 10.10.0.1, ipv6: "fd00:10::1", mac: "02:f1:00:00:00:fe"}
    mtu: 1500
workers: {cores: [0]}
vip_pools: [{name: a, cidrs: [10.20.0.0/24, "fd00:20::/120"]}]
forwarding: {dsr_source_v4: 172.16.0.0/16, dsr_source_v6: "fd00:f17c::/112"}
maglev: {table_size: 65537}
conntrack:
  capacity: 8192
  timeouts: {tcp_syn: 5, tcp_established: 60, tcp_fin: 7, tcp_closed: 3, tcp_time_wait: 9, udp: 4}
"#;

fn boot() -> Bootstrap {
    Bootstrap::parse(Path::new("worker-test.yaml"), BOOT).expect("test bootstrap")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// --- Services and snapshots --------------------------------------------------------------------

use EndpointState::{NotReady, Ready, Terminating};

fn service(
    name: &str,
    vip: &str,
    port: u16,
    proto: Protocol,
    mode: ForwardingMode,
    eps: &[(&str, u16, EndpointState)],
) -> VipService {
    VipService {
        service: ObjectRef { namespace: "t".into(), name: name.into() },
        port_name: String::new(),
        vip: ip(vip),
        port,
        protocol: proto,
        mode,
        affinity: None,
        health: None,
        source_ranges: Vec::new(),
        endpoints: eps
            .iter()
            .map(|&(a, p, state)| Endpoint { addr: ip(a), port: p, state, weight: 1, target: None })
            .collect(),
    }
}

/// Single-endpoint services (deterministic picks), as in the golden fixtures.
fn fixed_services() -> Vec<VipService> {
    use ForwardingMode::*;
    use Protocol::*;
    vec![
        service("web", "10.20.0.10", 80, Tcp, FullNat, &[("10.30.0.11", 8080, Ready)]),
        service("dns", "10.20.0.11", 53, Udp, FullNat, &[("10.30.0.12", 5353, Ready)]),
        service("dsr", "10.20.0.12", 80, Tcp, DsrIpip, &[("10.30.0.13", 80, Ready)]),
        service("web6", "fd00:20::10", 80, Tcp, FullNat, &[("fd00:30::11", 8080, Ready)]),
        service("dns6", "fd00:20::11", 53, Udp, FullNat, &[("fd00:30::12", 5353, Ready)]),
        service("dsr6", "fd00:20::12", 80, Tcp, DsrIpip, &[("fd00:30::13", 80, Ready)]),
    ]
}

const MULTI_VIP: &str = "10.20.0.20";
const E1: &str = "10.30.0.1";
const E2: &str = "10.30.0.2";
const E3: &str = "10.30.0.3";

/// The fixed services plus "multi" (10.20.0.20:80/TCP, FullNAT) with the given endpoints on 8080.
fn multi(eps: &[(&str, EndpointState)], affinity_s: Option<u32>) -> Vec<VipService> {
    let eps: Vec<(&str, u16, EndpointState)> = eps.iter().map(|&(a, s)| (a, 8080, s)).collect();
    let mut s = service("multi", MULTI_VIP, 80, Protocol::Tcp, ForwardingMode::FullNat, &eps);
    s.affinity = affinity_s.map(|t| ClientIpAffinity { timeout_seconds: t });
    let mut v = fixed_services();
    v.push(s);
    v
}

fn snapshot(services: Vec<VipService>, generation: u64) -> Arc<Snapshot> {
    Arc::new(Snapshot::compile(&boot(), &DesiredState { services, ..Default::default() }, generation).expect("compile"))
}

fn config() -> WorkerConfig {
    let mut cfg = WorkerConfig::from_bootstrap(&boot(), 0, 1);
    cfg.seed = 7;
    cfg.snat_offset = 0;
    cfg.affinity_capacity = 4096;
    cfg
}

// --- Harness -----------------------------------------------------------------------------------

struct H {
    w: Worker,
    port: MemoryPort,
}

impl H {
    fn new(services: Vec<VipService>) -> H {
        H::with(config(), services)
    }

    fn with(cfg: WorkerConfig, services: Vec<VipService>) -> H {
        H { w: Worker::new(cfg, snapshot(services, 1)).expect("worker"), port: MemoryPort::new() }
    }

    /// One frame in at `now`: the frames sent and the drops counted for it.
    fn step(&mut self, now: u64, frame: &[u8]) -> (Vec<Vec<u8>>, Vec<DropReason>) {
        let before = self.w.stats.drops;
        self.port.push_rx(frame);
        self.w.poll(&mut self.port, now);
        let sent = self.port.take_tx();
        let mut drops = Vec::new();
        for r in DropReason::ALL {
            for _ in before[*r as usize]..self.w.stats.drops[*r as usize] {
                drops.push(*r);
            }
        }
        (sent, drops)
    }

    /// The frame must be forwarded as exactly one frame; returns it, parsed and checked.
    #[track_caller]
    fn fwd(&mut self, now: u64, frame: &[u8]) -> Pkt {
        let (sent, drops) = self.step(now, frame);
        assert!(drops.is_empty(), "expected a forward, got drops {drops:?}");
        assert_eq!(sent.len(), 1, "expected one frame out");
        parse(&sent[0])
    }

    /// The frame must be dropped under exactly one reason, with nothing sent.
    #[track_caller]
    fn dropped(&mut self, now: u64, frame: &[u8]) -> DropReason {
        let (sent, drops) = self.step(now, frame);
        assert!(sent.is_empty(), "expected a drop, but {} frame(s) were sent (drops {drops:?})", sent.len());
        assert_eq!(drops.len(), 1, "expected exactly one drop, got {drops:?}");
        drops[0]
    }

    /// Many frames at once, through as many polls as it takes; every one must be forwarded.
    fn fwd_all(&mut self, now: u64, frames: &[Vec<u8>]) -> Vec<Pkt> {
        let drops_before = self.w.stats.total_drops();
        for f in frames {
            self.port.push_rx(f);
        }
        while !self.port.rx.is_empty() {
            self.w.poll(&mut self.port, now);
        }
        assert_eq!(self.w.stats.total_drops(), drops_before, "drops: {}", self.w.stats.to_json()["drops"]);
        let out: Vec<Pkt> = self.port.take_tx().iter().map(|f| parse(f)).collect();
        assert_eq!(out.len(), frames.len());
        out
    }
}

// --- Checksums, from scratch -------------------------------------------------------------------

fn sum16(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    sum16(&addr_bytes(src)) + sum16(&addr_bytes(dst)) + proto as u32 + (len as u32 >> 16) + (len as u32 & 0xffff)
}

/// The checksum to store in an L4 segment whose checksum field is zero.
fn l4_csum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> u16 {
    !fold(pseudo(src, dst, proto, seg.len()) + sum16(seg))
}

/// Whether a segment (checksum field included) sums to all ones with its pseudo-header.
fn l4_csum_ok(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> bool {
    fold(pseudo(src, dst, proto, seg.len()) + sum16(seg)) == 0xffff
}

// --- Frame building ----------------------------------------------------------------------------

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IP header fields that do not depend on the payload.
#[derive(Clone, Copy, Debug)]
struct IpOpts {
    ttl: u8,
    tos: u8,
    df: bool,
    id: u16,
    flow_label: u32,
}

const IPO: IpOpts = IpOpts { ttl: 63, tos: 0, df: true, id: 0x1234, flow_label: 0 };

/// An IPv4 or IPv6 packet around `l4` (IPv4 header checksum computed).
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], o: IpOpts) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[1] = o.tos;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&o.id.to_be_bytes());
            h[6] = if o.df { 0x40 } else { 0 };
            h[8] = o.ttl;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = !fold(sum16(&h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(l4);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            let w0 = (6u32 << 28) | ((o.tos as u32) << 20) | (o.flow_label & 0xfffff);
            h[0..4].copy_from_slice(&w0.to_be_bytes());
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = o.ttl;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h.extend_from_slice(l4);
            h
        }
        _ => panic!("mixed families"),
    }
}

fn ethertype_of(a: IpAddr) -> u16 {
    if a.is_ipv4() {
        0x0800
    } else {
        0x86dd
    }
}

/// A TCP or UDP packet, described once and rendered with any addresses.
#[derive(Clone, Debug)]
struct Seg {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: Vec<u8>,
    /// UDP over IPv4: send checksum 0 (none).
    no_udp_csum: bool,
    o: IpOpts,
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Seg {
    Seg {
        src: ip(src),
        sport,
        dst: ip(dst),
        dport,
        proto: TCP,
        flags,
        seq: 1000,
        ack: if flags & ACK != 0 { 2000 } else { 0 },
        payload: vec![],
        no_udp_csum: false,
        o: IPO,
    }
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Seg {
    Seg { proto: UDP, flags: 0, seq: 0, ack: 0, payload: payload.to_vec(), ..tcp(src, sport, dst, dport, 0) }
}

impl Seg {
    fn data(mut self, p: &[u8]) -> Seg {
        self.payload = p.to_vec();
        self
    }
    fn opts(mut self, o: IpOpts) -> Seg {
        self.o = o;
        self
    }
    fn seqs(mut self, seq: u32, ack: u32) -> Seg {
        self.seq = seq;
        self.ack = ack;
        self
    }
    /// The same segment with other addresses and ports (how it looks on the other side).
    fn at(&self, src: &str, sport: u16, dst: &str, dport: u16) -> Seg {
        Seg { src: ip(src), sport, dst: ip(dst), dport, ..self.clone() }
    }
    fn l4(&self) -> Vec<u8> {
        let mut s;
        let coff;
        if self.proto == TCP {
            s = vec![0u8; 20];
            s[4..8].copy_from_slice(&self.seq.to_be_bytes());
            s[8..12].copy_from_slice(&self.ack.to_be_bytes());
            s[12] = 5 << 4;
            s[13] = self.flags;
            s[14..16].copy_from_slice(&64240u16.to_be_bytes());
            coff = 16;
        } else {
            s = vec![0u8; 8];
            s[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            coff = 6;
        }
        s[0..2].copy_from_slice(&self.sport.to_be_bytes());
        s[2..4].copy_from_slice(&self.dport.to_be_bytes());
        s.extend_from_slice(&self.payload);
        let mut c = l4_csum(self.src, self.dst, self.proto, &s);
        if self.proto == UDP && c == 0 {
            c = 0xffff;
        }
        if self.proto == UDP && self.no_udp_csum {
            c = 0;
        }
        s[coff..coff + 2].copy_from_slice(&c.to_be_bytes());
        s
    }
    fn l3(&self) -> Vec<u8> {
        ip_packet(self.src, self.dst, self.proto, &self.l4(), self.o)
    }
    /// As received by the appliance (from the next hop).
    fn frame(&self) -> Vec<u8> {
        eth(LB_MAC, GW_MAC, ethertype_of(self.src), &self.l3())
    }
    /// As the appliance must send it (to the next hop).
    fn out_frame(&self) -> Vec<u8> {
        eth(GW_MAC, LB_MAC, ethertype_of(self.src), &self.l3())
    }
}

// --- Parsing what was sent ---------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Pkt {
    frame: Vec<u8>,
    dmac: [u8; 6],
    smac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// The IP packet (from the IP header on).
    l3: Vec<u8>,
    l4_off: usize,
    sport: u16,
    dport: u16,
}

impl Pkt {
    fn l4(&self) -> &[u8] {
        &self.l3[self.l4_off..]
    }
    fn l4_csum(&self) -> u16 {
        let off = if self.proto == TCP { 16 } else { 6 };
        u16::from_be_bytes([self.l4()[off], self.l4()[off + 1]])
    }
}

/// Parses an Ethernet/IP frame and checks everything that must hold for any frame we send:
/// IPv4 header checksum and lengths, TCP/UDP checksums from scratch (UDP over IPv4 may be 0).
#[track_caller]
fn parse(f: &[u8]) -> Pkt {
    let et = u16::from_be_bytes([f[12], f[13]]);
    let l3 = f[14..].to_vec();
    let (src, dst, proto, l4_off) = match et {
        0x0800 => {
            assert_eq!(l3[0], 0x45, "IPv4 without options");
            assert_eq!(u16::from_be_bytes([l3[2], l3[3]]) as usize, l3.len(), "IPv4 total length");
            assert_eq!(fold(sum16(&l3[..20])), 0xffff, "IPv4 header checksum");
            let s: [u8; 4] = l3[12..16].try_into().unwrap();
            let d: [u8; 4] = l3[16..20].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), l3[9], 20)
        }
        0x86dd => {
            assert_eq!(l3[0] >> 4, 6);
            assert_eq!(u16::from_be_bytes([l3[4], l3[5]]) as usize + 40, l3.len(), "IPv6 payload length");
            let s: [u8; 16] = l3[8..24].try_into().unwrap();
            let d: [u8; 16] = l3[24..40].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), l3[6], 40)
        }
        _ => panic!("not IP: ethertype {et:#06x}"),
    };
    let l4 = &l3[l4_off..];
    let (mut sport, mut dport) = (0, 0);
    if proto == TCP || proto == UDP {
        sport = u16::from_be_bytes([l4[0], l4[1]]);
        dport = u16::from_be_bytes([l4[2], l4[3]]);
        let udp_none = proto == UDP && src.is_ipv4() && l4[6] == 0 && l4[7] == 0;
        if !udp_none {
            assert!(l4_csum_ok(src, dst, proto, l4), "{} checksum wrong", if proto == TCP { "TCP" } else { "UDP" });
        }
    }
    Pkt {
        frame: f.to_vec(),
        dmac: f[0..6].try_into().unwrap(),
        smac: f[6..12].try_into().unwrap(),
        src,
        dst,
        proto,
        l3,
        l4_off,
        sport,
        dport,
    }
}

#[track_caller]
fn assert_macs_to_next_hop(p: &Pkt) {
    assert_eq!((p.dmac, p.smac), (GW_MAC, LB_MAC), "MACs");
}

/// Opens a FullNAT TCP flow (SYN, SYN-ACK, ACK) at `now`; returns (backend, backend port, SNAT port).
fn handshake(h: &mut H, now: u64, client: &str, cport: u16, vip: &str, vport: u16) -> (IpAddr, u16, u16) {
    let syn = h.fwd(now, &tcp(client, cport, vip, vport, SYN).frame());
    // The port's own address, or one of the FullNAT source addresses where a test lists them.
    let own = syn.src;
    assert!([LB4, LB6, SNAT_A, SNAT_B, SNAT_6].iter().any(|a| ip(a) == own), "SNAT source {own}");
    assert_eq!(own.is_ipv4(), ip(vip).is_ipv4());
    let (b, bport, snat) = (syn.dst, syn.dport, syn.sport);
    let sa = tcp("0.0.0.0", bport, "0.0.0.0", snat, SYN | ACK);
    let sa = Seg { src: b, dst: own, ..sa };
    let back = h.fwd(now, &sa.frame());
    assert_eq!((back.src, back.sport, back.dst, back.dport), (ip(vip), vport, ip(client), cport));
    let a = h.fwd(now, &tcp(client, cport, vip, vport, ACK).frame());
    assert_eq!((a.dst, a.dport, a.sport), (b, bport, snat));
    (b, bport, snat)
}

/// A segment from backend `b:bport` to our address `own:snat`.
fn from_backend(b: IpAddr, bport: u16, snat: u16, flags: u8) -> Seg {
    let own = if b.is_ipv4() { ip(LB4) } else { ip(LB6) };
    Seg { src: b, dst: own, ..tcp("0.0.0.0", bport, "0.0.0.0", snat, flags) }
}

// --- Spread and consistency --------------------------------------------------------------------

#[test]
fn spread_over_three_endpoints_and_flows_stick() {
    let mut h = H::new(multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let n = 3000u16;
    let syns: Vec<Vec<u8>> = (0..n).map(|i| tcp(CLIENT4, 20000 + i, MULTI_VIP, 80, SYN).frame()).collect();
    let out = h.fwd_all(0, &syns);
    let mut count: HashMap<IpAddr, usize> = HashMap::new();
    let mut snat_seen = HashSet::new();
    let mut picked = Vec::new();
    for (i, p) in out.iter().enumerate() {
        assert_macs_to_next_hop(p);
        assert_eq!((p.src, p.dport), (ip(LB4), 8080), "flow {i}");
        assert!([ip(E1), ip(E2), ip(E3)].contains(&p.dst), "flow {i} went to {}", p.dst);
        assert!(snat_seen.insert(p.sport), "SNAT port {} reused", p.sport);
        *count.entry(p.dst).or_default() += 1;
        picked.push((p.dst, p.sport));
    }
    for e in [E1, E2, E3] {
        let c = count.get(&ip(e)).copied().unwrap_or(0);
        let share = c as f64 / n as f64;
        assert!((0.25..=0.42).contains(&share), "{e} got {c} of {n} flows ({:.1}%)", share * 100.0);
    }
    // Every later packet of each flow goes to the same endpoint, through the same SNAT port.
    let acks: Vec<Vec<u8>> = (0..n).map(|i| tcp(CLIENT4, 20000 + i, MULTI_VIP, 80, ACK).data(b"x").frame()).collect();
    let again = h.fwd_all(10, &acks);
    for (i, p) in again.iter().enumerate() {
        assert_eq!((p.dst, p.sport), picked[i], "flow {i} moved");
    }
    // And the return traffic of each comes back from the VIP to the right client port.
    let rets: Vec<Vec<u8>> = picked.iter().map(|&(b, snat)| from_backend(b, 8080, snat, ACK).frame()).collect();
    let back = h.fwd_all(20, &rets);
    for (i, p) in back.iter().enumerate() {
        assert_eq!((p.src, p.sport, p.dst, p.dport), (ip(MULTI_VIP), 80, ip(CLIENT4), 20000 + i as u16));
    }
}

// --- Snapshot switches -------------------------------------------------------------------------

/// Opens flows from successive client ports until one lands on each endpoint; returns
/// endpoint -> (client port, SNAT port).
fn one_flow_per_endpoint(h: &mut H, eps: &[&str]) -> HashMap<IpAddr, (u16, u16)> {
    let mut m = HashMap::new();
    for cport in 30000..30200 {
        let (b, _, snat) = handshake(h, 0, CLIENT4, cport, MULTI_VIP, 80);
        m.entry(b).or_insert((cport, snat));
        if m.len() == eps.len() {
            return m;
        }
    }
    panic!("200 flows did not reach every endpoint: {m:?}");
}

fn new_syns_avoid(h: &mut H, now: u64, avoid: &str, expect: &[&str]) {
    let syns: Vec<Vec<u8>> = (0..300).map(|i| tcp(CLIENT4, 50000 + i, MULTI_VIP, 80, SYN).frame()).collect();
    let out = h.fwd_all(now, &syns);
    let got: HashSet<IpAddr> = out.iter().map(|p| p.dst).collect();
    assert!(!got.contains(&ip(avoid)), "a new flow went to {avoid}");
    let want: HashSet<IpAddr> = expect.iter().map(|e| ip(e)).collect();
    assert_eq!(got, want, "new flows spread over the endpoints that take new flows");
}

fn established_survives(state_after: Option<EndpointState>) {
    let mut h = H::new(multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let flows = one_flow_per_endpoint(&mut h, &[E1, E2, E3]);
    let (cport, snat) = flows[&ip(E2)];
    let eps: Vec<(&str, EndpointState)> = match state_after {
        None => vec![(E1, Ready), (E3, Ready)],
        Some(s) => vec![(E1, Ready), (E2, s), (E3, Ready)],
    };
    h.w.set_snapshot(snapshot(multi(&eps, None), 2));
    if state_after.is_some() {
        let snap = h.w.snapshot().clone();
        let e2 = snap.backends.iter().find(|b| b.addr == ip(E2)).unwrap();
        assert_eq!(e2.maglev_slots, 0);
    }
    // Data on the old flow still goes to E2, through its SNAT port, and back.
    let p = h.fwd(1000, &tcp(CLIENT4, cport, MULTI_VIP, 80, PSH | ACK).data(b"GET / HTTP/1.1\r\n\r\n").frame());
    assert_eq!((p.src, p.sport, p.dst, p.dport), (ip(LB4), snat, ip(E2), 8080));
    let r = h.fwd(1001, &from_backend(ip(E2), 8080, snat, PSH | ACK).data(b"HTTP/1.1 200 OK\r\n\r\n").frame());
    assert_eq!((r.src, r.sport, r.dst, r.dport), (ip(MULTI_VIP), 80, ip(CLIENT4), cport));
    // New SYNs never go to E2.
    new_syns_avoid(&mut h, 1002, E2, &[E1, E3]);
    // The old flow still works after all those new ones.
    let p = h.fwd(1003, &tcp(CLIENT4, cport, MULTI_VIP, 80, ACK).frame());
    assert_eq!((p.dst, p.sport), (ip(E2), snat));
}

#[test]
fn established_flow_survives_removal_of_its_endpoint() {
    established_survives(None);
}

#[test]
fn established_flow_survives_its_endpoint_terminating() {
    established_survives(Some(Terminating));
}

#[test]
fn established_flow_survives_its_endpoint_not_ready() {
    established_survives(Some(NotReady));
}

#[test]
fn all_terminating_fall_back_and_none_drop_as_no_backend() {
    let mut h = H::new(multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let (b, _, snat) = handshake(&mut h, 0, CLIENT4, 31000, MULTI_VIP, 80);

    // Every endpoint terminating: new flows still go to them (kube-proxy's fallback).
    h.w.set_snapshot(snapshot(multi(&[(E1, Terminating), (E2, Terminating), (E3, Terminating)], None), 2));
    assert!(h.w.snapshot().services.iter().find(|s| s.vip == ip(MULTI_VIP)).unwrap().terminating_fallback);
    let syns: Vec<Vec<u8>> = (0..300).map(|i| tcp(CLIENT4, 40000 + i, MULTI_VIP, 80, SYN).frame()).collect();
    let got: HashSet<IpAddr> = h.fwd_all(1, &syns).iter().map(|p| p.dst).collect();
    assert_eq!(got, [E1, E2, E3].iter().map(|e| ip(e)).collect::<HashSet<_>>());

    // Terminating and not-ready mixed: only the terminating ones take new flows.
    h.w.set_snapshot(snapshot(multi(&[(E1, NotReady), (E2, Terminating), (E3, NotReady)], None), 3));
    let syns: Vec<Vec<u8>> = (0..50).map(|i| tcp(CLIENT4, 41000 + i, MULTI_VIP, 80, SYN).frame()).collect();
    assert!(h.fwd_all(2, &syns).iter().all(|p| p.dst == ip(E2)));

    // No endpoint at all, or none serving: new SYNs drop as no_backend.
    for (g, eps) in [(4, vec![]), (5, vec![(E1, NotReady), (E2, NotReady)])] {
        h.w.set_snapshot(snapshot(multi(&eps, None), g));
        assert_eq!(h.dropped(3, &tcp(CLIENT4, 42000 + g as u16, MULTI_VIP, 80, SYN).frame()), DropReason::NoBackend);
        // UDP and TCP alike: the established flow keeps going to its endpoint.
        let p = h.fwd(3, &tcp(CLIENT4, 31000, MULTI_VIP, 80, ACK).frame());
        assert_eq!((p.dst, p.sport), (b, snat));
    }
    assert_eq!(h.w.stats.dropped(DropReason::NoBackend), 2);
}

// --- spec.loadBalancerSourceRanges -------------------------------------------------------------

#[test]
fn only_clients_in_the_source_ranges_open_flows() {
    let net = |n: &str| -> ipnet::IpNet { n.parse().unwrap() };
    let mut services = fixed_services();
    let restrict = |services: &mut Vec<VipService>, name: &str, ranges: &[&str]| {
        services.iter_mut().find(|s| s.service.name == name).unwrap().source_ranges =
            ranges.iter().map(|r| net(r)).collect();
    };
    // web admits CLIENT4's /24; dns only another network; web6 has an IPv4 range only (its
    // family none: nobody); dsr6 admits CLIENT6's /48.
    restrict(&mut services, "web", &["198.51.100.0/24", "fd00:99::/64"]);
    restrict(&mut services, "dns", &["192.0.2.0/24"]);
    restrict(&mut services, "web6", &["198.51.100.0/24"]);
    restrict(&mut services, "dsr6", &["2001:db8:100::/48"]);
    let mut h = H::new(services.clone());
    let p = h.fwd(0, &tcp(CLIENT4, 40000, "10.20.0.10", 80, SYN).frame());
    assert_eq!((p.dst, p.dport), (ip("10.30.0.11"), 8080), "admitted");
    let refused = [
        tcp("203.0.113.9", 40001, "10.20.0.10", 80, SYN).frame(),
        udp(CLIENT4, 40002, "10.20.0.11", 53, b"q").frame(),
        tcp(CLIENT6, 40003, "fd00:20::10", 80, SYN).frame(),
    ];
    for f in &refused {
        assert_eq!(h.dropped(1, f), DropReason::SourceNotAllowed);
    }
    let p = h.fwd(2, &tcp(CLIENT6, 40004, "fd00:20::12", 80, SYN).frame());
    assert_eq!(p.proto, 41, "DSR to dsr6: IPv6 in IPv6 to its endpoint");
    // Services without ranges admit anyone.
    let p = h.fwd(3, &udp("2001:db8:200::9", 40005, "fd00:20::11", 53, b"q").frame());
    assert_eq!(p.dst, ip("fd00:30::12"));
    assert_eq!(h.w.stats.dropped(DropReason::SourceNotAllowed), 3);
    // Narrowed while a flow is open: the flow goes on, the client opens no new one.
    restrict(&mut services, "web", &["192.0.2.0/24"]);
    h.w.set_snapshot(snapshot(services, 2));
    let p = h.fwd(4, &tcp(CLIENT4, 40000, "10.20.0.10", 80, ACK).data(b"x").frame());
    assert_eq!(p.dst, ip("10.30.0.11"), "the admitted flow lives on");
    assert_eq!(h.dropped(5, &tcp(CLIENT4, 40006, "10.20.0.10", 80, SYN).frame()), DropReason::SourceNotAllowed);
}

// --- ClientIP affinity -------------------------------------------------------------------------

#[test]
fn client_ip_affinity_sticks_across_snapshots_until_timeout() {
    const TIMEOUT_S: u32 = 10;
    let two = [(E1, Ready), (E2, Ready)];
    let five = [(E1, Ready), (E2, Ready), (E3, Ready), ("10.30.0.4", Ready), ("10.30.0.5", Ready)];
    let mut h = H::new(multi(&two, Some(TIMEOUT_S)));
    let clients: Vec<String> = (1..=64).map(|i| format!("198.51.100.{i}")).collect();
    let mut cport = 10000u16;
    // All flows of one client (different ports) go to one endpoint.
    let mut first: HashMap<String, IpAddr> = HashMap::new();
    for c in &clients {
        let mut seen = HashSet::new();
        for _ in 0..8 {
            cport += 1;
            seen.insert(h.fwd(1000, &tcp(c, cport, MULTI_VIP, 80, SYN).frame()).dst);
        }
        assert_eq!(seen.len(), 1, "client {c} spread over {seen:?}");
        first.insert(c.clone(), *seen.iter().next().unwrap());
    }
    let used: HashSet<IpAddr> = first.values().copied().collect();
    assert_eq!(used.len(), 2, "clients spread over both endpoints");

    // More endpoints: within the timeout every client keeps its endpoint.
    h.w.set_snapshot(snapshot(multi(&five, Some(TIMEOUT_S)), 2));
    let t1 = 2000;
    for c in &clients {
        for _ in 0..4 {
            cport += 1;
            assert_eq!(
                h.fwd(t1, &tcp(c, cport, MULTI_VIP, 80, SYN).frame()).dst,
                first[c],
                "client {c} moved within the timeout"
            );
        }
    }

    // After the timeout a client may move (and then sticks again); clients spread over all five.
    let t2 = t1 + TIMEOUT_S as u64 * 1000 + 1;
    let mut after: HashMap<String, IpAddr> = HashMap::new();
    for c in &clients {
        let mut seen = HashSet::new();
        for _ in 0..4 {
            cport += 1;
            seen.insert(h.fwd(t2, &tcp(c, cport, MULTI_VIP, 80, SYN).frame()).dst);
        }
        assert_eq!(seen.len(), 1, "client {c} spread over {seen:?}");
        after.insert(c.clone(), *seen.iter().next().unwrap());
    }
    let moved = clients.iter().filter(|c| after[*c] != first[*c]).count();
    assert!(moved > 0, "no client moved after the timeout: the stickiness above proves nothing");
    let used: HashSet<IpAddr> = after.values().copied().collect();
    assert!(used.len() >= 4, "64 clients over five endpoints used only {used:?}");

    // An endpoint that goes away releases its clients at once (no waiting for the timeout).
    let (victim_client, victim) = after.iter().next().map(|(c, b)| (c.clone(), *b)).unwrap();
    let rest: Vec<(&str, EndpointState)> = five.iter().copied().filter(|(e, _)| ip(e) != victim).collect();
    h.w.set_snapshot(snapshot(multi(&rest, Some(TIMEOUT_S)), 3));
    cport += 1;
    let p = h.fwd(t2 + 1, &tcp(&victim_client, cport, MULTI_VIP, 80, SYN).frame());
    assert_ne!(p.dst, victim);
}

// --- Conntrack states and timeouts -------------------------------------------------------------

fn web() -> H {
    H::new(fixed_services())
}

const WEB_VIP: &str = "10.20.0.10";
const WEB_EP: &str = "10.30.0.11";

#[test]
fn syn_only_flow_expires_after_tcp_syn() {
    let mut h = web();
    let p = h.fwd(0, &tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame());
    assert_eq!((p.src, p.sport, p.dst, p.dport), (ip(LB4), 1024, ip(WEB_EP), 8080));
    let p = h.fwd(0, &tcp(CLIENT4, 40001, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1025);
    assert_eq!(h.w.conntrack_v4().len(), 2);
    // Flow 2 answered just in time (and so established); flow 1 never.
    let r = h.fwd(T_SYN - 1, &from_backend(ip(WEB_EP), 8080, 1025, SYN | ACK).frame());
    assert_eq!((r.dst, r.dport), (ip(CLIENT4), 40001));
    // Flow 1 is gone: a non-SYN is no flow under FullNAT, and so is the backend's late answer.
    assert_eq!(h.dropped(T_SYN, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).frame()), DropReason::NoFlow);
    assert_eq!(h.dropped(T_SYN, &from_backend(ip(WEB_EP), 8080, 1024, SYN | ACK).frame()), DropReason::NoFlow);
    // Flow 2 lives on as established.
    let p = h.fwd(T_SYN + 1000, &tcp(CLIENT4, 40001, WEB_VIP, 80, ACK).frame());
    assert_eq!(p.sport, 1025);
}

#[test]
fn established_flow_lives_tcp_established() {
    let mut h = web();
    let (b, bport, snat) = handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    assert_eq!((b, bport, snat), (ip(WEB_EP), 8080, 1024));
    // Idle for just under the timeout, twice: still there (each packet pushes the deadline).
    let t1 = T_EST - 1;
    h.fwd(t1, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).data(b"a").frame());
    let t2 = t1 + T_EST - 1;
    h.fwd(t2, &from_backend(b, bport, snat, ACK).data(b"b").frame());
    // Then idle for the whole timeout: gone in both directions.
    let t3 = t2 + T_EST;
    assert_eq!(h.dropped(t3, &from_backend(b, bport, snat, ACK).frame()), DropReason::NoFlow);
    assert_eq!(h.dropped(t3, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).frame()), DropReason::NoFlow);
}

#[test]
fn fin_both_ways_then_closed_timeout() {
    let mut h = web();
    let (b, bport, snat) = handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    h.fwd(10, &tcp(CLIENT4, 40000, WEB_VIP, 80, FIN | ACK).frame());
    // Half closed: lives for tcp_fin.
    h.fwd(10 + T_FIN - 1, &from_backend(b, bport, snat, ACK).data(b"late data").frame());
    let t = 10 + T_FIN - 1;
    h.fwd(t + 1, &from_backend(b, bport, snat, FIN | ACK).frame());
    h.fwd(t + 2, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).frame());
    // Closed: stragglers pass for tcp_closed, then it is gone. (Idle timeouts are exact to
    // within a second: a packet need not push a deadline out by less than that, so "alive"
    // is checked a second before the timeout and "gone" at it.)
    let last = t + 2 + T_CLOSED - 1000;
    h.fwd(last, &from_backend(b, bport, snat, ACK).frame());
    let gone = last + T_CLOSED;
    assert_eq!(h.dropped(gone, &from_backend(b, bport, snat, ACK).frame()), DropReason::NoFlow);
    assert_eq!(h.dropped(gone, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).frame()), DropReason::NoFlow);
    // A new SYN from the same port is a new flow with a new SNAT port.
    let p = h.fwd(gone, &tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1025);
}

/// Closes a FullNAT flow as a server that closes first does: its FIN, the client's, its ACK.
fn close_backend_first(h: &mut H, now: u64, cport: u16, (b, bport, snat): (IpAddr, u16, u16)) {
    h.fwd(now, &from_backend(b, bport, snat, FIN | ACK).frame());
    h.fwd(now, &tcp(CLIENT4, cport, WEB_VIP, 80, FIN | ACK).frame());
    h.fwd(now, &from_backend(b, bport, snat, ACK).frame());
}

/// A worker whose core owns only the 64 SNAT ports 1024..=1087 (core 0 of 1008).
fn web_with_64_snat_ports() -> H {
    let mut cfg = config();
    cfg.cores = 1008;
    H::with(cfg, fixed_services())
}

#[test]
fn snat_ports_the_backend_holds_in_time_wait_are_passed_over() {
    let mut h = web_with_64_snat_ports();
    // Port 1024: closed by the backend first (TIME-WAIT there); 1025..=1087: by the client.
    let first = handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    assert_eq!(first.2, 1024);
    close_backend_first(&mut h, 10, 40000, first);
    for i in 1..64u16 {
        let t = handshake(&mut h, 20, CLIENT4, 40000 + i, WEB_VIP, 80);
        assert_eq!(t.2, 1024 + i);
        h.fwd(30, &tcp(CLIENT4, 40000 + i, WEB_VIP, 80, FIN | ACK).frame());
        h.fwd(30, &from_backend(t.0, t.1, t.2, FIN | ACK).frame());
    }
    // The round robin wraps to 1024 once the client-closed flows are gone: 1024 is passed
    // over while the backend's TIME-WAIT lasts, and its flow still carries stragglers.
    let t = 30 + T_CLOSED;
    let p = h.fwd(t, &tcp(CLIENT4, 41000, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1025);
    h.fwd(t, &from_backend(first.0, first.1, 1024, ACK).frame());
    // The same client port may take its own tuple over, as the backend lets it.
    let p = h.fwd(t, &tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1024);
    assert_eq!(h.w.stats.snat_time_wait_reuses, 0);
}

#[test]
fn time_wait_tuples_are_reused_only_when_no_port_is_free_and_counted() {
    let mut h = web_with_64_snat_ports();
    for i in 0..64u16 {
        let t = handshake(&mut h, 0, CLIENT4, 40000 + i, WEB_VIP, 80);
        close_backend_first(&mut h, 10 + u64::from(i), 40000 + i, t);
    }
    // Every port in TIME-WAIT at the backend: the oldest (the round robin's next) is taken back.
    let (_, _, snat) = handshake(&mut h, 100, CLIENT4, 41000, WEB_VIP, 80);
    assert_eq!(snat, 1024);
    assert_eq!(h.w.stats.snat_time_wait_reuses, 1);
    // Its old client is no flow any more; the next port's TIME-WAIT still holds.
    assert_eq!(h.dropped(100, &tcp(CLIENT4, 40000, WEB_VIP, 80, ACK).frame()), DropReason::NoFlow);
    h.fwd(100, &tcp(CLIENT4, 40001, WEB_VIP, 80, ACK).frame());
    // tcp_time_wait after its last packet a tuple is free again, without a count (1024 is
    // in use; 1025's straggler above pushed its end to 100 + T_TIME_WAIT).
    let p = h.fwd(100 + T_TIME_WAIT, &tcp(CLIENT4, 41001, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1025);
    assert_eq!(h.w.stats.snat_time_wait_reuses, 1);
}

#[test]
fn snat_ports_all_in_live_flows_drop_new_syns() {
    let mut h = web_with_64_snat_ports();
    for i in 0..64u16 {
        handshake(&mut h, 0, CLIENT4, 40000 + i, WEB_VIP, 80);
    }
    let r = h.dropped(10, &tcp(CLIENT4, 41000, WEB_VIP, 80, SYN).frame());
    assert_eq!(r, DropReason::SnatPortsExhausted);
    // One closes and expires: its port is free for the next SYN.
    h.fwd(20, &tcp(CLIENT4, 40005, WEB_VIP, 80, RST).frame());
    let p = h.fwd(20 + T_CLOSED, &tcp(CLIENT4, 41000, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1029);
    assert_eq!(h.w.stats.snat_time_wait_reuses, 0);
}

#[test]
fn half_closed_flow_expires_after_tcp_fin() {
    let mut h = web();
    let (b, bport, snat) = handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    h.fwd(10, &tcp(CLIENT4, 40000, WEB_VIP, 80, FIN | ACK).frame());
    assert_eq!(h.dropped(10 + T_FIN, &from_backend(b, bport, snat, ACK).frame()), DropReason::NoFlow);
}

#[test]
fn rst_closes() {
    let mut h = web();
    let (b, bport, snat) = handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    let p = h.fwd(100, &tcp(CLIENT4, 40000, WEB_VIP, 80, RST | ACK).frame());
    assert_eq!(p.l4()[13], RST | ACK);
    assert_eq!(h.dropped(100 + T_CLOSED, &from_backend(b, bport, snat, ACK).frame()), DropReason::NoFlow);
    // A RST from the backend closes too.
    let (b, bport, snat) = handshake(&mut h, 200, CLIENT4, 40001, WEB_VIP, 80);
    assert_eq!(snat, 1025);
    h.fwd(300, &from_backend(b, bport, snat, RST).frame());
    // Client port reuse within tcp_closed restarts the same flow (same SNAT port)...
    let p = h.fwd(301, &tcp(CLIENT4, 40001, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1025);
    // ... which is now in SYN state again: it expires after tcp_syn, not tcp_closed.
    h.fwd(301 + T_CLOSED + 1, &from_backend(b, bport, snat, SYN | ACK).frame());
}

#[test]
fn udp_flow_timeout() {
    let mut h = web();
    let q = udp(CLIENT4, 53000, "10.20.0.11", 53, b"query");
    let p = h.fwd(0, &q.frame());
    assert_eq!((p.src, p.sport, p.dst, p.dport), (ip(LB4), 1024, ip("10.30.0.12"), 5353));
    let ans = udp("10.30.0.12", 5353, LB4, 1024, b"answer");
    let r = h.fwd(T_UDP - 1, &ans.frame());
    assert_eq!((r.src, r.sport, r.dst, r.dport), (ip("10.20.0.11"), 53, ip(CLIENT4), 53000));
    assert_eq!(h.dropped(T_UDP - 1 + T_UDP, &ans.frame()), DropReason::NoFlow);
    // The next query opens a new flow.
    assert_eq!(h.fwd(2 * T_UDP, &q.frame()).sport, 1025);
}

#[test]
fn full_table_evicts_and_never_exceeds_capacity() {
    let mut cfg = config();
    cfg.ct_capacity = 64;
    let mut h = H::with(cfg, fixed_services());
    assert_eq!(h.w.conntrack_v4().capacity(), 64);
    let mut sent = 0;
    for i in 0..300u16 {
        h.port.push_rx(&tcp(CLIENT4, 10000 + i, WEB_VIP, 80, SYN).frame());
        if i % 20 == 19 {
            while !h.port.rx.is_empty() {
                h.w.poll(&mut h.port, i as u64);
                assert!(h.w.conntrack_v4().len() <= 64, "{} flows in a table of 64", h.w.conntrack_v4().len());
            }
            sent += h.port.take_tx().len();
        }
    }
    assert_eq!(sent, 300, "every SYN forwarded (old flows evicted), drops {}", h.w.stats.to_json()["drops"]);
    let s = &h.w.stats;
    assert_eq!(s.ct_inserts, 300);
    assert!(s.ct_flows <= 64);
    assert!(s.ct_evictions >= 300 - 64, "evictions {}", s.ct_evictions);
    assert_eq!(s.ct_evictions + s.ct_expired, s.ct_inserts - s.ct_flows);
    // The most recent flow is still there.
    assert_eq!(h.fwd(300, &tcp(CLIENT4, 10299, WEB_VIP, 80, ACK).frame()).dst, ip(WEB_EP));
}

// --- FullNAT return traffic: unknown port, another core's port ---------------------------------

#[test]
fn return_traffic_unknown_port_and_other_cores_port() {
    for v6 in [false, true] {
        let (own, vip, ep, client) =
            if v6 { (LB6, "fd00:20::10", "fd00:30::11", CLIENT6) } else { (LB4, WEB_VIP, WEB_EP, CLIENT4) };
        for core in [0u16, 1] {
            let mut cfg = config();
            cfg.cores = 2;
            cfg.core_index = core;
            let mut h = H::with(cfg, fixed_services());
            // Core 0 owns 1024..=33279, core 1 33280..=65535.
            let (first, mine, theirs) = if core == 0 { (1024, 2000, 40000) } else { (33280, 40000, 2000) };
            let (b, bport, snat) = handshake(&mut h, 0, client, 40000, vip, 80);
            assert_eq!((b, bport, snat), (ip(ep), 8080, first));
            let seg = |port| Seg { src: ip(ep), dst: ip(own), ..tcp("0.0.0.0", 8080, "0.0.0.0", port, ACK) };
            assert_eq!(h.dropped(1, &seg(mine).frame()), DropReason::NoFlow, "core {core} v6 {v6}");
            assert_eq!(h.dropped(1, &seg(theirs).frame()), DropReason::WrongCore, "core {core} v6 {v6}");
            // Right port, wrong backend port: no flow.
            let wrong = Seg { sport: 8081, ..seg(first) };
            assert_eq!(h.dropped(1, &wrong.frame()), DropReason::NoFlow);
            h.fwd(1, &seg(first).frame());
        }
    }
}

// --- Checksums after rewrite -------------------------------------------------------------------

/// Forward and back through a FullNAT flow; every field compared with the segment as the other
/// side must see it, built from scratch (so checksums are compared byte for byte too).
fn roundtrip(h: &mut H, c2s: Seg, ep: &str, ep_port: u16, snat: u16, s2c: Seg) {
    let own = if c2s.src.is_ipv4() { LB4 } else { LB6 };
    let (client, cport, vip, vport) = (c2s.src.to_string(), c2s.sport, c2s.dst.to_string(), c2s.dport);
    let p = h.fwd(0, &c2s.frame());
    let want = c2s.at(own, snat, ep, ep_port);
    assert_eq!(p.frame, want.out_frame(), "forward rewrite");
    let inb = s2c.at(ep, ep_port, own, snat);
    let r = h.fwd(1, &inb.frame());
    assert_eq!(r.frame, s2c.at(&vip, vport, &client, cport).out_frame(), "return rewrite");
    for p in [&p, &r] {
        if p.proto == UDP && p.src.is_ipv4() && s2c.no_udp_csum {
            assert_eq!(p.l4_csum(), 0, "IPv4 UDP without checksum must stay without");
        }
    }
}

#[test]
fn fullnat_checksums_valid_both_ways_v4_v6_tcp_udp() {
    let mut h = web();
    let o = IpOpts { ttl: 57, tos: 0x28, df: false, id: 0xbeef, flow_label: 0 };
    // TCP over IPv4 with an odd-length payload.
    let c2s = tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).opts(o).seqs(0x0102_0304, 0);
    let s2c = tcp("0.0.0.0", 0, "0.0.0.0", 0, SYN | ACK).seqs(0xa0b0_c0d0, 0x0102_0305);
    roundtrip(&mut h, c2s, WEB_EP, 8080, 1024, s2c);
    let c2s = tcp(CLIENT4, 40000, WEB_VIP, 80, PSH | ACK).data(b"GET /odd HTTP/1.1\r\n\r\n!").opts(o);
    let s2c = tcp("0.0.0.0", 0, "0.0.0.0", 0, PSH | ACK).data(b"HTTP/1.1 204 No Content\r\n\r\n");
    roundtrip(&mut h, c2s, WEB_EP, 8080, 1024, s2c);
    // UDP over IPv4, with a checksum and without one.
    roundtrip(
        &mut h,
        udp(CLIENT4, 53000, "10.20.0.11", 53, b"q1"),
        "10.30.0.12",
        5353,
        1025,
        udp("0.0.0.0", 0, "0.0.0.0", 0, b"a1!"),
    );
    let mut q = udp(CLIENT4, 53001, "10.20.0.11", 53, b"q2-nocsum");
    q.no_udp_csum = true;
    let mut a = udp("0.0.0.0", 0, "0.0.0.0", 0, b"a2-nocsum");
    a.no_udp_csum = true;
    roundtrip(&mut h, q, "10.30.0.12", 5353, 1026, a);
    // TCP and UDP over IPv6 (own SNAT allocator, from 1024).
    let o6 = IpOpts { tos: 0xb8, flow_label: 0xabcde, ..IPO };
    let c2s = tcp(CLIENT6, 41000, "fd00:20::10", 80, SYN).opts(o6);
    roundtrip(&mut h, c2s, "fd00:30::11", 8080, 1024, tcp("::", 0, "::", 0, SYN | ACK));
    let c2s = tcp(CLIENT6, 41000, "fd00:20::10", 80, PSH | ACK).data(b"odd6!").opts(o6);
    roundtrip(&mut h, c2s, "fd00:30::11", 8080, 1024, tcp("::", 0, "::", 0, PSH | ACK).data(b"even"));
    roundtrip(
        &mut h,
        udp(CLIENT6, 53000, "fd00:20::11", 53, b"q6"),
        "fd00:30::12",
        5353,
        1025,
        udp("::", 0, "::", 0, b"a6"),
    );
}

#[test]
fn fullnat_checksums_valid_for_many_ports_and_payloads() {
    // Incremental updates must agree with a full recompute whatever the values: many flows,
    // different payloads, both families, checked from scratch in `parse`.
    let mut h = web();
    for i in 0..400u16 {
        let payload: Vec<u8> = (0..(i % 37)).map(|k| (k * 31 + i) as u8).collect();
        let p = h.fwd(0, &udp(CLIENT4, 1 + i * 163, "10.20.0.11", 53, &payload).frame());
        let r = h.fwd(0, &udp("10.30.0.12", 5353, LB4, p.sport, &payload).frame());
        assert_eq!(r.dport, 1 + i * 163);
        let p = h.fwd(0, &udp(CLIENT6, 1 + i * 163, "fd00:20::11", 53, &payload).frame());
        h.fwd(0, &udp("fd00:30::12", 5353, LB6, p.sport, &payload).frame());
        let p = h.fwd(0, &tcp(CLIENT4, 1 + i * 163, WEB_VIP, 80, SYN).data(&payload).frame());
        h.fwd(0, &from_backend(p.dst, 8080, p.sport, SYN | ACK).data(&payload).frame());
    }
}

// --- DSR ---------------------------------------------------------------------------------------

fn dsr_outer_v4(client: Ipv4Addr, cport: u16) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000u32 | ((cport ^ (u32::from(client) as u16)) as u32))
}

#[test]
fn dsr_ipv4_encapsulates_and_too_big_drops() {
    let mut h = web();
    let o = IpOpts { tos: 0x28, df: false, ..IPO };
    let inner = tcp(CLIENT4, 40000, "10.20.0.12", 80, SYN).opts(o);
    let p = h.fwd(0, &inner.frame());
    assert_macs_to_next_hop(&p);
    assert_eq!((p.proto, p.src, p.dst), (4, IpAddr::V4(dsr_outer_v4(ip4(CLIENT4), 40000)), ip("10.30.0.13")));
    assert_eq!(p.src, ip("172.16.248.71"));
    assert_eq!((p.l3[1], p.l3[6] & 0x40, p.l3[8]), (0x28, 0, 64), "TOS, DF copied; TTL 64");
    assert_eq!(&p.l3[20..], &inner.l3()[..]);
    // 1480 bytes inner + 20 = 1500 fits the MTU; 1481 does not.
    let fits = tcp(CLIENT4, 40000, "10.20.0.12", 80, ACK).data(&vec![7u8; 1480 - 40]);
    assert_eq!(h.fwd(1, &fits.frame()).l3.len(), 1500);
    let big = tcp(CLIENT4, 40000, "10.20.0.12", 80, ACK).data(&vec![7u8; 1481 - 40]);
    assert_eq!(h.dropped(2, &big.frame()), DropReason::TooBigForEncap);
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn dsr_ipv6_encapsulates_ipv6_in_ipv6() {
    let mut h = web();
    let vip = "fd00:20::12";
    let o = IpOpts { tos: 0xb8, flow_label: 0x12345, ttl: 61, ..IPO };
    let key = FlowKey::<u128> { src: ip6(CLIENT6).into(), dst: ip6(vip).into(), sport: 40000, dport: 80, proto: TCP };
    let label = (key.hash(MAGLEV_SEED) as u32) & 0xfffff;
    for (i, inner) in [
        tcp(CLIENT6, 40000, vip, 80, SYN).opts(o),
        tcp(CLIENT6, 40000, vip, 80, PSH | ACK).data(b"GET / HTTP/1.1\r\n\r\n").opts(IpOpts { tos: 0, ..o }),
    ]
    .iter()
    .enumerate()
    {
        let p = h.fwd(i as u64, &inner.frame());
        assert_macs_to_next_hop(&p);
        let l3 = &p.l3;
        let w0 = u32::from_be_bytes(l3[0..4].try_into().unwrap());
        assert_eq!(w0 >> 28, 6);
        assert_eq!((w0 >> 20) & 0xff, inner.o.tos as u32, "traffic class copied from the inner packet");
        assert_eq!(w0 & 0xfffff, label, "flow label: 20 bits of the flow hash, the same for every packet");
        assert_eq!((l3[6], l3[7]), (41, 64), "next header 41, hop limit 64");
        // fd00:f17c::/112 | (client port ^ low 16 bits of the client address): 40000 ^ 7.
        assert_eq!(p.src, ip("fd00:f17c::9c47"));
        assert_eq!(p.dst, ip("fd00:30::13"));
        assert_eq!(&l3[40..], &inner.l3()[..], "inner packet untouched");
    }
    assert_ne!(label, 0x12345, "the flow label is the worker's, not the inner packet's");
    // 1460 bytes inner + 40 = 1500 fits; 1461 does not.
    let fits = tcp(CLIENT6, 40000, vip, 80, ACK).data(&vec![1u8; 1460 - 60]);
    assert_eq!(h.fwd(3, &fits.frame()).l3.len(), 1500);
    let big = tcp(CLIENT6, 40000, vip, 80, ACK).data(&vec![1u8; 1461 - 60]);
    assert_eq!(h.dropped(4, &big.frame()), DropReason::TooBigForEncap);
}

// --- ICMP errors -------------------------------------------------------------------------------

/// An ICMPv4 error message (type, code, 4 bytes of rest, quote) with its checksum.
fn icmp4(typ: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let c = !fold(sum16(&m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn icmp6(src: IpAddr, dst: IpAddr, typ: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let c = l4_csum(src, dst, 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMP error from `src` to `dst` quoting `quote`, as a frame from the next hop (`out`:
/// as sent by the appliance to the next hop).
fn icmp_err_frame(src: &str, dst: &str, quote: &[u8], out: bool) -> Vec<u8> {
    let (s, d) = (ip(src), ip(dst));
    let o = IpOpts { ttl: 250, tos: 0xc0, df: false, id: 0x4d2, flow_label: 0 };
    let l3 = if s.is_ipv4() {
        ip_packet(s, d, 1, &icmp4(3, 4, [0, 0, 0x05, 0x78], quote), o) // frag needed, MTU 1400
    } else {
        ip_packet(s, d, 58, &icmp6(s, d, 2, 0, 1400u32.to_be_bytes(), quote), o)
        // packet too big
    };
    if out {
        eth(GW_MAC, LB_MAC, ethertype_of(s), &l3)
    } else {
        eth(LB_MAC, GW_MAC, ethertype_of(s), &l3)
    }
}

/// Checks an ICMP error we sent: outer checksums (IPv4 header, ICMP / ICMPv6 with its
/// pseudo-header), the quoted IPv4 header checksum.
#[track_caller]
fn check_icmp_checksums(p: &Pkt) {
    let m = p.l4();
    if p.src.is_ipv4() {
        assert_eq!(p.proto, 1);
        assert_eq!(fold(sum16(m)), 0xffff, "ICMP checksum");
        assert_eq!(fold(sum16(&m[8..28])), 0xffff, "quoted IPv4 header checksum");
    } else {
        assert_eq!(p.proto, 58);
        assert!(l4_csum_ok(p.src, p.dst, 58, m), "ICMPv6 checksum");
    }
}

fn icmp_fullnat_both_ways(v6: bool, full_quote: bool) {
    let (own, vip, ep, client, router) = if v6 {
        (LB6, "fd00:20::10", "fd00:30::11", CLIENT6, "2001:db8:ffff::1")
    } else {
        (LB4, WEB_VIP, WEB_EP, CLIENT4, "203.0.113.1")
    };
    let mut h = web();
    let (b, _, snat) = handshake(&mut h, 0, client, 40000, vip, 80);
    assert_eq!((b, snat), (ip(ep), 1024));
    let cut = |l3: Vec<u8>| if full_quote { l3 } else { l3[..if v6 { 48 } else { 28 }].to_vec() };

    // From the client side, to the VIP, about a response we sent (VIP:80 -> client:40000):
    // forwarded to the backend, about the response as the backend sent it.
    let resp = tcp("::", 0, "::", 0, PSH | ACK).data(b"HTTP/1.1 200 OK\r\n\r\nbig body").seqs(5001, 1001);
    let quoted_in = cut(resp.at(vip, 80, client, 40000).l3());
    let quoted_out = cut(resp.at(ep, 8080, own, 1024).l3());
    let p = h.fwd(1, &icmp_err_frame(router, vip, &quoted_in, false));
    check_icmp_checksums(&p);
    assert_eq!((p.src, p.dst), (ip(own), ip(ep)));
    assert_eq!(&p.l4()[8..], &quoted_out[..], "quoted packet translated");
    assert_eq!(p.frame, icmp_err_frame(own, ep, &quoted_out, true));

    // From the backend side, to us, about a request we sent (own:1024 -> backend:8080):
    // forwarded to the client, about the request as the client sent it.
    let req = tcp("::", 0, "::", 0, PSH | ACK).data(b"POST / HTTP/1.1\r\n\r\nlarge upload").seqs(1001, 5001);
    let quoted_in = cut(req.at(own, 1024, ep, 8080).l3());
    let quoted_out = cut(req.at(client, 40000, vip, 80).l3());
    let p = h.fwd(2, &icmp_err_frame(router, own, &quoted_in, false));
    check_icmp_checksums(&p);
    assert_eq!((p.src, p.dst), (ip(vip), ip(client)));
    assert_eq!(p.frame, icmp_err_frame(vip, client, &quoted_out, true));
    assert_eq!(h.w.stats.icmp_errors_forwarded, 2);

    // About flows we do not know: no_flow, both sides.
    let other = cut(resp.at(vip, 80, client, 55555).l3());
    assert_eq!(h.dropped(3, &icmp_err_frame(router, vip, &other, false)), DropReason::NoFlow);
    let other = cut(req.at(own, 1999, ep, 8080).l3());
    assert_eq!(h.dropped(3, &icmp_err_frame(router, own, &other, false)), DropReason::NoFlow);
}

#[test]
fn icmp_frag_needed_fullnat_v4_both_ways() {
    icmp_fullnat_both_ways(false, true);
    icmp_fullnat_both_ways(false, false);
}

#[test]
fn icmpv6_packet_too_big_fullnat_both_ways() {
    icmp_fullnat_both_ways(true, true);
    icmp_fullnat_both_ways(true, false);
}

#[test]
fn icmp_error_to_dsr_vip_is_encapsulated_to_the_backend() {
    let mut h = web();
    let vip = "10.20.0.12";
    h.fwd(0, &tcp(CLIENT4, 40000, vip, 80, SYN).frame());
    // The backend answered the client directly (src = VIP); a router on the way says too big.
    let resp = tcp(vip, 80, CLIENT4, 40000, PSH | ACK).data(b"HTTP/1.1 200 OK\r\n\r\nbody").l3();
    let err = icmp_err_frame("203.0.113.1", vip, &resp, false);
    let p = h.fwd(1, &err);
    assert_macs_to_next_hop(&p);
    assert_eq!((p.proto, p.src, p.dst), (4, ip("172.16.248.71"), ip("10.30.0.13")));
    assert_eq!((p.l3[1], p.l3[6] & 0x40, p.l3[8]), (0xc0, 0, 64));
    assert_eq!(&p.l3[20..], &err[14..], "the ICMP error travels untouched inside");
    // And for an unknown DSR flow: no_flow.
    let resp = tcp(vip, 80, CLIENT4, 40001, ACK).l3();
    assert_eq!(h.dropped(2, &icmp_err_frame("203.0.113.1", vip, &resp, false)), DropReason::NoFlow);

    // IPv6: packet too big to the DSR VIP, IPv6-in-IPv6 to the backend.
    let vip6 = "fd00:20::12";
    h.fwd(3, &tcp(CLIENT6, 40000, vip6, 80, SYN).frame());
    let resp = tcp(vip6, 80, CLIENT6, 40000, PSH | ACK).data(b"HTTP/1.1 200 OK\r\n\r\nbody").l3();
    let err = icmp_err_frame("2001:db8:ffff::1", vip6, &resp, false);
    let p = h.fwd(4, &err);
    assert_eq!((p.proto, p.src, p.dst), (41, ip("fd00:f17c::9c47"), ip("fd00:30::13")));
    assert_eq!(&p.l3[40..], &err[14..], "the ICMPv6 error travels untouched inside");
    assert_eq!(h.w.stats.icmp_errors_forwarded, 2);
}

// --- Neighbour resolution ----------------------------------------------------------------------

fn arp(op: u16, sha: [u8; 6], spa: &str, tha: [u8; 6], tpa: &str) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&ip4(spa).octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&ip4(tpa).octets());
    a
}

#[test]
fn unresolved_next_hop_solicits_then_flows() {
    let mut cfg = config();
    cfg.static_neighbors.clear();
    let mut h = H::with(cfg, fixed_services());
    let syn = tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame();
    let (sent, drops) = h.step(0, &syn);
    assert_eq!(drops, vec![DropReason::NeighborUnresolved]);
    // Both next hops (every backend is behind them) are solicited at once, ahead of traffic:
    // an ARP request for the IPv4 one and a neighbour solicitation for the IPv6 one.
    assert_eq!(sent.len(), 2, "one ARP request, one neighbour solicitation");
    let want = eth([0xff; 6], LB_MAC, 0x0806, &arp(1, LB_MAC, LB4, [0; 6], GW4));
    assert_eq!(sent[0], want);
    assert_eq!(parse(&sent[1]).l4()[0], 135, "neighbour solicitation");
    // Retransmissions within a second: dropped, no new request; at one second, another.
    for t in [1, 500, 999] {
        let (sent, drops) = h.step(t, &syn);
        assert_eq!((sent.len(), drops), (0, vec![DropReason::NeighborUnresolved]), "t={t}");
    }
    // Nothing received: poll sends nothing either.
    h.w.poll(&mut h.port, 999);
    assert!(h.port.take_tx().is_empty());
    let (sent, _) = h.step(1000, &syn);
    assert_eq!(sent, vec![want]);
    // The next hop answers: learned, nothing sent, nothing dropped.
    let reply = eth(LB_MAC, GW_MAC, 0x0806, &arp(2, GW_MAC, GW4, LB_MAC, LB4));
    let (sent, drops) = h.step(1001, &reply);
    assert!(sent.is_empty() && drops.is_empty(), "{sent:?} {drops:?}");
    let p = h.fwd(1002, &syn);
    assert_eq!((p.dmac, p.dst), (GW_MAC, ip(WEB_EP)));
    // The dropped SYNs kept no flow (each took a SNAT port in turn, given back at once).
    assert_eq!(h.w.conntrack_v4().len(), 1);
    let r = h.fwd(1003, &from_backend(ip(WEB_EP), 8080, p.sport, SYN | ACK).frame());
    assert_eq!((r.dmac, r.dst), (GW_MAC, ip(CLIENT4)));

    // IPv6: a neighbour solicitation for fd00:10::1 to its solicited-node group.
    let (sent, drops) = h.step(1004, &tcp(CLIENT6, 40000, "fd00:20::10", 80, SYN).frame());
    assert_eq!(drops, vec![DropReason::NeighborUnresolved]);
    assert_eq!(sent.len(), 1);
    let ns = parse(&sent[0]);
    assert_eq!(ns.dmac, [0x33, 0x33, 0xff, 0, 0, 1]);
    assert_eq!((ns.src, ns.dst, ns.proto, ns.l4()[0]), (ip(LB6), ip("ff02::1:ff00:1"), 58, 135));
    assert_eq!(&ns.l4()[8..24], &ip6("fd00:10::1").octets());
    assert!(l4_csum_ok(ns.src, ns.dst, 58, ns.l4()));
}

/// The next hop's MAC changes without a gratuitous ARP (a router replaced, a VM moved): past
/// its reachable time the entry in use is asked at the old MAC once a second, then given up
/// and asked by broadcast, and traffic follows the answer. Before, the first MAC learned was
/// kept for the process's life and every packet went to a MAC nobody had any more.
#[test]
fn a_neighbor_whose_mac_changed_is_found_again() {
    const NEW_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0xfd];
    let mut cfg = config();
    cfg.static_neighbors.clear();
    cfg.neighbors.reachable_ms = 2_000;
    cfg.neighbors.probes = 2;
    let mut h = H::with(cfg, fixed_services());
    let syn = tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame();
    h.step(0, &syn);
    let reply = eth(LB_MAC, GW_MAC, 0x0806, &arp(2, GW_MAC, GW4, LB_MAC, LB4));
    h.step(1000, &reply);
    let request = arp(1, LB_MAC, LB4, [0; 6], GW4);
    let probe = eth(GW_MAC, LB_MAC, 0x0806, &request);
    let broadcast = eth([0xff; 6], LB_MAC, 0x0806, &request);
    // Traffic every 50 ms. The reachable time is drawn between half and one and a half of the
    // configured 2 s (as Linux draws it): within it, forwarded and nobody asked; past it, a
    // unicast probe to the MAC in use (traffic keeps going there), one a second, then a
    // broadcast, and traffic waits for the answer.
    let mut asked = Vec::new();
    let mut t = 1000;
    while asked.len() < 3 {
        let (sent, drops) = h.step(t, &syn);
        assert!(drops.is_empty(), "t={t}: {drops:?}");
        assert_eq!(parse(&sent[0]).dmac, GW_MAC, "t={t}");
        for f in sent.iter().filter(|f| f[12..14] == [0x08, 0x06]) {
            asked.push((t, f.clone()));
        }
        t += 50;
        assert!(t < 10_000, "{asked:?}");
    }
    assert!((2000..=4000).contains(&asked[0].0), "first probe at {} ms, 1 to 3 s after the answer", asked[0].0);
    assert_eq!(asked.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(), [probe.clone(), probe, broadcast]);
    assert_eq!((asked[1].0 - asked[0].0, asked[2].0 - asked[1].0), (1000, 1000), "{asked:?}");
    let (sent, drops) = h.step(t, &syn);
    assert_eq!(drops, vec![DropReason::NeighborUnresolved]);
    assert!(sent.is_empty());
    let (sent, drops) = h.step(t + 1, &eth(LB_MAC, NEW_MAC, 0x0806, &arp(2, NEW_MAC, GW4, LB_MAC, LB4)));
    assert!(sent.is_empty() && drops.is_empty());
    assert_eq!(h.fwd(t + 2, &syn).dmac, NEW_MAC);
    let s = h.w.stats_copy();
    assert_eq!((s.neighbor_probes, s.neighbor_failures, s.neighbor_evictions), (2, 1, 0));
}

/// Clients on the appliance's own segment each take a neighbour entry. A full table gives
/// the entry of a client gone quiet to a new one; before, the 4,097th client ever seen got no
/// answer until a restart. Senders of ARP requests never push out entries traffic uses.
#[test]
fn a_full_neighbor_table_still_serves_new_on_link_clients() {
    let mut cfg = config();
    cfg.neighbors.capacity = 4; // the next hops' static entries (IPv4, IPv6) and two more
    let mut h = H::with(cfg, fixed_services());
    let mac = |i: u8| [0x02, 0xc1, 0, 0, 0, i];
    let asks_for_vip = |i: u8| {
        eth([0xff; 6], mac(i), 0x0806, &arp(1, mac(i), &format!("10.10.0.{}", 100 + i as u16), [0; 6], WEB_VIP))
    };
    for i in 0..10u8 {
        // Each client a minute after the last: the earlier ones have gone quiet.
        let now = 1_000 + i as u64 * 60_000;
        let client = format!("10.10.0.{}", 100 + i);
        let (sent, drops) = h.step(now, &asks_for_vip(i));
        assert!(drops.is_empty() && sent.len() == 1, "client {i}: ARP answered");
        let syn = h.fwd(now, &tcp(&client, 40000, WEB_VIP, 80, SYN).frame());
        let sa = Seg { src: syn.dst, dst: ip(LB4), ..tcp("0.0.0.0", syn.dport, "0.0.0.0", syn.sport, SYN | ACK) };
        let back = h.fwd(now, &sa.frame());
        assert_eq!((back.dst, back.dmac), (ip(&client), mac(i)), "client {i}");
    }
    assert!(h.w.stats_copy().neighbor_evictions >= 7);

    // Two clients in the middle of transfers while 200 others ask for the VIP: their replies
    // keep going out, none dropped (the askers take only idle entries, and there are none).
    let now = 1_000_000;
    let mut from_be = Vec::new();
    for i in [50u8, 60] {
        h.step(now, &asks_for_vip(i));
        let syn = h.fwd(now, &tcp(&format!("10.10.0.{}", 100 + i as u16), 40001, WEB_VIP, 80, SYN).frame());
        let seg =
            move |flags| Seg { src: syn.dst, dst: ip(LB4), ..tcp("0.0.0.0", syn.dport, "0.0.0.0", syn.sport, flags) };
        assert_eq!(h.fwd(now, &seg(SYN | ACK).frame()).dmac, mac(i));
        from_be.push((i, seg));
    }
    for k in 0..200u64 {
        h.step(now + 10 * k, &asks_for_vip(70 + (k % 80) as u8));
        for (i, seg) in &from_be {
            assert_eq!(h.fwd(now + 10 * k, &seg(ACK).frame()).dmac, mac(*i), "client {i} after {k} askers");
        }
    }
}

/// An on-link client we never asked (it kept our MAC from before a restart or a takeover, so
/// it sent no ARP request): its first frame's source MAC serves for the backend's answer, and
/// is checked by a unicast ARP request at once. Before, that answer was dropped while we asked
/// and the client waited for its retransmission (a second for a SYN).
#[test]
fn an_on_link_clients_first_answer_is_not_dropped() {
    const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x42];
    let mut h = H::new(fixed_services());
    let syn = tcp("10.10.0.42", 40000, WEB_VIP, 80, SYN).l3();
    let syn = h.fwd(0, &eth(LB_MAC, CLIENT_MAC, 0x0800, &syn));
    let sa = Seg { src: syn.dst, dst: ip(LB4), ..tcp("0.0.0.0", syn.dport, "0.0.0.0", syn.sport, SYN | ACK) };
    let (sent, drops) = h.step(1, &sa.frame());
    assert!(drops.is_empty(), "{drops:?}");
    assert_eq!(sent.len(), 2, "the SYN-ACK and a probe");
    let back = parse(&sent[0]);
    assert_eq!((back.dst, back.dmac, back.l4()[13]), (ip("10.10.0.42"), CLIENT_MAC, SYN | ACK));
    assert_eq!(sent[1], eth(CLIENT_MAC, LB_MAC, 0x0806, &arp(1, LB_MAC, LB4, [0; 6], "10.10.0.42")));
    // Off-link clients take nothing from the frame: their answers go to the next hop.
    let syn = h.fwd(2, &eth(LB_MAC, CLIENT_MAC, 0x0800, &tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).l3()));
    let sa = Seg { src: syn.dst, dst: ip(LB4), ..tcp("0.0.0.0", syn.dport, "0.0.0.0", syn.sport, SYN | ACK) };
    assert_eq!(h.fwd(3, &sa.frame()).dmac, GW_MAC);
}

/// Each process starts its SNAT ports somewhere of its own (random in production), so a
/// restarted appliance does not reuse the last one's first 4-tuples, which backends may hold.
#[test]
fn snat_ports_start_where_the_process_says() {
    let (a, b) = (WorkerConfig::from_bootstrap(&boot(), 0, 1), WorkerConfig::from_bootstrap(&boot(), 0, 1));
    assert_ne!(a.snat_offset, b.snat_offset, "two processes, two starts");
    let mut cfg = config();
    cfg.snat_offset = 5_000;
    let mut h = H::with(cfg, fixed_services());
    let p = h.fwd(0, &tcp(CLIENT4, 40000, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1024 + 5_000);
    let p = h.fwd(1, &tcp(CLIENT4, 40001, WEB_VIP, 80, SYN).frame());
    assert_eq!(p.sport, 1024 + 5_001);
}

// --- Malformed and truncated input ---------------------------------------------------------------

/// Every frame is either sent or counted as exactly one drop, and nothing panics.
#[track_caller]
fn sent_or_counted(h: &mut H, now: u64, frame: &[u8], what: &str) -> bool {
    let rx = h.w.stats.rx.packets;
    let (sent, drops) = h.step(now, frame);
    assert_eq!(h.w.stats.rx.packets, rx + 1);
    assert_eq!(sent.len() + drops.len(), 1, "{what}: sent {} dropped {drops:?}", sent.len());
    !sent.is_empty()
}

/// The same IP packet with its L3 payload cut to `n` bytes and the IP length fields (and
/// IPv4 header checksum) saying so.
fn cut_consistently(frame: &[u8], n: usize) -> Vec<u8> {
    let mut f = frame[..14].to_vec();
    let l3 = &frame[14..];
    if l3[0] >> 4 == 4 {
        let mut h = l3[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + n) as u16).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum16(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&h);
        f.extend_from_slice(&l3[20..20 + n]);
    } else {
        let mut h = l3[..40].to_vec();
        h[4..6].copy_from_slice(&(n as u16).to_be_bytes());
        f.extend_from_slice(&h);
        f.extend_from_slice(&l3[40..40 + n]);
    }
    f
}

#[test]
fn every_truncation_is_sent_or_counted() {
    let mut h = web();
    // Flows for the ICMP errors to be about.
    handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    handshake(&mut h, 0, CLIENT6, 40000, "fd00:20::10", 80);
    let resp4 = tcp(WEB_VIP, 80, CLIENT4, 40000, ACK).data(b"0123456789").l3();
    let resp6 = tcp("fd00:20::10", 80, CLIENT6, 40000, ACK).data(b"0123456789").l3();
    let frames = [
        ("tcp4 syn", tcp(CLIENT4, 40001, WEB_VIP, 80, SYN).data(b"syn-data").frame()),
        ("udp4", udp(CLIENT4, 53000, "10.20.0.11", 53, b"a dns query").frame()),
        ("tcp6 syn", tcp(CLIENT6, 40001, "fd00:20::10", 80, SYN).data(b"syn-data").frame()),
        ("udp6", udp(CLIENT6, 53000, "fd00:20::11", 53, b"a dns query").frame()),
        ("dsr4", tcp(CLIENT4, 40001, "10.20.0.12", 80, SYN).frame()),
        ("icmp4 frag needed", icmp_err_frame("203.0.113.1", WEB_VIP, &resp4, false)),
        ("icmpv6 too big", icmp_err_frame("2001:db8:ffff::1", "fd00:20::10", &resp6, false)),
        ("return tcp4", from_backend(ip(WEB_EP), 8080, 1024, ACK).data(b"resp").frame()),
    ];
    let mut t = 1;
    for (what, full) in &frames {
        assert!(sent_or_counted(&mut h, t, full, what), "{what}: the whole frame must be forwarded");
        for len in 0..full.len() {
            t += 1;
            let sent = sent_or_counted(&mut h, t, &full[..len], &format!("{what} cut to {len}"));
            assert!(!sent, "{what} cut to {len} bytes was forwarded");
        }
        // Cut at every L3 payload length with consistent IP lengths: reaches the L4 checks.
        let payload = full.len() - 14 - if full[14] >> 4 == 4 { 20 } else { 40 };
        for n in 0..payload {
            t += 1;
            sent_or_counted(&mut h, t, &cut_consistently(full, n), &format!("{what} with {n} bytes of payload"));
        }
    }
    let s = &h.w.stats;
    assert_eq!(s.rx.packets, s.tx.packets + s.total_drops());
}

#[test]
fn every_bit_flip_is_sent_or_counted() {
    let mut h = web();
    handshake(&mut h, 0, CLIENT4, 40000, WEB_VIP, 80);
    let resp4 = tcp(WEB_VIP, 80, CLIENT4, 40000, ACK).l3();
    let frames = [
        tcp(CLIENT4, 40001, WEB_VIP, 80, SYN).frame(),
        udp(CLIENT6, 53000, "fd00:20::11", 53, b"q").frame(),
        icmp_err_frame("203.0.113.1", WEB_VIP, &resp4, false),
    ];
    let mut t = 1;
    for full in &frames {
        for i in 0..full.len() {
            for bit in 0..8 {
                let mut f = full.clone();
                f[i] ^= 1 << bit;
                t += 1;
                let rx = h.w.stats.rx.packets;
                let (sent, drops) = h.step(t, &f);
                assert_eq!(h.w.stats.rx.packets, rx + 1);
                // (Not checked: L4 checksums of what is sent. The data plane does not verify
                // them, so a flipped payload bit goes through with a checksum as wrong as before.)
                assert!(sent.len() + drops.len() <= 1, "byte {i} bit {bit}: {} sent, {drops:?}", sent.len());
            }
        }
    }
}

// --- Ethernet padding, full transmit queues, counters --------------------------------------------

#[test]
fn ethernet_padding_stays_out_of_rewrites_and_encapsulation() {
    let mut h = web();
    // A 54-byte SYN padded to the 60-byte minimum as a NIC receives it.
    let syn = tcp(CLIENT4, 40000, WEB_VIP, 80, SYN);
    let mut f = syn.frame();
    assert_eq!(f.len(), 54);
    f.extend_from_slice(&[0xee; 6]);
    let p = h.fwd(0, &f);
    assert_eq!(p.frame, syn.at(LB4, 1024, WEB_EP, 8080).out_frame());
    // UDP return traffic with padding: the UDP length and checksum cover only the datagram.
    let ans = udp("10.30.0.12", 5353, LB4, 1025, b"a");
    h.fwd(1, &udp(CLIENT4, 53000, "10.20.0.11", 53, b"q").frame());
    let mut f = ans.frame();
    f.extend_from_slice(&[0xee; 60 - 43]);
    let r = h.fwd(2, &f);
    assert_eq!(r.frame, ans.at("10.20.0.11", 53, CLIENT4, 53000).out_frame());
    // DSR: the outer header covers the IP packet, not the padding.
    let syn = tcp(CLIENT4, 40000, "10.20.0.12", 80, SYN);
    let mut f = syn.frame();
    f.extend_from_slice(&[0xee; 6]);
    let p = h.fwd(3, &f);
    assert_eq!(&p.l3[20..], &syn.l3()[..]);
    // IPv6 with trailing bytes after the payload length.
    let syn6 = tcp(CLIENT6, 41000, "fd00:20::10", 80, SYN);
    let mut f = syn6.frame();
    f.extend_from_slice(&[0xee; 8]);
    let p = h.fwd(4, &f);
    assert_eq!(p.frame, syn6.at(LB6, 1024, "fd00:30::11", 8080).out_frame());
}

#[test]
fn full_transmit_queue_counts_tx_full() {
    let mut h = web();
    h.port.tx_limit = Some(1);
    for i in 0..5u16 {
        h.port.push_rx(&tcp(CLIENT4, 40000 + i, WEB_VIP, 80, SYN).frame());
    }
    h.w.poll(&mut h.port, 0);
    assert_eq!(h.port.take_tx().len(), 1);
    let s = &h.w.stats;
    assert_eq!((s.rx.packets, s.tx.packets, s.dropped(DropReason::TxFull)), (5, 1, 4));
    assert_eq!(s.tx.bytes, 54);
}

#[test]
fn per_vip_and_per_backend_counters() {
    let mut h = H::new(multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let syns: Vec<Vec<u8>> = (0..300).map(|i| tcp(CLIENT4, 20000 + i, MULTI_VIP, 80, SYN).frame()).collect();
    let out = h.fwd_all(0, &syns);
    let snap = h.w.snapshot().clone();
    let svc = snap.services.iter().position(|s| s.vip == ip(MULTI_VIP)).unwrap();
    assert_eq!(h.w.stats.per_vip[svc].packets, 300);
    assert_eq!(h.w.stats.per_vip[svc].bytes, 300 * 54);
    for e in [E1, E2, E3] {
        let bi = snap.backends.iter().position(|b| b.addr == ip(e)).unwrap();
        let n = out.iter().filter(|p| p.dst == ip(e)).count() as u64;
        assert_eq!(h.w.stats.per_backend[bi].packets, n, "{e}");
    }
}

/// Counters follow backends across snapshots: a flow created under one snapshot keeps counting
/// under its own backend after a switch that removes another backend and reorders the rest.
#[test]
fn counters_follow_backends_across_snapshot_switches() {
    let services = |eps: &[(&str, EndpointState)]| multi(eps, None);
    let boot = boot();
    let mut ids = fulcrum_dataplane::snapshot::StatIds::default();
    let first = Snapshot::compile_with(
        &boot,
        &DesiredState { services: services(&[(E1, Ready), (E2, Ready), (E3, Ready)]), ..Default::default() },
        1,
        &mut ids,
    )
    .unwrap();
    let mut h = H::with(config(), vec![]);
    h.w.set_snapshot(Arc::new(first));
    let flows = one_flow_per_endpoint(&mut h, &[E1, E2, E3]);
    let id_of = |snap: &Snapshot, e: &str| snap.backends.iter().find(|b| b.addr == ip(e)).unwrap().stat_id as usize;
    let before = h.w.stats.per_backend.clone();
    let id1 = id_of(h.w.snapshot(), E1);

    // E1 removed: E2 and E3 move to other positions in the backend array.
    let second = Snapshot::compile_with(
        &boot,
        &DesiredState { services: services(&[(E2, Ready), (E3, Ready)]), ..Default::default() },
        2,
        &mut ids,
    )
    .unwrap();
    assert_ne!(
        second.backends.iter().position(|b| b.addr == ip(E2)),
        h.w.snapshot().backends.iter().position(|b| b.addr == ip(E2))
    );
    h.w.set_snapshot(Arc::new(second));
    let snap = h.w.snapshot().clone();
    for e in [E1, E2, E3] {
        let (cport, _) = flows[&ip(e)];
        let p = h.fwd(10, &tcp(CLIENT4, cport, MULTI_VIP, 80, ACK).frame());
        assert_eq!(p.dst, ip(e));
    }
    for e in [E2, E3] {
        let id = id_of(&snap, e);
        assert_eq!(h.w.stats.per_backend[id].packets, before[id].packets + 1, "{e} counted under its own slot");
    }
    // E1 is gone from the snapshot but its counter slot still takes its flow's packets.
    assert_eq!(h.w.stats.per_backend[id1].packets, before[id1].packets + 1);
}

/// Found by fuzzing (fuzz/regressions/packet_path/echo-reply-multicast-src-mac): a ping to a VIP
/// sent to a group Ethernet address is answered from the port's own MAC, never from the group.
#[test]
fn echo_reply_to_a_group_address_comes_from_our_mac() {
    let mut h = web();
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
    let c = !fold(sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut frame = eth([0xff; 6], GW_MAC, 0x0800, &ip_packet(ip(CLIENT4), ip(WEB_VIP), 1, &icmp, IPO));
    let (sent, drops) = h.step(0, &frame);
    assert!(drops.is_empty(), "{drops:?}");
    assert_eq!(&sent[0][0..12], &[GW_MAC, LB_MAC].concat()[..]);
    frame[0..6].copy_from_slice(&[0x65, 0x74, 0x61, 0, 0, 1]);
    let (sent, _) = h.step(1, &frame);
    assert_eq!(&sent[0][6..12], &LB_MAC);
}

/// A standby (snapshot with `answers_vips: false`) leaves ARP for the VIPs to the leader but
/// still answers for its own address; when it takes over, worker 0 announces every VIP with a
/// gratuitous ARP (and IPv6 VIPs with an unsolicited neighbour advertisement), three rounds a
/// second apart, and answers ARP for them.
#[test]
fn standby_does_not_claim_vips_and_announces_them_on_takeover() {
    let mut h = H::new(fixed_services());
    let standby = Arc::new(snapshot(fixed_services(), 2).with_vip_owner(false, 2));
    h.w.set_snapshot(standby.clone());
    let who_has_vip = eth([0xff; 6], GW_MAC, 0x0806, &arp(1, GW_MAC, GW4, [0; 6], WEB_VIP));
    let who_has_us = eth([0xff; 6], GW_MAC, 0x0806, &arp(1, GW_MAC, GW4, [0; 6], LB4));
    let (sent, _) = h.step(10, &who_has_vip);
    assert!(sent.is_empty(), "the standby answered ARP for a VIP: {sent:?}");
    let (sent, _) = h.step(11, &who_has_us);
    assert_eq!(sent.len(), 1, "its own address is still answered");

    h.w.set_snapshot(Arc::new(standby.with_vip_owner(true, 3)));
    h.w.poll(&mut h.port, 20);
    let sent = h.port.take_tx();
    let vips: std::collections::BTreeSet<IpAddr> = fixed_services().iter().map(|s| s.vip).collect();
    assert_eq!(sent.len(), vips.len(), "one announcement per VIP");
    let garp = eth([0xff; 6], LB_MAC, 0x0806, &arp(1, LB_MAC, WEB_VIP, [0; 6], WEB_VIP));
    assert!(sent.contains(&garp), "gratuitous ARP for {WEB_VIP}");
    let na = sent.iter().filter(|f| f[12..14] == [0x86, 0xdd]).map(|f| parse(f)).find(|p| p.l4().first() == Some(&136));
    assert!(na.is_some_and(|p| p.dst == ip("ff02::1")), "unsolicited NA for the IPv6 VIP to all nodes");
    h.w.poll(&mut h.port, 500);
    assert!(h.port.take_tx().is_empty(), "next round a second later");
    h.w.poll(&mut h.port, 1020);
    assert_eq!(h.port.take_tx().len(), vips.len());
    h.w.poll(&mut h.port, 2020);
    assert_eq!(h.port.take_tx().len(), vips.len());
    h.w.poll(&mut h.port, 3020);
    assert!(h.port.take_tx().is_empty(), "three rounds");
    let (sent, _) = h.step(3021, &who_has_vip);
    assert_eq!(sent.len(), 1, "the leader answers ARP for the VIP");
    assert_eq!(h.w.stats.announcements, 3 * vips.len() as u64);
}

// --- FullNAT source addresses (ports[].snat_addresses) -----------------------------------------

const SNAT_A: &str = "10.10.0.20";
const SNAT_B: &str = "10.10.0.21";
const SNAT_6: &str = "fd00:10::20";

/// 64 SNAT ports (core 0 of 1008) with two IPv4 source addresses and one IPv6 one.
fn web_with_snat_addresses() -> H {
    let mut cfg = config();
    cfg.cores = 1008;
    cfg.snat_addresses = vec![ip(SNAT_A), ip(SNAT_B), ip(SNAT_6)];
    H::with(cfg, fixed_services())
}

#[test]
fn snat_addresses_take_turns_and_traffic_comes_back_through_each() {
    let mut h = web_with_snat_addresses();
    let mut got = Vec::new();
    for i in 0..4u16 {
        let p = h.fwd(0, &tcp(CLIENT4, 40000 + i, WEB_VIP, 80, SYN).frame());
        assert_eq!(p.dst, ip(WEB_EP));
        got.push((p.src, p.sport));
    }
    assert_eq!(got, [(ip(SNAT_A), 1024), (ip(SNAT_B), 1024), (ip(SNAT_A), 1025), (ip(SNAT_B), 1025)]);
    // The backend answers the second address: back to the second client, from the VIP.
    let sa = Seg { src: ip(WEB_EP), dst: ip(SNAT_B), ..tcp("0.0.0.0", 8080, "0.0.0.0", 1024, SYN | ACK) };
    let back = h.fwd(0, &sa.frame());
    assert_eq!((back.src, back.sport, back.dst, back.dport), (ip(WEB_VIP), 80, ip(CLIENT4), 40001));
    // The port's own address is not a source any more: nothing comes back to it.
    let stray = Seg { src: ip(WEB_EP), dst: ip(LB4), ..tcp("0.0.0.0", 8080, "0.0.0.0", 1024, SYN | ACK) };
    assert_eq!(h.dropped(0, &stray.frame()), DropReason::NoFlow);
    // IPv6 takes its own listed address.
    let p = h.fwd(0, &tcp(CLIENT6, 40000, "fd00:20::10", 80, SYN).frame());
    assert_eq!((p.src, p.sport), (ip(SNAT_6), 1024));
    // Two addresses: 128 flows to one backend before the tuples run out.
    for i in 4..128u16 {
        handshake(&mut h, 1, CLIENT4, 40000 + i, WEB_VIP, 80);
    }
    assert_eq!(h.dropped(2, &tcp(CLIENT4, 41000, WEB_VIP, 80, SYN).frame()), DropReason::SnatPortsExhausted);
}

#[test]
fn snat_addresses_answer_arp_ndp_and_ping() {
    let mut h = web_with_snat_addresses();
    for target in [SNAT_A, SNAT_B, LB4] {
        let who_has = eth([0xff; 6], GW_MAC, 0x0806, &arp(1, GW_MAC, GW4, [0; 6], target));
        let (sent, drops) = h.step(0, &who_has);
        assert!(drops.is_empty() && sent.len() == 1, "{target}: {drops:?}");
        let a = &sent[0][14..];
        assert_eq!(
            (&a[6..8], &a[8..14], &a[14..18]),
            (&[0, 2][..], &LB_MAC[..], &ip4(target).octets()[..]),
            "{target}"
        );
    }
    let who_has_other = eth([0xff; 6], GW_MAC, 0x0806, &arp(1, GW_MAC, GW4, [0; 6], "10.10.0.22"));
    assert_eq!(h.dropped(0, &who_has_other), DropReason::ArpNotForUs);
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
    let c = !fold(sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ping = eth(LB_MAC, GW_MAC, 0x0800, &ip_packet(ip(CLIENT4), ip(SNAT_B), 1, &icmp, IPO));
    let reply = h.fwd(0, &ping);
    assert_eq!((reply.src, reply.dst, reply.l3[reply.l4_off]), (ip(SNAT_B), ip(CLIENT4), 0));
    // Neighbour solicitation for the IPv6 source address, to its solicited-node group.
    let target = ip6(SNAT_6);
    let group: Ipv6Addr =
        format!("ff02::1:ff{:02x}:{:02x}{:02x}", target.octets()[13], target.octets()[14], target.octets()[15])
            .parse()
            .unwrap();
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&target.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&GW_MAC);
    let src = ip("fd00:10::1");
    let c = l4_csum(src, IpAddr::V6(group), 58, &ns);
    ns[2..4].copy_from_slice(&c.to_be_bytes());
    let o = IpOpts { ttl: 255, ..IPO };
    let frame = eth(
        [0x33, 0x33, 0xff, target.octets()[13], target.octets()[14], target.octets()[15]],
        GW_MAC,
        0x86dd,
        &ip_packet(src, IpAddr::V6(group), 58, &ns, o),
    );
    let na = h.fwd(0, &frame);
    assert_eq!((na.src, na.l3[na.l4_off]), (ip(SNAT_6), 136));
    assert_eq!(&na.l3[na.l4_off + 8..na.l4_off + 24], &target.octets()[..]);
}

/// At start (`fulcrum run` calls `announce_own_addresses`) worker 0 announces the port's own
/// addresses and the FullNAT source addresses, three rounds a second apart; other workers
/// stay quiet.
#[test]
fn own_and_source_addresses_are_announced_at_start() {
    let mut h = web_with_snat_addresses();
    h.w.announce_own_addresses();
    let mut rounds = Vec::new();
    for now in [0, 500, 1000, 2000, 3000] {
        h.w.poll(&mut h.port, now);
        let sent = h.port.take_tx();
        let mut got: Vec<String> = sent
            .iter()
            .map(|f| match u16::from_be_bytes([f[12], f[13]]) {
                // Gratuitous ARP: a broadcast request from us for the address itself.
                0x0806 => {
                    assert_eq!((&f[..6], &f[6..12], &f[20..22]), (&[0xff; 6][..], &LB_MAC[..], &[0, 1][..]));
                    assert_eq!(&f[28..32], &f[38..42], "sender address = target address");
                    Ipv4Addr::from(<[u8; 4]>::try_from(&f[28..32]).unwrap()).to_string()
                }
                // Unsolicited NA to all nodes, override set, target = the address.
                0x86dd => {
                    assert_eq!((&f[..6], f[54], f[58] & 0x20), (&[0x33, 0x33, 0, 0, 0, 1][..], 136, 0x20));
                    Ipv6Addr::from(<[u8; 16]>::try_from(&f[62..78]).unwrap()).to_string()
                }
                t => panic!("unexpected ethertype {t:#06x}"),
            })
            .collect();
        got.sort();
        rounds.push(got);
    }
    let all: Vec<String> =
        ["10.10.0.2", "10.10.0.20", "10.10.0.21", "fd00:10::2", "fd00:10::20"].map(String::from).into();
    assert_eq!(rounds, [all.clone(), vec![], all.clone(), all, vec![]]);
    // Another worker announces nothing (one announcement per appliance).
    let mut cfg = config();
    cfg.core_index = 1;
    cfg.cores = 2;
    let mut other = H::with(cfg, fixed_services());
    other.w.announce_own_addresses();
    other.w.poll(&mut other.port, 0);
    assert!(other.port.take_tx().is_empty());
}

/// An on-link backend that stops answering ARP (a dead node whose endpoints the API still lists
/// as ready): after three unanswered requests a second apart, new flows Maglev gives it go to
/// the next backend of the table instead (counted), the dropped SYNs kept no flow that would
/// pin their clients to it, it is still asked once a second, and once it answers new flows go
/// back to it. Before, a third of the new connections here waited out their SYN timeout.
#[test]
fn new_flows_pass_over_a_backend_that_stopped_answering() {
    let mac = |i: u8| [0x02, 0xbe, 0, 0, 0, i];
    let answer = |i: u8| {
        let be = format!("10.10.0.1{i}");
        eth(LB_MAC, mac(i), 0x0806, &arp(2, mac(i), &be, LB_MAC, LB4))
    };
    let asks_for = |sent: &[Vec<u8>], i: u8| {
        let want = eth([0xff; 6], LB_MAC, 0x0806, &arp(1, LB_MAC, LB4, [0; 6], &format!("10.10.0.1{i}")));
        sent.iter().filter(|f| **f == want).count()
    };
    let on_link = [("10.10.0.11", Ready), ("10.10.0.12", Ready), ("10.10.0.13", Ready)];
    let mut h = H::new(multi(&on_link, None));
    // The snapshot's backends are asked at once; be1 and be2 answer, be3 never does.
    h.w.poll(&mut h.port, 0);
    let sent = h.port.take_tx();
    assert_eq!((asks_for(&sent, 1), asks_for(&sent, 2), asks_for(&sent, 3)), (1, 1, 1));
    h.step(1, &answer(1));
    h.step(1, &answer(2));
    let syn = |port: u16| tcp(CLIENT4, port, MULTI_VIP, 80, SYN).frame();
    let mut to_be3 = Vec::new();
    for port in 40000..40060 {
        let (sent, drops) = h.step(10, &syn(port));
        match drops.as_slice() {
            [] => assert_ne!(parse(&sent[0]).dst, ip("10.10.0.13")),
            [DropReason::NeighborUnresolved] => to_be3.push(port),
            d => panic!("port {port}: {d:?}"),
        }
    }
    assert!(to_be3.len() >= 10, "{} of 60 flows to be3", to_be3.len());
    assert_eq!(h.w.conntrack_v4().len() as usize, 60 - to_be3.len(), "no flow kept for the dropped SYNs");
    // Retransmissions at 1 s and 2 s: still be3 (asked again each time), still dropped.
    for t in [1_000, 2_000] {
        let (sent, drops) = h.step(t, &syn(to_be3[0]));
        assert_eq!((asks_for(&sent, 3), drops), (1, vec![DropReason::NeighborUnresolved]), "t={t}");
    }
    assert_eq!(h.w.stats.unreachable_backend_repicks, 0);
    // A second after the third request: be3 is unreachable, its clients' SYNs go elsewhere,
    // each port always to the same backend; be3 is still asked once a second.
    let mut went = HashMap::new();
    for (k, &port) in to_be3.iter().enumerate() {
        let (sent, drops) = h.step(3_000 + k as u64, &syn(port));
        assert!(drops.is_empty(), "port {port}: {drops:?}");
        let fwd: Vec<Pkt> = sent.iter().filter(|f| f[12..14] == [8, 0]).map(|f| parse(f)).collect();
        assert_eq!(fwd.len(), 1);
        assert!(matches!(fwd[0].dst, d if d == ip("10.10.0.11") || d == ip("10.10.0.12")), "{:?}", fwd[0].dst);
        assert_eq!(asks_for(&sent, 3), (k == 0) as usize, "be3 asked at 3 s, once");
        went.insert(port, fwd[0].dst);
    }
    assert_eq!(h.w.stats.unreachable_backend_repicks, to_be3.len() as u64);
    let (sent, _) = h.step(4_000, &syn(to_be3[0]));
    assert_eq!(parse(sent.iter().find(|f| f[12..14] == [8, 0]).unwrap()).dst, went[&to_be3[0]], "same port, same flow");
    assert_eq!(asks_for(&sent, 3), 0, "an established flow's packet asks nothing");
    let both: HashSet<IpAddr> = went.values().copied().collect();
    assert_eq!(both.len(), 2, "be3's flows shared by be1 and be2: {went:?}");
    // be3 answers: new flows Maglev gives it reach it again, no more re-picks.
    h.step(5_000, &answer(3));
    let repicks = h.w.stats.unreachable_backend_repicks;
    let mut to_be3_again = 0;
    for port in 41000..41060 {
        let p = h.fwd(5_001, &syn(port));
        to_be3_again += (p.dst == ip("10.10.0.13")) as usize;
    }
    assert!(to_be3_again >= 10, "{to_be3_again} of 60 new flows to be3 after it answered");
    assert_eq!(h.w.stats.unreachable_backend_repicks, repicks);
}

/// With ClientIP affinity, a client whose backend stopped answering goes to one other backend,
/// and its next connections follow it there (the affinity remembers the backend it got).
#[test]
fn an_affine_client_of_an_unreachable_backend_stays_on_its_new_one() {
    let mac = |i: u8| [0x02, 0xbe, 0, 0, 0, i];
    let answer = |i: u8| eth(LB_MAC, mac(i), 0x0806, &arp(2, mac(i), &format!("10.10.0.1{i}"), LB_MAC, LB4));
    let on_link = [("10.10.0.11", Ready), ("10.10.0.12", Ready), ("10.10.0.13", Ready)];
    let mut h = H::new(multi(&on_link, Some(600)));
    h.w.poll(&mut h.port, 0);
    h.step(1, &answer(1));
    h.step(1, &answer(2));
    let syn = |client: &str, port: u16| tcp(client, port, MULTI_VIP, 80, SYN).frame();
    // Clients whose affinity is be3 (unresolved: their SYNs are dropped).
    let clients: Vec<String> = (1..60)
        .map(|i| format!("198.51.100.{i}"))
        .filter(|c| h.step(10, &syn(c, 40000)).1 == vec![DropReason::NeighborUnresolved])
        .collect();
    assert!(clients.len() >= 5, "{} clients on be3", clients.len());
    for t in [1_000, 2_000] {
        h.step(t, &syn(&clients[0], 40000));
    }
    for c in &clients {
        // (The first also asks be3 again: its ARP request goes out beside it.)
        let (sent, drops) = h.step(3_000, &syn(c, 40001));
        assert!(drops.is_empty(), "{drops:?}");
        let first = parse(sent.iter().find(|f| f[12..14] == [8, 0]).expect("forwarded")).dst;
        assert_ne!(first, ip("10.10.0.13"));
        for port in 40002..40006 {
            assert_eq!(h.fwd(3_001, &syn(c, port)).dst, first, "client {c} port {port}");
        }
    }
}

/// Passive health (`passive_health`): an endpoint that is reachable (its next hop answers) but
/// leaves SYNs unanswered, a hung or firewalled service, is passed over by new flows after its
/// third SYN sent again unanswered, for `pass_over_ms`; the flows whose SYNs it ignored pick
/// again on their next retransmission; a SYN-ACK from it starts its count over. Before, a
/// third of the connections here waited out their clients' SYN retries.
#[test]
fn new_flows_pass_over_an_endpoint_that_leaves_syns_unanswered() {
    let mut h = H::new(multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let syn = |port: u16| tcp(CLIENT4, port, MULTI_VIP, 80, SYN).frame();
    let e3 = ip(E3);
    // 60 connections; E1 and E2 answer theirs, E3 answers none.
    let mut to_e3 = Vec::new();
    for port in 40000..40060 {
        let p = h.fwd(10, &syn(port));
        if p.dst == e3 {
            to_e3.push(port);
        } else {
            h.fwd(11, &from_backend(p.dst, 8080, p.sport, SYN | ACK).frame());
        }
    }
    assert!(to_e3.len() >= 10, "{} of 60 flows to E3", to_e3.len());
    assert_eq!(h.w.stats.unanswered_syns, 0, "answered SYNs are no misses");
    // A SYN seen again within 200 ms is a duplicate, not a retransmission.
    assert_eq!(h.fwd(100, &syn(to_e3[0])).dst, e3);
    assert_eq!(h.w.stats.unanswered_syns, 0);
    // Retransmissions a second on: two misses leave E3 in place (the same flow, its SNAT port).
    let first = h.fwd(1_010, &syn(to_e3[0]));
    assert_eq!((first.dst, h.w.stats.unanswered_syns), (e3, 1));
    assert_eq!(h.fwd(1_020, &syn(to_e3[1])).dst, e3);
    assert_eq!(h.w.stats.unanswered_backend_repicks, 0);
    // The third: E3 is passed over, and this SYN picks again.
    let p = h.fwd(1_030, &syn(to_e3[2]));
    assert_ne!(p.dst, e3);
    assert_eq!((h.w.stats.unanswered_syns, h.w.stats.unanswered_backend_repicks), (3, 1));
    assert_eq!(h.w.stats_copy().passed_over, [(e3, 8080)]);
    // Every flow E3 ignored picks again on its next retransmission, each port to the same
    // backend every time; new flows Maglev gives E3 go elsewhere too.
    let mut went = HashMap::new();
    for &port in &to_e3 {
        let p = h.fwd(3_000, &syn(port));
        assert_ne!(p.dst, e3, "port {port}");
        went.insert(port, p.dst);
    }
    for &port in &to_e3 {
        assert_eq!(h.fwd(3_001, &syn(port)).dst, went[&port], "port {port}: the re-picked flow");
    }
    let both: HashSet<IpAddr> = went.values().copied().collect();
    assert_eq!(both.len(), 2, "E3's flows shared by E1 and E2: {went:?}");
    let new_to_e3 = (41000..41060).filter(|&port| h.fwd(3_100, &syn(port)).dst == e3).count();
    assert_eq!(new_to_e3, 0);
    let repicks = h.w.stats.unanswered_backend_repicks;
    assert!(repicks >= to_e3.len() as u64 + 10, "{repicks} re-picks");
    // Ten seconds after the third miss, new flows Maglev gives E3 try it again; it answers one,
    // which starts its count over: the next flow's unanswered SYN does not pass it over.
    let mut tried = Vec::new();
    for port in 42000..42060 {
        let p = h.fwd(11_030, &syn(port));
        if p.dst == e3 {
            tried.push((port, p.sport));
        }
    }
    assert!(tried.len() >= 10, "{} new flows to E3 after its time", tried.len());
    assert!(h.w.stats_copy().passed_over.is_empty());
    h.fwd(11_031, &from_backend(e3, 8080, tried[0].1, SYN | ACK).frame());
    assert_eq!(h.fwd(12_100, &syn(tried[1].0)).dst, e3, "one miss after an answer");
    assert_eq!(h.fwd(12_200, &syn(tried[2].0)).dst, e3, "two");
    assert_ne!(h.fwd(12_300, &syn(tried[3].0)).dst, e3, "the third passes it over again");
    assert_eq!(h.w.stats.unanswered_backend_repicks, repicks + 1);
}

/// `passive_health.unanswered_syns: 0` turns the check off: unanswered SYNs count for nothing.
#[test]
fn unanswered_syns_zero_turns_passive_health_off() {
    let mut cfg = config();
    cfg.passive_health.unanswered_syns = 0;
    let mut h = H::with(cfg, multi(&[(E1, Ready), (E2, Ready), (E3, Ready)], None));
    let syn = |port: u16| tcp(CLIENT4, port, MULTI_VIP, 80, SYN).frame();
    let to_e3: Vec<u16> = (40000..40060).filter(|&port| h.fwd(10, &syn(port)).dst == ip(E3)).collect();
    for t in [1_010, 3_010, 7_010] {
        for &port in &to_e3 {
            assert_eq!(h.fwd(t, &syn(port)).dst, ip(E3), "port {port} at {t}");
        }
    }
    assert_eq!((h.w.stats.unanswered_syns, h.w.stats.unanswered_backend_repicks), (0, 0));
}
