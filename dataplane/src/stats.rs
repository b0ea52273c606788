//! Per-core counters. Each worker owns its `CoreStats` and only it writes them: plain integers,
//! no atomics on the fast path. Readers (the control thread, the bench) take copies.

use serde::Serialize;

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal,)*) => {
        /// Why a packet was dropped. Every drop is counted under exactly one reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = [$($name,)*].len();
            /// Stable snake_case name, used in metrics and JSON.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    EthTruncated => "eth_truncated",
    VlanTruncated => "vlan_truncated",
    UnsupportedEthertype => "unsupported_ethertype",
    NotOurMac => "not_our_mac",
    ArpMalformed => "arp_malformed",
    ArpNotForUs => "arp_not_for_us",
    Ipv4Malformed => "ipv4_malformed",
    Ipv4BadChecksum => "ipv4_bad_checksum",
    Ipv6Malformed => "ipv6_malformed",
    Ipv4Fragment => "ipv4_fragment",
    Ipv6ExtensionHeader => "ipv6_extension_header",
    TcpMalformed => "tcp_malformed",
    UdpMalformed => "udp_malformed",
    IcmpMalformed => "icmp_malformed",
    IcmpUnhandled => "icmp_unhandled",
    NdpMalformed => "ndp_malformed",
    NotForUs => "not_for_us",
    UnknownVipPort => "unknown_vip_port",
    UnsupportedProtocol => "unsupported_protocol",
    NoBackend => "no_backend",
    SourceNotAllowed => "source_not_allowed",
    NoFlow => "no_flow",
    WrongCore => "wrong_core",
    ConntrackFull => "conntrack_full",
    SnatPortsExhausted => "snat_ports_exhausted",
    NeighborUnresolved => "neighbor_unresolved",
    NoRoute => "no_route",
    TooBigForEncap => "too_big_for_encap",
    TxFull => "tx_full",
    HandoffFull => "handoff_full",
    L7ConnectionLimit => "l7_connection_limit",
    L7Draining => "l7_draining",
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    #[inline]
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// How long a worker's loop iterations took, from one poll of its port to the next, less any
/// pause the worker chose (an idle worker's sleep): a histogram in fixed buckets. A burst of
/// packets takes microseconds; an iteration of milliseconds is the worker not running: another
/// thread on its CPU, or the host. An idle worker's yield to other threads counts, as it asks
/// for no pause (in the lab, the client and backends sharing its CPU show here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopTimes {
    /// Iterations up to each of `LoopTimes::BOUNDS_NS` (and past the last), not cumulative.
    pub counts: [u64; LoopTimes::BOUNDS_NS.len() + 1],
    pub sum_ns: u64,
}

impl LoopTimes {
    /// Bucket upper bounds: 10 us, 100 us, 1 ms, 10 ms, 100 ms.
    pub const BOUNDS_NS: [u64; 5] = [10_000, 100_000, 1_000_000, 10_000_000, 100_000_000];

    #[inline]
    pub fn record(&mut self, ns: u64) {
        let i = Self::BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(Self::BOUNDS_NS.len());
        self.counts[i] += 1;
        self.sum_ns += ns;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Iterations longer than `BOUNDS_NS[i]`.
    pub fn over(&self, i: usize) -> u64 {
        self.counts[i + 1..].iter().sum()
    }

    pub fn merge(&mut self, o: &LoopTimes) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
    }
}

