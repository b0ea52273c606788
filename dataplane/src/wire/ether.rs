//! Ethernet with an optional 802.1Q tag: where the L3 header starts and what it is.
//! smoltcp's `EthernetFrame` has no VLAN support, so the tag is read here.

use crate::stats::DropReason;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Info {
    /// Offset of the L3 header.
    pub l3_off: usize,
    /// Ethertype after any VLAN tag.
    pub ethertype: u16,
    /// The 802.1Q VLAN id, if tagged.
    pub vlan: Option<u16>,
}

/// Reads the Ethernet header and one optional 802.1Q tag.
#[inline]
pub fn parse_l2(frame: &[u8]) -> Result<L2Info, DropReason> {
    if frame.len() < ETH_HLEN {
        return Err(DropReason::EthTruncated);
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    if et != ETHERTYPE_VLAN {
        return Ok(L2Info { l3_off: ETH_HLEN, ethertype: et, vlan: None });
    }
    if frame.len() < ETH_HLEN + VLAN_HLEN {
        return Err(DropReason::VlanTruncated);
    }
    let tci = u16::from_be_bytes([frame[14], frame[15]]);
    let inner = u16::from_be_bytes([frame[16], frame[17]]);
    Ok(L2Info { l3_off: ETH_HLEN + VLAN_HLEN, ethertype: inner, vlan: Some(tci & 0x0fff) })
}

#[inline]
pub fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[0..6].try_into().unwrap()
}

#[inline]
pub fn src_mac(frame: &[u8]) -> [u8; 6] {
    frame[6..12].try_into().unwrap()
}

/// Writes destination and source MACs.
#[inline]
pub fn set_macs(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_and_tagged() {
        let mut f = [0u8; 18];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(parse_l2(&f).unwrap(), L2Info { l3_off: 14, ethertype: ETHERTYPE_IPV4, vlan: None });
        f[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f[14..16].copy_from_slice(&0x2064u16.to_be_bytes());
        f[16..18].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        assert_eq!(parse_l2(&f).unwrap(), L2Info { l3_off: 18, ethertype: ETHERTYPE_IPV6, vlan: Some(100) });
        assert_eq!(parse_l2(&f[..16]), Err(DropReason::VlanTruncated));
        assert_eq!(parse_l2(&f[..13]), Err(DropReason::EthTruncated));
    }
}
