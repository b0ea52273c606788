//! Per-core connection tracking: a preallocated, bounded table of flows, each reachable by its
//! forward key (client -> VIP) and, for FullNAT, its reverse key (backend -> SNAT address).
//!
//! Layout, chosen for 1M+ flows per core (see DESIGN.md "What 1M flows cost"):
//! - Buckets are one cache line: 7 (signature, slot) pairs and a spill count. A key lives in its
//!   primary bucket, or in an alternative bucket when the primary is full (the primary's spill
//!   count says whether to look there, so a lookup is one line in the common case).
//! - Flow records live in a separate array, one 64-byte line for IPv4 and two for IPv6; the
//!   signature check avoids touching records that cannot match.
//! - Lookups are split into stages (`prefetch_bucket`, `candidate`, `verify`) so a worker can
//!   overlap the misses of a whole burst.
//! - Everything is allocated up front on huge pages; nothing allocates per packet.
//!
//! Written here rather than taken from a crate because none offers bounded, preallocated,
//! prefetchable, two-key entries with per-state timeouts.

use super::hash::mum;
use crate::mem::{prefetch, HugeArray, Zeroable};
use crate::neigh::NeighborRef;
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address family's address as a plain integer.
pub trait Addr: Copy + Eq + Default + Debug + 'static {
    fn to_ip(self) -> IpAddr;
    fn from_ip(ip: IpAddr) -> Option<Self>;
    /// Two words for hashing.
    fn words(self) -> (u64, u64);
    /// Big-endian bytes (4 or 16).
    fn write_be(self, out: &mut [u8]);
    fn read_be(b: &[u8]) -> Self;
    const LEN: usize;
}

impl Addr for u32 {
    const LEN: usize = 4;
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }
    fn from_ip(ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => Some(a.into()),
            IpAddr::V6(_) => None,
        }
    }
    #[inline(always)]
    fn words(self) -> (u64, u64) {
        (self as u64, 0)
    }
    #[inline(always)]
    fn write_be(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_be_bytes())
    }
    #[inline(always)]
    fn read_be(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }
}

impl Addr for u128 {
    const LEN: usize = 16;
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
    fn from_ip(ip: IpAddr) -> Option<u128> {
        match ip {
            IpAddr::V6(a) => Some(a.into()),
            IpAddr::V4(_) => None,
        }
    }
    #[inline(always)]
    fn words(self) -> (u64, u64) {
        (self as u64, (self >> 64) as u64)
    }
    #[inline(always)]
    fn write_be(self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.to_be_bytes())
    }
    #[inline(always)]
    fn read_be(b: &[u8]) -> u128 {
        u128::from_be_bytes(b[..16].try_into().unwrap())
    }
}

/// A 5-tuple as seen on the wire in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowKey<A: Addr> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: Addr> FlowKey<A> {
    /// Seeded hash for the table. The seed enters both factors of the multiply, so a remote
    /// sender who does not know it cannot choose keys that collide (or zero a factor).
    #[inline(always)]
    pub fn hash(&self, seed: u64) -> u64 {
        let (s0, s1) = self.src.words();
        let (d0, d1) = self.dst.words();
        let ports = ((self.sport as u64) << 24) | ((self.dport as u64) << 8) | self.proto as u64;
        // IPv4: src << 32 | dst exactly; IPv6: the high words folded in first.
        let mut a = s0.rotate_left(32) ^ d0;
        let mut b = ports;
        if A::LEN == 16 {
            a ^= mum(s1 ^ seed.rotate_left(11) ^ 0x2d35_8dcc_aa6c_78a5, d1 ^ 0x8bb8_4b93_962e_acc9);
            b ^= (s1 >> 32) ^ (d1 << 40);
        }
        // One 64x64->128 multiply of two seeded words mixes every input bit into the middle
        // of the product (wyhash's core); the shift brings the high half into the bucket bits.
        let x = mum(a ^ seed ^ 0xa076_1d64_78bd_642f, b ^ seed.rotate_left(29) ^ 0xe703_7ed1_a0b4_28db);
        x ^ (x >> 29)
    }
}

