//! Worker threads: one per configured core, pinned, run to completion over their own port
//! queue. They share three things, none of them per packet:
//! - the published snapshot: a generation number read once per loop iteration (a plain load,
//!   no read-modify-write), and, only when it changed, the new snapshot taken under a lock;
//! - the stop flag, read once per iteration;
//! - hand-off rings: FullNAT return traffic that RSS delivered to the wrong core goes to the
//!   owner of its SNAT port through a single-producer single-consumer ring per pair of cores
//!   (`rtrb`: wait-free, loads and stores only).
//!
//! Each worker copies its counters out every ~100 ms for the control thread to read, and at once
//! when a health check verdict changes (the control thread then rebuilds without the endpoint).

use crate::l7::access_log::AccessLog;
use crate::port::{Burst, Port, BURST};
use crate::snapshot::Snapshot;
use crate::stats::{CoreStats, DropReason};
use crate::worker::{Worker, WorkerConfig};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the control thread publishes snapshots and workers pick them up.
pub struct SnapshotCell {
    generation: AtomicU64,
    current: Mutex<Arc<Snapshot>>,
    /// Snapshots replaced but perhaps still held by a worker. They are freed here, by the
    /// control thread (`reclaim`), never by a worker: freeing 10,000 services' tables takes
    /// milliseconds that a worker must spend on packets.
    retired: Mutex<Vec<Arc<Snapshot>>>,
}

