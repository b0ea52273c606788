//! When each of the stack's shards next needs polling for a timer (retransmission, delayed ACK,
//! keep-alive, TIME-WAIT), kept in a hashed wheel of one-millisecond slots.
//!
//! DESIGN.md: "keep a timer heap per core instead of calling `poll_at` on every shard". Asking
//! every shard each millisecond costs O(shards) even when none is due (3.8% of a worker at 10,000
//! connections); a binary heap costs O(log n) cache misses per reschedule, and a busy connection
//! reschedules on every segment. A wheel inserts and expires in O(1). Entries are never removed
//! on reschedule: the owner keeps the one time that counts (`Shard::timer`) and ignores stale
//! entries as they expire, so the wheel holds at most one entry per reschedule within a lap.

/// Slots: one per millisecond, one lap. A timer further out than a lap sits in its slot and is
/// passed over (kept) until the lap that reaches it.
const SLOTS: usize = 1024;

pub struct TimerWheel {
    slots: Vec<Vec<(u64, u32)>>,
    /// The first millisecond not yet expired.
    next_ms: u64,
}

impl TimerWheel {
    pub fn new(now_ms: u64) -> TimerWheel {
        TimerWheel { slots: (0..SLOTS).map(|_| Vec::new()).collect(), next_ms: now_ms }
    }

    /// Asks for `id` at `at_ms` (a time already past fires at the next `expire`); returns the
    /// time filed, which `expire` hands back.
    pub fn schedule(&mut self, at_ms: u64, id: u32) -> u64 {
        let at = at_ms.max(self.next_ms);
        self.slots[at as usize % SLOTS].push((at, id));
        at
    }

    /// Hands every entry due by `now_ms` to `fire` as (time asked for, id), in no set order.
    pub fn expire(&mut self, now_ms: u64, mut fire: impl FnMut(u64, u32)) {
        if now_ms < self.next_ms {
            return;
        }
        // After a gap of a lap or more every slot is due once; otherwise the slots in between.
        let laps = (now_ms - self.next_ms) as usize + 1;
        for ms in self.next_ms..self.next_ms + laps.min(SLOTS) as u64 {
            self.slots[ms as usize % SLOTS].retain(|&(at, id)| {
                if at <= now_ms {
                    fire(at, id);
                    false
                } else {
                    true
                }
            });
        }
        self.next_ms = now_ms + 1;
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(w: &mut TimerWheel, now: u64) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        w.expire(now, |at, id| v.push((at, id)));
        v.sort_unstable();
        v
    }

    #[test]
    fn timers_fire_at_their_millisecond_and_not_before() {
        let mut w = TimerWheel::new(100);
        w.schedule(105, 1);
        w.schedule(103, 2);
        w.schedule(50, 3); // already past: next expiry
        assert_eq!(fired(&mut w, 100), [(100, 3)]);
        assert_eq!(fired(&mut w, 102), []);
        assert_eq!(fired(&mut w, 104), [(103, 2)]);
        assert_eq!(fired(&mut w, 105), [(105, 1)]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_timer_beyond_one_lap_waits_for_its_lap() {
        let mut w = TimerWheel::new(0);
        let far = 3 * SLOTS as u64 + 7;
        w.schedule(far, 9);
        for now in (0..far).step_by(5) {
            assert_eq!(fired(&mut w, now), [], "at {now}");
        }
        assert_eq!(fired(&mut w, far + 2), [(far, 9)]);
    }

    #[test]
    fn a_gap_longer_than_a_lap_fires_everything_due_once() {
        let mut w = TimerWheel::new(0);
        for id in 0..3000u32 {
            w.schedule(id as u64, id);
        }
        w.schedule(10_000, 7777);
        let v = fired(&mut w, 5000);
        assert_eq!(v.len(), 3000);
        assert!(v.iter().enumerate().all(|(i, &(at, id))| at == i as u64 && id == i as u32));
        assert_eq!(w.len(), 1);
        assert_eq!(fired(&mut w, 10_000), [(10_000, 7777)]);
    }
}
