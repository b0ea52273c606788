//! Each worker's neighbour table (IPv4 and IPv6): fixed capacity, allocated once, with Linux's
//! neighbour life cycle cut to what a load balancer needs.
//!
//! - An entry's MAC is trusted for a reachable time after it was learned or confirmed, drawn
//!   between half and one and a half `reachable_ms` when jitter is on (as Linux draws it).
//!   Past that, an entry still being sent to is asked again by unicast, once a second; after
//!   `probes` unanswered questions it is given up (unresolved), so the next packets ask by
//!   broadcast and a neighbour whose MAC changed without a gratuitous ARP is found again. Linux
//!   does the same (REACHABLE, STALE, PROBE, FAILED); without it an entry was kept for the
//!   process's life.
//! - A full table makes room by handing the slot of an entry to the new address: the first
//!   idle entry (not sent to for `reachable_ms`) near a clock hand, else, when traffic needs
//!   the new entry, the one sent to least recently among those looked at. An address merely
//!   learned from the wire, or reserved ahead of traffic, takes only an idle slot, so senders
//!   of ARP requests (or a snapshot's many endpoints) cannot push out the entries traffic uses.
//! - A MAC seen in a client's first frame can serve as an unconfirmed hint, asked at once.
//! - A neighbour without a MAC that left three questions a second apart unanswered (unicast
//!   probes before it lost its MAC, then solicitations) is unreachable (Linux's FAILED) until it
//!   answers: new flows do not pick a backend behind it (see [`NeighborTable::unreachable`]),
//!   though traffic that needs it goes on asking once a second.
//! - A flow keeps a [`NeighborRef`]: the slot and its generation. A slot handed to another
//!   address gets a new generation, so a flow's old reference is noticed and looked up again.

use super::is_unicast_mac;
use fulcrum_config::bootstrap::MacAddr;
use std::net::{IpAddr, Ipv4Addr};

/// A flow's handle on an entry: its slot, and the slot's generation when it was taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct NeighborRef {
    pub idx: u16,
    pub gen: u16,
}

impl NeighborRef {
    /// What a table with no room for an entry hands out: it never resolves and never solicits.
    pub const NONE: NeighborRef = NeighborRef { idx: NeighborTable::NONE, gen: 0 };
}

/// What [`NeighborTable::use_ref`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefState {
    Resolved([u8; 6]),
    /// Being resolved (or the table had no room).
    Unresolved,
    /// The slot now holds another address: look the address up again.
    Moved,
}

/// An entry as an operator sees it (`/neighbors`): the appliance's own `ip neigh`, since the
/// kernel's shows nothing of a data plane that bypasses it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NeighborView {
    pub ip: IpAddr,
    /// `02:f1:00:00:02:01`, or none while unresolved.
    pub mac: Option<MacAddr>,
    /// Linux's names: `permanent` (static), `incomplete` (no MAC: being asked, or given up
    /// until traffic needs it), `failed` (no MAC, and solicitations went unanswered: see
    /// [`NeighborTable::unreachable`]), `reachable`, `stale` (past its reachable time), `probe`
    /// (asked by unicast, unanswered so far), and `unconfirmed` (a MAC taken from a client's
    /// frame, being checked).
    pub state: &'static str,
    /// Milliseconds since a packet last went out through it; none if never.
    pub used_ms_ago: Option<u64>,
}

impl NeighborView {
    /// Every `state` a view can have.
    pub const STATES: [&'static str; 7] =
        ["permanent", "incomplete", "failed", "reachable", "stale", "probe", "unconfirmed"];
}

/// What the table did on its own, for the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighborCounters {
    /// Entries whose slot was handed to another address because the table was full.
    pub evictions: u64,
    /// Unicast questions to entries past their reachable time.
    pub probes: u64,
    /// Entries given up after `probes` unanswered questions.
    pub failures: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    mac: Option<[u8; 6]>,
    is_static: bool,
    gen: u16,
    /// Unanswered questions: unicast ones since the entry went past its reachable time while
    /// it has a MAC; then broadcast ones (solicitations), counted on from there once it has
    /// none. An answer, or a hint, starts it again from 0.
    probes: u8,
    /// The MAC is a hint (see [`NeighborTable::hint`]), to be asked at once.
    unconfirmed: bool,
    /// When a packet last went out through the entry (or traffic asked for it); 0 never (an
    /// entry never used is idle at once).
    used_ms: u64,
    /// When the MAC stops counting as confirmed: a reachable time after it was learned.
    stale_ms: u64,
    /// When a solicitation was last asked for; `None` never.
    solicited_ms: Option<u64>,
    ip: IpAddr,
}

impl Entry {
    /// No MAC, and [`NeighborTable::UNANSWERED_SOLICITS`] questions unanswered, the last for a
    /// whole interval (see [`NeighborTable::unreachable`]).
    fn unanswered(&self, now_ms: u64) -> bool {
        let n = NeighborTable::UNANSWERED_SOLICITS;
        let last_long_ago =
            self.solicited_ms.is_some_and(|t| now_ms.saturating_sub(t) >= NeighborTable::SOLICIT_INTERVAL_MS);
        self.mac.is_none() && (self.probes > n || (self.probes == n && last_long_ago))
    }
}

/// Who may lose its slot when a new address finds the table full.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Evict {
    /// Only an entry nobody sent to for `reachable_ms` (for addresses learned from the wire).
    Idle,
    /// Else the least recently used of those looked at (for addresses traffic needs).
    LeastRecentlyUsed,
}

