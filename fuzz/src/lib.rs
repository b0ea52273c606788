//! Shared pieces of the fuzz targets: the golden appliance (the configuration behind
//! `dataplane/tests/fixtures`) and an independent checksum checker/fixer.
//!
//! The checksum code here is deliberately written from scratch (RFC 1071 over the bytes as
//! they are) rather than reusing `fulcrum_dataplane::wire::checksum`, so that a bug there
//! cannot hide itself.

use fulcrum_config::manifests::Objects;
use fulcrum_config::{translate::translate, Bootstrap};
use fulcrum_dataplane::packet::{HeapBuf, PacketBuf};
use fulcrum_dataplane::port::{Burst, MemoryPort, BURST};
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub const GOLDEN_BOOTSTRAP: &str = include_str!("../../dataplane/tests/fixtures/bootstrap.yaml");
pub const GOLDEN_MANIFESTS: &str = include_str!("../../dataplane/tests/fixtures/manifests.yaml");
pub const LAB_BOOTSTRAP: &str = include_str!("../../config/examples/bootstrap.yaml");
pub const LAB_MANIFESTS: &str = include_str!("../../config/examples/manifests/lab.yaml");

/// The golden fixtures' input pcaps, in a fixed order (replayed by `packet_frame` to warm up).
pub const GOLDEN_PCAPS: &[(&str, &[u8])] = &[
    ("arp", include_bytes!("../../dataplane/tests/fixtures/arp.in.pcap")),
    ("ndp", include_bytes!("../../dataplane/tests/fixtures/ndp.in.pcap")),
    ("ping_vip", include_bytes!("../../dataplane/tests/fixtures/ping_vip.in.pcap")),
    ("tcp_fullnat", include_bytes!("../../dataplane/tests/fixtures/tcp_fullnat.in.pcap")),
    ("udp_fullnat", include_bytes!("../../dataplane/tests/fixtures/udp_fullnat.in.pcap")),
    ("ipv6_fullnat", include_bytes!("../../dataplane/tests/fixtures/ipv6_fullnat.in.pcap")),
    ("dsr_ipip", include_bytes!("../../dataplane/tests/fixtures/dsr_ipip.in.pcap")),
    ("icmp_fullnat", include_bytes!("../../dataplane/tests/fixtures/icmp_fullnat.in.pcap")),
    ("vlan", include_bytes!("../../dataplane/tests/fixtures/vlan.in.pcap")),
    ("unknown_vip", include_bytes!("../../dataplane/tests/fixtures/unknown_vip.in.pcap")),
    ("malformed", include_bytes!("../../dataplane/tests/fixtures/malformed.in.pcap")),
];

/// Frames longer than this are truncated before they are fed (a buffer's data room).
pub const MAX_FRAME: usize = 2048;
/// Conntrack capacity of fuzzed workers (small: one worker is built per input).
pub const CT_CAPACITY: u32 = 4096;

pub struct Golden {
    pub boot: Bootstrap,
    pub snap: Arc<Snapshot>,
}

impl Golden {
    /// The golden bootstrap with these manifests, compiled.
    fn compile(manifests: &str) -> Golden {
        let boot = Bootstrap::parse(Path::new("fixtures/bootstrap.yaml"), GOLDEN_BOOTSTRAP).expect("golden bootstrap");
        let objects = Objects::parse(Path::new("fixtures/manifests.yaml"), manifests).expect("manifests");
        let state = translate(&boot, &objects).expect("translate");
        let snap = Snapshot::compile(&boot, &state, 1).expect("snapshot");
        Golden { boot, snap: Arc::new(snap) }
    }

    /// A fresh worker `core_index` of `cores` (fixed seed, small tables) with these FullNAT
    /// source addresses (`ports[].snat_addresses`).
    fn worker(&self, core_index: u16, cores: u16, snat_addresses: Vec<std::net::IpAddr>) -> Worker {
        let cfg = WorkerConfig {
            seed: 1,
            snat_offset: 0,
            ct_capacity: CT_CAPACITY,
            affinity_capacity: 64,
            snat_addresses,
            ..WorkerConfig::from_bootstrap(&self.boot, core_index, cores)
        };
        Worker::new(cfg, self.snap.clone()).expect("worker")
    }
}

