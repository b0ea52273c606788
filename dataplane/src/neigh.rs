//! The appliance's L2/L3 presence on a link: its addresses and routes ([`Interface`]), a
//! fixed-capacity neighbour table ([`NeighborTable`]), answering ARP, NDP and ICMP echo for its
//! own addresses and VIPs, and building the ARP/NDP packets it originates.
//!
//! Slow path, but it runs on the worker: it never panics on any input, never allocates per
//! packet (the table is preallocated), and rewrites replies in place in the received buffer.
//!
//! Conventions (the golden fixtures in `tests/fixtures/` encode the same):
//! - Replies keep any 802.1Q tag of the request and carry no Ethernet padding: the frame is cut
//!   (or grown) to exactly the reply's length; the NIC pads to the minimum on the wire.
//! - ARP replies and echo replies go back to the MAC the request came from; NDP advertisements
//!   go to the solicitor's source link-layer address option if any, else to the frame's source.
//! - A Neighbor Advertisement's IPv6 source is the target address it advertises (so a VIP is
//!   advertised from the VIP); its hop limit is 255. Echo replies have TTL / hop limit 64.

use crate::packet::PacketBuf;
use crate::stats::{CoreStats, DropReason};
use crate::wire::ether::{self, L2Info, ETHERTYPE_ARP, ETHERTYPE_IPV6, ETH_HLEN};
use crate::wire::ndp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, Ipv4Packet, NdiscNeighborFlags,
    NdiscRepr,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

mod table;
pub use table::{NeighborCounters, NeighborRef, NeighborTable, NeighborView, RefState};

const ARP_LEN: usize = 28;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// ICMPv6 NS/NA header: type, code, checksum, flags/reserved, target.
const ND_HLEN: usize = 24;
/// Source/target link-layer address option for Ethernet.
const LLADDR_OPT_LEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The appliance's presence on one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub mac: [u8; 6],
    /// Own IPv4 address and on-link prefix length.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// EUI-64 link-local address derived from `mac`.
    pub ipv6_link_local: Ipv6Addr,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
    pub mtu: u16,
}

fn v4_on_link(net: (Ipv4Addr, u8), dst: Ipv4Addr) -> bool {
    let len = net.1.min(32) as u32;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(net.0) & mask == u32::from(dst) & mask
}

fn v6_on_link(net: (Ipv6Addr, u8), dst: Ipv6Addr) -> bool {
    let len = net.1.min(128) as u32;
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(net.0) & mask == u128::from(dst) & mask
}

impl Interface {
    pub fn from_config(p: &fulcrum_config::bootstrap::PortConfig) -> Interface {
        let mac = p.mac.0;
        Interface {
            mac,
            ipv4: p.ipv4.map(|n| (n.addr(), n.prefix_len())),
            ipv6: p.ipv6.map(|n| (n.addr(), n.prefix_len())),
            ipv6_link_local: ndp::eui64_link_local(mac),
            next_hop_v4: p.next_hop.ipv4,
            next_hop_v6: p.next_hop.ipv6,
            mtu: p.mtu,
        }
    }

    /// Whether `ip` is one of the port's own addresses (IPv4, IPv6 or the link-local).
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.ipv4.is_some_and(|(o, _)| o == a),
            IpAddr::V6(a) => a == self.ipv6_link_local || self.ipv6.is_some_and(|(o, _)| o == a),
        }
    }

    /// Whether `ip` is reached directly (not through a next hop): only such neighbours are
    /// worth a table entry, so only they are learned from the wire.
    pub fn on_link(&self, ip: IpAddr) -> bool {
        self.route(ip) == Some(ip)
    }

    /// The neighbour to send to for `dst`: `dst` itself when on-link (inside the port's prefix,
    /// or IPv6 link-local), else the next hop of that family; `None` when there is no route.
    pub fn route(&self, dst: IpAddr) -> Option<IpAddr> {
        match dst {
            IpAddr::V4(d) => {
                if self.ipv4.is_some_and(|n| v4_on_link(n, d)) {
                    Some(dst)
                } else {
                    self.next_hop_v4.map(IpAddr::V4)
                }
            }
            IpAddr::V6(d) => {
                if ndp::is_link_local(d) || self.ipv6.is_some_and(|n| v6_on_link(n, d)) {
                    Some(dst)
                } else {
                    self.next_hop_v6.map(IpAddr::V6)
                }
            }
        }
    }
}

/// What to do with a packet after the neighbour code looked at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The buffer was rewritten in place as a reply: send it.
    Tx,
    Drop(DropReason),
    /// Learned something (or nothing to do); nothing to send, not a drop.
    Consumed,
}

fn mac6(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[..6]);
    m
}

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

fn is_unicast_mac(m: [u8; 6]) -> bool {
    m[0] & 1 == 0 && m != [0; 6]
}

/// Writes an Ethernet/IPv4 ARP body at `arp` (28 bytes).
fn write_arp(arp: &mut [u8], op: ArpOperation, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: smoltcp::wire::EthernetAddress(sha),
        source_protocol_addr: spa,
        target_hardware_addr: smoltcp::wire::EthernetAddress(tha),
        target_protocol_addr: tpa,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut arp[..ARP_LEN]));
}

/// Answers or learns from an ARP packet (see the module conventions). `answers_for`: the
/// addresses besides the port's own that this appliance answers for (VIPs while it holds them,
/// FullNAT source addresses).
///
/// - Request for our IPv4 or a VIP: reply in place from `iface.mac`, learn the sender (if it
///   is on-link, as everything learned).
/// - Reply or gratuitous ARP (sender == target): learn when we already have an entry for the
///   sender or it is addressed to us, then `Consumed`.
/// - Anything else: `Drop(ArpNotForUs)`; truncated or not Ethernet/IPv4: `Drop(ArpMalformed)`.
pub fn handle_arp<B: PacketBuf>(
    buf: &mut B,
    l2: &L2Info,
    iface: &Interface,
    answers_for: &dyn Fn(IpAddr) -> bool,
    neigh: &mut NeighborTable,
    now_ms: u64,
    stats: &mut CoreStats,
) -> Verdict {
    let frame = buf.data();
    let Some(body) = frame.get(l2.l3_off..) else { return Verdict::Drop(DropReason::ArpMalformed) };
    if l2.ethertype != ETHERTYPE_ARP || l2.l3_off < ETH_HLEN {
        return Verdict::Drop(DropReason::ArpMalformed);
    }
    let Ok(pkt) = ArpPacket::new_checked(body) else { return Verdict::Drop(DropReason::ArpMalformed) };
    let Ok(ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: sha,
        source_protocol_addr: spa,
        target_hardware_addr: tha,
        target_protocol_addr: tpa,
    }) = ArpRepr::parse(&pkt)
    else {
        return Verdict::Drop(DropReason::ArpMalformed);
    };
    let (sha, tha) = (sha.0, tha.0);
    if !is_unicast_mac(sha) {
        return Verdict::Drop(DropReason::ArpMalformed);
    }
    let own = iface.ipv4.map(|(a, _)| a);
    // Never learn (or answer) a claim to our own address.
    if Some(spa) == own {
        return Verdict::Drop(DropReason::ArpNotForUs);
    }
    let for_us = Some(tpa) == own || (!tpa.is_unspecified() && answers_for(IpAddr::V4(tpa)));
    let sender = IpAddr::V4(spa);
    // Off-link senders are never sent to directly: an entry for one would only take room.
    let learnable = iface.on_link(sender);
    match operation {
        ArpOperation::Request if for_us && spa != tpa => {
            if !spa.is_unspecified() && learnable {
                neigh.learn(sender, sha, now_ms);
            }
            let l3 = l2.l3_off;
            if !buf.set_len(l3 + ARP_LEN) {
                return Verdict::Drop(DropReason::ArpMalformed);
            }
            let f = buf.data_mut();
            ether::set_macs(f, sha, iface.mac);
            write_arp(&mut f[l3..], ArpOperation::Reply, iface.mac, tpa, sha, spa);
            stats.arp_replies += 1;
            Verdict::Tx
        }
        ArpOperation::Request | ArpOperation::Reply => {
            let gratuitous = spa == tpa;
            let addressed = operation == ArpOperation::Reply && (Some(tpa) == own || tha == iface.mac);
            if learnable && (gratuitous || operation == ArpOperation::Reply) && (addressed || neigh.contains(sender)) {
                neigh.learn(sender, sha, now_ms);
                Verdict::Consumed
            } else {
                Verdict::Drop(DropReason::ArpNotForUs)
            }
        }
        _ => Verdict::Drop(DropReason::ArpNotForUs),
    }
}

