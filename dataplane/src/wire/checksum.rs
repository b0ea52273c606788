//! Internet checksum helpers, including incremental updates (RFC 1624), which smoltcp 0.14
//! does not offer: rewriting an address must not re-sum the whole segment on the fast path.

/// One's-complement sum of `data` as 16-bit big-endian words (odd length padded with zero),
/// not folded, not complemented.
#[inline]
pub fn ones_sum(data: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    fold64(sum)
}

#[inline]
fn fold64(mut sum: u64) -> u32 {
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Folds a 32-bit one's-complement sum to 16 bits (not complemented).
#[inline]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field value for `data` (complement of the folded sum).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data))
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one 16-bit word changing from `old` to `new`.
#[inline]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum as u32) + (!old as u32 & 0xffff) + new as u32;
    !fold(sum)
}

/// RFC 1624 update for a 32-bit field (e.g. an IPv4 address).
#[inline]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum as u32) + (!(old >> 16) & 0xffff) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// RFC 1624 update for an even-length byte field (e.g. an IPv6 address).
#[inline]
pub fn update_bytes(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    debug_assert_eq!(old.len() % 2, 0);
    let mut sum: u64 = (!csum) as u64;
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += (!u16::from_be_bytes([o[0], o[1]])) as u64 & 0xffff;
        sum += u16::from_be_bytes([n[0], n[1]]) as u64;
    }
    !fold(fold64(sum))
}

/// A precomputed difference: `apply(csum)` adds it to a checksum in one step. Built once per
/// flow (old fields -> new fields) so that the per-packet rewrite is one add and fold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(pub u16);

impl Delta {
    /// The delta that turns a sum over `old` words into a sum over `new` words.
    pub fn between(old: &[u8], new: &[u8]) -> Delta {
        // Using update_bytes on a checksum of 0xffff (sum 0) yields ~(delta) folded.
        Delta(!update_bytes(0xffff, old, new))
    }
    #[inline]
    pub fn apply(self, csum: u16) -> u16 {
        let sum = (!csum as u32) + self.0 as u32;
        !fold(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn incremental_equals_full_recompute(mut data in proptest::collection::vec(any::<u8>(), 8..64),
                                             at in 0usize..3, new in any::<[u8; 4]>()) {
            if data.len() % 2 == 1 { data.pop(); }
            let off = at * 2;
            let before = checksum(&data);
            let old: [u8; 4] = data[off..off + 4].try_into().unwrap();
            data[off..off + 4].copy_from_slice(&new);
            let full = checksum(&data);
            let inc32 = update32(before, u32::from_be_bytes(old), u32::from_be_bytes(new));
            let incb = update_bytes(before, &old, &new);
            let delta = Delta::between(&old, &new).apply(before);
            // 0x0000 and 0xffff are the same one's-complement value; compare as sums.
            let eq = |a: u16, b: u16| a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0);
            prop_assert!(eq(full, inc32), "full {full:#x} inc32 {inc32:#x}");
            prop_assert!(eq(full, incb), "full {full:#x} bytes {incb:#x}");
            prop_assert!(eq(full, delta), "full {full:#x} delta {delta:#x}");
        }
    }

    #[test]
    fn known_ipv4_header() {
        // RFC 1071-style example: header from Wikipedia's IPv4 checksum article.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        assert_eq!(update16(0xb861, 0x0073, 0x0073), 0xb861);
    }
}
