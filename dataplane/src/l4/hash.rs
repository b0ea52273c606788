//! Hashes for the fast path, written here because they must be (a) stable across processes and
//! machines for Maglev (several appliances behind ECMP must pick the same backend for a flow)
//! and (b) a few cycles for conntrack. std's SipHash is neither stable-by-contract nor cheap.

/// splitmix64's finaliser: a strong 64-bit mix.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of arbitrary bytes (backend identities; not per packet).
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = mix64(seed ^ 0x9e37_79b9_7f4a_7c15 ^ bytes.len() as u64);
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    h
}

/// Maps a 64-bit hash uniformly onto 0..n without a division (Lemire's multiply-shift).
#[inline(always)]
pub fn reduce(hash: u64, n: u32) -> u32 {
    ((hash as u128 * n as u128) >> 64) as u32
}

/// The folded 128-bit product (wyhash's "mum"): one multiply instruction mixes two words.
#[inline(always)]
pub fn mum(a: u64, b: u64) -> u64 {
    let r = (a as u128) * (b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}