/// One worker's counters.
#[derive(Clone, Debug, Default)]
pub struct CoreStats {
    /// The worker's loop iterations (see [`LoopTimes`]); kept by the runtime.
    pub loop_times: LoopTimes,
    pub rx: Counter,
    pub tx: Counter,
    pub drops: [u64; DropReason::COUNT],
    pub arp_replies: u64,
    pub ndp_replies: u64,
    pub echo_replies: u64,
    /// Gratuitous ARPs and unsolicited neighbour advertisements sent for claimed addresses.
    pub announcements: u64,
    pub icmp_errors_forwarded: u64,
    /// FullNAT return packets passed to the core that owns their SNAT port.
    pub handed_off: u64,
    /// Handed-off packets this core received from others.
    pub handoff_received: u64,
    /// Conntrack: flows now held, inserted, removed on timeout, evicted while still live.
    pub ct_flows: u64,
    pub ct_inserts: u64,
    pub ct_expired: u64,
    pub ct_evictions: u64,
    /// New FullNAT flows given a SNAT tuple the backend may still hold in TIME-WAIT, because
    /// every port tried was in use (too few SNAT ports for the rate of connections the
    /// backends close first).
    pub snat_time_wait_reuses: u64,
    /// New flows Maglev gave a backend behind an unreachable neighbour, sent to the next
    /// reachable backend of its table instead.
    pub unreachable_backend_repicks: u64,
    /// Client SYNs sent again on FullNAT flows whose endpoint never answered, and new TCP flows
    /// sent past an endpoint passed over for them (`passive_health`).
    pub unanswered_syns: u64,
    pub unanswered_backend_repicks: u64,
    /// The endpoints new TCP flows pass over now, copied out with the counters (per core, not
    /// merged).
    pub passed_over: Vec<(std::net::IpAddr, u16)>,
    /// Neighbour table: entries (resolved or being resolved) and what it can hold.
    pub neighbors: u64,
    pub neighbors_capacity: u64,
    /// Neighbour entries given to another address (table full), unicast re-checks of entries
    /// past their reachable time, and entries given up after unanswered re-checks.
    pub neighbor_evictions: u64,
    pub neighbor_probes: u64,
    pub neighbor_failures: u64,
    /// The neighbour table's entries (per core, not merged), refreshed about once a second.
    pub neighbor_table: std::sync::Arc<Vec<crate::neigh::NeighborView>>,
    /// Indexed like the snapshot's services.
    pub per_vip: Vec<Counter>,
    /// Indexed like the snapshot's backends (all services' backends in one array).
    pub per_backend: Vec<Counter>,
    /// TCP segments handed to the HTTP proxy, and the proxy's own counters.
    pub l7_segments: u64,
    pub l7: crate::l7::proxy::ProxyStats,
    /// HTTP request latency in microseconds, from a request head to its response head (None
    /// without L7). Copied out with the counters, not kept here per packet.
    pub l7_latency_us: Option<hdrhistogram::Histogram<u64>>,
    /// Endpoints failing their active health check (worker 0 probes), copied out with the
    /// counters; the control thread takes them out of the tables.
    pub health_down: Vec<crate::snapshot::HealthTarget>,
}

