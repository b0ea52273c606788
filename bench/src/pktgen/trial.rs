//! One trial: open-loop constant-rate transmission for a fixed time, receiving all the while,
//! then a drain period for stragglers. Pacing is by the TSC: at every loop the packets due by
//! now are sent in bursts of up to 32, so the rate holds whatever the replies cost and a slow
//! device under test never slows the offered load (open loop, as RFC 2544 requires).

use super::frame::{self, Endpoints, Received, Template};
use fulcrum_dataplane::packet::PacketBuf;
use fulcrum_dataplane::port::{Burst, Port, BURST};
use fulcrum_dpdk::{rdtsc, Mbuf, PortQueue};
use hdrhistogram::Histogram;

/// What a trial asks for.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rate_pps: f64,
    pub seconds: f64,
    pub drain_ms: u64,
    pub trial: u16,
}

/// What a trial measured.
#[derive(Debug)]
pub struct Outcome {
    pub plan: Plan,
    /// Probes handed to the device.
    pub sent: u64,
    /// Probes the device would not take (the generator's own limit, not the DUT's).
    pub tx_rejected: u64,
    /// This trial's probes received back (each sequence number counted once).
    pub received: u64,
    pub duplicates: u64,
    /// Probes of earlier trials that arrived during this one.
    pub stale: u64,
    pub send_seconds: f64,
    /// Round-trip latency in nanoseconds.
    pub latency_ns: Histogram<u64>,
    pub arp_answered: u64,
}

impl Outcome {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    pub fn loss_ratio(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.lost() as f64 / self.sent as f64
    }

    /// The generator could not offer the planned rate (its core or the device's tx queue was
    /// the limit): the trial says nothing about the device under test at that rate.
    pub fn generator_limited(&self) -> bool {
        let planned = (self.plan.rate_pps * self.plan.seconds).round();
        self.tx_rejected > 0 || (self.sent as f64) < 0.99 * planned
    }

    pub fn json(&self, frame_bytes: usize) -> serde_json::Value {
        let h = &self.latency_ns;
        let q = |p: f64| if h.is_empty() { serde_json::Value::Null } else { h.value_at_quantile(p).into() };
        let achieved = self.sent as f64 / self.send_seconds.max(1e-9);
        serde_json::json!({
            "bench": "pktgen",
            "trial": self.plan.trial,
            "offered_pps": self.plan.rate_pps,
            "achieved_tx_pps": achieved,
            // Preamble, start delimiter, FCS and inter-frame gap: 24 bytes a frame on the wire.
            "achieved_tx_gbps": achieved * ((frame_bytes + 24) * 8) as f64 / 1e9,
            "seconds": self.send_seconds,
            "sent": self.sent,
            "tx_rejected": self.tx_rejected,
            "generator_limited": self.generator_limited(),
            "received": self.received,
            "lost": self.lost(),
            "loss_ratio": self.loss_ratio(),
            "duplicates": self.duplicates,
            "stale": self.stale,
            "arp_answered": self.arp_answered,
            "latency_ns": {
                "min": if h.is_empty() { serde_json::Value::Null } else { h.min().into() },
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": if h.is_empty() { serde_json::Value::Null } else { h.max().into() },
                "mean": if h.is_empty() { serde_json::Value::Null } else { h.mean().into() },
            },
        })
    }
}

/// Sequence numbers seen, one bit each, to count every probe once (an echo service or a
/// looping topology may duplicate).
struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    fn new(n: u64) -> Seen {
        Seen { bits: vec![0; (n as usize).div_ceil(64).max(1)] }
    }
    /// True the first time `seq` is marked.
    fn mark(&mut self, seq: u32) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        let Some(word) = self.bits.get_mut(w) else { return false };
        let new = *word & (1 << b) == 0;
        *word |= 1 << b;
        new
    }
}

/// The generator's port, its addresses and the TSC rate.
pub struct Generator {
    pub q: PortQueue,
    pub ep: Endpoints,
    pub tpl: Template,
    pub hz: u64,
}