/// Connection state; selects the idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum FlowState {
    #[default]
    Free = 0,
    /// A SYN seen, no answer yet.
    TcpSynSent = 1,
    TcpEstablished = 2,
    /// A FIN seen in at least one direction.
    TcpFin = 3,
    /// RST seen or both FINs: the flow lingers briefly for stragglers, then goes.
    TcpClosed = 4,
    Udp = 5,
    /// Both FINs, the backend's first: the backend now holds the tuple in TIME-WAIT. Kept
    /// as long (`tcp_time_wait`) so that the SNAT port allocator does not give the same tuple
    /// to a new client meanwhile (a SYN on it would meet the old connection's ACK).
    TcpTimeWait = 6,
}

pub const STATES: usize = 7;

/// Which of a flow's keys matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client -> VIP.
    Fwd,
    /// Backend -> appliance (FullNAT return traffic).
    Rev,
}

/// TCP flags as they appear in byte 13 of the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// One tracked flow. The forward key is what the client sends; `rev` is what the backend
/// sends back under FullNAT (src = backend, dst = SNAT address). Under DSR `rev` only holds the
/// backend's address and port and is not indexed.
/// Cache-line aligned: an IPv4 record is exactly one line (so one prefetch brings all of it),
/// an IPv6 record two.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub struct Flow<A: Addr> {
    pub fwd: FlowKey<A>,
    pub rev: FlowKey<A>,
    /// Idle deadline, milliseconds on the worker's wrapping clock.
    pub deadline: u32,
    pub state: FlowState,
    /// Forwarding mode (`Mode as u8`).
    pub mode: u8,
    /// Whether `rev` is in the index.
    pub has_rev: bool,
    /// FIN seen from the client (bit 0) and from the backend (bit 1).
    pub fins: u8,
    /// Snapshot index of the service and of the backend (for counters).
    pub service: u16,
    /// Neighbour-table entry of the next hop towards the backend / towards the client.
    pub neigh_fwd: NeighborRef,
    pub backend: u32,
    pub neigh_rev: NeighborRef,
    /// Precomputed checksum differences for the forward rewrite (the reverse is their
    /// complement): IPv4 header (addresses), and L4 (pseudo-header addresses and ports).
    pub ip_delta: u16,
    pub l4_delta: u16,
    /// Next free record while on the free list.
    pub next_free: u32,
}

// SAFETY: all-zero is a valid Flow (Free state, zero keys).
unsafe impl<A: Addr> Zeroable for Flow<A> {}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket {
    sig: [u32; SLOTS],
    /// Keys whose primary bucket is this one but that live in their alternative bucket.
    spill: u32,
    slot: [u32; SLOTS],
    _pad: u32,
}

// SAFETY: all-zero = all slots empty, no spill.
unsafe impl Zeroable for Bucket {}

const SLOTS: usize = 7;
const REV_BIT: u32 = 1 << 31;
/// Returned by `candidate` when the primary bucket has no matching signature.
pub const NO_CANDIDATE: u32 = u32::MAX;
const NIL: u32 = u32::MAX;

/// Idle timeouts per state in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct TimeoutsMs(pub [u32; STATES]);

impl TimeoutsMs {
    pub fn from_config(t: &fulcrum_config::bootstrap::Timeouts) -> Self {
        let mut a = [0u32; STATES];
        a[FlowState::TcpSynSent as usize] = t.tcp_syn * 1000;
        a[FlowState::TcpEstablished as usize] = t.tcp_established * 1000;
        a[FlowState::TcpFin as usize] = t.tcp_fin * 1000;
        a[FlowState::TcpClosed as usize] = t.tcp_closed * 1000;
        a[FlowState::TcpTimeWait as usize] = t.tcp_time_wait * 1000;
        a[FlowState::Udp as usize] = t.udp * 1000;
        TimeoutsMs(a)
    }
}

/// What an insert did besides inserting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    pub expired: u32,
    pub evicted: u32,
}

/// Counters the table keeps itself; the worker copies them into `CoreStats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounters {
    pub inserts: u64,
    pub expired: u64,
    pub evictions: u64,
}

pub struct Conntrack<A: Addr> {
    buckets: HugeArray<Bucket>,
    mask: usize,
    flows: HugeArray<Flow<A>>,
    /// Freed records, linked through `next_free`.
    free_head: u32,
    /// Records at and beyond this index have never been used: a new table touches no pages.
    fresh: u32,
    live: u32,
    seed: u64,
    /// Clock hand for the incremental expiry sweep.
    hand: u32,
    timeouts: TimeoutsMs,
    pub counters: CtCounters,
}

