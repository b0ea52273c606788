//! The generator's frames: UDP/IPv4 probes with a tag, a sequence number and a transmit
//! timestamp in the payload; ARP requests and replies so that it can find its next hop and be
//! found by it without static neighbour entries anywhere.

use fulcrum_dataplane::neigh;
use fulcrum_dataplane::wire::checksum;
use smoltcp::wire::ArpOperation;
use std::net::Ipv4Addr;

pub const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Ethernet + IPv4 + UDP.
pub const HEADERS: usize = ETH_HLEN + IP_HLEN + UDP_HLEN;
/// tag (u32), sequence (u32), transmit TSC (u64).
pub const PROBE: usize = 16;
/// The smallest frame without FCS (64 bytes on the wire).
pub const MIN_FRAME: usize = 60;
pub const MAX_FRAME: usize = 1514;

/// Where probes go and come from: one flow = one (source address, source port) pair.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub src_ips: u32,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    pub flows: u32,
}

/// Source ports start here; flows beyond one address's ports move to the next address.
const PORT_BASE: u32 = 1024;
const PORTS: u32 = 65536 - PORT_BASE;

impl Endpoints {
    /// Flow `i`'s source address and port: addresses first, so that consecutive flows differ
    /// in address (and an appliance's RSS spreads them) as well as in port.
    pub fn flow(&self, i: u32) -> (u32, u16) {
        let i = i % self.flows.max(1);
        let ip = u32::from(self.src_ip).wrapping_add(i % self.src_ips.max(1));
        let port = PORT_BASE + (i / self.src_ips.max(1)) % PORTS;
        (ip, port as u16)
    }

    /// Whether `ip` is one of the generator's source addresses (answered by ARP, accepted back).
    pub fn owns(&self, ip: u32) -> bool {
        ip.wrapping_sub(u32::from(self.src_ip)) < self.src_ips.max(1)
    }
}

/// A probe frame of `size` bytes (without FCS) for flow `flow`: a template filled once, of
/// which each packet patches the address, ports, checksum and payload.
pub struct Template {
    bytes: Vec<u8>,
}