/// The golden appliance, parsed and compiled once per process.
pub fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| Golden::compile(GOLDEN_MANIFESTS))
}

/// A fresh worker `core_index` of `cores` of the golden appliance (fixed seed, small tables).
pub fn golden_worker(core_index: u16, cores: u16) -> Worker {
    golden_worker_with(core_index, cores, vec![])
}

/// The golden appliance with its endpoints on-link (10.10.0.0/24, fd00:10::/64; the web and
/// web6 Services with three each) and no static MAC for the next hop: every neighbour is
/// resolved from what the input brings (ARP replies, neighbour advertisements), so neighbours
/// left unanswered become unreachable as time steps pass and new flows are re-picked.
pub fn golden_on_link() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let three = |a: &str, b: &str, c: &str| {
            format!(
                "- addresses: [\"{a}\"]\n    conditions: {{ready: true}}\n  - addresses: [\"{b}\"]\n    \
                 conditions: {{ready: true}}\n  - addresses: [\"{c}\"]"
            )
        };
        let text = GOLDEN_MANIFESTS
            .replace("- addresses: [\"10.30.0.11\"]", &three("10.10.0.11", "10.10.0.12", "10.10.0.31"))
            .replace("- addresses: [\"fd00:30::11\"]", &three("fd00:10::11", "fd00:10::12", "fd00:10::31"))
            .replace("10.30.0.", "10.10.0.")
            .replace("fd00:30::", "fd00:10::");
        let mut g = Golden::compile(&text);
        g.boot.ports[0].next_hop.mac = None;
        g
    })
}

/// A fresh worker of [`golden_on_link`] (as [`golden_worker_with`]).
pub fn golden_on_link_worker(core_index: u16, cores: u16, snat_addresses: Vec<std::net::IpAddr>) -> Worker {
    golden_on_link().worker(core_index, cores, snat_addresses)
}

/// FullNAT source addresses for [`golden_worker_with`]: two IPv4 and one IPv6 in the golden
/// port's prefixes.
pub fn golden_snat_addresses() -> Vec<std::net::IpAddr> {
    ["10.10.0.20", "10.10.0.21", "fd00:10::20"].iter().map(|a| a.parse().unwrap()).collect()
}

/// [`golden_worker`] with these FullNAT source addresses (`ports[].snat_addresses`).
pub fn golden_worker_with(core_index: u16, cores: u16, snat_addresses: Vec<std::net::IpAddr>) -> Worker {
    golden().worker(core_index, cores, snat_addresses)
}

/// Frames of a classic pcap (as `fulcrum_dataplane::pcap::read_pcap_from`).
pub fn pcap_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    fulcrum_dataplane::pcap::read_pcap_from(bytes).expect("fixture pcap")
}