impl SnapshotCell {
    pub fn new(s: Arc<Snapshot>) -> SnapshotCell {
        SnapshotCell {
            generation: AtomicU64::new(s.generation),
            current: Mutex::new(s),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// Makes `s` current; workers switch at their next loop iteration. Never blocks a worker
    /// for longer than an Arc clone.
    pub fn publish(&self, s: Arc<Snapshot>) {
        let g = s.generation;
        let old = std::mem::replace(&mut *self.current.lock().unwrap_or_else(|e| e.into_inner()), s);
        self.generation.store(g, Ordering::Release);
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.push(old);
        retired.retain(|r| Arc::strong_count(r) > 1);
    }

    /// Frees retired snapshots that no worker holds any more (call from the control thread).
    pub fn reclaim(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|r| Arc::strong_count(r) > 1);
    }

    #[inline(always)]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the workers share with the control thread.
pub struct Shared {
    pub snapshot: SnapshotCell,
    pub stop: AtomicBool,
    /// Set before `stop` for a graceful stop: each worker's L7 proxy drains (`Proxy::drain`).
    pub drain: AtomicBool,
    /// Each worker's latest counters.
    pub stats: Vec<Mutex<CoreStats>>,
    /// Generation each worker is running (for "all workers switched" checks).
    pub running_generation: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(snapshot: Arc<Snapshot>, workers: usize) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: SnapshotCell::new(snapshot),
            stop: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            stats: (0..workers).map(|_| Mutex::new(CoreStats::default())).collect(),
            running_generation: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The sum of every worker's last published counters.
    pub fn total_stats(&self) -> CoreStats {
        let mut t = CoreStats::default();
        for s in &self.stats {
            t.merge(&s.lock().unwrap_or_else(|e| e.into_inner()));
        }
        t
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Starts a graceful stop of the workers' L7 proxies (see `Proxy::drain`); `stop` ends it.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Release);
    }
}

/// How a worker waits when there is nothing to do.
#[derive(Clone, Copy, Debug)]
pub enum Idle {
    /// Poll without pause (lowest latency, one core at 100%).
    BusyPoll,
    /// Give the core to other threads while idle, and pause up to this long once idle for a
    /// while (labs, laptops: see `backoff_pause`).
    Backoff(Duration),
}

/// Back-off: how long a worker goes on polling (yielding the core between polls to any other
/// runnable thread) after the last packet before it pauses. Longer than a backend in the lab
/// takes to answer (tens of microseconds), so that the packets of one exchange find the worker
/// awake. (It paused after 64 empty polls before, a few microseconds: a sequential client
/// through the lab then made 2,400 requests/s, the kernel's DNAT 8,000.)
const SPIN_BEFORE_PAUSE: Duration = Duration::from_micros(200);
/// The shortest pause.
const MIN_PAUSE: Duration = Duration::from_micros(10);
/// The timer slack of a backing-off worker thread (see `run_worker`).
const TIMER_SLACK_NS: libc::c_ulong = 1_000;

/// How long an idle worker pauses, after `idle` without packets: nothing while it spins, then an
/// eighth of the time it has been idle (from `MIN_PAUSE` up to `max`), so that a packet after a
/// quiet spell waits at most about an eighth of that spell on top, and an idle worker wakes
/// about every `max`.
fn backoff_pause(idle: Duration, max: Duration) -> Option<Duration> {
    (idle > SPIN_BEFORE_PAUSE).then(|| (idle / 8).clamp(MIN_PAUSE, max.max(MIN_PAUSE)))
}

/// One worker to start: its configuration, the CPU core to pin it to, and its port queue.
pub struct WorkerSpec<P> {
    pub config: WorkerConfig,
    pub cpu: Option<usize>,
    pub port: P,
    /// Its proxy's access log (see `l7::access_log`); None: requests are not logged.
    pub access_log: Option<AccessLog>,
}

/// Starts one thread per spec. Worker i hands return traffic for core j to ring (i, j).
pub fn spawn<P>(specs: Vec<WorkerSpec<P>>, shared: Arc<Shared>, idle: Idle) -> std::io::Result<Vec<JoinHandle<()>>>
where
    P: Port + Send + 'static,
    P::Buf: Send + 'static,
{
    let n = specs.len();
    let (producers, consumers) = mesh::<P::Buf>(n, 4 * BURST);
    let (news_out, news_in) = mesh::<News>(n, NEWS_RING);
    let peers = producers.into_iter().zip(consumers).zip(news_out.into_iter().zip(news_in));
    let mut handles = Vec::with_capacity(n);
    for (i, (spec, ((outs, ins), (news_out, news_in)))) in specs.into_iter().zip(peers).enumerate() {
        let announce = spec.config.announce_at_start;
        let mut worker = Worker::new(spec.config, shared.snapshot.current())?;
        if let Some(log) = spec.access_log {
            worker.set_access_log(log);
        }
        if announce {
            worker.announce_own_addresses();
        }
        let shared = shared.clone();
        let news = WorkerNews { out: news_out.into_iter().flatten().collect(), incoming: news_in };
        let h = std::thread::Builder::new()
            .name(format!("fulcrum-w{i}"))
            .spawn(move || run_worker(i, worker, spec.port, spec.cpu, outs, ins, news, shared, idle))?;
        handles.push(h);
    }
    Ok(handles)
}

/// Single-producer rings between every pair of `n` workers: `producers[i][j]` (None where
/// i == j) feeds `consumers[j]`, which holds one ring from each other worker.
#[allow(clippy::type_complexity)]
fn mesh<T>(n: usize, capacity: usize) -> (Vec<Vec<Option<rtrb::Producer<T>>>>, Vec<Vec<rtrb::Consumer<T>>>) {
    let mut producers: Vec<Vec<Option<rtrb::Producer<T>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut consumers: Vec<Vec<rtrb::Consumer<T>>> = (0..n).map(|_| Vec::new()).collect();
    for (i, row) in producers.iter_mut().enumerate() {
        for (j, slot) in row.iter_mut().enumerate() {
            if i != j {
                let (p, c) = rtrb::RingBuffer::new(capacity);
                *slot = Some(p);
                consumers[j].push(c);
            }
        }
    }
    (producers, consumers)
}

/// What one worker learned that every other needs, since each keeps its tables alone.
/// - Neighbours: an ARP or NDP answer reaches only the worker whose queue the NIC put it in
///   (under RSS, queue 0 for ARP), whichever worker asked. Without this the others never
///   resolved a neighbour whose answers went elsewhere and dropped its traffic as unresolved.
/// - Passive health verdicts (`l4::unanswered`): an endpoint one worker found leaving SYNs
///   unanswered is passed over by all, instead of each worker's clients waiting out their own
///   misses first; an answer clears it everywhere.
#[derive(Clone, Copy, Debug)]
enum News {
    Neighbor(IpAddr, [u8; 6]),
    Health(crate::l4::unanswered::News),
}

struct WorkerNews {
    out: Vec<rtrb::Producer<News>>,
    incoming: Vec<rtrb::Consumer<News>>,
}

/// News in flight from one worker to another (a full ring drops news: the worker that misses
/// it solicits for itself a second later, or judges the endpoint by its own flows).
const NEWS_RING: usize = 256;

impl WorkerNews {
    /// Passes on what `w` learned, and takes what the others learned.
    fn exchange(&mut self, w: &mut Worker, now_ms: u64) {
        if self.out.is_empty() {
            // A worker alone: nobody to tell.
            w.neigh.take_news();
            w.unanswered.take_news();
            return;
        }
        let neighbors = w.neigh.take_news().map(|(ip, mac)| News::Neighbor(ip, mac));
        let health = w.unanswered.take_news().map(News::Health);
        for news in neighbors.chain(health) {
            for p in self.out.iter_mut() {
                let _ = p.push(news);
            }
        }
        for c in self.incoming.iter_mut() {
            while let Ok(news) = c.pop() {
                match news {
                    News::Neighbor(ip, mac) => {
                        w.neigh.learn_quietly(ip, mac, now_ms);
                    }
                    News::Health(n) => w.unanswered.hear(n, now_ms),
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_worker<P: Port>(
    index: usize,
    mut w: Worker,
    mut port: P,
    cpu: Option<usize>,
    mut outs: Vec<Option<rtrb::Producer<P::Buf>>>,
    mut ins: Vec<rtrb::Consumer<P::Buf>>,
    mut news: WorkerNews,
    shared: Arc<Shared>,
    idle: Idle,
) {
    if let Some(c) = cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
            eprintln!("fulcrum: worker {index}: could not pin to CPU {c}; running unpinned");
        }
    }
    // Held until the loop ends, dropped on this thread (a DPDK lcore id, see Port::attach_thread).
    let _attachment = port.attach_thread().unwrap_or_else(|e| {
        eprintln!("fulcrum: worker {index}: {e}; its packet buffers go through the pool's shared ring");
        None
    });
    let start = Instant::now();
    let mut generation = w.snapshot().generation;
    shared.running_generation[index].store(generation, Ordering::Release);
    let mut last_publish = 0u64;
    let mut transitions = 0u64;
    // Idle back-off: since when nothing came (None while there is work).
    let mut idle_since: Option<Instant> = None;
    if matches!(idle, Idle::Backoff(_)) {
        // The pauses are tens of microseconds: with the default timer slack (50 µs) each
        // would last 60 µs or more. Best effort: without it the pauses are only longer.
        // SAFETY: prctl with PR_SET_TIMERSLACK takes an integer and changes only this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS) };
    }
    let mut rx: Burst<P::Buf> = Burst::new();
    let mut tx: Burst<P::Buf> = Burst::new();
    let mut handoff: Burst<(u16, P::Buf)> = Burst::new();
    // When the last iteration began, and the pause it chose to take at its end: the loop's
    // time is from one poll to the next, less that pause, at no extra clock read.
    let mut last_top: Option<Instant> = None;
    let mut chosen_pause = Duration::ZERO;
    let mut draining = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let top = Instant::now();
        if let Some(t) = last_top {
            w.stats.loop_times.record((top - t).saturating_sub(chosen_pause).as_nanos() as u64);
        }
        chosen_pause = Duration::ZERO;
        let now_ms = (top - start).as_millis() as u64 + 1;
        if !draining && shared.drain.load(Ordering::Relaxed) {
            draining = true;
            w.drain_l7();
        }
        let g = shared.snapshot.generation();
        if g != generation {
            w.set_snapshot(shared.snapshot.current());
            generation = g;
            shared.running_generation[index].store(g, Ordering::Release);
        }
        let mut work = port.rx_burst(&mut rx);
        if work > 0 {
            w.process_burst_handoff(now_ms, &mut rx, &mut tx, Some(&mut handoff));
            w.send(&mut port, &mut tx);
            for (core, buf) in handoff.drain(..) {
                let pushed = outs.get_mut(core as usize).and_then(Option::as_mut).map(|p| p.push(buf).is_ok());
                if pushed != Some(true) {
                    w.stats.drop(DropReason::HandoffFull);
                }
            }
        }
        // Return traffic other cores received for our SNAT ports.
        for c in ins.iter_mut() {
            while !c.is_empty() {
                while rx.len() < BURST {
                    match c.pop() {
                        Ok(b) => rx.push(b),
                        Err(_) => break,
                    }
                }
                work += rx.len();
                w.stats.handoff_received += rx.len() as u64;
                w.process_burst(now_ms, &mut rx, &mut tx);
                w.send(&mut port, &mut tx);
            }
        }
        news.exchange(&mut w, now_ms);
        w.housekeeping(&mut port, now_ms);
        // A changed health verdict goes to the control thread at once, not at the next copy.
        // Never waits for the lock: a reader holding it (a /metrics scrape copying 100,000
        // endpoints' counters) would stall the worker that long; it copies at a later loop.
        if now_ms >= last_publish + 100 || w.stats.l7.health_transitions != transitions {
            let slot = match shared.stats[index].try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut slot) = slot {
                *slot = w.stats_copy();
                last_publish = now_ms;
                transitions = w.stats.l7.health_transitions;
            }
        }
        last_top = Some(top);
        if work == 0 {
            if let Idle::Backoff(max) = idle {
                let now = Instant::now();
                match backoff_pause(now - *idle_since.get_or_insert(now), max) {
                    Some(pause) => {
                        chosen_pause = pause;
                        std::thread::sleep(pause);
                    }
                    // Spinning: whatever else is runnable on this core (in the lab: the
                    // client, the backends) goes first, and the poll comes straight back
                    // when nothing is.
                    None => std::thread::yield_now(),
                }
            }
        } else {
            idle_since = None;
        }
    }
    // The proxy's connections are reset, not left for peers to time out.
    w.abort_connections(&mut port);
    *shared.stats[index].lock().unwrap_or_else(|e| e.into_inner()) = w.stats_copy();
}

#[cfg(test)]
mod tests {
    use super::{backoff_pause, MIN_PAUSE, SPIN_BEFORE_PAUSE};
    use std::time::Duration;

    #[test]
    fn an_idle_worker_spins_then_pauses_an_eighth_of_its_idle_time_up_to_the_maximum() {
        let max = Duration::from_millis(1);
        let us = Duration::from_micros;
        assert_eq!(backoff_pause(us(0), max), None);
        assert_eq!(backoff_pause(SPIN_BEFORE_PAUSE, max), None, "still spinning");
        assert_eq!(backoff_pause(SPIN_BEFORE_PAUSE + us(1), max), Some(Duration::from_nanos(25_125)));
        assert_eq!(backoff_pause(us(400), max), Some(us(50)));
        assert_eq!(backoff_pause(us(8_000), max), Some(max));
        assert_eq!(backoff_pause(Duration::from_secs(60), max), Some(max), "capped");
        // A maximum below the shortest pause still pauses (the shortest).
        assert_eq!(backoff_pause(us(400), us(1)), Some(MIN_PAUSE));
    }
}