#[inline(always)]
fn expired(deadline: u32, now: u32) -> bool {
    (now.wrapping_sub(deadline) as i32) >= 0
}

/// Bit i set when slot i's signature equals `sig`: all seven compared at once.
#[inline(always)]
fn sig_matches(b: &Bucket, sig: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86_64; the two loads cover sig[0..7] and spill, 32 bytes
        // inside the 64-byte bucket (repr(C)).
        unsafe {
            let p = b as *const Bucket as *const __m128i;
            let k = _mm_set1_epi32(sig as i32);
            let lo = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(_mm_loadu_si128(p), k)));
            let hi = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(_mm_loadu_si128(p.add(1)), k)));
            ((lo | (hi << 4)) & 0x7f) as u32
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (0..SLOTS).filter(|&i| b.sig[i] == sig).fold(0, |m, i| m | 1 << i)
    }
}

#[inline(always)]
fn sig_of(h: u64) -> u32 {
    ((h >> 32) as u32) | 1
}

/// Records examined per eviction attempt when the table is full.
const EVICT_SCAN: u32 = 32;

impl<A: Addr> Conntrack<A> {
    fn buckets_for(capacity: u32) -> usize {
        (capacity as usize * 2 * 2).div_ceil(SLOTS).next_power_of_two().max(2)
    }

    /// The memory a table for `capacity` flows takes (all of it committed at creation).
    pub fn bytes_for(capacity: u32) -> usize {
        let capacity = capacity.clamp(1, REV_BIT - 1);
        HugeArray::<Bucket>::bytes_for(Self::buckets_for(capacity)) + HugeArray::<Flow<A>>::bytes_for(capacity as usize)
    }

    /// A table for `capacity` flows. Buckets are sized for at most ~50% slot load with both keys
    /// of every flow present.
    pub fn new(capacity: u32, timeouts: TimeoutsMs, seed: u64) -> std::io::Result<Self> {
        let capacity = capacity.clamp(1, REV_BIT - 1);
        let nb = Self::buckets_for(capacity);
        Ok(Conntrack {
            buckets: HugeArray::new(nb)?,
            mask: nb - 1,
            flows: HugeArray::new(capacity as usize)?,
            free_head: NIL,
            fresh: 0,
            live: 0,
            seed,
            hand: 0,
            timeouts,
            counters: CtCounters::default(),
        })
    }

    pub fn capacity(&self) -> u32 {
        self.flows.len() as u32
    }