/// Fixed-capacity neighbour table; see the module documentation. Lookups go through an
/// open-addressed index (linear probing, backward-shift deletion).
pub struct NeighborTable {
    entries: Vec<Entry>,
    /// Slots hold entry index + 1; 0 is empty. Power-of-two length, at least 2x capacity.
    slots: Vec<u16>,
    capacity: usize,
    reachable_ms: u64,
    max_probes: u8,
    /// Where the search for an entry to evict goes on from.
    hand: usize,
    /// Where [`NeighborTable::age`] goes on from.
    age_cursor: usize,
    /// Draws each entry's reachable time between half and one and a half `reachable_ms`, as
    /// Linux does (xorshift state; 0: exactly `reachable_ms`). Each worker keeps a table of its
    /// own and they learn an answer together (the news), so without it every worker would
    /// ask each neighbour again at the same moment, before any answer could reach the others.
    rng: u64,
    pub counters: NeighborCounters,
    /// What this table learned from the wire since the last [`NeighborTable::take_news`], for
    /// the other workers: each has a table of its own, and an ARP or NDP answer reaches only
    /// the one whose queue the NIC put it in (queue 0 for ARP under RSS), whoever asked.
    news: Vec<(IpAddr, [u8; 6])>,
}

impl NeighborTable {
    /// The slot of [`NeighborRef::NONE`].
    pub const NONE: u16 = u16::MAX;
    /// Minimum interval between two solicitations (or probes) for the same neighbour.
    pub const SOLICIT_INTERVAL_MS: u64 = 1000;
    /// Questions left unanswered, the last for a whole interval, before a neighbour without a
    /// MAC counts as unreachable (Linux's `mcast_solicit` and `ucast_probes`: 3, a second
    /// apart).
    pub const UNANSWERED_SOLICITS: u8 = 3;
    /// News kept between two [`NeighborTable::take_news`] (a loop iteration's worth); more in
    /// one iteration are not passed on (each worker then solicits for itself, as before).
    pub const NEWS_CAPACITY: usize = 64;
    /// Entries looked at for one eviction, and by one call of [`NeighborTable::age`].
    const SCAN: usize = 64;

    /// A table for up to `capacity` neighbours (capped at 65534), all memory allocated now;
    /// reachable time 30 s, 3 unicast probes (Linux's defaults).
    pub fn new(capacity: usize) -> Self {
        Self::with_reachability(capacity, 30_000, 3)
    }

    pub fn with_reachability(capacity: usize, reachable_ms: u64, probes: u8) -> Self {
        let capacity = capacity.clamp(1, u16::MAX as usize - 1);
        let nslots = (capacity * 2).next_power_of_two();
        NeighborTable {
            entries: Vec::with_capacity(capacity),
            slots: vec![0; nslots],
            capacity,
            reachable_ms: reachable_ms.max(1),
            max_probes: probes.max(1),
            hand: 0,
            age_cursor: 0,
            rng: 0,
            counters: NeighborCounters::default(),
            news: Vec::with_capacity(Self::NEWS_CAPACITY),
        }
    }

    /// Reachable times drawn at random around `reachable_ms` (see the `rng` field), from
    /// `seed` (each worker its own).
    pub fn with_jitter(mut self, seed: u64) -> Self {
        self.rng = seed | 1;
        self
    }

