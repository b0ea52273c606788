//! ICMP errors about tracked flows (fragmentation needed / packet too big, unreachable, time
//! exceeded) reach the side that sent the offending packet, translated like the flow itself:
//! - an error sent to a VIP is about a packet we sent to the client (src = VIP): under FullNAT it
//!   goes to the backend, with the quoted packet rewritten to what the backend sent; under DSR it
//!   is encapsulated to the backend like the flow;
//! - an error sent to our own address or a SNAT address is about a packet we sent to a backend
//!   (src = SNAT address): it goes to the client, quoting the packet as the client sent it.
//!
//! Without this, path MTU discovery breaks through the load balancer.

use super::conntrack::{Dir, FlowKey};
use crate::packet::PacketBuf;
use crate::snapshot::Mode;
use crate::stats::DropReason;
use crate::wire::checksum::{self, Delta};
use crate::wire::ether;
use crate::worker::{Class, Family, Worker, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// An IPv4 ICMP error (type 3, 11 or 12) addressed to a VIP or to us.
pub(crate) fn handle_v4<B: PacketBuf>(w: &mut Worker, buf: &mut B, l3: usize, ihl: usize) -> Class {
    let f = buf.data();
    let tot = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) as usize;
    let l4 = l3 + ihl;
    let end = l3 + tot;
    // ICMP header (8) + quoted IPv4 header (>= 20) + 8 bytes of its L4 header.
    if end < l4 + 8 + 20 + 8 {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    let e3 = l4 + 8;
    let eihl = ((f[e3] & 0x0f) as usize) * 4;
    if f[e3] >> 4 != 4 || eihl < 20 || e3 + eihl + 8 > end {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    if checksum::fold(checksum::ones_sum(&f[l4..end])) != 0xffff {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    let outer_dst = u32::from_be_bytes(f[l3 + 16..l3 + 20].try_into().unwrap());
    let to_us = w.ours4(outer_dst);
    let r = translate::<u32, B>(w, buf, l3, l4, e3, e3 + eihl, end, to_us);
    if let Class::Tx = r {
        let f = buf.data_mut();
        // Quoted IPv4 header and outer header: full checksums (short, and not per packet).
        // Only for a rewritten error: an encapsulated one is untouched, and its bytes have
        // moved (e3 no longer points at the quoted header).
        if is_v4_header_here(f, l3) {
            f[e3 + 10..e3 + 12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&f[e3..e3 + eihl]);
            f[e3 + 10..e3 + 12].copy_from_slice(&c.to_be_bytes());
            f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&f[l3..l3 + ihl]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            f[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&f[l4..end]);
            f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
    }
    r
}

/// After a DSR encapsulation the frame starts with the outer header; only rewritten (not
/// encapsulated) errors need their outer checksums redone.
fn is_v4_header_here(f: &[u8], l3: usize) -> bool {
    f[l3 + 9] == 1
}

/// An ICMPv6 error (types 1-4) addressed to a VIP or to us.
pub(crate) fn handle_v6<B: PacketBuf>(w: &mut Worker, buf: &mut B, l3: usize) -> Class {
    let f = buf.data();
    let plen = u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]) as usize;
    let l4 = l3 + 40;
    let end = l4 + plen;
    if end < l4 + 8 + 40 + 8 {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    let e3 = l4 + 8;
    if f[e3] >> 4 != 6 {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    if icmpv6_checksum(f, l3, l4, end) != 0 {
        return Class::Drop(DropReason::IcmpMalformed);
    }
    let outer_dst = u128::from_be_bytes(f[l3 + 24..l3 + 40].try_into().unwrap());
    let to_us = w.ours6(outer_dst);
    let r = translate::<u128, B>(w, buf, l3, l4, e3, e3 + 40, end, to_us);
    if let Class::Tx = r {
        let f = buf.data_mut();
        if f[l3 + 6] == PROTO_ICMPV6 {
            f[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
            let c = icmpv6_checksum(f, l3, l4, end);
            f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
    }
    r
}

/// The ICMPv6 checksum over the pseudo-header and message (0 when the stored one is right).
fn icmpv6_checksum(f: &[u8], l3: usize, l4: usize, end: usize) -> u16 {
    let mut sum = checksum::ones_sum(&f[l3 + 8..l3 + 40]);
    sum += (end - l4) as u32;
    sum += PROTO_ICMPV6 as u32;
    sum += checksum::ones_sum(&f[l4..end]);
    !checksum::fold(sum)
}

#[allow(clippy::too_many_arguments)]
fn translate<A: Family, B: PacketBuf>(
    w: &mut Worker,
    buf: &mut B,
    l3: usize,
    _l4: usize,
    e3: usize,
    el4: usize,
    end: usize,
    to_us: bool,
) -> Class {
    let f = buf.data();
    let proto = f[e3 + if A::LEN == 4 { 9 } else { 6 }];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Class::Drop(DropReason::IcmpUnhandled);
    }
    let q_src = A::read_be(&f[e3 + A::SRC_OFF..]);
    let q_dst = A::read_be(&f[e3 + A::DST_OFF..]);
    let q_sport = u16::from_be_bytes([f[el4], f[el4 + 1]]);
    let q_dport = u16::from_be_bytes([f[el4 + 2], f[el4 + 3]]);
    // The quoted packet is one we sent; its reverse is a key we track.
    let key = FlowKey { src: q_dst, dst: q_src, sport: q_dport, dport: q_sport, proto };
    let Some((_, dir, flow)) = w.lookup_flow::<A>(&key) else {
        return Class::Drop(DropReason::NoFlow);
    };
    // (outer src, outer dst, quoted src, quoted dst, quoted sport, quoted dport, neighbour)
    let plan = match (to_us, dir, flow.mode) {
        (false, Dir::Fwd, m) if m == Mode::DsrIpip as u8 => {
            w.stats.icmp_errors_forwarded += 1;
            return w.encap_to_backend::<A, B>(buf, l3, &flow);
        }
        (false, Dir::Fwd, _) => {
            (flow.rev.dst, flow.rev.src, flow.rev.src, flow.rev.dst, flow.rev.sport, flow.rev.dport, flow.neigh_fwd)
        }
        (true, Dir::Rev, _) => {
            (flow.fwd.dst, flow.fwd.src, flow.fwd.src, flow.fwd.dst, flow.fwd.sport, flow.fwd.dport, flow.neigh_rev)
        }
        _ => return Class::Drop(DropReason::NoFlow),
    };
    let (o_src, o_dst, n_src, n_dst, n_sport, n_dport, neigh) = plan;
    let mac = match w.mac_for(neigh, o_dst) {
        Ok(m) => m,
        Err(r) => return Class::Drop(r),
    };
    let f = buf.data_mut();
    // Quoted L4 checksum, if quoted: incremental over the changed addresses and ports.
    let coff = el4 + if proto == PROTO_TCP { 16 } else { 6 };
    if coff + 2 <= end {
        let mut old = [0u8; 36];
        let mut new = [0u8; 36];
        let n = 2 * A::LEN;
        old[..A::LEN].copy_from_slice(&f[e3 + A::SRC_OFF..e3 + A::SRC_OFF + A::LEN]);
        old[A::LEN..n].copy_from_slice(&f[e3 + A::DST_OFF..e3 + A::DST_OFF + A::LEN]);
        old[n..n + 4].copy_from_slice(&f[el4..el4 + 4]);
        n_src.write_be(&mut new[0..]);
        n_dst.write_be(&mut new[A::LEN..]);
        new[n..n + 2].copy_from_slice(&n_sport.to_be_bytes());
        new[n + 2..n + 4].copy_from_slice(&n_dport.to_be_bytes());
        let c = u16::from_be_bytes([f[coff], f[coff + 1]]);
        if !(proto == PROTO_UDP && c == 0) {
            let d = Delta::between(&old[..n + 4], &new[..n + 4]);
            f[coff..coff + 2].copy_from_slice(&d.apply(c).to_be_bytes());
        }
    }
    n_src.write_be(&mut f[e3 + A::SRC_OFF..]);
    n_dst.write_be(&mut f[e3 + A::DST_OFF..]);
    f[el4..el4 + 2].copy_from_slice(&n_sport.to_be_bytes());
    f[el4 + 2..el4 + 4].copy_from_slice(&n_dport.to_be_bytes());
    o_src.write_be(&mut f[l3 + A::SRC_OFF..]);
    o_dst.write_be(&mut f[l3 + A::DST_OFF..]);
    let own_mac = w.iface().mac;
    ether::set_macs(f, mac, own_mac);
    w.stats.icmp_errors_forwarded += 1;
    Class::Tx
}