impl Template {
    pub fn new(ep: &Endpoints, size: usize) -> Template {
        let size = size.clamp(MIN_FRAME, MAX_FRAME);
        let mut b = vec![0u8; size];
        b[0..6].copy_from_slice(&ep.dst_mac);
        b[6..12].copy_from_slice(&ep.src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut b[ETH_HLEN..ETH_HLEN + IP_HLEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((size - ETH_HLEN) as u16).to_be_bytes());
        ip[6] = 0x40; // DF: a probe must arrive whole or not at all
        ip[8] = 64;
        ip[9] = 17;
        ip[16..20].copy_from_slice(&ep.dst_ip.octets());
        let udp = &mut b[ETH_HLEN + IP_HLEN..HEADERS];
        udp[2..4].copy_from_slice(&ep.dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&((size - ETH_HLEN - IP_HLEN) as u16).to_be_bytes());
        Template { bytes: b }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Writes the probe into `out` (exactly `len()` bytes). The UDP checksum is left at zero
    /// (no checksum, allowed over IPv4), so a probe costs one 20-byte header sum.
    #[inline]
    pub fn write(&self, out: &mut [u8], src: (u32, u16), tag: u32, seq: u32, tsc: u64) {
        out.copy_from_slice(&self.bytes);
        let ip = &mut out[ETH_HLEN..ETH_HLEN + IP_HLEN];
        ip[12..16].copy_from_slice(&src.0.to_be_bytes());
        ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        let c = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out[ETH_HLEN + IP_HLEN..ETH_HLEN + IP_HLEN + 2].copy_from_slice(&src.1.to_be_bytes());
        let p = &mut out[HEADERS..HEADERS + PROBE];
        p[0..4].copy_from_slice(&tag.to_be_bytes());
        p[4..8].copy_from_slice(&seq.to_be_bytes());
        p[8..16].copy_from_slice(&tsc.to_be_bytes());
    }
}

/// What a received frame is to the generator.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// One of this trial's probes (or its echo): sequence number and transmit TSC.
    Probe {
        seq: u32,
        tsc: u64,
    },
    /// A probe from another trial (arrived late): counted apart, never as this trial's.
    StaleProbe,
    /// An ARP request for one of our addresses: answer with `arp_reply`.
    ArpRequest,
    /// An ARP reply: (sender address, sender MAC).
    ArpReply(u32, [u8; 6]),
    Other,
}

/// Classifies a received frame. Probes are recognised by their payload alone (an echo comes
/// back with addresses and ports swapped; a loopback unchanged), by the tag's high half.
pub fn classify(f: &[u8], ep: &Endpoints, tag: u32) -> Received {
    if f.len() < ETH_HLEN + 28 {
        return Received::Other;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => {
            let a = &f[ETH_HLEN..ETH_HLEN + 28];
            if a[0..8] != [0, 1, 8, 0, 6, 4, 0, 1][..] && a[0..8] != [0, 1, 8, 0, 6, 4, 0, 2][..] {
                return Received::Other;
            }
            let sender = u32::from_be_bytes([a[14], a[15], a[16], a[17]]);
            let target = u32::from_be_bytes([a[24], a[25], a[26], a[27]]);
            match a[7] {
                1 if ep.owns(target) => Received::ArpRequest,
                2 => Received::ArpReply(sender, a[8..14].try_into().unwrap()),
                _ => Received::Other,
            }
        }
        0x0800 => {
            let ihl = (f[ETH_HLEN] & 0x0f) as usize * 4;
            let start = ETH_HLEN + ihl + UDP_HLEN;
            if f[ETH_HLEN + 9] != 17 || ihl < IP_HLEN || f.len() < start + PROBE {
                return Received::Other;
            }
            let p = &f[start..start + PROBE];
            let t = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            if t >> 16 != MAGIC >> 16 {
                return Received::Other;
            }
            if t != tag {
                return Received::StaleProbe;
            }
            Received::Probe {
                seq: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                tsc: u64::from_be_bytes(p[8..16].try_into().unwrap()),
            }
        }
        _ => Received::Other,
    }
}

/// Probe tags: "FP" in the high half, the trial number in the low half.
pub const MAGIC: u32 = 0x4650_0000;

pub fn tag_for(trial: u16) -> u32 {
    MAGIC | trial as u32
}

/// An ARP request from `ip` for `target`, broadcast.
pub fn arp_request(out: &mut [u8; 42], mac: [u8; 6], ip: u32, target: u32) {
    *out = neigh::arp_frame(ArpOperation::Request, [0xff; 6], mac, ip.into(), [0; 6], target.into());
}

/// Turns the ARP request `req` for one of our addresses into its reply, from `mac`.
pub fn arp_reply(req: &[u8], mac: [u8; 6]) -> [u8; 42] {
    let a = &req[ETH_HLEN..ETH_HLEN + 28];
    let asker_mac: [u8; 6] = a[8..14].try_into().unwrap();
    let asker_ip = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    let target = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
    neigh::arp_frame(ArpOperation::Reply, asker_mac, mac, target, asker_mac, asker_ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoints {
        Endpoints {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 10, 0, 100),
            src_ips: 4,
            dst_ip: Ipv4Addr::new(10, 20, 0, 11),
            dst_port: 5353,
            flows: 10,
        }
    }

    #[test]
    fn probe_round_trips_and_is_a_valid_ipv4_udp_frame() {
        let ep = ep();
        let t = Template::new(&ep, 60);
        let mut f = vec![0u8; t.len()];
        t.write(&mut f, ep.flow(5), tag_for(7), 42, 0x0102_0304_0506_0708);
        assert_eq!(checksum::checksum(&f[ETH_HLEN..ETH_HLEN + 20]), 0, "header checksum verifies");
        assert_eq!(&f[26..30], &[10, 10, 0, 101], "flow 5 of 4 addresses: address 1");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1025, "flow 5: second port");
        assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, 60 - 34, "UDP length");
        assert_eq!(classify(&f, &ep, tag_for(7)), Received::Probe { seq: 42, tsc: 0x0102_0304_0506_0708 });
        assert_eq!(classify(&f, &ep, tag_for(8)), Received::StaleProbe);
        f[HEADERS] ^= 0xff;
        assert_eq!(classify(&f, &ep, tag_for(7)), Received::Other, "not our magic");
        assert_eq!(classify(&f[..40], &ep, tag_for(7)), Received::Other, "truncated");
    }

    #[test]
    fn flows_cover_addresses_then_ports() {
        let ep = Endpoints { flows: 100_000, src_ips: 1, ..ep() };
        assert_eq!(ep.flow(0), (u32::from(ep.src_ip), 1024));
        assert_eq!(ep.flow(64512), (u32::from(ep.src_ip), 1024), "wraps within the port range");
        assert!(ep.owns(u32::from(ep.src_ip)) && !ep.owns(u32::from(ep.src_ip) + 1));
    }

    #[test]
    fn arp_request_is_answered_for_our_addresses_only() {
        let ep = ep();
        let mut req = [0u8; 42];
        arp_request(&mut req, [2, 0, 0, 0, 0, 9], 0x0a0a_0002, u32::from(ep.src_ip) + 3);
        assert_eq!(classify(&req, &ep, 0), Received::ArpRequest);
        let rep = arp_reply(&req, ep.src_mac);
        assert_eq!(classify(&rep, &ep, 0), Received::ArpReply(u32::from(ep.src_ip) + 3, ep.src_mac));
        assert_eq!(&rep[0..6], &[2, 0, 0, 0, 0, 9]);
        arp_request(&mut req, [2, 0, 0, 0, 0, 9], 0x0a0a_0002, u32::from(ep.src_ip) + 4);
        assert_eq!(classify(&req, &ep, 0), Received::Other, "not ours");
    }
}