/// Feeds `frames` (each truncated to [`MAX_FRAME`]) to `worker` as one burst at `now_ms` and
/// checks the invariants every burst must keep; returns the frames sent.
///
/// * rx accounting: `stats.rx.packets` grows by exactly the burst's size;
/// * no packet is created: `tx + new drops <= rx` (ARP/NDP frames that are only learned from
///   are neither sent nor dropped);
/// * every frame sent is from the port's MAC and every IPv4 header in it (outer and
///   encapsulated) has a valid checksum;
/// * when every input's transport checksum was valid (or absent), so is every output's.
///
/// Then runs one idle `poll` (neighbour solicitations, conntrack sweep) and checks what it sends.
pub fn burst_and_check(worker: &mut Worker, now_ms: u64, frames: &[&[u8]]) -> Vec<Vec<u8>> {
    assert!(frames.len() <= BURST);
    let mut rx: Burst<HeapBuf> = Burst::new();
    let mut inputs_valid = true;
    for f in frames {
        let f = &f[..f.len().min(MAX_FRAME)];
        let s = check_frame(f);
        if s.l4 == Some(false) {
            inputs_valid = false;
        }
        rx.push(HeapBuf::from_slice(f));
    }
    let rx0 = worker.stats.rx.packets;
    let drops0 = worker.stats.total_drops();
    let mut tx: Burst<HeapBuf> = Burst::new();
    worker.process_burst(now_ms, &mut rx, &mut tx);
    let n = frames.len() as u64;
    assert!(rx.is_empty(), "process_burst left {} packets in rx", rx.len());
    assert_eq!(worker.stats.rx.packets - rx0, n, "rx counter does not match the burst size");
    let drops = worker.stats.total_drops() - drops0;
    assert!(
        tx.len() as u64 + drops <= n,
        "{} packets in, {} sent + {} dropped: a packet was duplicated or double-counted",
        n,
        tx.len(),
        drops
    );
    let mac = worker.cfg.iface.mac;
    let out: Vec<Vec<u8>> = tx.iter().map(|b| b.data().to_vec()).collect();
    for f in &out {
        check_output(f, mac, inputs_valid);
    }
    // Idle poll: sends neighbour solicitations queued by the burst and sweeps conntrack.
    let mut port = MemoryPort::new();
    let tx0 = worker.stats.tx.packets;
    worker.poll(&mut port, now_ms);
    let sent = port.take_tx();
    assert_eq!(worker.stats.tx.packets - tx0, sent.len() as u64, "tx counter does not match what was sent");
    for f in &sent {
        check_output(f, mac, true);
    }
    out
}

