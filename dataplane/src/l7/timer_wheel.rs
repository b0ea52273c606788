//! When each of the stack's shards next needs polling for a timer (retransmission, delayed ACK,
//! keep-alive, TIME-WAIT), kept in a hashed wheel of one-millisecond slots.
//!
//! DESIGN.md: "keep a timer heap per core instead of calling `poll_at` on every shard". Asking
//! every shard each millisecond costs O(shards) even when none is due (3.8% of a worker at 10,000
//! connections); a binary heap costs O(log n) cache misses per reschedule, and a busy connection
//! reschedules on every segment. A wheel inserts and expires in O(1). Entries are never removed
//! on reschedule: the owner keeps the one time that counts (`Shard::filed`) and ignores stale
//! entries as they expire; it files a new entry only for an earlier time (a later one waits for
//! the entry it has to come up), so a shard rarely holds more than one.
//! The proxy's connections use `DeadlineWheel` (below), whose entries can be cancelled.

/// Slots: one per millisecond, one lap. A timer further out than a lap sits in its slot and is
/// passed over (kept) until the lap that reaches it.
const SLOTS: usize = 1024;

/// The slots an expiry at `now_ms` looks at, the first millisecond not yet expired being
/// `next_ms`: the ones in between, or after a gap of a lap or more every slot once; none if
/// `now_ms` is before `next_ms`.
fn due_slots(next_ms: u64, now_ms: u64) -> impl Iterator<Item = usize> {
    let n = if now_ms < next_ms { 0 } else { ((now_ms - next_ms) as usize + 1).min(SLOTS) };
    (next_ms..next_ms + n as u64).map(|ms| ms as usize % SLOTS)
}

/// Entries a chunk holds: a chunk is 1 KiB, so a slot's entries are written and read in line
/// order.
const CHUNK: usize = 63;

/// A run of one slot's entries; chunks come from the wheel's pool and go back to it when their
/// slot expires.
struct Chunk {
    len: u32,
    /// The slot's next (older) chunk.
    next: u32,
    entries: [(u64, u32); CHUNK],
}

/// Each slot's entries sit in a list of fixed-size chunks from one pool, so the wheel holds
/// memory for the entries it has, not for every slot's busiest moment: with a vector per slot,
/// each slot kept the capacity of the most entries it ever held, and a worker whose whole burst
/// of 20,000 connections filed timers into the same millisecond grew slot after slot to
/// 20,000 entries (`fulcrum-bench l7 --conns 10000`: 8% of the worker in growing vectors and
/// zeroing their pages, hundreds of megabytes held).
pub struct TimerWheel {
    /// Per slot, its newest chunk (the one being filled).
    heads: Vec<u32>,
    chunks: Vec<Chunk>,
    /// Chunks given back, linked through `next`.
    free: u32,
    len: usize,
    /// The first millisecond not yet expired.
    next_ms: u64,
}

impl TimerWheel {
    pub fn new(now_ms: u64) -> TimerWheel {
        TimerWheel { heads: vec![NIL; SLOTS], chunks: Vec::new(), free: NIL, len: 0, next_ms: now_ms }
    }

    /// Asks for `id` at `at_ms` (a time already past fires at the next `expire`); returns the
    /// time filed, which `expire` hands back.
    pub fn schedule(&mut self, at_ms: u64, id: u32) -> u64 {
        let at = at_ms.max(self.next_ms);
        self.push(at as usize % SLOTS, (at, id));
        at
    }

    fn push(&mut self, slot: usize, entry: (u64, u32)) {
        let mut c = self.heads[slot];
        if c == NIL || self.chunks[c as usize].len as usize == CHUNK {
            c = self.take_chunk(c);
            self.heads[slot] = c;
        }
        let chunk = &mut self.chunks[c as usize];
        chunk.entries[chunk.len as usize] = entry;
        chunk.len += 1;
        self.len += 1;
    }

    /// An empty chunk from the pool (a new one when the pool is dry) whose next is `next`.
    fn take_chunk(&mut self, next: u32) -> u32 {
        let c = if self.free != NIL {
            let c = self.free;
            self.free = self.chunks[c as usize].next;
            c
        } else {
            self.chunks.push(Chunk { len: 0, next: NIL, entries: [(0, 0); CHUNK] });
            (self.chunks.len() - 1) as u32
        };
        let chunk = &mut self.chunks[c as usize];
        (chunk.len, chunk.next) = (0, next);
        c
    }

