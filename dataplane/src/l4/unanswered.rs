//! Passive health for TCP endpoints, per core: an endpoint that leaves clients' SYNs unanswered
//! is passed over by new flows for a while.
//!
//! The neighbour table catches an endpoint gone from the link (no ARP/NDP answer), but not one
//! behind a router that still answers, nor a host that is up with its service hung or
//! firewalled: Maglev keeps giving such an endpoint its share of new flows, each one a client
//! waiting out its SYN retransmissions until the API server notices (if it ever does). Under
//! FullNAT the endpoint's answers come back through the appliance, so a flow still in SYN-SENT
//! when its client sends the SYN again (a second or more later) is an endpoint that did not
//! answer: the SYN-ACK or RST would have moved the flow on. That is what nginx's `max_fails`,
//! HAProxy's `observe layer4` and Envoy's consecutive-failure outlier detection count, here
//! without a proxy in the path.
//!
//! Per core, like everything on the worker: each core judges from the flows it sees (RSS keeps
//! a client's retransmissions on its flow's core), and tells the others its verdicts (`News`,
//! through the runtime's rings between workers), so that an endpoint one core found dead is
//! passed over by all of them at once rather than after each core's own clients waited.

use ahash::AHashMap;
use std::net::IpAddr;

/// A client re-sending its SYN this soon after the last one is not a retransmission after an
/// unanswered SYN (TCP's minimum retransmission timeout is 200 ms; a first SYN waits 1 s) but a
/// duplicate, or a client's new connection on the same port; it counts for nothing.
pub const MIN_RESEND_MS: u32 = 200;

/// Endpoints tracked at most per core: entries exist only for endpoints that missed SYNs, so
/// this bounds a table no honest traffic fills; when full, new endpoints are not tracked.
const CAPACITY: usize = 4096;

/// An endpoint not tracked (or whose last miss is this old and that is not passed over) is
/// forgotten by `forget_stale`.
const STALE_MS: u64 = 60_000;

/// An endpoint: its address and TCP port.
pub type Endpoint = (IpAddr, u16);

/// A verdict for the other workers: the endpoint is passed over for this many more
/// milliseconds (each worker has its own clock), or (None) it answered.
pub type News = (Endpoint, Option<u32>);

/// News kept between two `take_news` (a loop iteration's worth); more is dropped (the other
/// workers then judge by themselves, as before news existed).
const NEWS_CAPACITY: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Suspect {
    /// Unanswered SYNs since the endpoint last answered one.
    misses: u8,
    last_miss_ms: u64,
    /// New flows pass over it until then.
    passed_over_until: u64,
}

pub struct UnansweredSyns {
    /// Misses that pass an endpoint over; 0: off.
    threshold: u8,
    pass_over_ms: u64,
    suspects: AHashMap<Endpoint, Suspect>,
    news: Vec<News>,
}

impl UnansweredSyns {
    pub fn new(threshold: u8, pass_over_ms: u64) -> UnansweredSyns {
        UnansweredSyns { threshold, pass_over_ms, suspects: AHashMap::new(), news: Vec::new() }
    }

    pub fn enabled(&self) -> bool {
        self.threshold > 0
    }

    /// A client sent again the SYN of a flow that `e` never answered. Returns whether new flows
    /// pass over `e` now (the flow of that SYN should pick again too).
    pub fn missed(&mut self, e: Endpoint, now_ms: u64) -> bool {
        let (threshold, pass_over_ms) = (self.threshold, self.pass_over_ms);
        let Some(s) = self.suspect(e, now_ms) else { return false };
        s.misses = s.misses.saturating_add(1);
        let verdict = s.misses >= threshold && s.passed_over_until <= now_ms;
        if verdict {
            s.passed_over_until = now_ms + pass_over_ms;
        }
        let passed_over = s.passed_over_until > now_ms;
        if verdict && self.news.len() < NEWS_CAPACITY {
            self.news.push((e, Some(pass_over_ms as u32)));
        }
        passed_over
    }

    /// `e`'s record, made if missing, its last miss now; None when the check is off, or the
    /// table is full and `e` not in it.
    fn suspect(&mut self, e: Endpoint, now_ms: u64) -> Option<&mut Suspect> {
        if !self.enabled() || (self.suspects.len() >= CAPACITY && !self.suspects.contains_key(&e)) {
            return None;
        }
        let s = self.suspects.entry(e).or_insert(Suspect { misses: 0, last_miss_ms: now_ms, passed_over_until: 0 });
        s.last_miss_ms = now_ms;
        Some(s)
    }

    /// `e` answered a SYN (a SYN-ACK or a RST came back): its count starts over.
    #[inline]
    pub fn answered(&mut self, e: Endpoint) {
        if !self.suspects.is_empty() && self.suspects.remove(&e).is_some() && self.news.len() < NEWS_CAPACITY {
            self.news.push((e, None));
        }
    }

