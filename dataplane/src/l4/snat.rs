//! FullNAT source ports, partitioned per core: the port of a return packet names the core that
//! owns its flow (DESIGN.md), so return traffic can be steered or handed to its owner.

pub const FIRST_PORT: u16 = 1024;
const PORTS: u32 = 65536 - FIRST_PORT as u32;

/// One core's share of the SNAT port space, handed out round robin. A port is reused only for
/// a different backend tuple: the caller checks the reverse key is free in conntrack.
#[derive(Clone, Debug)]
pub struct SnatPorts {
    lo: u16,
    hi: u16,
    /// The last port handed to L4 flows (below it when the top is reserved for L7).
    alloc_hi: u16,
    next: u16,
}

impl SnatPorts {
    /// Core `core` of `cores`: an equal, contiguous slice of 1024..=65535.
    pub fn for_core(core: u16, cores: u16) -> SnatPorts {
        let (lo, hi) = range(core, cores);
        SnatPorts { lo, hi, alloc_hi: hi, next: lo }
    }

    /// Keeps the top `n` ports of this core's range (at most a quarter of it) out of L4
    /// allocation and returns them: the L7 proxy's upstream connections use them, so their
    /// replies come back to this core like FullNAT return traffic.
    pub fn reserve_top(&mut self, n: u16) -> (u16, u16) {
        let n = n.min((self.hi - self.lo) / 4).max(1);
        self.alloc_hi = self.hi - n;
        (self.alloc_hi + 1, self.hi)
    }

    /// Moves the round robin's start `offset` ports (modulo the L4 share) into the range.
    pub fn start_at(&mut self, offset: u64) {
        self.next = port_in((self.lo, self.alloc_hi), offset);
    }

    #[inline]
    pub fn take_next(&mut self) -> u16 {
        let p = self.next;
        self.next = if p >= self.alloc_hi { self.lo } else { p + 1 };
        p
    }

    #[inline(always)]
    pub fn owns(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    pub fn range(&self) -> (u16, u16) {
        (self.lo, self.hi)
    }
}

/// A family's FullNAT source addresses (LVS's local addresses) and which one the next tuple
/// takes. Each port of the core's share is paired with every address in turn before the next
/// port is taken, so a backend sees a tuple (address, port) again only after ports x addresses
/// new flows, and each address's tuples last that much longer in a backend's TIME-WAIT.
#[derive(Clone, Debug)]
pub struct SnatAddrs<A> {
    addrs: Vec<A>,
    next: usize,
    port: u16,
}

impl<A: Copy + PartialEq> SnatAddrs<A> {
    pub fn new(addrs: Vec<A>) -> SnatAddrs<A> {
        SnatAddrs { addrs, next: 0, port: 0 }
    }

    /// The next (address, port): the first address takes a new port from `ports`.
    #[inline]
    pub fn next_tuple(&mut self, ports: &mut SnatPorts) -> Option<(A, u16)> {
        let a = *self.addrs.get(self.next)?;
        if self.next == 0 {
            self.port = ports.take_next();
        }
        self.next += 1;
        if self.next == self.addrs.len() {
            self.next = 0;
        }
        Some((a, self.port))
    }

    /// Whether `a` is one of the addresses (return traffic comes back to them).
    #[inline(always)]
    pub fn contains(&self, a: A) -> bool {
        self.addrs.contains(&a)
    }

    pub fn addrs(&self) -> &[A] {
        &self.addrs
    }
}

fn range(core: u16, cores: u16) -> (u16, u16) {
    let cores = cores.max(1) as u32;
    let chunk = PORTS / cores;
    let lo = FIRST_PORT as u32 + core as u32 * chunk;
    let hi = if core as u32 + 1 == cores { 65535 } else { lo + chunk - 1 };
    (lo as u16, hi as u16)
}

/// The port `offset` places (modulo the range's size) into `lo..=hi`: where a per-process
/// round robin starts.
pub fn port_in((lo, hi): (u16, u16), offset: u64) -> u16 {
    lo + (offset % (u64::from(hi - lo) + 1)) as u16
}

/// Which core owns a SNAT port (None below the SNAT range).
pub fn owner(port: u16, cores: u16) -> Option<u16> {
    if port < FIRST_PORT {
        return None;
    }
    let cores = cores.max(1);
    let chunk = PORTS / cores as u32;
    Some((((port - FIRST_PORT) as u32 / chunk) as u16).min(cores - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_the_range_without_overlap() {
        for cores in [1u16, 2, 3, 7, 16, 64] {
            let mut expect = FIRST_PORT as u32;
            for c in 0..cores {
                let (lo, hi) = range(c, cores);
                assert_eq!(lo as u32, expect);
                assert!(hi >= lo);
                assert_eq!(owner(lo, cores), Some(c));
                assert_eq!(owner(hi, cores), Some(c));
                expect = hi as u32 + 1;
            }
            assert_eq!(expect, 65536);
        }
        assert_eq!(owner(80, 4), None);
    }

    #[test]
    fn a_start_offset_stays_within_the_l4_share_and_wraps() {
        let mut p = SnatPorts::for_core(0, 1);
        let (lo, top) = p.reserve_top(4096);
        assert_eq!((lo, top), (61440, 65535));
        p.start_at(u64::MAX);
        let first = p.take_next();
        assert!((FIRST_PORT..lo).contains(&first), "{first}");
        p.start_at(u64::from(lo - FIRST_PORT) - 1);
        assert_eq!((p.take_next(), p.take_next()), (lo - 1, FIRST_PORT), "the last L4 port, then the first");
    }

    #[test]
    fn each_port_goes_with_every_address_before_the_next_port() {
        let mut ports = SnatPorts::for_core(0, 1);
        let mut a = SnatAddrs::new(vec![10u32, 11, 12]);
        let got: Vec<(u32, u16)> = (0..7).map(|_| a.next_tuple(&mut ports).unwrap()).collect();
        let p = FIRST_PORT;
        assert_eq!(got, [(10, p), (11, p), (12, p), (10, p + 1), (11, p + 1), (12, p + 1), (10, p + 2)]);
        assert!(a.contains(12) && !a.contains(13));
        // One address: the port round robin unchanged.
        let mut ports = SnatPorts::for_core(0, 1);
        let mut one = SnatAddrs::new(vec![10u32]);
        assert_eq!((one.next_tuple(&mut ports), one.next_tuple(&mut ports)), (Some((10, p)), Some((10, p + 1))));
        // None (the family has no address): no tuple.
        assert_eq!(SnatAddrs::<u32>::new(vec![]).next_tuple(&mut ports), None);
    }

    #[test]
    fn round_robin_wraps_within_the_slice() {
        let mut p = SnatPorts::for_core(1, 2);
        let (lo, hi) = p.range();
        assert_eq!(p.take_next(), lo);
        assert_eq!(p.take_next(), lo + 1);
        for _ in 0..(hi - lo - 1) {
            p.take_next();
        }
        assert_eq!(p.take_next(), lo);
    }
}