    /// Flows held now (including expired ones not yet reclaimed).
    pub fn len(&self) -> u32 {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Memory the table may use once every page is touched.
    pub fn mapped_bytes(&self) -> usize {
        self.buckets.mapped_bytes() + self.flows.mapped_bytes()
    }

    pub fn timeouts(&self) -> &TimeoutsMs {
        &self.timeouts
    }

    #[inline(always)]
    pub fn hash(&self, key: &FlowKey<A>) -> u64 {
        key.hash(self.seed)
    }

    #[inline(always)]
    fn primary(&self, h: u64) -> usize {
        h as usize & self.mask
    }

    #[inline(always)]
    fn alternative(&self, h: u64) -> usize {
        let p = self.primary(h);
        let a = (p ^ (sig_of(h).wrapping_mul(0x5bd1_e995) as usize)) & self.mask;
        if a == p {
            p ^ 1
        } else {
            a
        }
    }

    /// Stage 1: start loading the key's primary bucket.
    #[inline(always)]
    pub fn prefetch_bucket(&self, h: u64) {
        prefetch(&self.buckets[self.primary(h)]);
    }

    /// Stage 2: the first slot in the primary bucket whose signature matches (the flow record
    /// is prefetched), or NO_CANDIDATE. Confirm with `verify`, fall back to `lookup`.
    #[inline(always)]
    pub fn candidate(&self, h: u64) -> u32 {
        let b = &self.buckets[self.primary(h)];
        let hits = sig_matches(b, sig_of(h));
        if hits == 0 {
            return NO_CANDIDATE;
        }
        let slot = b.slot[hits.trailing_zeros() as usize];
        let rec = &self.flows[(slot & !REV_BIT) as usize] as *const Flow<A>;
        prefetch(rec);
        if std::mem::size_of::<Flow<A>>() > 64 {
            prefetch((rec as *const u8).wrapping_add(64));
        }
        slot
    }

    /// Stage 3: does the candidate slot hold `key`? Returns the flow index and direction.
    #[inline(always)]
    pub fn verify(&self, slot: u32, key: &FlowKey<A>) -> Option<(u32, Dir)> {
        if slot == NO_CANDIDATE {
            return None;
        }
        let idx = slot & !REV_BIT;
        let f = &self.flows[idx as usize];
        // A candidate taken earlier in the burst may name a record removed since (a live flow
        // can be removed for another's sake: a SNAT tuple taken back), which still holds its keys.
        if f.state == FlowState::Free {
            return None;
        }
        if slot & REV_BIT == 0 {
            (f.fwd == *key).then_some((idx, Dir::Fwd))
        } else {
            (f.rev == *key).then_some((idx, Dir::Rev))
        }
    }

    /// Whether a miss on the candidate path needs the full lookup (another candidate in the
    /// primary bucket, or keys spilled to the alternative bucket).
    #[inline(always)]
    pub fn needs_full_lookup(&self, h: u64, slot: u32) -> bool {
        slot != NO_CANDIDATE || self.buckets[self.primary(h)].spill != 0
    }

    /// Full lookup: every matching signature in the primary bucket, then the alternative
    /// bucket if anything spilled.
    pub fn lookup(&self, key: &FlowKey<A>, h: u64) -> Option<(u32, Dir)> {
        let sig = sig_of(h);
        let p = self.primary(h);
        if let Some(r) = self.scan(p, sig, key) {
            return Some(r);
        }
        if self.buckets[p].spill != 0 {
            return self.scan(self.alternative(h), sig, key);
        }
        None
    }

    fn scan(&self, b: usize, sig: u32, key: &FlowKey<A>) -> Option<(u32, Dir)> {
        let b = &self.buckets[b];
        (0..SLOTS).filter(|&i| b.sig[i] == sig).find_map(|i| self.verify(b.slot[i], key))
    }

    #[inline(always)]
    pub fn flow(&self, idx: u32) -> &Flow<A> {
        &self.flows[idx as usize]
    }

    #[inline(always)]
    pub fn flow_mut(&mut self, idx: u32) -> &mut Flow<A> {
        &mut self.flows[idx as usize]
    }

    /// Whether the flow's idle deadline has passed.
    #[inline(always)]
    pub fn is_expired(&self, idx: u32, now: u32) -> bool {
        expired(self.flows[idx as usize].deadline, now)
    }

    /// A packet of a live flow in direction `dir`: advances the TCP state (UDP keeps its own),
    /// pushes the deadline out and returns a copy of the record, all in one access.
    #[inline(always)]
    pub fn refresh(&mut self, idx: u32, dir: Dir, proto: u8, tcp_flags: u8, now: u32) -> Flow<A> {
        let f = &mut self.flows[idx as usize];
        if proto == 6 {
            f.state = tcp_next_state(f.state, &mut f.fins, dir, tcp_flags);
        }
        f.deadline = now.wrapping_add(self.timeouts.0[f.state as usize]);
        *f
    }

    /// Inserts a new flow (its keys must not be present). The table never grows: when every
    /// record is taken, an expired flow is reclaimed, else the flow nearest its deadline among a
    /// few examined is evicted; the same when both buckets of a key are full. Returns the index.
    pub fn insert(&mut self, mut flow: Flow<A>, now: u32) -> (u32, InsertOutcome) {
        let mut out = InsertOutcome::default();
        let idx = self.alloc_record(now, &mut out);
        flow.deadline = now.wrapping_add(self.timeouts.0[flow.state as usize]);
        flow.next_free = NIL;
        self.flows[idx as usize] = flow;
        self.live += 1;
        self.counters.inserts += 1;
        let hf = self.hash(&flow.fwd);
        self.place(hf, idx, now, &mut out);
        if flow.has_rev {
            let hr = self.hash(&flow.rev);
            self.place(hr, idx | REV_BIT, now, &mut out);
        }
        (idx, out)
    }

    fn alloc_record(&mut self, now: u32, out: &mut InsertOutcome) -> u32 {
        if self.free_head == NIL && self.fresh < self.capacity() {
            self.fresh += 1;
            return self.fresh - 1;
        }
        if self.free_head == NIL {
            self.reclaim_one(now, out);
        }
        let idx = self.free_head;
        debug_assert_ne!(idx, NIL);
        self.free_head = self.flows[idx as usize].next_free;
        idx
    }

    /// Frees one record: the first expired one after the clock hand, else the one nearest its
    /// deadline among those examined (an eviction of a live flow, counted).
    fn reclaim_one(&mut self, now: u32, out: &mut InsertOutcome) {
        let cap = self.capacity();
        let mut victim = NIL;
        let mut victim_left = u32::MAX;
        for _ in 0..EVICT_SCAN.min(cap) {
            let i = self.hand;
            self.hand = (self.hand + 1) % cap;
            let f = &self.flows[i as usize];
            if f.state == FlowState::Free {
                continue;
            }
            if expired(f.deadline, now) {
                self.remove_expired(i);
                out.expired += 1;
                return;
            }
            let left = f.deadline.wrapping_sub(now);
            if left < victim_left {
                victim_left = left;
                victim = i;
            }
        }
        if victim == NIL {
            // Every record examined was free, so free_head cannot be NIL: not reachable, but
            // fall back to the first record rather than corrupt the table.
            victim = 0;
        }
        self.remove(victim);
        self.counters.evictions += 1;
        out.evicted += 1;
    }

    fn place(&mut self, h: u64, slot: u32, now: u32, out: &mut InsertOutcome) {
        let sig = sig_of(h);
        let p = self.primary(h);
        if let Some(i) = self.buckets[p].sig.iter().position(|&s| s == 0) {
            self.buckets[p].sig[i] = sig;
            self.buckets[p].slot[i] = slot;
            return;
        }
        let a = self.alternative(h);
        if self.buckets[a].sig.iter().all(|&s| s != 0) && self.relocate_one(p) {
            let i = self.buckets[p].sig.iter().position(|&s| s == 0).expect("relocation freed a slot");
            self.buckets[p].sig[i] = sig;
            self.buckets[p].slot[i] = slot;
            return;
        }
        if self.buckets[a].sig.iter().all(|&s| s != 0) && !self.relocate_one(a) {
            // Both full and nothing movable: evict the flow nearest its deadline from the alternative bucket
            // (never the flow being placed, which cannot be there yet).
            let victim = (0..SLOTS)
                .map(|i| self.buckets[a].slot[i] & !REV_BIT)
                .filter(|&v| v != slot & !REV_BIT)
                .min_by_key(|&v| self.flows[v as usize].deadline.wrapping_sub(now))
                .expect("a full bucket holds another flow");
            if expired(self.flows[victim as usize].deadline, now) {
                self.counters.expired += 1;
                out.expired += 1;
            } else {
                self.counters.evictions += 1;
                out.evicted += 1;
            }
            self.remove(victim);
            // Removing may have freed a slot in the primary bucket too.
            if let Some(i) = self.buckets[p].sig.iter().position(|&s| s == 0) {
                self.buckets[p].sig[i] = sig;
                self.buckets[p].slot[i] = slot;
                return;
            }
        }
        let i = self.buckets[a].sig.iter().position(|&s| s == 0).expect("a slot was freed");
        self.buckets[a].sig[i] = sig;
        self.buckets[a].slot[i] = slot;
        self.buckets[p].spill += 1;
    }

    /// Cuckoo step: moves one key out of full bucket `b` into its other bucket, if that has
    /// room, keeping the spill counts right. Rare (both of a key's buckets full), so reading
    /// the records to rehash their keys is fine.
    fn relocate_one(&mut self, b: usize) -> bool {
        for i in 0..SLOTS {
            let slot = self.buckets[b].slot[i];
            let f = &self.flows[(slot & !REV_BIT) as usize];
            let key = if slot & REV_BIT == 0 { f.fwd } else { f.rev };
            let h = self.hash(&key);
            let (p, a) = (self.primary(h), self.alternative(h));
            let other = if b == p { a } else { p };
            if let Some(j) = self.buckets[other].sig.iter().position(|&s| s == 0) {
                self.buckets[other].sig[j] = self.buckets[b].sig[i];
                self.buckets[other].slot[j] = slot;
                self.buckets[b].sig[i] = 0;
                if b == p {
                    self.buckets[p].spill += 1;
                } else {
                    self.buckets[p].spill -= 1;
                }
                return true;
            }
        }
        false
    }

    fn unplace(&mut self, h: u64, slot: u32) {
        let sig = sig_of(h);
        let p = self.primary(h);
        if let Some(i) = (0..SLOTS).find(|&i| self.buckets[p].sig[i] == sig && self.buckets[p].slot[i] == slot) {
            self.buckets[p].sig[i] = 0;
            return;
        }
        let a = self.alternative(h);
        if let Some(i) = (0..SLOTS).find(|&i| self.buckets[a].sig[i] == sig && self.buckets[a].slot[i] == slot) {
            self.buckets[a].sig[i] = 0;
            self.buckets[p].spill -= 1;
            return;
        }
        debug_assert!(false, "flow key not found in its buckets");
    }

    /// Removes a flow found past its deadline before the sweep reached it, counted as expired.
    pub fn remove_expired(&mut self, idx: u32) {
        self.remove(idx);
        self.counters.expired += 1;
    }

    /// Removes a flow and returns its record to the free list.
    pub fn remove(&mut self, idx: u32) {
        let f = self.flows[idx as usize];
        if f.state == FlowState::Free {
            return;
        }
        self.unplace(self.hash(&f.fwd), idx);
        if f.has_rev {
            self.unplace(self.hash(&f.rev), idx | REV_BIT);
        }
        let r = &mut self.flows[idx as usize];
        r.state = FlowState::Free;
        r.next_free = self.free_head;
        self.free_head = idx;
        self.live -= 1;
    }

    /// Incremental expiry: examines up to `budget` records after the clock hand and removes
    /// the expired ones. Called once per burst so reclaiming never stalls a worker.
    pub fn sweep(&mut self, now: u32, budget: u32) -> u32 {
        let used = self.fresh;
        if used == 0 {
            return 0;
        }
        let mut n = 0;
        for _ in 0..budget.min(used) {
            let i = self.hand % used;
            self.hand = (i + 1) % used;
            let f = &self.flows[i as usize];
            if f.state != FlowState::Free && expired(f.deadline, now) {
                self.remove(i);
                n += 1;
            }
        }
        self.counters.expired += n as u64;
        n
    }

    /// Every live flow index (for dumps and tests; walks the whole table).
    pub fn iter_live(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.fresh).filter(|&i| self.flows[i as usize].state != FlowState::Free)
    }
}