    /// Hands every entry due by `now_ms` to `fire` as (time asked for, id), in no set order.
    pub fn expire(&mut self, now_ms: u64, mut fire: impl FnMut(u64, u32)) {
        for slot in due_slots(self.next_ms, now_ms) {
            // The slot's chunks are emptied and given back; entries a lap or more away are
            // filed in it again.
            let mut c = std::mem::replace(&mut self.heads[slot], NIL);
            while c != NIL {
                let (len, next) = (self.chunks[c as usize].len, self.chunks[c as usize].next);
                self.len -= len as usize;
                for k in 0..len as usize {
                    let (at, id) = self.chunks[c as usize].entries[k];
                    if at <= now_ms {
                        fire(at, id);
                    } else {
                        self.push(slot, (at, id));
                    }
                }
                // Given back only now: the pushes above must not take the chunk being read.
                self.chunks[c as usize].next = self.free;
                self.free = c;
                c = next;
            }
        }
        self.next_ms = self.next_ms.max(now_ms + 1);
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks made so far (in use or in the pool): what the wheel's memory grew to.
    #[cfg(test)]
    fn chunks_made(&self) -> usize {
        self.chunks.len()
    }
}

/// No entry (the end of a slot's list, or of the free list).
const NIL: u32 = u32::MAX;

/// One filed timer. Entries live in a slab and each slot's entries form a doubly linked list
/// through it, so that an owner that no longer needs its timer (a connection gone long before
/// its 10 s header timeout) takes it out at once: with plain per-slot vectors such an entry
/// could only wait for its time, and at 190,000 connections a second `fulcrum-bench l7
/// --new-conn --clock worker` held a million of them after 5 s, each passed over once a lap.
struct Entry {
    at: u64,
    id: u32,
    /// Bumped when the entry is freed: a handle to an earlier use does nothing.
    generation: u32,
    prev: u32,
    next: u32,
}

/// What `schedule` returns; `cancel` takes it. A handle whose timer has fired or was cancelled
/// is dead: cancelling it again does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerHandle {
    index: u32,
    generation: u32,
}

impl TimerHandle {
    /// A handle to no timer (for owners that have not filed one yet).
    pub const NONE: TimerHandle = TimerHandle { index: NIL, generation: 0 };
}

/// A wheel like `TimerWheel` whose entries can be cancelled, for the proxy's connections:
/// their deadlines are seconds away (header, idle, FIN timeouts) and the connection usually goes
/// long before, so an entry left to its time would outlive it by seconds. Each slot's entries
/// form a doubly linked list through a slab, so that `cancel` is O(1). That costs misses the
/// chunks do not (a schedule touches the slot's previous head, an expiry walks a list), which is
/// why the stack's shards, rescheduled on every segment with milliseconds-away timers, keep
/// `TimerWheel`: with this wheel there, scheduling and expiring shard timers took 2.9% of the
/// worker in `fulcrum-bench l7 --new-conn --clock worker` instead of 0.45% (perf), and the
/// proxy's own entries 0.05%.
pub struct DeadlineWheel {
    /// Per slot, its first entry.
    heads: Vec<u32>,
    entries: Vec<Entry>,
    /// Freed entries, linked through `next`.
    free: u32,
    len: usize,
    /// The first millisecond not yet expired.
    next_ms: u64,
}

impl DeadlineWheel {
    pub fn new(now_ms: u64) -> DeadlineWheel {
        DeadlineWheel { heads: vec![NIL; SLOTS], entries: Vec::new(), free: NIL, len: 0, next_ms: now_ms }
    }

    /// Asks for `id` at `at_ms` (a time already past fires at the next `expire`); returns the
    /// time filed, which `expire` hands back, and the handle that cancels it.
    pub fn schedule(&mut self, at_ms: u64, id: u32) -> (u64, TimerHandle) {
        let at = at_ms.max(self.next_ms);
        let slot = at as usize % SLOTS;
        let head = self.heads[slot];
        let index = if self.free != NIL {
            let k = self.free;
            self.free = self.entries[k as usize].next;
            k
        } else {
            self.entries.push(Entry { at: 0, id: 0, generation: 0, prev: NIL, next: NIL });
            (self.entries.len() - 1) as u32
        };
        let e = &mut self.entries[index as usize];
        (e.at, e.id, e.prev, e.next) = (at, id, NIL, head);
        let generation = e.generation;
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[slot] = index;
        self.len += 1;
        (at, TimerHandle { index, generation })
    }