/// Checks an IPv4 header at `ip`; returns (header length, total length).
fn check_ipv4(ip: &[u8]) -> Result<(usize, usize), DropReason> {
    if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 {
        return Err(DropReason::Ipv4Malformed);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < IPV4_HLEN || ihl > ip.len() || total < ihl || total > ip.len() {
        return Err(DropReason::Ipv4Malformed);
    }
    if !Ipv4Packet::new_unchecked(&ip[..total]).verify_checksum() {
        return Err(DropReason::Ipv4BadChecksum);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(DropReason::Ipv4Fragment);
    }
    Ok((ihl, total))
}

/// Answers an ICMPv4 echo request addressed to our address or a VIP with an echo reply in
/// place (addresses swapped, TTL 64, checksums recomputed, sent back to the source MAC).
/// Other types: `Drop(IcmpUnhandled)`; bad ICMP length/checksum: `Drop(IcmpMalformed)`;
/// bad IPv4 header: `Ipv4Malformed` / `Ipv4BadChecksum` / `Ipv4Fragment`.
pub fn handle_icmpv4_local<B: PacketBuf>(buf: &mut B, l2: &L2Info, own_mac: [u8; 6], stats: &mut CoreStats) -> Verdict {
    let l3 = l2.l3_off;
    let Some(ip) = buf.data().get(l3..) else { return Verdict::Drop(DropReason::Ipv4Malformed) };
    if l3 < ETH_HLEN {
        return Verdict::Drop(DropReason::Ipv4Malformed);
    }
    let (ihl, total) = match check_ipv4(ip) {
        Ok(v) => v,
        Err(r) => return Verdict::Drop(r),
    };
    if ip[9] != PROTO_ICMP {
        return Verdict::Drop(DropReason::UnsupportedProtocol);
    }
    let icmp = &ip[ihl..total];
    if icmp.len() < 8 {
        return Verdict::Drop(DropReason::IcmpMalformed);
    }
    if !Icmpv4Packet::new_unchecked(icmp).verify_checksum() {
        return Verdict::Drop(DropReason::IcmpMalformed);
    }
    if icmp[0] != 8 || icmp[1] != 0 {
        return Verdict::Drop(DropReason::IcmpUnhandled);
    }
    if !buf.set_len(l3 + total) {
        return Verdict::Drop(DropReason::Ipv4Malformed);
    }
    let f = buf.data_mut();
    // From our own MAC, never the request's destination MAC: that may be a group address.
    let src = ether::src_mac(f);
    ether::set_macs(f, src, own_mac);
    let ip = &mut f[l3..];
    let (s, d) = (v4(&ip[12..16]), v4(&ip[16..20]));
    ip[12..16].copy_from_slice(&d.octets());
    ip[16..20].copy_from_slice(&s.octets());
    ip[8] = 64;
    Ipv4Packet::new_unchecked(&mut ip[..ihl]).fill_checksum();
    let icmp = &mut ip[ihl..total];
    icmp[0] = 0;
    Icmpv4Packet::new_unchecked(icmp).fill_checksum();
    stats.echo_replies += 1;
    Verdict::Tx
}

/// Writes an IPv6 header (traffic class and flow label 0).
fn write_ipv6(ip: &mut [u8], payload_len: u16, next: u8, hop_limit: u8, src: Ipv6Addr, dst: Ipv6Addr) {
    ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next;
    ip[7] = hop_limit;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
}

/// Writes a Neighbor Advertisement or Solicitation with a link-layer address option
/// (source for NS, target for NA) into `icmp` (32 bytes) and fills its checksum.
fn write_nd(
    icmp: &mut [u8],
    msg: Icmpv6Message,
    flags: NdiscNeighborFlags,
    target: Ipv6Addr,
    mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
) {
    let icmp = &mut icmp[..ND_HLEN + LLADDR_OPT_LEN];
    let lladdr = Some(smoltcp::wire::RawHardwareAddress::from_bytes(&mac));
    let repr = if msg == Icmpv6Message::NeighborSolicit {
        NdiscRepr::NeighborSolicit { target_addr: target, lladdr }
    } else {
        NdiscRepr::NeighborAdvert { flags, target_addr: target, lladdr }
    };
    let mut pkt = Icmpv6Packet::new_unchecked(&mut *icmp);
    repr.emit(&mut pkt);
    pkt.fill_checksum(&src, &dst);
}

/// Handles ICMPv6 whose destination is ours, a VIP, all-nodes or a solicited-node group:
///
/// - Neighbor Solicitation (hop limit 255, code 0, valid options, else `Drop(NdpMalformed)`)
///   for our address, link-local or a VIP: learn the solicitor's link-layer address, answer with
///   a Neighbor Advertisement in place (flags S|O, or only O for DAD from `::` which goes to
///   ff02::1; target link-layer address option; hop limit 255). NS for another target:
///   `Drop(IcmpUnhandled)`.
/// - NA / RA / RS: learn (NA: only for neighbours we have an entry for or NAs addressed to us),
///   then `Consumed`.
/// - Echo request to our address or a VIP: echo reply in place (hop limit 64).
/// - Anything else: `Drop(IcmpUnhandled)`.
pub fn handle_icmpv6_local<B: PacketBuf>(
    buf: &mut B,
    l2: &L2Info,
    iface: &Interface,
    answers_for: &dyn Fn(IpAddr) -> bool,
    neigh: &mut NeighborTable,
    now_ms: u64,
    stats: &mut CoreStats,
) -> Verdict {
    let l3 = l2.l3_off;
    let frame = buf.data();
    let Some(ip) = frame.get(l3..) else { return Verdict::Drop(DropReason::Ipv6Malformed) };
    if l3 < ETH_HLEN || l2.ethertype != ETHERTYPE_IPV6 || ip.len() < IPV6_HLEN || ip[0] >> 4 != 6 {
        return Verdict::Drop(DropReason::Ipv6Malformed);
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if IPV6_HLEN + plen > ip.len() {
        return Verdict::Drop(DropReason::Ipv6Malformed);
    }
    if ip[6] != PROTO_ICMPV6 {
        return Verdict::Drop(DropReason::Ipv6ExtensionHeader);
    }
    let hop_limit = ip[7];
    let (src, dst) = (v6(&ip[8..24]), v6(&ip[24..40]));
    let icmp = &ip[IPV6_HLEN..IPV6_HLEN + plen];
    if icmp.len() < 4 {
        return Verdict::Drop(DropReason::IcmpMalformed);
    }
    let pkt = Icmpv6Packet::new_unchecked(icmp);
    if !pkt.verify_checksum(&src, &dst) {
        return Verdict::Drop(DropReason::IcmpMalformed);
    }
    let msg = pkt.msg_type();
    let frame_src = ether::src_mac(frame);
    let is_nd = matches!(
        msg,
        Icmpv6Message::RouterSolicit
            | Icmpv6Message::RouterAdvert
            | Icmpv6Message::NeighborSolicit
            | Icmpv6Message::NeighborAdvert
            | Icmpv6Message::Redirect
    );
    if is_nd {
        // RFC 4861 §6.1, §7.1: hop limit 255, code 0, well-formed options.
        if hop_limit != 255 || pkt.msg_code() != 0 {
            return Verdict::Drop(DropReason::NdpMalformed);
        }
        let Ok(pkt) = Icmpv6Packet::new_checked(icmp) else { return Verdict::Drop(DropReason::NdpMalformed) };
        let Ok(repr) = NdiscRepr::parse(&pkt) else { return Verdict::Drop(DropReason::NdpMalformed) };
        let ll = |a: Option<smoltcp::wire::RawHardwareAddress>| {
            a.filter(|a| a.len() == 6).map(|a| mac6(a.as_bytes())).filter(|m| is_unicast_mac(*m))
        };
        return match repr {
            NdiscRepr::NeighborSolicit { target_addr, lladdr } => {
                let dad = src.is_unspecified();
                if target_addr.is_multicast() || (dad && (lladdr.is_some() || !ndp::is_solicited_node(dst))) {
                    return Verdict::Drop(DropReason::NdpMalformed);
                }
                let target = IpAddr::V6(target_addr);
                if !(iface.owns(target) || answers_for(target)) {
                    return Verdict::Drop(DropReason::IcmpUnhandled);
                }
                let sll = ll(lladdr);
                if !dad && iface.on_link(IpAddr::V6(src)) {
                    if let Some(m) = sll {
                        neigh.learn(IpAddr::V6(src), m, now_ms);
                    }
                }
                let (to_ip, to_mac, flags) = if dad {
                    (ndp::ALL_NODES, ndp::ALL_NODES_MAC, NdiscNeighborFlags::OVERRIDE)
                } else {
                    let to_mac = sll.unwrap_or(frame_src);
                    if !is_unicast_mac(to_mac) {
                        return Verdict::Drop(DropReason::NdpMalformed);
                    }
                    (src, to_mac, NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE)
                };
                let ilen = ND_HLEN + LLADDR_OPT_LEN;
                if !buf.set_len(l3 + IPV6_HLEN + ilen) {
                    return Verdict::Drop(DropReason::NdpMalformed);
                }
                let f = buf.data_mut();
                ether::set_macs(f, to_mac, iface.mac);
                let ip = &mut f[l3..];
                write_ipv6(ip, ilen as u16, PROTO_ICMPV6, 255, target_addr, to_ip);
                write_nd(
                    &mut ip[IPV6_HLEN..],
                    Icmpv6Message::NeighborAdvert,
                    flags,
                    target_addr,
                    iface.mac,
                    target_addr,
                    to_ip,
                );
                stats.ndp_replies += 1;
                Verdict::Tx
            }
            NdiscRepr::NeighborAdvert { flags, target_addr, lladdr } => {
                let target = IpAddr::V6(target_addr);
                let learnable = !iface.owns(target)
                    && iface.on_link(target)
                    && (neigh.contains(target) || iface.owns(IpAddr::V6(dst)));
                match ll(lladdr) {
                    Some(m) if learnable => neigh.learn(target, m, now_ms),
                    // An answer to a unicast solicitation (a probe) may leave the option out
                    // (RFC 4861 §7.2.4; Linux does): it confirms the MAC we asked at, which it
                    // came from, and changes none (§7.2.5).
                    None if learnable && flags.contains(NdiscNeighborFlags::SOLICITED) => match neigh.lookup(target) {
                        Some(m) if m == frame_src => neigh.learn(target, frame_src, now_ms),
                        // The probe went out from another worker (the one whose entry holds
                        // this MAC), and the answer reached this one: passed on as news, which
                        // confirms the asker's entry, while this table is left as it is. Until
                        // then the asker gave its entry up after its probes: an IPv6 client or
                        // backend unreachable from that worker for seconds.
                        None if iface.owns(IpAddr::V6(dst)) && is_unicast_mac(frame_src) => {
                            neigh.tell_others(target, frame_src)
                        }
                        _ => {}
                    },
                    _ => {}
                }
                Verdict::Consumed
            }
            NdiscRepr::RouterSolicit { lladdr } | NdiscRepr::RouterAdvert { lladdr, .. } => {
                if let (false, true, Some(m)) = (src.is_unspecified(), iface.on_link(IpAddr::V6(src)), ll(lladdr)) {
                    neigh.learn(IpAddr::V6(src), m, now_ms);
                }
                Verdict::Consumed
            }
            NdiscRepr::Redirect { .. } => Verdict::Drop(DropReason::IcmpUnhandled),
        };
    }
    if msg != Icmpv6Message::EchoRequest {
        return Verdict::Drop(DropReason::IcmpUnhandled);
    }
    if icmp.len() < 8 {
        return Verdict::Drop(DropReason::IcmpMalformed);
    }
    let d = IpAddr::V6(dst);
    if !(iface.owns(d) || answers_for(d)) || src.is_multicast() || src.is_unspecified() {
        return Verdict::Drop(DropReason::IcmpUnhandled);
    }
    if !buf.set_len(l3 + IPV6_HLEN + plen) {
        return Verdict::Drop(DropReason::Ipv6Malformed);
    }
    let f = buf.data_mut();
    // From our own MAC, never the request's destination MAC: that may be a group address.
    let fs = ether::src_mac(f);
    ether::set_macs(f, fs, iface.mac);
    let ip = &mut f[l3..];
    ip[8..24].copy_from_slice(&dst.octets());
    ip[24..40].copy_from_slice(&src.octets());
    ip[7] = 64;
    let mut pkt = Icmpv6Packet::new_unchecked(&mut ip[IPV6_HLEN..IPV6_HLEN + plen]);
    pkt.set_msg_type(Icmpv6Message::EchoReply);
    pkt.fill_checksum(&dst, &src);
    stats.echo_replies += 1;
    Verdict::Tx
}

/// Writes an untagged Ethernet header and sets the buffer's length; false if it does not fit.
fn start_frame<B: PacketBuf>(buf: &mut B, len: usize, dst: [u8; 6], src: [u8; 6], ethertype: u16) -> bool {
    if !buf.set_len(len) {
        return false;
    }
    let f = buf.data_mut();
    if f.len() < len {
        return false;
    }
    ether::set_macs(f, dst, src);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    true
}

/// A whole untagged ARP frame (42 bytes) for tools that make their own, such as the packet
/// generator: Ethernet to `dst` from `sha`, then the ARP packet.
pub fn arp_frame(op: ArpOperation, dst: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; ETH_HLEN + ARP_LEN];
    ether::set_macs(&mut f, dst, sha);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    write_arp(&mut f[ETH_HLEN..], op, sha, spa, tha, tpa);
    f
}

/// An ARP request for `target` from the port's IPv4 address (untagged, 42 bytes): broadcast,
/// or to `unicast` (a probe of a known neighbour, as Linux sends, target MAC left zero).
/// False when the port has no IPv4 address or the buffer is too small.
pub fn build_arp_request<B: PacketBuf>(
    buf: &mut B,
    iface: &Interface,
    target: Ipv4Addr,
    unicast: Option<[u8; 6]>,
) -> bool {
    let Some((own, _)) = iface.ipv4 else { return false };
    if !start_frame(buf, ETH_HLEN + ARP_LEN, unicast.unwrap_or(BROADCAST), iface.mac, ETHERTYPE_ARP) {
        return false;
    }
    write_arp(&mut buf.data_mut()[ETH_HLEN..], ArpOperation::Request, iface.mac, own, [0; 6], target);
    true
}

/// A gratuitous ARP announcement for `ip` (request, sender = target = `ip`, broadcast, RFC 5227
/// style), e.g. when taking over a VIP.
pub fn gratuitous_arp<B: PacketBuf>(buf: &mut B, iface: &Interface, ip: Ipv4Addr) -> bool {
    if !start_frame(buf, ETH_HLEN + ARP_LEN, BROADCAST, iface.mac, ETHERTYPE_ARP) {
        return false;
    }
    write_arp(&mut buf.data_mut()[ETH_HLEN..], ArpOperation::Request, iface.mac, ip, [0; 6], ip);
    true
}

/// A Neighbor Solicitation for `target` to its solicited-node group, or to `target` itself at
/// `unicast` (a probe of a known neighbour, RFC 4861 §7.3.3), with a source link-layer
/// address option, hop limit 255. The source is the link-local address for link-local targets
/// (or when the port has no global IPv6), else the port's IPv6 address. Untagged, 86 bytes.
pub fn build_neighbor_solicitation<B: PacketBuf>(
    buf: &mut B,
    iface: &Interface,
    target: Ipv6Addr,
    unicast: Option<[u8; 6]>,
) -> bool {
    let src = match iface.ipv6 {
        Some((a, _)) if !ndp::is_link_local(target) => a,
        _ => iface.ipv6_link_local,
    };
    let (dst, dst_mac) = match unicast {
        Some(mac) => (target, mac),
        None => (ndp::solicited_node(target), ndp::multicast_mac(ndp::solicited_node(target))),
    };
    let ilen = ND_HLEN + LLADDR_OPT_LEN;
    if !start_frame(buf, ETH_HLEN + IPV6_HLEN + ilen, dst_mac, iface.mac, ETHERTYPE_IPV6) {
        return false;
    }
    let ip = &mut buf.data_mut()[ETH_HLEN..];
    write_ipv6(ip, ilen as u16, PROTO_ICMPV6, 255, src, dst);
    write_nd(
        &mut ip[IPV6_HLEN..],
        Icmpv6Message::NeighborSolicit,
        NdiscNeighborFlags::empty(),
        target,
        iface.mac,
        src,
        dst,
    );
    true
}

/// An unsolicited Neighbor Advertisement for `ip` to ff02::1 (flags O only, target link-layer
/// address option, source `ip`, hop limit 255), e.g. when taking over a VIP. 86 bytes.
pub fn unsolicited_na<B: PacketBuf>(buf: &mut B, iface: &Interface, ip: Ipv6Addr) -> bool {
    let ilen = ND_HLEN + LLADDR_OPT_LEN;
    if !start_frame(buf, ETH_HLEN + IPV6_HLEN + ilen, ndp::ALL_NODES_MAC, iface.mac, ETHERTYPE_IPV6) {
        return false;
    }
    let h = &mut buf.data_mut()[ETH_HLEN..];
    write_ipv6(h, ilen as u16, PROTO_ICMPV6, 255, ip, ndp::ALL_NODES);
    write_nd(
        &mut h[IPV6_HLEN..],
        Icmpv6Message::NeighborAdvert,
        NdiscNeighborFlags::OVERRIDE,
        ip,
        iface.mac,
        ip,
        ndp::ALL_NODES,
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::HeapBuf;
    use crate::wire::ether::{parse_l2, ETHERTYPE_IPV4, ETHERTYPE_VLAN};

    const MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 1];
    const GW_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0xfe];
    const PEER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 7];

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn iface() -> Interface {
        Interface {
            mac: MAC,
            ipv4: Some((ip4("10.10.0.2"), 24)),
            ipv6: Some((ip6("fd00:10::2"), 64)),
            ipv6_link_local: ndp::eui64_link_local(MAC),
            next_hop_v4: Some(ip4("10.10.0.1")),
            next_hop_v6: Some(ip6("fd00:10::1")),
            mtu: 1500,
        }
    }

    fn vips(ip: IpAddr) -> bool {
        ip == IpAddr::V4(ip4("10.20.0.10")) || ip == IpAddr::V6(ip6("fd00:20::10"))
    }

    fn eth(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, et: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(v) = vlan {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&et.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp(op: ArpOperation, sha: [u8; 6], spa: &str, tha: [u8; 6], tpa: &str) -> Vec<u8> {
        let mut a = vec![0u8; ARP_LEN];
        write_arp(&mut a, op, sha, ip4(spa), tha, ip4(tpa));
        a
    }

    fn echo4(src: &str, dst: &str, ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 20 + 8 + payload.len()];
        let total = ip.len() as u16;
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 61;
        ip[9] = PROTO_ICMP;
        ip[12..16].copy_from_slice(&ip4(src).octets());
        ip[16..20].copy_from_slice(&ip4(dst).octets());
        Ipv4Packet::new_unchecked(&mut ip[..20]).fill_checksum();
        ip[20] = ty;
        ip[24..26].copy_from_slice(&7u16.to_be_bytes());
        ip[26..28].copy_from_slice(&1u16.to_be_bytes());
        ip[28..].copy_from_slice(payload);
        Icmpv4Packet::new_unchecked(&mut ip[20..]).fill_checksum();
        ip
    }

    fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, icmp: &[u8]) -> Vec<u8> {
        let mut ip = vec![0u8; 40 + icmp.len()];
        write_ipv6(&mut ip, icmp.len() as u16, PROTO_ICMPV6, hop, src, dst);
        ip[40..].copy_from_slice(icmp);
        Icmpv6Packet::new_unchecked(&mut ip[40..]).fill_checksum(&src, &dst);
        ip
    }

    fn ns(target: Ipv6Addr, lladdr: Option<[u8; 6]>) -> Vec<u8> {
        let repr = NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: lladdr.map(|m| smoltcp::wire::RawHardwareAddress::from_bytes(&m)),
        };
        let mut b = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]));
        b
    }

    fn echo6(ty: u8) -> Vec<u8> {
        let mut b = vec![ty, 0, 0, 0, 0, 9, 0, 1];
        b.extend_from_slice(b"ping6");
        b
    }

    struct Ctx {
        iface: Interface,
        neigh: NeighborTable,
        stats: CoreStats,
    }

    impl Ctx {
        fn new() -> Self {
            Ctx { iface: iface(), neigh: NeighborTable::new(64), stats: CoreStats::default() }
        }
        fn arp(&mut self, f: &[u8]) -> (Verdict, Vec<u8>) {
            let mut b = HeapBuf::from_slice(f);
            let l2 = parse_l2(f).unwrap();
            let v = handle_arp(&mut b, &l2, &self.iface, &vips, &mut self.neigh, 5, &mut self.stats);
            (v, b.data().to_vec())
        }
        fn icmp6(&mut self, f: &[u8]) -> (Verdict, Vec<u8>) {
            let mut b = HeapBuf::from_slice(f);
            let l2 = parse_l2(f).unwrap();
            let v = handle_icmpv6_local(&mut b, &l2, &self.iface, &vips, &mut self.neigh, 5, &mut self.stats);
            (v, b.data().to_vec())
        }
    }

    fn icmp4(f: &[u8], stats: &mut CoreStats) -> (Verdict, Vec<u8>) {
        let mut b = HeapBuf::from_slice(f);
        let l2 = parse_l2(f).unwrap();
        let v = handle_icmpv4_local(&mut b, &l2, MAC, stats);
        (v, b.data().to_vec())
    }

    #[test]
    fn interface_from_config_owns_and_routes() {
        let yaml_mac: fulcrum_config::bootstrap::MacAddr = "02:f1:00:00:00:01".parse().unwrap();
        let p = fulcrum_config::bootstrap::PortConfig {
            name: "p0".into(),
            device: "net_null0".into(),
            mac: yaml_mac,
            ipv4: Some("10.10.0.2/24".parse().unwrap()),
            ipv6: Some("fd00:10::2/64".parse().unwrap()),
            next_hop: fulcrum_config::bootstrap::NextHop {
                ipv4: Some(ip4("10.10.0.1")),
                ipv6: Some(ip6("fd00:10::1")),
                mac: None,
            },
            mtu: 1500,
            snat_addresses: vec![],
        };
        let i = Interface::from_config(&p);
        assert_eq!(i, iface());
        assert_eq!(i.ipv6_link_local, ip6("fe80::f1:ff:fe00:1"));
        assert!(i.owns(ip4("10.10.0.2").into()));
        assert!(i.owns(ip6("fd00:10::2").into()));
        assert!(i.owns(ip6("fe80::f1:ff:fe00:1").into()));
        assert!(!i.owns(ip4("10.10.0.3").into()));
        assert_eq!(i.route(ip4("10.10.0.77").into()), Some(ip4("10.10.0.77").into()));
        assert_eq!(i.route(ip4("198.51.100.7").into()), Some(ip4("10.10.0.1").into()));
        assert_eq!(i.route(ip6("fd00:10::99").into()), Some(ip6("fd00:10::99").into()));
        assert_eq!(i.route(ip6("fe80::5").into()), Some(ip6("fe80::5").into()));
        assert_eq!(i.route(ip6("2001:db8::7").into()), Some(ip6("fd00:10::1").into()));
        let bare = Interface { ipv4: None, ipv6: None, next_hop_v4: None, next_hop_v6: None, ..iface() };
        assert_eq!(bare.route(ip4("10.10.0.77").into()), None);
        assert_eq!(bare.route(ip6("2001:db8::7").into()), None);
        let all = Interface { ipv4: Some((ip4("10.0.0.1"), 0)), ipv6: Some((ip6("::1"), 0)), ..iface() };
        assert_eq!(all.route(ip4("1.2.3.4").into()), Some(ip4("1.2.3.4").into()));
        assert_eq!(all.route(ip6("2001::1").into()), Some(ip6("2001::1").into()));
    }

    #[test]
    fn arp_request_for_own_ip_and_vip_is_answered() {
        for (target, vlan) in [("10.10.0.2", None), ("10.20.0.10", None), ("10.20.0.10", Some(100u16))] {
            let mut c = Ctx::new();
            let mut req = eth(
                BROADCAST,
                GW_MAC,
                vlan,
                ETHERTYPE_ARP,
                &arp(ArpOperation::Request, GW_MAC, "10.10.0.1", [0; 6], target),
            );
            req.resize(req.len() + 18, 0); // Ethernet padding, trimmed in the reply
            let (v, out) = c.arp(&req);
            assert_eq!(v, Verdict::Tx);
            let l3 = if vlan.is_some() { 18 } else { 14 };
            let want =
                eth(GW_MAC, MAC, vlan, ETHERTYPE_ARP, &arp(ArpOperation::Reply, MAC, target, GW_MAC, "10.10.0.1"));
            assert_eq!(out, want);
            assert_eq!(out.len(), l3 + 28);
            assert_eq!(parse_l2(&out).unwrap().vlan, vlan);
            assert_eq!(c.stats.arp_replies, 1);
            assert_eq!(c.neigh.lookup(ip4("10.10.0.1").into()), Some(GW_MAC), "sender learned");
        }
    }

    #[test]
    fn arp_probe_is_answered_without_learning() {
        let mut c = Ctx::new();
        let req = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, PEER_MAC, "0.0.0.0", [0; 6], "10.10.0.2"),
        );
        let (v, out) = c.arp(&req);
        assert_eq!(v, Verdict::Tx);
        assert_eq!(
            out,
            eth(PEER_MAC, MAC, None, ETHERTYPE_ARP, &arp(ArpOperation::Reply, MAC, "10.10.0.2", PEER_MAC, "0.0.0.0"))
        );
        assert!(c.neigh.is_empty());
    }

    #[test]
    fn arp_not_for_us_and_learning() {
        let mut c = Ctx::new();
        let other = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, PEER_MAC, "10.10.0.7", [0; 6], "10.10.0.99"),
        );
        assert_eq!(c.arp(&other).0, Verdict::Drop(DropReason::ArpNotForUs));
        assert!(c.neigh.is_empty(), "requests for others do not create entries");

        // A reply to our request: learned.
        let reply =
            eth(MAC, PEER_MAC, None, ETHERTYPE_ARP, &arp(ArpOperation::Reply, PEER_MAC, "10.10.0.7", MAC, "10.10.0.2"));
        assert_eq!(c.arp(&reply).0, Verdict::Consumed);
        assert_eq!(c.neigh.lookup(ip4("10.10.0.7").into()), Some(PEER_MAC));

        // Gratuitous ARP for a known neighbour: updated. For an unknown one: not ours.
        let garp = eth(
            BROADCAST,
            GW_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, GW_MAC, "10.10.0.7", [0; 6], "10.10.0.7"),
        );
        assert_eq!(c.arp(&garp).0, Verdict::Consumed);
        assert_eq!(c.neigh.lookup(ip4("10.10.0.7").into()), Some(GW_MAC));
        let garp2 = eth(
            BROADCAST,
            GW_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Reply, GW_MAC, "10.10.0.8", BROADCAST, "10.10.0.8"),
        );
        assert_eq!(c.arp(&garp2).0, Verdict::Drop(DropReason::ArpNotForUs));
        assert_eq!(c.neigh.lookup(ip4("10.10.0.8").into()), None);

        // A pending (unresolved) entry gets resolved by a reply addressed elsewhere.
        let i = c.neigh.index_of(ip4("10.10.0.9").into(), 0).idx;
        let r = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Reply, PEER_MAC, "10.10.0.9", BROADCAST, "10.10.0.9"),
        );
        assert_eq!(c.arp(&r).0, Verdict::Consumed);
        assert_eq!(c.neigh.mac_at(i), Some(PEER_MAC));

        // Someone claiming our address is never learned nor answered.
        let claim = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, PEER_MAC, "10.10.0.2", [0; 6], "10.10.0.2"),
        );
        assert_eq!(c.arp(&claim).0, Verdict::Drop(DropReason::ArpNotForUs));
        assert_eq!(c.neigh.lookup(ip4("10.10.0.2").into()), None);

        // Senders outside the port's prefix are answered but not learned: they are reached
        // through the next hop, so an entry would only take room (a spoofing sender could
        // otherwise fill the table with addresses of its choosing).
        let before = c.neigh.len();
        let off_link = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, PEER_MAC, "198.51.100.7", [0; 6], "10.20.0.10"),
        );
        assert_eq!(c.arp(&off_link).0, Verdict::Tx);
        assert_eq!(c.stats.arp_replies, 1);
        c.stats.arp_replies = 0;
        let off_reply = eth(
            MAC,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Reply, PEER_MAC, "198.51.100.8", MAC, "10.10.0.2"),
        );
        assert_eq!(c.arp(&off_reply).0, Verdict::Drop(DropReason::ArpNotForUs));
        assert_eq!(c.neigh.len(), before);
        assert_eq!(c.neigh.lookup(ip4("198.51.100.7").into()), None);

        // Malformed: wrong protocol type, multicast sender.
        let mut bad = arp(ArpOperation::Request, PEER_MAC, "10.10.0.7", [0; 6], "10.10.0.2");
        bad[2] = 0x86;
        assert_eq!(
            c.arp(&eth(BROADCAST, PEER_MAC, None, ETHERTYPE_ARP, &bad)).0,
            Verdict::Drop(DropReason::ArpMalformed)
        );
        let mc = eth(
            BROADCAST,
            PEER_MAC,
            None,
            ETHERTYPE_ARP,
            &arp(ArpOperation::Request, BROADCAST, "10.10.0.7", [0; 6], "10.10.0.2"),
        );
        assert_eq!(c.arp(&mc).0, Verdict::Drop(DropReason::ArpMalformed));
        assert_eq!(c.stats.arp_replies, 0);
    }

    #[test]
    fn icmpv4_echo_request_gets_a_reply() {
        let mut stats = CoreStats::default();
        for vlan in [None, Some(100)] {
            let mut req = eth(MAC, GW_MAC, vlan, ETHERTYPE_IPV4, &echo4("198.51.100.7", "10.20.0.10", 8, b"hello"));
            req.extend_from_slice(&[0; 12]); // padding
            let (v, out) = icmp4(&req, &mut stats);
            assert_eq!(v, Verdict::Tx);
            let l2 = parse_l2(&out).unwrap();
            assert_eq!(l2.vlan, vlan);
            assert_eq!(&out[..6], &GW_MAC);
            assert_eq!(&out[6..12], &MAC);
            let ip = Ipv4Packet::new_checked(&out[l2.l3_off..]).unwrap();
            assert_eq!(out.len(), l2.l3_off + 33);
            assert!(ip.verify_checksum());
            assert_eq!(ip.src_addr(), ip4("10.20.0.10"));
            assert_eq!(ip.dst_addr(), ip4("198.51.100.7"));
            assert_eq!(ip.hop_limit(), 64);
            assert_eq!(ip.ident(), 0x1234);
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum());
            assert_eq!(icmp.msg_type(), smoltcp::wire::Icmpv4Message::EchoReply);
            assert_eq!(icmp.echo_ident(), 7);
            assert_eq!(icmp.echo_seq_no(), 1);
            assert_eq!(icmp.data(), b"hello");
        }
        assert_eq!(stats.echo_replies, 2);
    }

    #[test]
    fn icmpv4_errors() {
        let mut st = CoreStats::default();
        let ok = eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &echo4("198.51.100.7", "10.20.0.10", 8, b"x"));
        let mut f = ok.clone();
        f[14 + 10] ^= 1;
        assert_eq!(icmp4(&f, &mut st).0, Verdict::Drop(DropReason::Ipv4BadChecksum));
        let mut f = ok.clone();
        f[14 + 20 + 8] ^= 1;
        assert_eq!(icmp4(&f, &mut st).0, Verdict::Drop(DropReason::IcmpMalformed));
        let f = eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &echo4("198.51.100.7", "10.20.0.10", 13, b"x"));
        assert_eq!(icmp4(&f, &mut st).0, Verdict::Drop(DropReason::IcmpUnhandled));
        let mut f = ok.clone();
        f[14] = 0x44;
        assert_eq!(icmp4(&f, &mut st).0, Verdict::Drop(DropReason::Ipv4Malformed));
        let mut ip = echo4("198.51.100.7", "10.20.0.10", 8, b"x");
        ip[2..4].copy_from_slice(&200u16.to_be_bytes());
        Ipv4Packet::new_unchecked(&mut ip[..20]).fill_checksum();
        assert_eq!(
            icmp4(&eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &ip), &mut st).0,
            Verdict::Drop(DropReason::Ipv4Malformed)
        );
        let mut ip = echo4("198.51.100.7", "10.20.0.10", 8, b"x");
        ip[6] = 0x20; // MF
        Ipv4Packet::new_unchecked(&mut ip[..20]).fill_checksum();
        assert_eq!(
            icmp4(&eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &ip), &mut st).0,
            Verdict::Drop(DropReason::Ipv4Fragment)
        );
        // ICMP shorter than 8 bytes inside a valid IPv4 packet.
        let mut ip = echo4("198.51.100.7", "10.20.0.10", 8, b"");
        ip.truncate(24);
        ip[2..4].copy_from_slice(&24u16.to_be_bytes());
        Ipv4Packet::new_unchecked(&mut ip[..20]).fill_checksum();
        assert_eq!(
            icmp4(&eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &ip), &mut st).0,
            Verdict::Drop(DropReason::IcmpMalformed)
        );
        assert_eq!(st.echo_replies, 0);
    }

    #[test]
    fn ns_for_own_vip_and_link_local_gets_na() {
        let iface = iface();
        for (target, vlan) in
            [(ip6("fd00:10::2"), None), (ip6("fd00:20::10"), Some(100)), (iface.ipv6_link_local, None)]
        {
            let mut c = Ctx::new();
            let src = ip6("fd00:10::1");
            let req = eth(
                ndp::multicast_mac(ndp::solicited_node(target)),
                GW_MAC,
                vlan,
                ETHERTYPE_IPV6,
                &ipv6_icmp(src, ndp::solicited_node(target), 255, &ns(target, Some(GW_MAC))),
            );
            let (v, out) = c.icmp6(&req);
            assert_eq!(v, Verdict::Tx, "target {target}");
            let l2 = parse_l2(&out).unwrap();
            assert_eq!(l2.vlan, vlan);
            assert_eq!(out.len(), l2.l3_off + 72);
            // The exact expected frame.
            let mut na = vec![0u8; 32];
            write_nd(
                &mut na,
                Icmpv6Message::NeighborAdvert,
                NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
                target,
                MAC,
                target,
                src,
            );
            let mut ip = vec![0u8; 40];
            write_ipv6(&mut ip, 32, PROTO_ICMPV6, 255, target, src);
            ip.extend_from_slice(&na);
            assert_eq!(out, eth(GW_MAC, MAC, vlan, ETHERTYPE_IPV6, &ip));
            // And it parses as an NA with the right flags via smoltcp.
            let icmp = Icmpv6Packet::new_checked(&out[l2.l3_off + 40..]).unwrap();
            assert!(icmp.verify_checksum(&target, &src));
            match NdiscRepr::parse(&icmp).unwrap() {
                NdiscRepr::NeighborAdvert { flags, target_addr, lladdr } => {
                    assert_eq!(flags, NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE);
                    assert_eq!(target_addr, target);
                    assert_eq!(lladdr.unwrap().as_bytes(), &MAC);
                }
                r => panic!("{r:?}"),
            }
            assert_eq!(c.stats.ndp_replies, 1);
            assert_eq!(c.neigh.lookup(src.into()), Some(GW_MAC));
        }
    }

    #[test]
    fn ns_without_lladdr_replies_to_frame_source() {
        let mut c = Ctx::new();
        let t = ip6("fd00:10::2");
        let src = ip6("fd00:10::77");
        let req = eth(MAC, PEER_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(src, t, 255, &ns(t, None)));
        let (v, out) = c.icmp6(&req);
        assert_eq!(v, Verdict::Tx);
        assert_eq!(&out[..6], &PEER_MAC);
        assert!(c.neigh.is_empty(), "nothing to learn without the option");
    }

    #[test]
    fn dad_ns_gets_na_to_all_nodes() {
        let mut c = Ctx::new();
        let t = ip6("fd00:20::10");
        let req = eth(
            ndp::multicast_mac(ndp::solicited_node(t)),
            PEER_MAC,
            None,
            ETHERTYPE_IPV6,
            &ipv6_icmp(Ipv6Addr::UNSPECIFIED, ndp::solicited_node(t), 255, &ns(t, None)),
        );
        let (v, out) = c.icmp6(&req);
        assert_eq!(v, Verdict::Tx);
        assert_eq!(&out[..6], &ndp::ALL_NODES_MAC);
        assert_eq!(&out[6..12], &MAC);
        assert_eq!(v6(&out[14 + 24..14 + 40]), ndp::ALL_NODES);
        assert_eq!(v6(&out[14 + 8..14 + 24]), t);
        let icmp = Icmpv6Packet::new_checked(&out[54..]).unwrap();
        assert!(icmp.verify_checksum(&t, &ndp::ALL_NODES));
        match NdiscRepr::parse(&icmp).unwrap() {
            NdiscRepr::NeighborAdvert { flags, .. } => assert_eq!(flags, NdiscNeighborFlags::OVERRIDE),
            r => panic!("{r:?}"),
        }
        assert!(c.neigh.is_empty());
        // DAD with a source lladdr option is invalid (RFC 4861 §7.1.1).
        let bad = eth(
            ndp::multicast_mac(ndp::solicited_node(t)),
            PEER_MAC,
            None,
            ETHERTYPE_IPV6,
            &ipv6_icmp(Ipv6Addr::UNSPECIFIED, ndp::solicited_node(t), 255, &ns(t, Some(PEER_MAC))),
        );
        assert_eq!(c.icmp6(&bad).0, Verdict::Drop(DropReason::NdpMalformed));
    }

    #[test]
    fn ndp_validation_and_learning() {
        let mut c = Ctx::new();
        let t = ip6("fd00:10::2");
        let src = ip6("fd00:10::1");
        let f = |hop, icmp: &[u8], dst| eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(src, dst, hop, icmp));
        assert_eq!(c.icmp6(&f(64, &ns(t, Some(GW_MAC)), t)).0, Verdict::Drop(DropReason::NdpMalformed));
        assert_eq!(
            c.icmp6(&f(255, &ns(ip6("fd00:10::99"), Some(GW_MAC)), t)).0,
            Verdict::Drop(DropReason::IcmpUnhandled)
        );
        assert_eq!(c.icmp6(&f(255, &ns(ip6("ff02::1"), Some(GW_MAC)), t)).0, Verdict::Drop(DropReason::NdpMalformed));
        // Option of length 0.
        let mut z = ns(t, Some(GW_MAC));
        z[25] = 0;
        assert_eq!(c.icmp6(&f(255, &z, t)).0, Verdict::Drop(DropReason::NdpMalformed));
        // Bad checksum.
        let mut bad = f(255, &ns(t, Some(GW_MAC)), t);
        bad[14 + 40 + 2] ^= 0xff;
        assert_eq!(c.icmp6(&bad).0, Verdict::Drop(DropReason::IcmpMalformed));
        assert_eq!(c.stats.ndp_replies, 0);
        assert!(c.neigh.is_empty());
        // An NS from outside the port's prefix is answered, its source not learned.
        let far = ip6("2001:db8::5");
        let far_ns = eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(far, t, 255, &ns(t, Some(GW_MAC))));
        assert_eq!(c.icmp6(&far_ns).0, Verdict::Tx);
        assert!(c.neigh.is_empty(), "off-link source learned");
        assert_eq!(c.icmp6(&f(255, &ns(t, Some(GW_MAC)), t)).0, Verdict::Tx);
        assert_eq!(c.neigh.lookup(src.into()), Some(GW_MAC), "on-link source learned");

        // NA to us for a pending neighbour: learned.
        let peer = ip6("fd00:10::7");
        let i = c.neigh.index_of(peer.into(), 0).idx;
        let mut na = vec![0u8; 32];
        write_nd(&mut na, Icmpv6Message::NeighborAdvert, NdiscNeighborFlags::SOLICITED, peer, PEER_MAC, peer, t);
        let na_frame = eth(MAC, PEER_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(peer, t, 255, &na));
        assert_eq!(c.icmp6(&na_frame).0, Verdict::Consumed);
        assert_eq!(c.neigh.mac_at(i), Some(PEER_MAC));
        // Linux answers a unicast solicitation (our probe) without the target link-layer
        // option: that confirms the entry when it comes from the MAC we have (news for the other
        // workers, as any answer), and neither confirms nor changes it from another MAC, or
        // without the solicited flag.
        c.neigh.take_news().for_each(drop);
        let bare_na = |flags, from: [u8; 6]| {
            let mut na = vec![0u8; 32];
            write_nd(&mut na, Icmpv6Message::NeighborAdvert, flags, peer, from, peer, t);
            eth(MAC, from, None, ETHERTYPE_IPV6, &ipv6_icmp(peer, t, 255, &na[..24]))
        };
        assert_eq!(c.icmp6(&bare_na(NdiscNeighborFlags::SOLICITED, PEER_MAC)).0, Verdict::Consumed);
        assert_eq!(c.neigh.take_news().collect::<Vec<_>>(), [(IpAddr::V6(peer), PEER_MAC)], "confirmed");
        assert_eq!(c.icmp6(&bare_na(NdiscNeighborFlags::SOLICITED, GW_MAC)).0, Verdict::Consumed);
        assert_eq!(c.icmp6(&bare_na(NdiscNeighborFlags::OVERRIDE, PEER_MAC)).0, Verdict::Consumed);
        assert_eq!(c.neigh.take_news().count(), 0);
        assert_eq!(c.neigh.mac_at(i), Some(PEER_MAC));
        // The same answer to a probe another worker sent (this table has no MAC for the
        // neighbour, or no entry): passed on as news for the asker, this table unchanged.
        let client = ip6("fd00:10::9");
        let bare_from_client = |flags| {
            let mut na = vec![0u8; 32];
            write_nd(&mut na, Icmpv6Message::NeighborAdvert, flags, client, PEER_MAC, client, t);
            eth(MAC, PEER_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(client, t, 255, &na[..24]))
        };
        assert_eq!(c.icmp6(&bare_from_client(NdiscNeighborFlags::SOLICITED)).0, Verdict::Consumed);
        assert_eq!(c.neigh.take_news().collect::<Vec<_>>(), [(IpAddr::V6(client), PEER_MAC)], "told the others");
        assert!(!c.neigh.contains(client.into()), "this table unchanged");
        assert_eq!(c.icmp6(&bare_from_client(NdiscNeighborFlags::OVERRIDE)).0, Verdict::Consumed);
        assert_eq!(c.neigh.take_news().count(), 0, "unsolicited: nothing to confirm");
        // Unsolicited NA to all-nodes for an unknown neighbour: not learned.
        let other = ip6("fd00:10::8");
        let mut na = vec![0u8; 32];
        write_nd(
            &mut na,
            Icmpv6Message::NeighborAdvert,
            NdiscNeighborFlags::OVERRIDE,
            other,
            PEER_MAC,
            other,
            ndp::ALL_NODES,
        );
        let f2 = eth(ndp::ALL_NODES_MAC, PEER_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(other, ndp::ALL_NODES, 255, &na));
        assert_eq!(c.icmp6(&f2).0, Verdict::Consumed);
        assert_eq!(c.neigh.lookup(other.into()), None);
        // NA with hop limit 64: malformed.
        let f3 = eth(ndp::ALL_NODES_MAC, PEER_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(other, ndp::ALL_NODES, 64, &na));
        assert_eq!(c.icmp6(&f3).0, Verdict::Drop(DropReason::NdpMalformed));

        // RA from the router's link-local: learned.
        let rtr = ip6("fe80::1");
        let ra = NdiscRepr::RouterAdvert {
            hop_limit: 64,
            flags: smoltcp::wire::NdiscRouterFlags::empty(),
            router_lifetime: smoltcp::time::Duration::from_secs(1800),
            reachable_time: smoltcp::time::Duration::from_millis(0),
            retrans_time: smoltcp::time::Duration::from_millis(0),
            lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GW_MAC)),
            mtu: None,
            prefix_info: None,
        };
        let mut b = vec![0u8; ra.buffer_len()];
        ra.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]));
        let raf = eth(ndp::ALL_NODES_MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(rtr, ndp::ALL_NODES, 255, &b));
        assert_eq!(c.icmp6(&raf).0, Verdict::Consumed);
        assert_eq!(c.neigh.lookup(rtr.into()), Some(GW_MAC));
    }

    #[test]
    fn icmpv6_echo() {
        let mut c = Ctx::new();
        let client = ip6("2001:db8:100::7");
        let vip = ip6("fd00:20::10");
        let req = eth(MAC, GW_MAC, Some(100), ETHERTYPE_IPV6, &ipv6_icmp(client, vip, 60, &echo6(128)));
        let (v, out) = c.icmp6(&req);
        assert_eq!(v, Verdict::Tx);
        let want = eth(GW_MAC, MAC, Some(100), ETHERTYPE_IPV6, &ipv6_icmp(vip, client, 64, &echo6(129)));
        assert_eq!(out, want);
        assert_eq!(c.stats.echo_replies, 1);
        // To an address that is not ours (e.g. all-nodes): not answered.
        let mc =
            eth(ndp::ALL_NODES_MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(client, ndp::ALL_NODES, 60, &echo6(128)));
        assert_eq!(c.icmp6(&mc).0, Verdict::Drop(DropReason::IcmpUnhandled));
        let reply = eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(client, vip, 60, &echo6(129)));
        assert_eq!(c.icmp6(&reply).0, Verdict::Drop(DropReason::IcmpUnhandled));
        let mut ext = ipv6_icmp(client, vip, 60, &echo6(128));
        ext[6] = 0;
        assert_eq!(
            c.icmp6(&eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ext)).0,
            Verdict::Drop(DropReason::Ipv6ExtensionHeader)
        );
        let mut long = ipv6_icmp(client, vip, 60, &echo6(128));
        long[5] += 1;
        assert_eq!(c.icmp6(&eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &long)).0, Verdict::Drop(DropReason::Ipv6Malformed));
    }

    #[test]
    fn originated_packets() {
        let i = iface();
        let mut b = HeapBuf::new();
        assert!(build_arp_request(&mut b, &i, ip4("10.10.0.1"), None));
        assert_eq!(
            b.data(),
            &eth(
                BROADCAST,
                MAC,
                None,
                ETHERTYPE_ARP,
                &arp(ArpOperation::Request, MAC, "10.10.0.2", [0; 6], "10.10.0.1")
            )[..]
        );
        // The other side answers our request; we learn from its reply.
        let mut c = Ctx::new();
        c.iface = Interface { mac: GW_MAC, ipv4: Some((ip4("10.10.0.1"), 24)), ..iface() };
        let (v, reply) = c.arp(b.data());
        assert_eq!(v, Verdict::Tx);
        let mut me = Ctx::new();
        assert_eq!(me.arp(&reply).0, Verdict::Consumed);
        assert_eq!(me.neigh.lookup(ip4("10.10.0.1").into()), Some(GW_MAC));
        // A probe of a known neighbour goes to its MAC alone; its answer is learned the same way.
        let mut b = HeapBuf::new();
        assert!(build_arp_request(&mut b, &i, ip4("10.10.0.1"), Some(GW_MAC)));
        assert_eq!(
            b.data(),
            &eth(GW_MAC, MAC, None, ETHERTYPE_ARP, &arp(ArpOperation::Request, MAC, "10.10.0.2", [0; 6], "10.10.0.1"))
                [..]
        );
        let (v, reply) = c.arp(b.data());
        assert_eq!(v, Verdict::Tx);
        let mut me = Ctx::new();
        assert_eq!(me.arp(&reply).0, Verdict::Consumed);
        assert_eq!(me.neigh.lookup(ip4("10.10.0.1").into()), Some(GW_MAC));

        let mut b = HeapBuf::new();
        assert!(gratuitous_arp(&mut b, &i, ip4("10.20.0.10")));
        assert_eq!(
            b.data(),
            &eth(
                BROADCAST,
                MAC,
                None,
                ETHERTYPE_ARP,
                &arp(ArpOperation::Request, MAC, "10.20.0.10", [0; 6], "10.20.0.10")
            )[..]
        );
        let no_v4 = Interface { ipv4: None, ..iface() };
        assert!(!build_arp_request(&mut b, &no_v4, ip4("10.10.0.1"), None));

        // NS from us, answered by a peer that owns the target, learned from the NA.
        let gw = ip6("fd00:10::1");
        let mut b = HeapBuf::new();
        assert!(build_neighbor_solicitation(&mut b, &i, gw, None));
        let f = b.data().to_vec();
        assert_eq!(f.len(), 86);
        assert_eq!(&f[..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
        assert_eq!(v6(&f[22..38]), ip6("fd00:10::2"));
        assert_eq!(v6(&f[38..54]), ip6("ff02::1:ff00:1"));
        let mut peer = Ctx::new();
        peer.iface =
            Interface { mac: GW_MAC, ipv6: Some((gw, 64)), ipv6_link_local: ndp::eui64_link_local(GW_MAC), ..iface() };
        let (v, na) = peer.icmp6(&f);
        assert_eq!(v, Verdict::Tx);
        assert_eq!(peer.neigh.lookup(ip6("fd00:10::2").into()), Some(MAC));
        let mut me = Ctx::new();
        let r = me.neigh.index_of(gw.into(), 0);
        assert_eq!(me.icmp6(&na).0, Verdict::Consumed);
        assert_eq!(me.neigh.mac_at(r.idx), Some(GW_MAC));
        // The unicast probe: to the neighbour's own address and MAC, answered and learned alike.
        let mut b = HeapBuf::new();
        assert!(build_neighbor_solicitation(&mut b, &i, gw, Some(GW_MAC)));
        let f = b.data().to_vec();
        assert_eq!(f.len(), 86);
        assert_eq!(&f[..6], &GW_MAC);
        assert_eq!(v6(&f[38..54]), gw);
        assert!(Icmpv6Packet::new_checked(&f[54..]).unwrap().verify_checksum(&ip6("fd00:10::2"), &gw));
        let (v, na) = peer.icmp6(&f);
        assert_eq!(v, Verdict::Tx);
        let mut me = Ctx::new();
        let r = me.neigh.index_of(gw.into(), 0);
        assert_eq!(me.icmp6(&na).0, Verdict::Consumed);
        assert_eq!(me.neigh.mac_at(r.idx), Some(GW_MAC));

        // NS for a link-local target comes from our link-local.
        let mut b = HeapBuf::new();
        assert!(build_neighbor_solicitation(&mut b, &i, ip6("fe80::1"), None));
        assert_eq!(v6(&b.data()[22..38]), i.ipv6_link_local);

        let mut b = HeapBuf::new();
        assert!(unsolicited_na(&mut b, &i, ip6("fd00:20::10")));
        let f = b.data();
        assert_eq!(&f[..6], &ndp::ALL_NODES_MAC);
        let icmp = Icmpv6Packet::new_checked(&f[54..]).unwrap();
        assert!(icmp.verify_checksum(&ip6("fd00:20::10"), &ndp::ALL_NODES));
        match NdiscRepr::parse(&icmp).unwrap() {
            NdiscRepr::NeighborAdvert { flags, target_addr, lladdr } => {
                assert_eq!(flags, NdiscNeighborFlags::OVERRIDE);
                assert_eq!(target_addr, ip6("fd00:20::10"));
                assert_eq!(lladdr.unwrap().as_bytes(), &MAC);
            }
            r => panic!("{r:?}"),
        }
    }

    /// Every valid input of the tests above, cut at every length and with every byte flipped,
    /// through every handler: never a panic, and never a reply from a cut frame that is shorter
    /// than the packet it claims to be.
    #[test]
    fn truncated_and_corrupted_inputs_never_panic() {
        let t = ip6("fd00:10::2");
        let frames = vec![
            eth(
                BROADCAST,
                GW_MAC,
                None,
                ETHERTYPE_ARP,
                &arp(ArpOperation::Request, GW_MAC, "10.10.0.1", [0; 6], "10.10.0.2"),
            ),
            eth(
                BROADCAST,
                GW_MAC,
                Some(100),
                ETHERTYPE_ARP,
                &arp(ArpOperation::Request, GW_MAC, "10.10.0.1", [0; 6], "10.20.0.10"),
            ),
            eth(MAC, GW_MAC, None, ETHERTYPE_IPV4, &echo4("198.51.100.7", "10.20.0.10", 8, b"hello")),
            eth(MAC, GW_MAC, Some(100), ETHERTYPE_IPV4, &echo4("198.51.100.7", "10.20.0.10", 8, b"")),
            eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(ip6("fd00:10::1"), t, 255, &ns(t, Some(GW_MAC)))),
            eth(
                MAC,
                GW_MAC,
                Some(7),
                ETHERTYPE_IPV6,
                &ipv6_icmp(Ipv6Addr::UNSPECIFIED, ndp::solicited_node(t), 255, &ns(t, None)),
            ),
            eth(MAC, GW_MAC, None, ETHERTYPE_IPV6, &ipv6_icmp(ip6("2001:db8::7"), t, 64, &echo6(128))),
        ];
        let mut c = Ctx::new();
        let mut st = CoreStats::default();
        let mut run = |f: &[u8], complete: bool| {
            let l2s = [
                parse_l2(f).ok(),
                Some(L2Info { l3_off: 14, ethertype: ETHERTYPE_ARP, vlan: None }),
                Some(L2Info { l3_off: 18, ethertype: ETHERTYPE_IPV6, vlan: Some(1) }),
                Some(L2Info { l3_off: 4000, ethertype: ETHERTYPE_IPV6, vlan: None }),
                Some(L2Info { l3_off: 0, ethertype: ETHERTYPE_IPV4, vlan: None }),
            ];
            for l2 in l2s.into_iter().flatten() {
                let mut b = HeapBuf::from_slice(f);
                let v1 = handle_arp(&mut b, &l2, &c.iface, &vips, &mut c.neigh, 1, &mut c.stats);
                let mut b = HeapBuf::from_slice(f);
                let v2 = handle_icmpv4_local(&mut b, &l2, MAC, &mut st);
                let mut b = HeapBuf::from_slice(f);
                let v3 = handle_icmpv6_local(&mut b, &l2, &c.iface, &vips, &mut c.neigh, 1, &mut c.stats);
                if !complete {
                    assert!(v1 != Verdict::Tx && v2 != Verdict::Tx && v3 != Verdict::Tx, "{f:?} {l2:?}");
                }
            }
        };
        for f in &frames {
            for n in 0..f.len() {
                run(&f[..n], false);
            }
            run(f, true);
            for i in 0..f.len() {
                for bit in [0x01u8, 0x80, 0xff] {
                    let mut g = f.clone();
                    g[i] ^= bit;
                    run(&g, true);
                }
            }
        }
    }
}
