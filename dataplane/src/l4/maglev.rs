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

/// Slot -> index into the input backends. Empty when there are no backends.
///
/// Shared (`Arc<[u32]>`): successive snapshots reuse the table of a service whose backends did
/// not change instead of building it again. Reading a slot costs what a `Box<[u32]>` does (the
/// fat pointer sits in the service entry, the slots right after the counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    slots: std::sync::Arc<[u32]>,
}

impl MaglevTable {
    /// Builds the lookup table of size `m` (must be prime and greater than the number of
    /// backends). Backends with weight 0 get no slot.
    pub fn build(backends: &[MaglevInput<'_>], m: u32) -> MaglevTable {
        assert!(is_prime(m), "Maglev table size {m} is not prime");
        let live: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
        if live.is_empty() {
            return MaglevTable { slots: std::sync::Arc::new([]) };
        }
        assert!(live.len() < m as usize, "more backends ({}) than Maglev slots ({m})", live.len());
        let max_w = live.iter().map(|&i| backends[i].weight).max().unwrap() as u64;
        let mut offset = Vec::with_capacity(live.len());
        let mut skip = Vec::with_capacity(live.len());
        for &i in &live {
            offset.push(hash_bytes(backends[i].key, OFFSET_SEED) % m as u64);
            skip.push(hash_bytes(backends[i].key, SKIP_SEED) % (m as u64 - 1) + 1);
        }
        // Each backend's current slot in its permutation (offset + j * skip) mod m, stepped by
        // adding skip and subtracting m once: no division per probe (a 64-bit division per probe
        // was most of the cost of compiling 10,000 services).
        let m64 = m as u64;
        let mut pos = offset.clone();
        let mut credit = vec![0u64; live.len()];
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0u32;
        'fill: loop {
            for (k, &i) in live.iter().enumerate() {
                credit[k] += backends[i].weight as u64;
                while credit[k] >= max_w {
                    credit[k] -= max_w;
                    // Next free slot in this backend's permutation.
                    let step = |c: u64| {
                        let n = c + skip[k];
                        if n >= m64 {
                            n - m64
                        } else {
                            n
                        }
                    };
                    let mut c = pos[k];
                    while slots[c as usize] != u32::MAX {
                        c = step(c);
                    }
                    slots[c as usize] = i as u32;
                    pos[k] = step(c);
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        MaglevTable { slots: slots.into() }
    }

    /// The backend index for a flow hash, or None when there are no backends.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[reduce(flow_hash, self.slots.len() as u32) as usize])
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
    fn empty_and_single() {
        assert_eq!(table(&[], &[], 7).pick(1), None);
        let t = table(&keys(1, 0), &[1], 7);
        assert!(t.slots().iter().all(|&s| s == 0));
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