    /// Takes a timer out before its time; a dead handle (fired, cancelled, or `NONE`) does
    /// nothing.
    pub fn cancel(&mut self, h: TimerHandle) {
        let live = self.entries.get(h.index as usize).is_some_and(|e| e.generation == h.generation);
        if live {
            self.unlink(h.index);
        }
    }

    /// Takes entry `k` out of its slot's list and frees it.
    fn unlink(&mut self, k: u32) {
        let e = &mut self.entries[k as usize];
        let (prev, next, slot) = (e.prev, e.next, e.at as usize % SLOTS);
        e.generation = e.generation.wrapping_add(1);
        e.next = self.free;
        self.free = k;
        if prev == NIL {
            self.heads[slot] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        self.len -= 1;
    }

    /// Hands every entry due by `now_ms` to `fire` as (time asked for, id), in no set order.
    pub fn expire(&mut self, now_ms: u64, mut fire: impl FnMut(u64, u32)) {
        for slot in due_slots(self.next_ms, now_ms) {
            let mut k = self.heads[slot];
            while k != NIL {
                let e = &self.entries[k as usize];
                let (at, id, next) = (e.at, e.id, e.next);
                if at <= now_ms {
                    self.unlink(k);
                    fire(at, id);
                }
                k = next;
            }
        }
        self.next_ms = self.next_ms.max(now_ms + 1);
    }

    /// Timers filed and not yet fired or cancelled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two wheels behind one face, so that the behaviour they share is tested on both.
    trait Wheel {
        fn at(now_ms: u64) -> Self;
        fn put(&mut self, at_ms: u64, id: u32);
        fn expire_into(&mut self, now_ms: u64, out: &mut Vec<(u64, u32)>);
        fn entries(&self) -> usize;
    }

    macro_rules! impl_wheel {
        ($t:ty) => {
            impl Wheel for $t {
                fn at(now_ms: u64) -> Self {
                    <$t>::new(now_ms)
                }
                fn put(&mut self, at_ms: u64, id: u32) {
                    self.schedule(at_ms, id);
                }
                fn expire_into(&mut self, now_ms: u64, out: &mut Vec<(u64, u32)>) {
                    self.expire(now_ms, |at, id| out.push((at, id)));
                }
                fn entries(&self) -> usize {
                    self.len()
                }
            }
        };
    }
    impl_wheel!(TimerWheel);
    impl_wheel!(DeadlineWheel);

    /// What expires by `now`, sorted.
    fn fired(w: &mut impl Wheel, now: u64) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        w.expire_into(now, &mut v);
        v.sort_unstable();
        v
    }

    fn timers_fire_at_their_millisecond_and_not_before<W: Wheel>() {
        let mut w = W::at(100);
        w.put(105, 1);
        w.put(103, 2);
        w.put(50, 3); // already past: next expiry
        assert_eq!(fired(&mut w, 100), [(100, 3)]);
        assert_eq!(fired(&mut w, 102), []);
        assert_eq!(fired(&mut w, 104), [(103, 2)]);
        assert_eq!(fired(&mut w, 105), [(105, 1)]);
        assert_eq!(w.entries(), 0);
    }

    fn a_timer_beyond_one_lap_waits_for_its_lap<W: Wheel>() {
        let mut w = W::at(0);
        let far = 3 * SLOTS as u64 + 7;
        w.put(far, 9);
        for now in (0..far).step_by(5) {
            assert_eq!(fired(&mut w, now), [], "at {now}");
        }
        assert_eq!(fired(&mut w, far + 2), [(far, 9)]);
    }

    fn a_gap_longer_than_a_lap_fires_everything_due_once<W: Wheel>() {
        let mut w = W::at(0);
        for id in 0..3000u32 {
            w.put(id as u64, id);
        }
        w.put(10_000, 7777);
        let v = fired(&mut w, 5000);
        assert_eq!(v.len(), 3000);
        assert!(v.iter().enumerate().all(|(i, &(at, id))| at == i as u64 && id == i as u32));
        assert_eq!(w.entries(), 1);
        assert_eq!(fired(&mut w, 10_000), [(10_000, 7777)]);
    }