    fn reachable_time(&mut self) -> u64 {
        if self.rng == 0 {
            return self.reachable_ms;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.reachable_ms / 2 + self.rng % self.reachable_ms
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries the table can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn hash(ip: IpAddr) -> u64 {
        let (a, b) = match ip {
            IpAddr::V4(a) => (u32::from(a) as u64, 4u64),
            IpAddr::V6(a) => {
                let v = u128::from(a);
                ((v as u64) ^ ((v >> 64) as u64), 6u64)
            }
        };
        let x = (a ^ b.rotate_left(59)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    /// The index slot holding `ip`, or the empty slot where it would go.
    fn find_slot(&self, ip: IpAddr) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut s = Self::hash(ip) as usize & mask;
        loop {
            match self.slots[s] {
                0 => return Err(s),
                i if self.entries[(i - 1) as usize].ip == ip => return Ok(s),
                _ => s = (s + 1) & mask,
            }
        }
    }

    fn find(&self, ip: IpAddr) -> Option<u16> {
        self.find_slot(ip).ok().map(|s| self.slots[s] - 1)
    }

    /// Takes `ip` out of the index, moving back the entries after it that its slot displaced
    /// (so that every entry stays reachable from its hash without tombstones).
    fn unindex(&mut self, ip: IpAddr) {
        let Ok(mut hole) = self.find_slot(ip) else { return };
        let mask = self.slots.len() - 1;
        let mut j = (hole + 1) & mask;
        while self.slots[j] != 0 {
            let home = Self::hash(self.entries[(self.slots[j] - 1) as usize].ip) as usize & mask;
            // The entry at j may fill the hole if the hole lies between its home and j.
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = 0;
    }

    /// An entry to give to a new address, or none.
    fn victim(&mut self, now_ms: u64, evict: Evict) -> Option<usize> {
        let n = self.entries.len();
        let mut oldest: Option<(usize, u64)> = None;
        for _ in 0..n.min(Self::SCAN) {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let e = &self.entries[i];
            if e.is_static {
                continue;
            }
            if e.used_ms == 0 || now_ms.saturating_sub(e.used_ms) >= self.reachable_ms {
                return Some(i);
            }
            if evict == Evict::LeastRecentlyUsed && oldest.is_none_or(|(_, t)| e.used_ms < t) {
                oldest = Some((i, e.used_ms));
            }
        }
        oldest.map(|(i, _)| i)
    }

    fn insert(&mut self, ip: IpAddr, now_ms: u64, evict: Evict) -> Option<u16> {
        if let Some(i) = self.find(ip) {
            return Some(i);
        }
        let fresh = Entry {
            mac: None,
            is_static: false,
            gen: 0,
            probes: 0,
            unconfirmed: false,
            used_ms: 0,
            stale_ms: now_ms,
            solicited_ms: None,
            ip,
        };
        let i = if self.entries.len() < self.capacity {
            self.entries.push(fresh);
            self.entries.len() - 1
        } else {
            let i = self.victim(now_ms, evict)?;
            let old = self.entries[i];
            self.unindex(old.ip);
            self.entries[i] = Entry { gen: old.gen.wrapping_add(1), ..fresh };
            self.counters.evictions += 1;
            i
        };
        let Err(slot) = self.find_slot(ip) else { unreachable!("{ip} was not in the index") };
        self.slots[slot] = i as u16 + 1;
        Some(i as u16)
    }

    fn reference(&self, i: u16) -> NeighborRef {
        NeighborRef { idx: i, gen: self.entries[i as usize].gen }
    }

    /// Adds (or overrides with) a static entry that learning never changes and the table
    /// never evicts; [`NeighborRef::NONE`] when every entry is static already.
    pub fn add_static(&mut self, ip: IpAddr, mac: [u8; 6]) -> NeighborRef {
        let Some(i) = self.insert(ip, 0, Evict::LeastRecentlyUsed) else { return NeighborRef::NONE };
        let e = &mut self.entries[i as usize];
        e.mac = Some(mac);
        e.is_static = true;
        self.reference(i)
    }

    /// Records that `ip` is at `mac` (taking an idle slot if the table is full), and keeps it
    /// as news for the other workers. Static entries, unspecified/multicast IPs and
    /// multicast/zero MACs are left alone. The caller checks that `ip` is on-link.
    pub fn learn(&mut self, ip: IpAddr, mac: [u8; 6], now_ms: u64) {
        if self.learn_quietly(ip, mac, now_ms) && self.news.len() < Self::NEWS_CAPACITY {
            self.news.push((ip, mac));
        }
    }

    /// Passes (ip, mac) to the other workers as news without touching this table: an answer
    /// that confirms another worker's entry only (see the bare neighbour advertisement in
    /// `neigh::handle_icmpv6_local`).
    pub fn tell_others(&mut self, ip: IpAddr, mac: [u8; 6]) {
        if self.news.len() < Self::NEWS_CAPACITY {
            self.news.push((ip, mac));
        }
    }

    /// As [`NeighborTable::learn`], for what another worker learned: kept, not passed on again.
    /// Returns whether the entry was taken.
    pub fn learn_quietly(&mut self, ip: IpAddr, mac: [u8; 6], now_ms: u64) -> bool {
        if ip.is_unspecified() || ip.is_multicast() || !is_unicast_mac(mac) {
            return false;
        }
        if let IpAddr::V4(a) = ip {
            if a.is_broadcast() {
                return false;
            }
        }
        let Some(i) = self.insert(ip, now_ms, Evict::Idle) else { return false };
        let e = &mut self.entries[i as usize];
        if e.is_static {
            return false;
        }
        e.mac = Some(mac);
        e.probes = 0;
        e.unconfirmed = false;
        let reachable = self.reachable_time();
        self.entries[i as usize].stale_ms = now_ms + reachable;
        true
    }

    /// A MAC seen but not confirmed: the source MAC of a frame from an on-link address that
    /// opens a connection. Taken only by an entry without a MAC, and asked by unicast at the
    /// next [`NeighborTable::age`] (Linux keeps the sender of an ARP request alike, as STALE).
    /// Without it, the first answer to an on-link client we never asked (it had our MAC from
    /// before a restart or a takeover) was dropped while we asked, costing it a retransmission.
    pub fn hint(&mut self, r: NeighborRef, mac: [u8; 6], now_ms: u64) {
        if !is_unicast_mac(mac) {
            return;
        }
        let Some(e) = self.entries.get_mut(r.idx as usize) else { return };
        if e.gen != r.gen || e.mac.is_some() || e.is_static {
            return;
        }
        e.mac = Some(mac);
        e.stale_ms = now_ms;
        e.probes = 0;
        e.unconfirmed = true;
        e.solicited_ms = None;
    }

    /// What was learned from the wire since the last call (see the `news` field).
    pub fn take_news(&mut self) -> std::vec::Drain<'_, (IpAddr, [u8; 6])> {
        self.news.drain(..)
    }

    /// Whether there is an entry for `ip`, resolved or not.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.find(ip).is_some()
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self.find(ip).and_then(|i| self.mac_at(i))
    }

    /// The entry of `ip`, created (unresolved) if there is none: traffic needs it, so a full
    /// table evicts for it. [`NeighborRef::NONE`] when every entry is static.
    pub fn index_of(&mut self, ip: IpAddr, now_ms: u64) -> NeighborRef {
        let Some(i) = self.insert(ip, now_ms, Evict::LeastRecentlyUsed) else { return NeighborRef::NONE };
        let e = &mut self.entries[i as usize];
        e.used_ms = e.used_ms.max(now_ms);
        self.reference(i)
    }

    /// The entry of `ip`, created (unresolved) if there is none and an idle entry can make
    /// room, without marking it used: for resolving ahead of traffic (a snapshot's endpoints),
    /// which must neither push out entries traffic uses nor keep entries it never uses asked.
    pub fn reserve(&mut self, ip: IpAddr, now_ms: u64) -> NeighborRef {
        match self.insert(ip, now_ms, Evict::Idle) {
            Some(i) => self.reference(i),
            None => NeighborRef::NONE,
        }
    }

    /// Whether `r` still names the address it was taken for.
    pub fn is_current(&self, r: NeighborRef) -> bool {
        self.entries.get(r.idx as usize).is_some_and(|e| e.gen == r.gen)
    }

    /// The MAC to send to through `r`, marking the entry used (per packet: one read of the
    /// entry's line, written at most once a millisecond).
    #[inline(always)]
    pub fn use_ref(&mut self, r: NeighborRef, now_ms: u64) -> RefState {
        let Some(e) = self.entries.get_mut(r.idx as usize) else { return RefState::Unresolved };
        if e.gen != r.gen {
            return RefState::Moved;
        }
        if e.used_ms != now_ms {
            e.used_ms = now_ms;
        }
        match e.mac {
            Some(m) => RefState::Resolved(m),
            None => RefState::Unresolved,
        }
    }

    pub fn mac_at(&self, idx: u16) -> Option<[u8; 6]> {
        self.entries.get(idx as usize).and_then(|e| e.mac)
    }

    /// True at most once per second per unresolved neighbour: the caller then sends a
    /// solicitation (and counts on it being sent: each counts towards
    /// [`NeighborTable::unreachable`]). Always false for resolved entries and [`Self::NONE`].
    pub fn should_solicit(&mut self, idx: u16, now_ms: u64) -> bool {
        let Some(e) = self.entries.get_mut(idx as usize) else { return false };
        if e.mac.is_some() {
            return false;
        }
        match e.solicited_ms {
            Some(t) if now_ms.saturating_sub(t) < Self::SOLICIT_INTERVAL_MS => false,
            _ => {
                e.solicited_ms = Some(now_ms);
                e.probes = e.probes.saturating_add(1);
                true
            }
        }
    }

    /// Whether `r`'s neighbour has no MAC and left [`Self::UNANSWERED_SOLICITS`] questions
    /// unanswered, the last for a whole interval: a backend behind it is gone from the link
    /// (a dead node whose endpoints the API still lists as ready, a host that lost its
    /// address), and a new flow sent there would be dropped until the client gave up. False
    /// for an entry since handed to another address (the caller looks that address up anyway).
    pub fn unreachable(&self, r: NeighborRef, now_ms: u64) -> bool {
        self.entries.get(r.idx as usize).is_some_and(|e| e.gen == r.gen && e.unanswered(now_ms))
    }

    /// Looks at the next entries for ones past their reachable time that traffic still uses:
    /// `ask(idx)` for each that is due a question (unicast while it has a MAC, see
    /// [`NeighborTable::mac_at`]); it returns false when it has no room for more. An entry
    /// that left `probes` questions unanswered loses its MAC and is asked by broadcast.
    pub fn age(&mut self, now_ms: u64, mut ask: impl FnMut(u16) -> bool) {
        let n = self.entries.len();
        for _ in 0..n.min(Self::SCAN) {
            let i = self.age_cursor;
            let e = &mut self.entries[i];
            let due = !e.is_static
                && e.mac.is_some()
                && (e.unconfirmed || now_ms >= e.stale_ms)
                && e.used_ms != 0
                && now_ms.saturating_sub(e.used_ms) < self.reachable_ms
                && e.solicited_ms.is_none_or(|t| now_ms.saturating_sub(t) >= Self::SOLICIT_INTERVAL_MS);
            if due {
                if !ask(i as u16) {
                    return;
                }
                e.solicited_ms = Some(now_ms);
                if e.probes >= self.max_probes {
                    // Given up (asked by broadcast now). The unanswered unicast questions
                    // still count towards `unreachable`: a neighbour gone for good is passed
                    // over a second after this broadcast goes unanswered, as Linux marks it
                    // FAILED after its unicast probes, not after three solicitations more.
                    e.mac = None;
                    e.unconfirmed = false;
                    self.counters.failures += 1;
                } else {
                    e.probes += 1;
                    self.counters.probes += 1;
                }
            }
            self.age_cursor = (i + 1) % n;
        }
    }

    /// Every entry as an operator sees it, in address order (off the packet path: allocates).
    pub fn view(&self, now_ms: u64) -> Vec<NeighborView> {
        let mut v: Vec<NeighborView> = self
            .entries
            .iter()
            .map(|e| NeighborView {
                ip: e.ip,
                mac: e.mac.map(MacAddr),
                state: match e {
                    e if e.is_static => "permanent",
                    e if e.unanswered(now_ms) => "failed",
                    e if e.mac.is_none() => "incomplete",
                    e if e.probes > 0 => "probe",
                    e if e.unconfirmed => "unconfirmed",
                    e if now_ms >= e.stale_ms => "stale",
                    _ => "reachable",
                },
                used_ms_ago: (e.used_ms != 0).then(|| now_ms.saturating_sub(e.used_ms)),
            })
            .collect();
        v.sort_by_key(|n| n.ip);
        v
    }

    /// The address of entry `idx` (`0.0.0.0` for [`Self::NONE`] or an index never handed out).
    pub fn ip_at(&self, idx: u16) -> IpAddr {
        self.entries.get(idx as usize).map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |e| e.ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv6Addr;

    const GW_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0xfe];
    const PEER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 7];
    const NEW_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 8];

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    #[test]
    fn learning_resolving_and_soliciting() {
        let mut t = NeighborTable::new(4);
        let gw = v4("10.10.0.1");
        let g = t.add_static(gw, GW_MAC);
        assert_eq!(t.lookup(gw), Some(GW_MAC));
        t.learn(gw, PEER_MAC, 10);
        assert_eq!(t.lookup(gw), Some(GW_MAC), "static entries are not overwritten");
        assert_eq!(t.index_of(gw, 10), g);

        let b = IpAddr::V6("fd00:10::9".parse().unwrap());
        let r = t.index_of(b, 1000);
        assert_eq!(t.ip_at(r.idx), b);
        assert_eq!(t.use_ref(r, 1000), RefState::Unresolved);
        assert!(t.should_solicit(r.idx, 1000));
        assert!(!t.should_solicit(r.idx, 1999));
        assert!(t.should_solicit(r.idx, 2000));
        t.learn(b, PEER_MAC, 2100);
        assert_eq!(t.use_ref(r, 2100), RefState::Resolved(PEER_MAC));
        assert_eq!(t.index_of(b, 2100), r, "same entry once resolved");
        assert!(!t.should_solicit(r.idx, 9000));
        t.learn(b, GW_MAC, 2200);
        assert_eq!(t.lookup(b), Some(GW_MAC));
        assert_eq!(t.take_news().collect::<Vec<_>>(), [(b, PEER_MAC), (b, GW_MAC)], "static entry's news dropped");

        // Junk is never learned.
        t.learn(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PEER_MAC, 0);
        t.learn(IpAddr::V4(Ipv4Addr::BROADCAST), PEER_MAC, 0);
        t.learn(v4("10.10.0.50"), [0xff; 6], 0);
        t.learn(v4("10.10.0.50"), [0; 6], 0);
        t.learn(IpAddr::V6("ff02::1".parse().unwrap()), PEER_MAC, 0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.counters, NeighborCounters::default());
        assert_eq!(NeighborRef::NONE.idx, NeighborTable::NONE);
        assert_eq!(t.use_ref(NeighborRef::NONE, 0), RefState::Unresolved);
        assert!(!t.should_solicit(NeighborTable::NONE, 0));
        assert_eq!(t.ip_at(NeighborTable::NONE), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    /// A full table: learning from the wire takes only idle entries; traffic's needs take the
    /// least recently used; static entries stay; a reference to an entry given away says so.
    #[test]
    fn a_full_table_makes_room_without_losing_what_traffic_uses() {
        let reachable = 30_000;
        let mut t = NeighborTable::with_reachability(4, reachable, 3);
        let gw = t.add_static(v4("10.10.0.1"), GW_MAC);
        let now = 100_000;
        let a = t.index_of(v4("10.10.0.11"), now);
        let b = t.index_of(v4("10.10.0.12"), now);
        let c = t.index_of(v4("10.10.0.13"), now);
        for r in [a, b, c] {
            t.learn(t.ip_at(r.idx), PEER_MAC, now);
        }
        assert_eq!(t.len(), 4);

        // A sender asking for us while every entry is in use: not learned, nothing lost.
        t.learn(v4("10.10.0.99"), PEER_MAC, now + 10);
        assert!(!t.contains(v4("10.10.0.99")));
        assert_eq!(t.counters.evictions, 0);

        // b and c keep being sent to; a falls idle. The sender now takes a's entry.
        let later = now + reachable + 1;
        assert_eq!(t.use_ref(b, later), RefState::Resolved(PEER_MAC));
        assert_eq!(t.use_ref(c, later), RefState::Resolved(PEER_MAC));
        t.learn(v4("10.10.0.99"), NEW_MAC, later);
        assert_eq!(t.lookup(v4("10.10.0.99")), Some(NEW_MAC));
        assert!(!t.contains(v4("10.10.0.11")));
        assert_eq!(t.counters.evictions, 1);
        assert_eq!(t.use_ref(a, later), RefState::Moved, "a flow holding a's entry is told");
        assert!(!t.is_current(a));
        assert!(t.is_current(b) && t.is_current(c) && t.is_current(gw));

        // Traffic needs a again with nothing idle: the least recently used goes (the learned
        // sender, never sent to), never the static entry.
        let a2 = t.index_of(v4("10.10.0.11"), later + 5);
        assert_eq!(a2.idx, a.idx);
        assert_ne!(a2.gen, a.gen);
        assert!(!t.contains(v4("10.10.0.99")));
        let d = t.index_of(v4("10.10.0.14"), later + 6);
        assert!(t.contains(v4("10.10.0.14")) && t.contains(v4("10.10.0.1")));
        assert_eq!(t.lookup(v4("10.10.0.1")), Some(GW_MAC));
        assert_eq!(t.counters.evictions, 3);
        // Every surviving reference still resolves to its own address.
        for r in [gw, a2, d] {
            assert!(t.is_current(r));
            assert_eq!(t.index_of(t.ip_at(r.idx), later + 7), r);
        }

        // A table of static entries only has nothing to give.
        let mut s = NeighborTable::new(1);
        s.add_static(v4("10.10.0.1"), GW_MAC);
        assert_eq!(s.index_of(v4("10.10.0.2"), 0), NeighborRef::NONE);
        assert_eq!(s.add_static(v4("10.10.0.3"), GW_MAC), NeighborRef::NONE);
    }

    /// Unreachable: three questions a second apart, the last unanswered for a second; an answer
    /// (or a hint) ends it; an entry that lost its MAC after unanswered unicast probes counts
    /// them, so one solicitation more makes three.
    #[test]
    fn three_unanswered_solicitations_make_a_neighbor_unreachable() {
        let mut t = NeighborTable::with_reachability(4, 2_000, 2);
        let a = t.index_of(v4("10.10.0.11"), 0);
        let asks = |t: &mut NeighborTable, now| t.should_solicit(a.idx, now);
        assert!(!t.unreachable(a, 0), "never asked");
        assert!(asks(&mut t, 0) && !asks(&mut t, 999) && asks(&mut t, 1_000) && asks(&mut t, 2_500));
        assert!(!t.unreachable(a, 3_499), "the third question not a second old");
        assert!(t.unreachable(a, 3_500));
        assert!(asks(&mut t, 3_500) && t.unreachable(a, 3_501), "asked again, still unreachable");
        t.learn(v4("10.10.0.11"), PEER_MAC, 3_600);
        assert!(!t.unreachable(a, 3_600) && !t.unreachable(a, 60_000));
        // Past its reachable time and still used: two unicast probes unanswered, then given up
        // (no MAC, a broadcast question at once): one solicitation more left unanswered for a
        // second makes it unreachable.
        let g = (4_000..12_000)
            .step_by(100)
            .find(|&now| {
                t.use_ref(a, now);
                t.age(now, |_| true);
                assert!(!t.unreachable(a, now), "t={now}: while probed by unicast");
                t.mac_at(a.idx).is_none()
            })
            .expect("given up");
        assert_eq!(t.counters.failures, 1);
        assert!(!t.unreachable(a, g + 999));
        assert!(asks(&mut t, g + 1_000));
        assert!(!t.unreachable(a, g + 1_999) && t.unreachable(a, g + 2_000));
        let state = |t: &NeighborTable, now| t.view(now)[0].state;
        assert_eq!((state(&t, g + 1_999), state(&t, g + 2_000)), ("incomplete", "failed"), "as /neighbors shows it");
        // A hint (a MAC from a frame) is a MAC to try: not unreachable.
        t.hint(a, NEW_MAC, g + 2_001);
        assert!(!t.unreachable(a, g + 2_001));
        // A reference to a slot since given to another address is never unreachable.
        assert!(!t.unreachable(NeighborRef { idx: a.idx, gen: a.gen.wrapping_add(1) }, g + 9_000));
    }

    /// Resolving ahead of traffic (a snapshot's endpoints) takes only idle room and marks
    /// nothing used: it pushes out no entry traffic uses, and an entry only reserved is never
    /// probed when its answer ages.
    #[test]
    fn reserving_ahead_of_traffic_takes_only_idle_room() {
        let mut t = NeighborTable::with_reachability(2, 1_000, 3);
        let a = t.index_of(v4("10.10.0.11"), 500);
        let b = t.reserve(v4("10.10.0.12"), 500);
        assert_ne!(b, NeighborRef::NONE);
        t.learn(v4("10.10.0.11"), PEER_MAC, 500);
        t.learn(v4("10.10.0.12"), PEER_MAC, 500);
        t.use_ref(a, 2_000);
        assert_eq!(aged(&mut t, 2_000), [(a.idx, Some(PEER_MAC))], "only the entry in use is asked");
        // Full: a third endpoint takes the reserved (idle) entry, never the one in use.
        let c = t.reserve(v4("10.10.0.13"), 2_000);
        assert_eq!(c.idx, b.idx);
        assert!(t.is_current(a) && !t.is_current(b));
        // Once traffic uses it, nothing idle is left: a further endpoint waits.
        t.use_ref(c, 2_001);
        assert_eq!(t.reserve(v4("10.10.0.14"), 2_001), NeighborRef::NONE, "nothing idle is left");
        assert!(t.is_current(a) && t.is_current(c));
    }

    /// Many insertions and evictions against a model: the index never loses an entry
    /// (backward-shift deletion) and never finds one that left.
    #[test]
    fn evictions_keep_the_index_consistent() {
        let mut t = NeighborTable::with_reachability(257, 1000, 3);
        let mut model: HashMap<IpAddr, NeighborRef> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip = if x & 1 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0a0a_0000 | (x >> 8) as u32 & 0x3ff))
            } else {
                IpAddr::V6(Ipv6Addr::from(0xfd00_0010_u128 << 96 | ((x >> 8) & 0x3ff) as u128))
            };
            let now = step * 3;
            let r = t.index_of(ip, now);
            assert_eq!(t.ip_at(r.idx), ip);
            model.retain(|_, m| m.idx != r.idx || *m == r);
            model.insert(ip, r);
            if step % 97 == 0 {
                for (ip, r) in &model {
                    assert!(t.is_current(*r), "{ip} lost at step {step}");
                    assert_eq!(t.find(*ip), Some(r.idx), "{ip} not found at step {step}");
                }
                assert_eq!(model.len(), t.len());
            }
        }
        assert!(t.counters.evictions > 10_000, "{:?}", t.counters);
    }

    #[test]
    fn many_entries() {
        let mut t = NeighborTable::new(1024);
        for i in 0..1024u32 {
            let ip = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
            } else {
                IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | i as u128))
            };
            assert_eq!(t.index_of(ip, 1).idx, i as u16);
        }
        for i in 0..1024u32 {
            let ip = t.ip_at(i as u16);
            assert_eq!(t.index_of(ip, 1).idx, i as u16);
        }
        assert_eq!(t.counters.evictions, 0);
    }

    fn aged(t: &mut NeighborTable, now: u64) -> Vec<(u16, Option<[u8; 6]>)> {
        let mut asked = Vec::new();
        t.age(now, |i| {
            asked.push(i);
            true
        });
        // What the worker sends: a unicast probe while the entry has a MAC, else a broadcast.
        asked.into_iter().map(|i| (i, t.mac_at(i))).collect()
    }

    /// An entry past its reachable time that traffic still uses is asked at its MAC once a
    /// second; unanswered `probes` times, it is given up and asked by broadcast; an answer
    /// at any point makes it reachable again. Unused or static entries are left alone.
    #[test]
    fn stale_entries_in_use_are_probed_then_given_up() {
        let mut t = NeighborTable::with_reachability(8, 5_000, 3);
        let gw = t.add_static(v4("10.10.0.1"), GW_MAC);
        let be = t.index_of(v4("10.10.0.11"), 0);
        let idle = t.index_of(v4("10.10.0.12"), 0);
        t.learn(v4("10.10.0.11"), PEER_MAC, 1_000);
        t.learn(v4("10.10.0.12"), PEER_MAC, 1_000);
        let send = |t: &mut NeighborTable, now| {
            assert_ne!(t.use_ref(gw, now), RefState::Moved);
            t.use_ref(be, now)
        };
        for now in (1_000..6_000).step_by(100) {
            assert_eq!(send(&mut t, now), RefState::Resolved(PEER_MAC));
            assert!(aged(&mut t, now).is_empty(), "asked before its reachable time ({now})");
        }
        assert_eq!(send(&mut t, 6_000), RefState::Resolved(PEER_MAC));
        assert_eq!(aged(&mut t, 6_000), [(be.idx, Some(PEER_MAC))], "first unicast probe");
        assert!(aged(&mut t, 6_500).is_empty(), "one a second");
        assert_eq!(send(&mut t, 6_900), RefState::Resolved(PEER_MAC), "still sent to while probed");
        assert_eq!(aged(&mut t, 7_000), [(be.idx, Some(PEER_MAC))]);
        // Answered: reachable again, the count starts over.
        t.learn(v4("10.10.0.11"), PEER_MAC, 7_100);
        for now in (7_100..12_100).step_by(500) {
            send(&mut t, now);
            assert!(aged(&mut t, now).is_empty(), "asked again at {now}");
        }
        // Its MAC changed silently: three unanswered probes, then a broadcast.
        send(&mut t, 12_100);
        assert_eq!(aged(&mut t, 12_100), [(be.idx, Some(PEER_MAC))]);
        send(&mut t, 13_100);
        assert_eq!(aged(&mut t, 13_100), [(be.idx, Some(PEER_MAC))]);
        send(&mut t, 14_100);
        assert_eq!(aged(&mut t, 14_100), [(be.idx, Some(PEER_MAC))]);
        send(&mut t, 15_100);
        assert_eq!(aged(&mut t, 15_100), [(be.idx, None)], "given up: asked by broadcast");
        assert_eq!(send(&mut t, 15_200), RefState::Unresolved);
        assert!(!t.should_solicit(be.idx, 15_200), "the broadcast just went");
        assert!(t.should_solicit(be.idx, 16_100));
        t.learn(v4("10.10.0.11"), NEW_MAC, 16_150);
        assert_eq!(send(&mut t, 16_200), RefState::Resolved(NEW_MAC));
        assert_eq!(t.counters, NeighborCounters { evictions: 0, probes: 5, failures: 1 });
        let states: Vec<_> =
            t.view(16_200).into_iter().map(|n| (n.ip.to_string(), n.mac, n.state, n.used_ms_ago)).collect();
        let mac = |m: [u8; 6]| Some(MacAddr(m));
        assert_eq!(
            states,
            [
                ("10.10.0.1".to_string(), mac(GW_MAC), "permanent", Some(0)),
                ("10.10.0.11".to_string(), mac(NEW_MAC), "reachable", Some(0)),
                ("10.10.0.12".to_string(), mac(PEER_MAC), "stale", None),
            ]
        );
        // The idle entry was never asked, though long past its reachable time.
        assert_eq!(t.mac_at(idle.idx), Some(PEER_MAC));
        assert!(aged(&mut t, 16_200).is_empty());
        assert!(!t.should_solicit(idle.idx, 16_200));
    }

    /// A hint (the source MAC of a client's first frame) serves at once and is asked by
    /// unicast at the next aging pass; it never replaces a MAC learned or configured.
    #[test]
    fn hints_serve_at_once_and_are_checked() {
        let mut t = NeighborTable::with_reachability(8, 30_000, 2);
        let gw = t.add_static(v4("10.10.0.1"), GW_MAC);
        t.hint(gw, PEER_MAC, 10);
        assert_eq!(t.lookup(v4("10.10.0.1")), Some(GW_MAC), "static kept");
        let known = t.index_of(v4("10.10.0.20"), 10);
        t.learn(v4("10.10.0.20"), GW_MAC, 10);
        t.hint(known, PEER_MAC, 11);
        assert_eq!(t.lookup(v4("10.10.0.20")), Some(GW_MAC), "learned kept");
        t.take_news().for_each(drop);

        let c = t.index_of(v4("10.10.0.30"), 100);
        t.hint(c, [0xff; 6], 100);
        assert_eq!(t.use_ref(c, 100), RefState::Unresolved, "multicast hint ignored");
        t.hint(c, PEER_MAC, 100);
        assert_eq!(t.use_ref(c, 100), RefState::Resolved(PEER_MAC));
        let state_of =
            |t: &NeighborTable, ip: &str, now| t.view(now).into_iter().find(|n| n.ip == v4(ip)).unwrap().state;
        assert_eq!(state_of(&t, "10.10.0.30", 100), "unconfirmed");
        assert_eq!(t.take_news().count(), 0, "a hint is not news for the other workers");
        assert_eq!(aged(&mut t, 101), [(c.idx, Some(PEER_MAC))], "asked by unicast at once");
        t.learn(v4("10.10.0.30"), PEER_MAC, 102);
        for now in (1_200..30_000).step_by(1_000) {
            t.use_ref(c, now);
            assert!(aged(&mut t, now).is_empty(), "confirmed: not asked again at {now}");
        }

        // A wrong hint (the frame came through a router): unanswered, given up, broadcast.
        let d = t.index_of(v4("10.10.0.31"), 100);
        t.hint(d, NEW_MAC, 100);
        let mut asked = Vec::new();
        for now in [100, 1_100, 2_100] {
            t.use_ref(d, now);
            asked.extend(aged(&mut t, now).into_iter().filter(|(i, _)| *i == d.idx));
            if now == 1_100 {
                assert_eq!(state_of(&t, "10.10.0.31", now), "probe");
            }
        }
        assert_eq!(asked, [(d.idx, Some(NEW_MAC)), (d.idx, Some(NEW_MAC)), (d.idx, None)]);
        assert_eq!(state_of(&t, "10.10.0.31", 2_100), "incomplete");
        assert!(t.view(2_100).iter().all(|n| NeighborView::STATES.contains(&n.state)));
        assert_eq!(state_of(&t, "10.10.0.30", 2_100), "reachable");
        assert_eq!(t.use_ref(d, 2_200), RefState::Unresolved);
        assert_eq!(t.counters.failures, 1);
        let moved = NeighborRef { gen: d.gen.wrapping_add(1), ..d };
        t.hint(moved, PEER_MAC, 2_300);
        assert_eq!(t.use_ref(d, 2_300), RefState::Unresolved, "a hint for another generation is ignored");
    }

    /// Sixteen workers' tables, one neighbour they all send to: an answer to any one's probe
    /// reaches them all (worker 0 receives it and passes it on). Reachable times drawn at
    /// random make one of them ask first and the answer spare the others; the same time for
    /// all makes all sixteen ask at once, every cycle.
    #[test]
    fn random_reachable_times_spare_the_other_workers_a_probe() {
        fn probes_over_ten_seconds(jitter: bool) -> u64 {
            let x = v4("10.10.0.11");
            let mut tables: Vec<_> = (0..16u64)
                .map(|k| {
                    let t = NeighborTable::with_reachability(8, 1_000, 3);
                    if jitter {
                        t.with_jitter(0x9e37_79b9 * (k + 1))
                    } else {
                        t
                    }
                })
                .collect();
            let refs: Vec<_> = tables.iter_mut().map(|t| t.index_of(x, 1)).collect();
            for t in &mut tables {
                t.learn_quietly(x, PEER_MAC, 1);
            }
            let mut answer_at = None;
            for now in 2..10_000u64 {
                for (t, r) in tables.iter_mut().zip(&refs) {
                    assert_eq!(t.use_ref(*r, now), RefState::Resolved(PEER_MAC));
                    let mut asked = false;
                    t.age(now, |_| {
                        asked = true;
                        true
                    });
                    if asked && answer_at.is_none() {
                        answer_at = Some(now + 1);
                    }
                }
                if answer_at == Some(now) {
                    answer_at = None;
                    tables[0].learn(x, PEER_MAC, now);
                    let news: Vec<_> = tables[0].take_news().collect();
                    for t in &mut tables[1..] {
                        for &(ip, mac) in &news {
                            t.learn_quietly(ip, mac, now);
                        }
                    }
                }
            }
            assert!(tables.iter().all(|t| t.counters.failures == 0));
            tables.iter().map(|t| t.counters.probes).sum()
        }
        let (with, without) = (probes_over_ten_seconds(true), probes_over_ten_seconds(false));
        assert!(with <= 20, "{with} probes in ten seconds with random reachable times");
        eprintln!("probes over ten seconds: {with} with random reachable times, {without} without");
        assert!(without >= 128, "{without} probes in ten seconds without");
    }

    #[test]
    fn aging_stops_when_the_caller_has_no_room() {
        let mut t = NeighborTable::with_reachability(8, 1_000, 3);
        let refs: Vec<_> = (0..4).map(|i| t.index_of(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 20 + i)), 0)).collect();
        for r in &refs {
            t.learn(t.ip_at(r.idx), PEER_MAC, 0);
            t.use_ref(*r, 1_500);
        }
        let mut asked = Vec::new();
        t.age(2_000, |i| {
            asked.push(i);
            asked.len() < 2
        });
        assert_eq!(asked.len(), 2, "stopped at the refusal");
        assert_eq!(t.counters.probes, 1, "the refused one is not counted");
        let mut rest = Vec::new();
        t.age(2_001, |i| {
            rest.push(i);
            true
        });
        let mut all: Vec<_> = asked[..1].iter().chain(&rest).copied().collect();
        all.sort();
        assert_eq!(all, refs.iter().map(|r| r.idx).collect::<Vec<_>>(), "each asked once");
    }
}