/// Invariants of one frame the appliance sends.
pub fn check_output(f: &[u8], mac: [u8; 6], inputs_valid: bool) {
    assert!(f.len() >= 14, "sent a frame of {} bytes", f.len());
    assert!(f.len() <= MAX_FRAME + fulcrum_dataplane::packet::HEADROOM, "sent a frame of {} bytes", f.len());
    // regressions/packet_path/echo-reply-multicast-src-mac: echo replies once copied a group
    // destination address into their source MAC.
    assert_eq!(f[6..12], mac, "sent a frame whose source MAC is not the port's: {:02x?}", &f[..14.min(f.len())]);
    let s = check_frame(f);
    assert!(!s.bad_ip_header, "sent an IPv4 header with a bad checksum: {:02x?}", f);
    if inputs_valid {
        assert_ne!(s.l4, Some(false), "sent a bad transport checksum although every input's was valid: {:02x?}", f);
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums

fn sum(data: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        s += (*last as u64) << 8;
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const IPIP: u8 = 4;
const IPV6_IN: u8 = 41;

/// Where the L3 header starts and its ethertype (one optional 802.1Q tag, as the worker).
fn l3(frame: &[u8]) -> Option<(u16, usize)> {
    if frame.len() < 14 {
        return None;
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    if et == 0x8100 {
        if frame.len() < 18 {
            return None;
        }
        return Some((u16::from_be_bytes([frame[16], frame[17]]), 18));
    }
    Some((et, 14))
}

/// What the checker found in one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    /// An IPv4 header (outer or encapsulated) with a wrong checksum was seen.
    pub bad_ip_header: bool,
    /// The transport checksum (TCP, UDP, ICMP, ICMPv6; the innermost packet for IP-in-IP):
    /// `None` when there is none to check (not IP, fragment, truncated, other protocol).
    pub l4: Option<bool>,
}

/// Checks an Ethernet frame's checksums.
pub fn check_frame(frame: &[u8]) -> Sums {
    let mut s = Sums::default();
    match l3(frame) {
        Some((0x0800, off)) => check_v4(&frame[off..], &mut s, 0),
        Some((0x86dd, off)) => check_v6(&frame[off..], &mut s, 0),
        _ => {}
    }
    s
}

fn check_v4(ip: &[u8], s: &mut Sums, depth: u8) {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || ihl > ip.len() {
        return;
    }
    if fold(sum(&ip[..ihl])) != 0xffff {
        s.bad_ip_header = true;
    }
    if tot < ihl || tot > ip.len() {
        return;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if frag != 0 {
        return;
    }
    let seg = &ip[ihl..tot];
    let proto = ip[9];
    let pseudo = sum(&ip[12..20]) + proto as u64 + seg.len() as u64;
    s.l4 = match proto {
        TCP if seg.len() >= 20 => Some(fold(pseudo + sum(seg)) == 0xffff),
        UDP if seg.len() >= 8 => {
            let c = u16::from_be_bytes([seg[6], seg[7]]);
            Some(c == 0 || fold(pseudo + sum(seg)) == 0xffff)
        }
        ICMP if seg.len() >= 4 => Some(fold(sum(seg)) == 0xffff),
        IPIP if depth == 0 => {
            check_v4(seg, s, 1);
            return;
        }
        IPV6_IN if depth == 0 => {
            check_v6(seg, s, 1);
            return;
        }
        _ => None,
    };
}

fn check_v6(ip: &[u8], s: &mut Sums, depth: u8) {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return;
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if 40 + plen > ip.len() {
        return;
    }
    let seg = &ip[40..40 + plen];
    let nh = ip[6];
    let pseudo = sum(&ip[8..40]) + nh as u64 + seg.len() as u64;
    s.l4 = match nh {
        TCP if seg.len() >= 20 => Some(fold(pseudo + sum(seg)) == 0xffff),
        UDP | ICMPV6 if seg.len() >= 8 || (nh == ICMPV6 && seg.len() >= 4) => {
            Some(fold(pseudo + sum(seg)) == 0xffff)
        }
        IPIP if depth == 0 => {
            check_v4(seg, s, 1);
            return;
        }
        IPV6_IN if depth == 0 => {
            check_v6(seg, s, 1);
            return;
        }
        _ => None,
    };
}

/// Rewrites a frame's IPv4 header and transport checksums so that they are valid (where the
/// lengths allow), so that the fuzzer does not have to learn RFC 1071 to get past them.
pub fn fix_frame(frame: &mut [u8]) {
    match l3(frame) {
        Some((0x0800, off)) => fix_v4(&mut frame[off..], 0),
        Some((0x86dd, off)) => fix_v6(&mut frame[off..], 0),
        _ => {}
    }
}

fn put(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn fix_v4(ip: &mut [u8], depth: u8) {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || ihl > ip.len() {
        return;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if tot >= ihl && tot <= ip.len() && frag == 0 {
        let proto = ip[9];
        let pseudo = sum(&ip[12..20]) + proto as u64 + (tot - ihl) as u64;
        let seg = &mut ip[ihl..tot];
        fix_l4(seg, proto, pseudo, true, depth);
    }
    put(ip, 10, 0);
    let c = !fold(sum(&ip[..ihl]));
    put(ip, 10, c);
}

fn fix_v6(ip: &mut [u8], depth: u8) {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return;
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if 40 + plen > ip.len() {
        return;
    }
    let nh = ip[6];
    let pseudo = sum(&ip[8..40]) + nh as u64 + plen as u64;
    fix_l4(&mut ip[40..40 + plen], nh, pseudo, false, depth);
}

fn fix_l4(seg: &mut [u8], proto: u8, pseudo: u64, v4: bool, depth: u8) {
    let (at, pseudo) = match proto {
        TCP if seg.len() >= 20 => (16, pseudo),
        UDP if seg.len() >= 8 => (6, pseudo),
        ICMP if v4 && seg.len() >= 4 => (2, 0),
        ICMPV6 if !v4 && seg.len() >= 4 => (2, pseudo),
        IPIP if depth == 0 => return fix_v4(seg, 1),
        IPV6_IN if depth == 0 => return fix_v6(seg, 1),
        _ => return,
    };
    put(seg, at, 0);
    let mut c = !fold(pseudo + sum(seg));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    put(seg, at, c);
}