    #[test]
    fn both_wheels_fire_on_time_across_laps_and_gaps() {
        timers_fire_at_their_millisecond_and_not_before::<TimerWheel>();
        timers_fire_at_their_millisecond_and_not_before::<DeadlineWheel>();
        a_timer_beyond_one_lap_waits_for_its_lap::<TimerWheel>();
        a_timer_beyond_one_lap_waits_for_its_lap::<DeadlineWheel>();
        a_gap_longer_than_a_lap_fires_everything_due_once::<TimerWheel>();
        a_gap_longer_than_a_lap_fires_everything_due_once::<DeadlineWheel>();
    }

    /// A burst of timers filed into one millisecond after another, lap after lap, reuses the
    /// same chunks: the wheel's memory follows the entries it holds at once, not how many each
    /// slot ever held.
    #[test]
    fn bursts_into_ever_new_slots_reuse_the_same_chunks() {
        const BURST: u32 = 20_000;
        let mut w = TimerWheel::new(0);
        let mut now = 0;
        let rounds = 3 * SLOTS as u64 / 7;
        for round in 0..rounds {
            for id in 0..BURST {
                w.schedule(now + 3, id);
            }
            // One far timer per round stays filed over laps (moved from chunk to chunk).
            w.schedule(now + 5 * SLOTS as u64, BURST + round as u32);
            now += 7;
            let fired = fired(&mut w, now);
            assert_eq!(fired.iter().filter(|&&(_, id)| id < BURST).count(), BURST as usize, "round {round}");
        }
        let far_left = w.len();
        assert_eq!(far_left as u64, rounds, "every far timer is still filed");
        // One burst's chunks, plus the far timers' (at most one chunk per slot), plus one
        // being refilled.
        let bound = (BURST as usize).div_ceil(CHUNK) + far_left + 2;
        assert!(w.chunks_made() <= bound, "{} chunks made, {bound} at most", w.chunks_made());
        let all = fired(&mut w, now + 6 * SLOTS as u64);
        assert_eq!(all.len(), far_left);
        assert!(w.is_empty());
    }

    #[test]
    fn a_cancelled_timer_never_fires_and_its_handle_dies() {
        let mut w = DeadlineWheel::new(0);
        let (_, a) = w.schedule(10, 1);
        let (_, b) = w.schedule(10, 2);
        let (_, c) = w.schedule(10 + SLOTS as u64, 3); // the same slot, a lap later
        w.cancel(b);
        assert_eq!(w.len(), 2);
        w.cancel(b); // dead: nothing happens
        w.cancel(TimerHandle::NONE);
        assert_eq!(w.len(), 2);
        assert_eq!(fired(&mut w, 10), [(10, 1)]);
        // `a` fired: its entry is reused by the next timer, which `a` must not touch.
        let (_, d) = w.schedule(20, 4);
        assert_eq!(d.index, a.index, "the slab reuses the freed entry");
        w.cancel(a);
        assert_eq!(w.len(), 2);
        w.cancel(c);
        assert_eq!(fired(&mut w, 5000), [(20, 4)]);
        assert!(w.is_empty());
    }

    /// Cancelling in any order keeps every slot's list whole: what is left fires, once.
    #[test]
    fn cancels_anywhere_in_a_slot_keep_the_rest() {
        let mut w = DeadlineWheel::new(0);
        let hs: Vec<TimerHandle> = (0..300u32).map(|id| w.schedule(7 + (id % 3) as u64 * SLOTS as u64, id).1).collect();
        for (id, h) in hs.iter().enumerate() {
            if id % 4 == 1 || id % 7 == 0 {
                w.cancel(*h);
            }
        }
        let left: Vec<u32> = (0..300u32).filter(|id| !(id % 4 == 1 || id % 7 == 0)).collect();
        assert_eq!(w.len(), left.len());
        let mut ids: Vec<u32> = fired(&mut w, 10 * SLOTS as u64).into_iter().map(|(_, id)| id).collect();
        ids.sort_unstable();
        assert_eq!(ids, left);
        assert!(w.is_empty());
    }
}