/// TCP state machine, as IPVS and Linux conntrack simplify it for a load balancer.
/// `dir` is who sent the segment; `fins` tracks FINs per side.
#[inline]
pub fn tcp_next_state(state: FlowState, fins: &mut u8, dir: Dir, flags: u8) -> FlowState {
    use tcp_flags::*;
    if flags & RST != 0 {
        return FlowState::TcpClosed;
    }
    if flags & SYN != 0 && flags & ACK == 0 && dir == Dir::Fwd {
        // A new SYN on a closed flow (client port reuse) starts over; on a live one it is a
        // retransmission. The same client port means the same client stack, whose sequence
        // numbers (and timestamps) for the tuple only grow: the backend takes it over its
        // TIME-WAIT.
        if matches!(state, FlowState::TcpClosed | FlowState::TcpTimeWait | FlowState::Free) {
            *fins = 0;
            return FlowState::TcpSynSent;
        }
        return state;
    }
    if flags & FIN != 0 {
        let before = *fins;
        *fins |= if dir == Dir::Fwd { 1 } else { 2 };
        return match (before, *fins) {
            // A retransmitted FIN changes nothing.
            (3, _) => state,
            // The client's FIN after the backend's: the backend closed first.
            (2, 3) => FlowState::TcpTimeWait,
            (_, 3) => FlowState::TcpClosed,
            _ => FlowState::TcpFin,
        };
    }
    match state {
        FlowState::TcpSynSent if flags & ACK != 0 => FlowState::TcpEstablished,
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn timeouts() -> TimeoutsMs {
        TimeoutsMs::from_config(&fulcrum_config::bootstrap::Timeouts::default())
    }

    fn key(i: u32) -> FlowKey<u32> {
        FlowKey { src: 0xc633_6400 + i, dst: 0x0a14_000a, sport: (i % 60000) as u16 + 1024, dport: 80, proto: 6 }
    }

    fn flow(i: u32, with_rev: bool) -> Flow<u32> {
        Flow {
            fwd: key(i),
            rev: FlowKey { src: 0x0a1e_000b, dst: 0x0a0a_0002, sport: 8080, dport: i as u16, proto: 6 },
            has_rev: with_rev,
            state: FlowState::TcpSynSent,
            ..Default::default()
        }
    }

    fn find(ct: &Conntrack<u32>, k: &FlowKey<u32>) -> Option<(u32, Dir)> {
        let h = ct.hash(k);
        let c = ct.candidate(h);
        ct.verify(c, k).or_else(|| if ct.needs_full_lookup(h, c) { ct.lookup(k, h) } else { None })
    }

    #[test]
    fn a_candidate_taken_before_a_remove_matches_nothing() {
        let mut ct = Conntrack::<u32>::new(16, timeouts(), 5).unwrap();
        let (idx, _) = ct.insert(flow(1, true), 0);
        let f = *ct.flow(idx);
        let (cf, cr) = (ct.candidate(ct.hash(&f.fwd)), ct.candidate(ct.hash(&f.rev)));
        assert_eq!(ct.verify(cf, &f.fwd), Some((idx, Dir::Fwd)));
        // Removed before its deadline (as a SNAT tuple taken back is), the record keeps its
        // keys on the free list; the stage-2 candidates must not find it.
        ct.remove(idx);
        assert_eq!(ct.verify(cf, &f.fwd), None);
        assert_eq!(ct.verify(cr, &f.rev), None);
        assert!(ct.lookup(&f.fwd, ct.hash(&f.fwd)).is_none());
    }

    #[test]
    fn records_fill_whole_cache_lines() {
        assert_eq!(std::mem::size_of::<Flow<u32>>(), 64);
        assert_eq!(std::mem::size_of::<Flow<u128>>(), 128);
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
    }

    #[test]
    fn insert_lookup_both_directions_and_remove() {
        let mut ct = Conntrack::<u32>::new(1000, timeouts(), 42).unwrap();
        let (idx, out) = ct.insert(flow(1, true), 0);
        assert_eq!(out, InsertOutcome::default());
        assert_eq!(find(&ct, &key(1)), Some((idx, Dir::Fwd)));
        let rev = ct.flow(idx).rev;
        assert_eq!(find(&ct, &rev), Some((idx, Dir::Rev)));
        assert_eq!(find(&ct, &key(2)), None);
        ct.remove(idx);
        assert_eq!(find(&ct, &key(1)), None);
        assert_eq!(find(&ct, &rev), None);
        assert_eq!(ct.len(), 0);
    }

    #[test]
    fn expiry_by_state_and_sweep() {
        let mut ct = Conntrack::<u32>::new(100, timeouts(), 1).unwrap();
        let (a, _) = ct.insert(flow(1, false), 0);
        assert!(!ct.is_expired(a, 29_999));
        assert!(ct.is_expired(a, 30_000));
        let f = ct.refresh(a, Dir::Fwd, 6, tcp_flags::ACK, 1000);
        assert_eq!(f.state, FlowState::TcpEstablished);
        assert!(!ct.is_expired(a, 900_999));
        assert_eq!(ct.sweep(500_000, 100), 0);
        assert_eq!(ct.sweep(901_000, 100), 1);
        assert!(ct.is_empty());
    }

    #[test]
    fn full_table_evicts_and_counts() {
        let mut ct = Conntrack::<u32>::new(64, timeouts(), 7).unwrap();
        for i in 0..64 {
            ct.insert(flow(i, true), i);
        }
        assert_eq!(ct.len(), 64);
        let (_, out) = ct.insert(flow(1000, true), 100);
        assert_eq!(out.evicted + out.expired, 1);
        assert_eq!(ct.len(), 64);
        assert!(find(&ct, &key(1000)).is_some());
        // Once everything has expired, inserts reclaim expired flows instead of evicting.
        let (_, out) = ct.insert(flow(1001, true), 10_000_000);
        assert_eq!(out, InsertOutcome { expired: 1, evicted: 0 });
    }

    #[test]
    fn wrapping_clock() {
        let mut ct = Conntrack::<u32>::new(10, timeouts(), 3).unwrap();
        let now = u32::MAX - 5_000;
        let (a, _) = ct.insert(flow(1, false), now);
        assert!(!ct.is_expired(a, now.wrapping_add(29_000)));
        assert!(ct.is_expired(a, now.wrapping_add(30_000)));
    }

    #[test]
    fn tcp_states() {
        use tcp_flags::*;
        let mut fins = 0;
        let s = tcp_next_state(FlowState::Free, &mut fins, Dir::Fwd, SYN);
        assert_eq!(s, FlowState::TcpSynSent);
        let s = tcp_next_state(s, &mut fins, Dir::Rev, SYN | ACK);
        assert_eq!(s, FlowState::TcpEstablished);
        let s = tcp_next_state(s, &mut fins, Dir::Fwd, FIN | ACK);
        assert_eq!(s, FlowState::TcpFin);
        let s = tcp_next_state(s, &mut fins, Dir::Rev, FIN | ACK);
        assert_eq!(s, FlowState::TcpClosed);
        let s = tcp_next_state(s, &mut fins, Dir::Fwd, SYN);
        assert_eq!((s, fins), (FlowState::TcpSynSent, 0));
        assert_eq!(tcp_next_state(FlowState::TcpEstablished, &mut fins, Dir::Rev, RST | ACK), FlowState::TcpClosed);
    }

    #[test]
    fn backend_closing_first_leaves_time_wait() {
        use tcp_flags::*;
        let mut fins = 0;
        let s = tcp_next_state(FlowState::TcpEstablished, &mut fins, Dir::Rev, FIN | ACK);
        assert_eq!(s, FlowState::TcpFin);
        // Retransmitted, still half closed.
        let s = tcp_next_state(s, &mut fins, Dir::Rev, FIN | ACK);
        assert_eq!(s, FlowState::TcpFin);
        let s = tcp_next_state(s, &mut fins, Dir::Fwd, FIN | ACK);
        assert_eq!(s, FlowState::TcpTimeWait);
        // The backend's retransmitted FIN, the client's last ACK: still TIME-WAIT.
        let s = tcp_next_state(s, &mut fins, Dir::Rev, FIN | ACK);
        let s = tcp_next_state(s, &mut fins, Dir::Fwd, ACK);
        assert_eq!(s, FlowState::TcpTimeWait);
        // A retransmitted FIN after the client closed first does not turn into TIME-WAIT.
        let mut fins = 0;
        let s = tcp_next_state(FlowState::TcpEstablished, &mut fins, Dir::Fwd, FIN | ACK);
        let s = tcp_next_state(s, &mut fins, Dir::Rev, FIN | ACK);
        assert_eq!(tcp_next_state(s, &mut fins, Dir::Fwd, FIN | ACK), FlowState::TcpClosed);
        // A RST ends TIME-WAIT at the backend (Linux without rfc1337), and so here.
        let mut fins = 3;
        assert_eq!(tcp_next_state(FlowState::TcpTimeWait, &mut fins, Dir::Fwd, RST), FlowState::TcpClosed);
        // The same client port opening again takes the flow over, as the backend does.
        let mut fins = 3;
        assert_eq!(tcp_next_state(FlowState::TcpTimeWait, &mut fins, Dir::Fwd, SYN), FlowState::TcpSynSent);
        assert_eq!(fins, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// The table never holds more than its capacity, every flow it holds is findable by both
        /// keys, and what it dropped is accounted for as expired or evicted.
        #[test]
        fn bounded_and_consistent(cap in 1u32..300, ops in proptest::collection::vec((0u32..2000, 0u32..4, any::<bool>()), 1..1500)) {
            let mut ct = Conntrack::<u32>::new(cap, timeouts(), 9).unwrap();
            let mut now = 0u32;
            let mut present = std::collections::HashMap::new();
            for (k, op, rev) in ops {
                now = now.wrapping_add(977);
                match op {
                    0 | 1 => {
                        if find(&ct, &key(k)).is_none() {
                            let mut f = flow(k, rev);
                            f.rev.dport = k as u16;
                            f.rev.sport = (k >> 16) as u16;
                            let (i, _) = ct.insert(f, now);
                            present.insert(k, i);
                        }
                    }
                    2 => { if let Some((i, _)) = find(&ct, &key(k)) { ct.remove(i); present.remove(&k); } }
                    _ => { ct.sweep(now, 16); }
                }
                prop_assert!(ct.len() <= cap);
            }
            let c = ct.counters;
            let live: Vec<u32> = ct.iter_live().collect();
            prop_assert_eq!(live.len() as u32, ct.len());
            for i in live {
                let f = *ct.flow(i);
                prop_assert_eq!(find(&ct, &f.fwd), Some((i, Dir::Fwd)));
                if f.has_rev { prop_assert_eq!(find(&ct, &f.rev), Some((i, Dir::Rev))); }
            }
            prop_assert!(c.inserts >= ct.len() as u64);
        }
    }
}