impl Generator {
    pub fn run(&mut self, plan: Plan) -> Outcome {
        let total = (plan.rate_pps * plan.seconds).round() as u64;
        let total = total.min(u32::MAX as u64);
        let tag = frame::tag_for(plan.trial);
        let mut out = Outcome {
            plan,
            sent: 0,
            tx_rejected: 0,
            received: 0,
            duplicates: 0,
            stale: 0,
            send_seconds: 0.0,
            // 1 ns to 100 s, 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds"),
            arp_answered: 0,
        };
        let mut seen = Seen::new(total);
        let hz = self.hz as f64;
        let ns_per_tick = 1e9 / hz;
        let start = rdtsc();
        let mut tx: Burst<Mbuf> = Burst::new();
        let mut attempted = 0u64;
        let mut last_tx = start;
        // A trial lasts its planned time even when the generator cannot keep up: what it could
        // not offer by then is not sent (and the trial is flagged generator-limited).
        let end = start + (plan.seconds * hz) as u64;
        loop {
            let now = rdtsc();
            // At the end everything planned is due: one last round of catching up, then stop.
            let last = now >= end;
            let due = if last { total } else { ((((now - start) as f64 / hz) * plan.rate_pps) as u64).min(total) };
            if attempted >= total {
                break;
            }
            // Catch up in bursts: a late loop sends what fell due meanwhile, 32 at a time, at
            // most 8 bursts before the clock is read again (the rest in the last round, with a
            // bounded wait for mbufs to come back).
            // (A backlog over 1% of the trial is a generator-limited trial anyway: not sent.)
            let (mut bursts, max_bursts) = (0, if last { 32 + total / 100 / BURST as u64 } else { 8 });
            let mut starved = 0;
            while attempted < due && bursts < max_bursts {
                bursts += 1;
                let n = (due - attempted).min(BURST as u64) as usize;
                if self.q.pool.alloc_bulk(&mut tx, n) == 0 {
                    // Pool exhausted for now: receiving frees mbufs.
                    self.receive(tag, ns_per_tick, &mut seen, &mut out);
                    starved += 1;
                    if !last || starved > 10_000 {
                        break;
                    }
                    continue;
                }
                let tsc = rdtsc();
                for (k, m) in tx.iter_mut().enumerate() {
                    let seq = (attempted + k as u64) as u32;
                    m.set_len(self.tpl.len());
                    self.tpl.write(m.data_mut(), self.ep.flow(seq), tag, seq, tsc);
                }
                let sent = self.q.tx_burst(&mut tx);
                last_tx = rdtsc();
                out.sent += sent as u64;
                out.tx_rejected += tx.len() as u64;
                attempted += n as u64;
                tx.clear();
                self.receive(tag, ns_per_tick, &mut seen, &mut out);
            }
            self.receive(tag, ns_per_tick, &mut seen, &mut out);
            if last {
                break;
            }
        }
        // Up to the last transmission (the receiving after it is not sending time), and never
        // shorter than the plan: a generator that is early has not sent faster.
        out.send_seconds = ((last_tx - start) as f64 / hz).max(plan.seconds.min(out.sent as f64 / plan.rate_pps));
        let drain_end = rdtsc() + self.hz * plan.drain_ms / 1000;
        while rdtsc() < drain_end && out.received < out.sent {
            self.receive(tag, ns_per_tick, &mut seen, &mut out);
        }
        // Late ARP requests still get answered for a moment after a complete trial.
        out
    }

    fn receive(&mut self, tag: u32, ns_per_tick: f64, seen: &mut Seen, out: &mut Outcome) {
        let mut rx: Burst<Mbuf> = Burst::new();
        if self.q.rx_burst(&mut rx) == 0 {
            return;
        }
        let now = rdtsc();
        let mut replies: Burst<Mbuf> = Burst::new();
        for m in rx.drain(..) {
            match frame::classify(m.data(), &self.ep, tag) {
                Received::Probe { seq, tsc } => {
                    if seen.mark(seq) {
                        out.received += 1;
                        let ns = (now.saturating_sub(tsc) as f64 * ns_per_tick) as u64;
                        let _ = out.latency_ns.record(ns.max(1));
                    } else {
                        out.duplicates += 1;
                    }
                }
                Received::StaleProbe => out.stale += 1,
                Received::ArpRequest => {
                    let reply = frame::arp_reply(m.data(), self.ep.src_mac);
                    let mut m = m;
                    if m.fill(&reply) {
                        replies.push(m);
                        out.arp_answered += 1;
                    }
                }
                Received::ArpReply(..) | Received::Other => {}
            }
        }
        if !replies.is_empty() {
            self.q.tx_burst(&mut replies);
        }
    }

    /// Sends an ARP request for `target` every 200 ms until it is answered or `timeout_ms`
    /// passes; answers ARP requests for our addresses meanwhile.
    pub fn resolve(&mut self, target: u32, timeout_ms: u64) -> Option<[u8; 6]> {
        let end = rdtsc() + self.hz * timeout_ms / 1000;
        let mut next_ask = 0u64;
        let mut rx: Burst<Mbuf> = Burst::new();
        while rdtsc() < end {
            if rdtsc() >= next_ask {
                let mut req = [0u8; 42];
                frame::arp_request(&mut req, self.ep.src_mac, u32::from(self.ep.src_ip), target);
                if let Some(mut m) = self.q.alloc() {
                    if m.fill(&req) {
                        let mut b: Burst<Mbuf> = Burst::new();
                        b.push(m);
                        self.q.tx_burst(&mut b);
                    }
                }
                next_ask = rdtsc() + self.hz / 5;
            }
            self.q.rx_burst(&mut rx);
            for m in rx.drain(..) {
                match frame::classify(m.data(), &self.ep, 0) {
                    Received::ArpReply(ip, mac) if ip == target => return Some(mac),
                    Received::ArpRequest => {
                        let reply = frame::arp_reply(m.data(), self.ep.src_mac);
                        let mut m = m;
                        if m.fill(&reply) {
                            let mut b: Burst<Mbuf> = Burst::new();
                            b.push(m);
                            self.q.tx_burst(&mut b);
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }
}
