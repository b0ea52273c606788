//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4) with weights.
//!
//! Every backend walks its own permutation of the table (offset + j * skip mod M) and claims
//! the first free slot in each of its turns; a backend of weight w takes w turns for every
//! turn of the heaviest backend's max weight, so it ends with a share of the table proportional to
//! its weight. With all weights equal this is the paper's algorithm exactly. M is prime, so
//! every skip in 1..M generates a full permutation.

use super::hash::{hash_bytes, reduce};
pub use fulcrum_config::bootstrap::is_prime;

/// Seeds for the two permutation hashes; fixed so that every appliance builds the same table.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SKIP_SEED: u64 = 0x6d61_676c_6576_3032;

/// A backend as Maglev sees it: a stable identity (e.g. "10.0.0.1:8080") and a weight.
pub struct MaglevInput<'a> {
    pub key: &'a [u8],
    pub weight: u32,
}

const EMPTY: u32 = u32::MAX;

/// One backend's walk through its permutation: slot (offset + j * skip) mod m for j = 0, 1, ...
struct Walk {
    /// The next position of the walk.
    pos: u32,
    skip: u32,
    weight: u32,
    /// Weighted turns owed (only with unequal weights; u64: weights are u32).
    credit: u64,
    backend: u32,
}

/// (a + b) mod m for a, b < m: no division (a 64-bit division per probe was most of the cost
/// of compiling 10,000 services).
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let n = a + b;
    if n >= m {
        n - m
    } else {
        n
    }
}

/// A table being filled.
struct Fill<'a> {
    slots: &'a mut [u32],
    m: u32,
    /// Slots still free.
    left: u32,
}

impl Fill<'_> {
    /// Gives the walk's backend the first free slot on its walk. (Measured no faster, on the
    /// 10,000-table bench: probing 2 to 16 positions per step without a branch, and searching a
    /// list of the free slots by modular inverse once fewer than sqrt(m) are left.)
    #[inline(always)]
    fn claim(&mut self, w: &mut Walk) {
        let mut c = w.pos;
        while self.slots[c as usize] != EMPTY {
            c = add_mod(c, w.skip, self.m);
        }
        self.slots[c as usize] = w.backend;
        w.pos = add_mod(c, w.skip, self.m);
        self.left -= 1;
    }
}

/// Slot -> index into the input backends. Empty when there are no backends.
///
/// Shared (`Arc<[u32]>`): successive snapshots reuse the table of a service whose backends did
/// not change instead of building it again. Reading a slot costs what a `Box<[u32]>` does (the
/// fat pointer sits in the service entry, the slots right after the counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: std::sync::Arc<[u32]>,
}

/// The table of a service without backends.
impl Default for MaglevTable {
    fn default() -> MaglevTable {
        MaglevTable { slots: std::sync::Arc::new([]) }
    }
}

impl MaglevTable {
    /// Builds the lookup table of size `m` (must be prime and greater than the number of
    /// backends). Backends with weight 0 get no slot.
    pub fn build(backends: &[MaglevInput<'_>], m: u32) -> MaglevTable {
        Self::build_with_shares(backends, m).0
    }

    /// `build`, and how many slots each backend got (in input order), counted while filling:
    /// counting afterwards re-reads a table that has left the cache by then.
    pub fn build_with_shares(backends: &[MaglevInput<'_>], m: u32) -> (MaglevTable, Vec<u32>) {
        assert!(is_prime(m), "Maglev table size {m} is not prime");
        // Positions are stepped in u32 (c + skip < 2m).
        assert!(m < 1 << 31, "Maglev table size {m} is too large");
        let mut shares = vec![0u32; backends.len()];
        let mut walks: Vec<Walk> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .map(|(i, b)| Walk {
                pos: (hash_bytes(b.key, OFFSET_SEED) % m as u64) as u32,
                skip: (hash_bytes(b.key, SKIP_SEED) % (m as u64 - 1) + 1) as u32,
                weight: b.weight,
                credit: 0,
                backend: i as u32,
            })
            .collect();
        if walks.is_empty() {
            return (MaglevTable::default(), shares);
        }
        assert!(walks.len() < m as usize, "more backends ({}) than Maglev slots ({m})", walks.len());
        // Filled in place: building a Vec and copying it into the Arc touched twice the memory.
        let mut slots: std::sync::Arc<[u32]> = std::iter::repeat_n(EMPTY, m as usize).collect();
        let mut fill = Fill { slots: std::sync::Arc::get_mut(&mut slots).expect("not shared yet"), m, left: m };
        let max_w = walks.iter().map(|w| w.weight).max().unwrap_or(1);
        let max_credit = max_w as u64;
        if walks.iter().all(|w| w.weight == max_w) {
            // Equal weights (the common case): one slot per backend per round.
            'equal: loop {
                for w in walks.iter_mut() {
                    fill.claim(w);
                    shares[w.backend as usize] += 1;
                    if fill.left == 0 {
                        break 'equal;
                    }
                }
            }
        } else {
            'weighted: loop {
                for w in walks.iter_mut() {
                    w.credit += w.weight as u64;
                    while w.credit >= max_credit {
                        w.credit -= max_credit;
                        fill.claim(w);
                        shares[w.backend as usize] += 1;
                        if fill.left == 0 {
                            break 'weighted;
                        }
                    }
                }
            }
        }
        (MaglevTable { slots }, shares)
    }