    /// The verdicts reached here since the last call, for the other workers.
    pub fn take_news(&mut self) -> std::vec::Drain<'_, News> {
        self.news.drain(..)
    }

    /// Another worker's verdict: passed over for `ms` more (as if this worker had seen the
    /// misses: one more here passes it over again when the time is up), or answered. Makes no
    /// news of its own.
    pub fn hear(&mut self, (e, verdict): News, now_ms: u64) {
        let threshold = self.threshold;
        match verdict {
            Some(ms) => {
                if let Some(s) = self.suspect(e, now_ms) {
                    s.misses = s.misses.max(threshold);
                    s.passed_over_until = s.passed_over_until.max(now_ms + ms as u64);
                }
            }
            None => {
                self.suspects.remove(&e);
            }
        }
    }

    /// No endpoint has missed a SYN (always so while the check is off).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.suspects.is_empty()
    }

    /// Whether new flows pass over `e` now. One branch while no endpoint missed a SYN.
    #[inline]
    pub fn passed_over(&self, e: Endpoint, now_ms: u64) -> bool {
        !self.suspects.is_empty() && self.suspects.get(&e).is_some_and(|s| s.passed_over_until > now_ms)
    }

    /// Drops endpoints that missed nothing for a minute and are not passed over (ones that
    /// left the tables, or missed a SYN or two long ago).
    pub fn forget_stale(&mut self, now_ms: u64) {
        if !self.suspects.is_empty() {
            self.suspects.retain(|_, s| s.passed_over_until > now_ms || now_ms < s.last_miss_ms + STALE_MS);
        }
    }

    /// The endpoints new flows pass over now, sorted (for the counters' copy).
    pub fn passed_over_now(&self, now_ms: u64) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> =
            self.suspects.iter().filter(|(_, s)| s.passed_over_until > now_ms).map(|(e, _)| *e).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> Endpoint {
        (IpAddr::from([10, 0, 0, last]), 8080)
    }

    #[test]
    fn the_third_miss_passes_an_endpoint_over_until_its_time_then_one_more_miss_does_again() {
        let mut u = UnansweredSyns::new(3, 10_000);
        assert!(!u.passed_over(ep(1), 0));
        assert!(!u.missed(ep(1), 1000));
        assert!(!u.missed(ep(1), 3000));
        assert!(!u.passed_over(ep(1), 3000));
        assert!(u.missed(ep(1), 7000), "the third miss");
        assert!(u.passed_over(ep(1), 7000));
        assert!(u.passed_over(ep(1), 16_999));
        assert!(!u.passed_over(ep(2), 8000), "only that endpoint");
        assert_eq!(u.passed_over_now(8000), [ep(1)]);
        // Its time is over: the next flow tries it; a miss then passes it over at once.
        assert!(!u.passed_over(ep(1), 17_000));
        assert!(u.missed(ep(1), 18_000));
        assert!(u.passed_over(ep(1), 27_999));
        // Misses meanwhile do not stretch the time.
        assert!(u.missed(ep(1), 20_000));
        assert!(!u.passed_over(ep(1), 28_000));
    }

    #[test]
    fn an_answer_starts_the_count_over_and_ends_a_pass_over() {
        let mut u = UnansweredSyns::new(3, 10_000);
        u.missed(ep(1), 1000);
        u.missed(ep(1), 2000);
        u.answered(ep(1));
        assert!(!u.missed(ep(1), 3000));
        assert!(!u.missed(ep(1), 4000));
        assert!(u.missed(ep(1), 5000));
        u.answered(ep(1));
        assert!(!u.passed_over(ep(1), 5001));
        assert!(u.passed_over_now(5001).is_empty());
    }

    #[test]
    fn verdicts_go_to_the_other_workers_once_and_are_heard_there() {
        let (mut a, mut b) = (UnansweredSyns::new(3, 10_000), UnansweredSyns::new(3, 10_000));
        a.missed(ep(1), 1000);
        a.missed(ep(1), 2000);
        assert_eq!(a.take_news().count(), 0, "no verdict yet");
        a.missed(ep(1), 3000);
        a.missed(ep(1), 4000); // already passed over: no second verdict
        let news: Vec<News> = a.take_news().collect();
        assert_eq!(news, [(ep(1), Some(10_000))]);
        // b's clock is its own: 500 ms behind.
        for n in news {
            b.hear(n, 2500);
        }
        assert!(b.passed_over(ep(1), 12_499) && !b.passed_over(ep(1), 12_500));
        assert_eq!(b.take_news().count(), 0, "heard news is not passed on again");
        // b's next miss after the time is up passes it over again at once.
        assert!(b.missed(ep(1), 13_000));
        // An answer at a is news too; b forgets the endpoint.
        a.answered(ep(1));
        a.answered(ep(2)); // never suspected: no news
        let news: Vec<News> = a.take_news().collect();
        assert_eq!(news, [(ep(1), None)]);
        b.take_news().for_each(drop);
        for n in news {
            b.hear(n, 13_100);
        }
        assert!(!b.passed_over(ep(1), 13_100));
        assert!(!b.missed(ep(1), 14_000), "counting starts over");
    }

    #[test]
    fn off_stale_and_full() {
        let mut off = UnansweredSyns::new(0, 10_000);
        for t in 0..10 {
            assert!(!off.missed(ep(1), t * 1000));
        }
        assert!(!off.passed_over(ep(1), 10_000));

        let mut u = UnansweredSyns::new(1, 10_000);
        u.missed(ep(1), 0);
        u.missed(ep(2), 0);
        // A minute on: the endpoint passed over long ago and missing nothing since is forgotten.
        u.forget_stale(59_999);
        assert_eq!(u.suspects.len(), 2);
        u.forget_stale(60_000);
        assert!(u.suspects.is_empty());
        // One still passed over is kept, however old its last miss.
        let mut long = UnansweredSyns::new(1, 120_000);
        long.missed(ep(3), 0);
        long.forget_stale(90_000);
        assert!(long.passed_over(ep(3), 90_000));

        // Full: endpoints beyond the capacity are not tracked; tracked ones still are.
        let mut full = UnansweredSyns::new(1, 10_000);
        for k in 0..CAPACITY {
            full.missed((IpAddr::from([10, 1, (k >> 8) as u8, k as u8]), 80), 0);
        }
        assert!(!full.missed(ep(9), 0));
        assert!(!full.passed_over(ep(9), 0));
        assert!(full.missed((IpAddr::from([10, 1, 0, 5]), 80), 1));
    }
}