impl CoreStats {
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    /// Resizes the per-VIP/per-backend arrays for a new snapshot (at switch time, never per packet).
    pub fn resize(&mut self, vips: usize, backends: usize) {
        self.per_vip.resize(vips, Counter::default());
        self.per_backend.resize(backends, Counter::default());
    }
    /// Adds another core's counters into this one (for totals).
    pub fn merge(&mut self, o: &CoreStats) {
        if !o.health_down.is_empty() {
            self.health_down.extend(o.health_down.iter().cloned());
            self.health_down.sort();
            self.health_down.dedup();
        }
        match (&mut self.l7_latency_us, &o.l7_latency_us) {
            (Some(a), Some(b)) => {
                let _ = a.add(b);
            }
            (None, Some(b)) => self.l7_latency_us = Some(b.clone()),
            _ => {}
        }
        self.loop_times.merge(&o.loop_times);
        self.rx.packets += o.rx.packets;
        self.rx.bytes += o.rx.bytes;
        self.tx.packets += o.tx.packets;
        self.tx.bytes += o.tx.bytes;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.arp_replies += o.arp_replies;
        self.ndp_replies += o.ndp_replies;
        self.echo_replies += o.echo_replies;
        self.announcements += o.announcements;
        self.icmp_errors_forwarded += o.icmp_errors_forwarded;
        self.handed_off += o.handed_off;
        self.handoff_received += o.handoff_received;
        self.ct_flows += o.ct_flows;
        self.ct_inserts += o.ct_inserts;
        self.ct_expired += o.ct_expired;
        self.ct_evictions += o.ct_evictions;
        self.snat_time_wait_reuses += o.snat_time_wait_reuses;
        self.unreachable_backend_repicks += o.unreachable_backend_repicks;
        self.unanswered_syns += o.unanswered_syns;
        self.unanswered_backend_repicks += o.unanswered_backend_repicks;
        self.neighbors += o.neighbors;
        self.neighbors_capacity += o.neighbors_capacity;
        self.neighbor_evictions += o.neighbor_evictions;
        self.neighbor_probes += o.neighbor_probes;
        self.neighbor_failures += o.neighbor_failures;
        self.l7_segments += o.l7_segments;
        self.l7.merge(&o.l7);
        self.resize(self.per_vip.len().max(o.per_vip.len()), self.per_backend.len().max(o.per_backend.len()));
        for (a, b) in self.per_vip.iter_mut().zip(&o.per_vip) {
            a.packets += b.packets;
            a.bytes += b.bytes;
        }
        for (a, b) in self.per_backend.iter_mut().zip(&o.per_backend) {
            a.packets += b.packets;
            a.bytes += b.bytes;
        }
    }
    /// JSON with drops by name (only non-zero ones).
    pub fn to_json(&self) -> serde_json::Value {
        let drops: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .filter(|r| self.dropped(**r) > 0)
            .map(|r| (r.name().to_string(), self.dropped(*r).into()))
            .collect();
        serde_json::json!({
            "rx": self.rx, "tx": self.tx, "drops": drops,
            "loops": {"count": self.loop_times.count(), "over_1ms": self.loop_times.over(2),
                      "over_10ms": self.loop_times.over(3)},
            "arp_replies": self.arp_replies, "ndp_replies": self.ndp_replies,
            "echo_replies": self.echo_replies, "announcements": self.announcements, "icmp_errors_forwarded": self.icmp_errors_forwarded,
            "handed_off": self.handed_off, "handoff_received": self.handoff_received,
            "neighbors": {"entries": self.neighbors, "capacity": self.neighbors_capacity,
                          "evictions": self.neighbor_evictions, "probes": self.neighbor_probes,
                          "failures": self.neighbor_failures},
            "conntrack": {"flows": self.ct_flows, "inserts": self.ct_inserts,
                          "expired": self.ct_expired, "evictions": self.ct_evictions},
            "snat_time_wait_reuses": self.snat_time_wait_reuses,
            "unreachable_backend_repicks": self.unreachable_backend_repicks,
            "unanswered_syns": self.unanswered_syns,
            "unanswered_backend_repicks": self.unanswered_backend_repicks,
            "per_vip": self.per_vip, "per_backend": self.per_backend,
            "l7": {"segments": self.l7_segments, "connections": self.l7.connections, "requests": self.l7.requests,
                   "responses": {"2xx": self.l7.responses[0], "3xx": self.l7.responses[1],
                                 "4xx": self.l7.responses[2], "5xx": self.l7.responses[3]},
                   "errors_local": self.l7.errors_local, "upstream_connects": self.l7.upstream_connects,
                   "upstream_reused": self.l7.upstream_reused,
                   "upstream_ports_exhausted": self.l7.upstream_ports_exhausted,
                   "upstream_connect_failures": self.l7.upstream_connect_failures,
                   "upstream_resends": self.l7.upstream_resends,
                   "access_log_records": self.l7.access_log_records,
                   "access_log_dropped": self.l7.access_log_dropped,
                   "segments_unwanted": self.l7.segments_unwanted},
            "health": {"probes": self.l7.health_probes, "failures": self.l7.health_failures,
                       "transitions": self.l7.health_transitions, "down": self.health_down.len()},
        })
    }
}