    /// The backend index for a flow hash, or None when there are no backends.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[reduce(flow_hash, self.slots.len() as u32) as usize])
    }

    /// The backends of the slots after the one [`MaglevTable::pick`] takes for `flow_hash`,
    /// in table order (wrapping round, each slot once): where a flow goes when its own backend
    /// cannot take it. Every backend's slots lie spread over the table (each walks its own
    /// permutation), so the next slots share that backend's flows among the others in
    /// proportion to their shares, and the same hash always finds the same one.
    pub fn after(&self, flow_hash: u64) -> impl Iterator<Item = u32> + '_ {
        let n = self.slots.len();
        let start = if n == 0 { 0 } else { reduce(flow_hash, n as u32) as usize + 1 };
        (0..n.saturating_sub(1)).map(move |i| self.slots[(start + i) % n])
    }

    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize, salt: u32) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("10.{}.{}.{}:8080", salt % 250, i / 250, i % 250).into_bytes()).collect()
    }

    fn table(keys: &[Vec<u8>], weights: &[u32], m: u32) -> MaglevTable {
        let inputs: Vec<MaglevInput> =
            keys.iter().zip(weights).map(|(k, &w)| MaglevInput { key: k, weight: w }).collect();
        MaglevTable::build(&inputs, m)
    }

    fn counts(t: &MaglevTable, n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &s in t.slots() {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(655373));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }

    #[test]
    fn after_spreads_a_backends_flows_over_the_others() {
        let t = table(&keys(4, 1), &[1; 4], 65537);
        assert_eq!(t.after(0).count(), 65536, "every other slot once");
        let mut seen = [0usize; 4];
        let mut hash = 0x1234_5678_u64;
        for _ in 0..40_000 {
            hash = hash.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if t.pick(hash) != Some(0) {
                continue;
            }
            let first = reduce(hash, 65537) as usize;
            assert_eq!(t.after(hash).next(), Some(t.slots()[(first + 1) % 65537]));
            let next = t.after(hash).find(|&b| b != 0).expect("another backend");
            seen[next as usize] += 1;
        }
        let moved: usize = seen.iter().sum();
        assert!(moved > 9_000, "{moved} flows of backend 0");
        for (b, &n) in seen.iter().enumerate().skip(1) {
            assert!(n * 3 > moved * 85 / 100 && n * 3 < moved * 115 / 100, "backend {b}: {n} of {moved}");
        }
        assert_eq!(table(&[], &[], 7).after(1).count(), 0);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(table(&[], &[], 7).pick(1), None);
        let t = table(&keys(1, 0), &[1], 7);
        assert!(t.slots().iter().all(|&s| s == 0));
    }

    /// The algorithm as the paper writes it (one modulo per probe), with the weighted turns:
    /// the fast build must give exactly this table, or appliances of different versions (and
    /// the golden packet fixtures) would disagree.
    fn reference(keys: &[Vec<u8>], weights: &[u32], m: u32) -> Vec<u32> {
        let live: Vec<usize> = (0..keys.len()).filter(|&i| weights[i] > 0).collect();
        if live.is_empty() {
            return Vec::new();
        }
        let max_w = live.iter().map(|&i| weights[i] as u64).max().unwrap();
        let offset: Vec<u64> = live.iter().map(|&i| hash_bytes(&keys[i], OFFSET_SEED) % m as u64).collect();
        let skip: Vec<u64> = live.iter().map(|&i| hash_bytes(&keys[i], SKIP_SEED) % (m as u64 - 1) + 1).collect();
        let mut next = vec![0u64; live.len()];
        let mut credit = vec![0u64; live.len()];
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0;
        loop {
            for (k, &i) in live.iter().enumerate() {
                credit[k] += weights[i] as u64;
                while credit[k] >= max_w {
                    credit[k] -= max_w;
                    let mut c = (offset[k] + next[k] * skip[k]) % m as u64;
                    while slots[c as usize] != u32::MAX {
                        next[k] += 1;
                        c = (offset[k] + next[k] * skip[k]) % m as u64;
                    }
                    slots[c as usize] = i as u32;
                    next[k] += 1;
                    filled += 1;
                    if filled == m {
                        return slots;
                    }
                }
            }
        }
    }

    #[test]
    fn same_input_same_table() {
        let k = keys(10, 3);
        assert_eq!(table(&k, &[1; 10], 1009), table(&k, &[1; 10], 1009));
    }

    #[test]
    fn weights_give_proportional_shares() {
        let k = keys(3, 1);
        let t = table(&k, &[1, 2, 3], 65537);
        let c = counts(&t, 3);
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let fair = 65537.0 * w / 6.0;
            assert!((c[i] as f64 - fair).abs() / fair < 0.01, "backend {i}: {} vs {fair}", c[i]);
        }
        // Weight zero gets nothing.
        let t = table(&k, &[1, 0, 1], 1009);
        assert_eq!(counts(&t, 3)[1], 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Exactly the paper's table, and shares that count it.
        #[test]
        fn matches_the_reference(n in 0usize..=40, salt in any::<u32>(), m in prop::sample::select(vec![7u32, 251, 1021, 65537]),
                                 weights in prop::collection::vec(0u32..=5, 40), equal in any::<bool>()) {
            prop_assume!((n as u32) < m);
            let k = keys(n, salt);
            let w: Vec<u32> = if equal { vec![1; n] } else { weights[..n].to_vec() };
            let inputs: Vec<MaglevInput> = k.iter().zip(&w).map(|(k, &w)| MaglevInput { key: k, weight: w }).collect();
            let (t, shares) = MaglevTable::build_with_shares(&inputs, m);
            prop_assert_eq!(t.slots(), &reference(&k, &w, m)[..]);
            let mut counted = vec![0u32; n];
            for &s in t.slots() {
                counted[s as usize] += 1;
            }
            prop_assert_eq!(shares, counted);
        }

        /// Each backend within 1% of its fair share when M >= 100 x N.
        #[test]
        fn balance(n in 1usize..=200, salt in any::<u32>()) {
            let m = 65537u32;
            prop_assume!(m as usize >= 100 * n);
            let t = table(&keys(n, salt), &vec![1; n], m);
            let fair = m as f64 / n as f64;
            for (i, c) in counts(&t, n).into_iter().enumerate() {
                // The algorithm's own rounding: shares differ by at most one slot per round.
                let dev = (c as f64 - fair).abs() / fair;
                prop_assert!(dev <= 0.01 || (c as f64 - fair).abs() <= 1.0, "backend {i}: {c} vs fair {fair:.1}");
            }
        }

        /// Removing one of N backends moves that backend's slots and at most 2% more of the table.
        #[test]
        fn disruption(n in 2usize..=200, victim in any::<prop::sample::Index>(), salt in any::<u32>()) {
            let m = 65537u32;
            prop_assume!(m as usize >= 100 * n);
            let k = keys(n, salt);
            let before = table(&k, &vec![1; n], m);
            let v = victim.index(n);
            let kept: Vec<Vec<u8>> = k.iter().enumerate().filter(|(i, _)| *i != v).map(|(_, k)| k.clone()).collect();
            let after = table(&kept, &vec![1; n - 1], m);
            // Map "after" indices back to original indices.
            let orig = |j: u32| if (j as usize) < v { j } else { j + 1 };
            let mut extra = 0usize;
            for (s, &b) in before.slots().iter().enumerate() {
                if b as usize != v && orig(after.slots()[s]) != b {
                    extra += 1;
                }
            }
            let frac = extra as f64 / m as f64;
            prop_assert!(frac <= 0.02, "removing 1 of {n} moved {:.3}% extra", frac * 100.0);
        }
    }
}
