//! IPv6 neighbour-discovery addressing helpers (RFC 4291, RFC 4861) that smoltcp 0.14 keeps
//! private or does not have: solicited-node multicast groups, their MACs, EUI-64 link-locals.

use std::net::Ipv6Addr;

/// `ff02::1`, all nodes.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The MAC of `ff02::1` (`33:33:00:00:00:01`).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// The solicited-node multicast group of `addr`: `ff02::1:ffXX:XXXX` (low 24 bits of `addr`).
#[inline]
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// Whether `addr` is some solicited-node multicast group (`ff02::1:ff00:0/104`).
#[inline]
pub fn is_solicited_node(addr: Ipv6Addr) -> bool {
    let o = addr.octets();
    o[..13] == [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]
}

/// The Ethernet multicast MAC of an IPv6 multicast group (`33:33` + low 32 bits, RFC 2464).
#[inline]
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The modified-EUI-64 link-local address of `mac` (`fe80::` + mac with U/L bit flipped and
/// `ff:fe` in the middle, RFC 4291 appendix A).
#[inline]
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]])
}

/// `fe80::/10`.
#[inline]
pub fn is_link_local(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a: Ipv6Addr = "fd00:10::1:2:3".parse().unwrap();
        assert_eq!(solicited_node(a), "ff02::1:ff02:3".parse::<Ipv6Addr>().unwrap());
        assert!(is_solicited_node(solicited_node(a)));
        assert!(!is_solicited_node(ALL_NODES));
        assert_eq!(multicast_mac(solicited_node(a)), [0x33, 0x33, 0xff, 0x02, 0, 3]);
        assert_eq!(multicast_mac(ALL_NODES), ALL_NODES_MAC);
        assert_eq!(eui64_link_local([0x02, 0xf1, 0, 0, 0, 1]), "fe80::f1:ff:fe00:1".parse::<Ipv6Addr>().unwrap());
        assert!(is_link_local("fe80::1".parse().unwrap()));
        assert!(!is_link_local("fd00::1".parse().unwrap()));
    }
}
