//! `fulcrum-bench l4`: the real worker code over in-memory buffers, one pinned core, bursts of
//! 32, N active flows with random 5-tuples.
//!
//! Two phases, timed separately:
//! 1. new flows: one SYN per flow, N flows (Maglev pick + SNAT port + conntrack insert);
//! 2. established: ACKs on flows picked uniformly at random for S seconds.
//!
//! Only the worker's `process_burst` is timed (one clock read per burst, < 1 ns per packet);
//! building the packets is timed apart and reported as `generator_ns_per_packet`.

use crate::report;
use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::model::*;
use fulcrum_dataplane::packet::{HeapBuf, PacketBuf};
use fulcrum_dataplane::port::{Burst, BURST};
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::stats::DropReason;
use fulcrum_dataplane::wire::checksum;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct L4Args {
    /// Active flows.
    #[arg(long, default_value_t = 1_000_000)]
    pub flows: u32,
    /// Seconds of established-flow traffic.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Forwarding mode of the VIP.
    #[arg(long, value_enum, default_value_t = ModeArg::Fullnat)]
    pub mode: ModeArg,
    /// Send exactly this many established-flow packets instead of running for --seconds
    /// (repeatable instruction counts under callgrind).
    #[arg(long)]
    pub packets: Option<u64>,
    /// Endpoints behind the VIP.
    #[arg(long, default_value_t = 100)]
    pub backends: u32,
    /// CPU core to pin to (default: the last one).
    #[arg(long)]
    pub core: Option<usize>,
    /// Packet buffers: in-memory buffers (the worker alone), or real mbufs received from and
    /// sent to DPDK `net_null` ports (rx_burst + worker + tx_burst, beside dpdk-testpmd's io
    /// forwarding on the same vdevs and core in the same run).
    #[arg(long, value_enum, default_value_t = IoArg::Memory)]
    pub io: IoArg,
    /// Run the curve for 1..=N pinned workers (in-memory buffers), one JSON line.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoArg {
    Memory,
    DpdkNull,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Fullnat,
    DsrIpip,
}

const BOOTSTRAP: &str = r#"
ports:
  - name: bench0
    device: "memory"
    mac: "02:f1:00:00:00:01"
    ipv4: 10.10.0.2/24
    next_hop: {ipv4: 10.10.0.1, mac: "02:f1:00:00:00:fe"}
workers: {cores: [0]}
vip_pools: [{name: bench, cidrs: [10.20.0.0/24]}]
maglev: {table_size: 65537}
"#;

pub(crate) const VIP: [u8; 4] = [10, 20, 0, 10];

pub fn run(a: &L4Args) -> anyhow::Result<()> {
    if a.workers <= 1 || a.io != IoArg::Memory {
        let v = measure(a, a.core, None)?;
        if !v.is_null() {
            report::print(v);
        }
        return Ok(());
    }
    scaling(a)
}

/// `--workers N`: N pinned workers at once (cores 0..N), each with its own tables and traffic,
/// as the appliance runs them. All N start their timed established phase together (a barrier
/// after the SYN phases), so the figures are of N cores loading memory at the same time. One
/// JSON line: per-worker, median and total Mpps, and the scaling efficiency against N times the
/// single-worker figure measured first in the same run (both the total's and the median's:
/// on a shared host single cores vary by tens of percent, and the median shows the trend).
fn scaling(a: &L4Args) -> anyhow::Result<()> {
    let ncores = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1);
    let mut curve = Vec::new();
    let mut single = None;
    for n in 1..=a.workers {
        if n > ncores {
            eprintln!("fulcrum-bench: {n} workers > {ncores} cores; stopping the curve there");
            break;
        }
        let start = std::sync::Barrier::new(n);
        let start = &start;
        let results: Vec<anyhow::Result<serde_json::Value>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|i| s.spawn(move || measure(a, Some(i), Some(start)))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))).collect()
        });
        let mut per = Vec::new();
        for r in results {
            per.push(r?["mpps_per_core"].as_f64().unwrap_or(0.0));
        }
        let total: f64 = per.iter().sum();
        let base = *single.get_or_insert(total);
        let mut sorted = per.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        curve.push(serde_json::json!({"workers": n, "mpps_total": total, "mpps_per_worker": per,
                                      "mpps_worker_median": median,
                                      "mpps_worker_min": sorted[0],
                                      "mpps_worker_max": sorted[sorted.len() - 1],
                                      "efficiency": total / (base * n as f64),
                                      "efficiency_median": median / base}));
    }
    report::print(serde_json::json!({
        "bench": "l4-scaling",
        "mode": match a.mode { ModeArg::Fullnat => "fullnat", ModeArg::DsrIpip => "dsr-ipip" },
        "flows_per_worker": a.flows,
        "cores": ncores,
        "curve": curve,
        "loadavg": report::loadavg(),
    }));
    Ok(())
}

/// One worker on `core`: the SYN phase then the established phase (after `start`, when given,
/// lets every worker of a scaling point through); the result as JSON (Null when the DPDK path
/// printed its own line).
fn measure(a: &L4Args, core: Option<usize>, start: Option<&std::sync::Barrier>) -> anyhow::Result<serde_json::Value> {
    let core = crate::pin(core);
    let (mut w, mut gen) = match worker(a) {
        Ok(wg) => wg,
        Err(e) => {
            // The other workers of this point wait at the barrier: let them through, then fail.
            if let Some(b) = start {
                b.wait();
            }
            return Err(e);
        }
    };
    if a.io == IoArg::DpdkNull {
        crate::l4_dpdk::run(a, core, w, gen)?;
        return Ok(serde_json::Value::Null);
    }
    let mut pool: Vec<HeapBuf> = (0..4 * BURST).map(|_| HeapBuf::new()).collect();

    // Phase 1: a SYN for every flow.
    let t_new = drive(&mut w, &mut gen, &mut pool, a.flows as u64, |g, b, i| g.syn(b, i as u32));
    let new_flows_per_s = a.flows as f64 / t_new.worker_s;
    let syn_drops = w.stats.total_drops();
    if let Some(b) = start {
        b.wait();
    }

    // Phase 2: established traffic, random flows, for the requested time.
    let mut rng = 0x1234_5678_9abc_def1u64;
    let start = Instant::now();
    let mut t_est = Timing::default();
    let chunk = 1u64 << 20;
    let mut left = a.packets.unwrap_or(u64::MAX);
    while left > 0 && (a.packets.is_some() || start.elapsed().as_secs_f64() < a.seconds) {
        let flows = a.flows as u64;
        let n = chunk.min(left);
        left -= n;
        let t = drive(&mut w, &mut gen, &mut pool, n, |g, b, _| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            g.ack(b, ((rng >> 11) % flows) as u32)
        });
        t_est.add(&t);
    }
    let est_drops = w.stats.total_drops() - syn_drops;
    let gen_ns = generator_cost(&mut gen, a.flows);
    let ns = t_est.worker_s * 1e9 / t_est.packets as f64;
    let mut drops = serde_json::Map::new();
    for r in DropReason::ALL {
        if w.stats.dropped(*r) > 0 {
            drops.insert(r.name().into(), w.stats.dropped(*r).into());
        }
    }
    let ct = w.conntrack_v4();
    let v = serde_json::json!({
        "bench": "l4",
        "mode": match a.mode { ModeArg::Fullnat => "fullnat", ModeArg::DsrIpip => "dsr-ipip" },
        "flows": a.flows,
        "mpps_per_core": 1e3 / ns,
        "ns_per_packet": ns,
        "new_flows_per_s": new_flows_per_s,
        "ns_per_new_flow": 1e9 / new_flows_per_s,
        "packets": t_est.packets,
        "seconds": t_est.worker_s,
        "backends": a.backends,
        "burst": BURST,
        "core": core,
        "conntrack_flows": ct.len(),
        "conntrack_mapped_mib": ct.mapped_bytes() as f64 / (1 << 20) as f64,
        "evictions": w.stats.ct_evictions + ct.counters.evictions,
        "drops_syn_phase": syn_drops,
        "drops_established_phase": est_drops,
        "drops": drops,
        "generator_ns_per_packet": gen_ns,
        "transparent_hugepages": report::thp_mode(),
        "loadavg": report::loadavg(),
    });
    if syn_drops + est_drops > 0 {
        report::print(v);
        anyhow::bail!("the worker dropped packets: {drops:?}");
    }
    Ok(v)
}

/// The bench's worker: one VIP, `--backends` endpoints, conntrack sized for `--flows`.
fn worker(a: &L4Args) -> anyhow::Result<(Worker, Generator)> {
    let mut boot = Bootstrap::parse(Path::new("<bench>"), BOOTSTRAP)?;
    // Room for every flow with a quarter to spare, as an operator would size it.
    boot.conntrack.capacity = a.flows + a.flows / 4;
    let mode = match a.mode {
        ModeArg::Fullnat => ForwardingMode::FullNat,
        ModeArg::DsrIpip => ForwardingMode::DsrIpip,
    };
    let state = DesiredState {
        services: vec![VipService {
            service: ObjectRef { namespace: "bench".into(), name: "web".into() },
            port_name: "http".into(),
            vip: IpAddr::V4(Ipv4Addr::from(VIP)),
            port: 80,
            protocol: Protocol::Tcp,
            mode,
            affinity: None,
            health: None,
            source_ranges: Vec::new(),
            endpoints: (0..a.backends)
                .map(|i| Endpoint {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 30, (i >> 8) as u8, i as u8)),
                    port: 8080,
                    state: EndpointState::Ready,
                    weight: 1,
                    target: None,
                })
                .collect(),
        }],
        ..Default::default()
    };
    let snap = Arc::new(Snapshot::compile(&boot, &state, 1)?);
    let cfg = WorkerConfig::from_bootstrap(&boot, 0, 1);
    Ok((Worker::new(cfg, snap)?, Generator::new(a.flows)))
}

#[derive(Default)]
struct Timing {
    worker_s: f64,
    packets: u64,
}

impl Timing {
    fn add(&mut self, o: &Timing) {
        self.worker_s += o.worker_s;
        self.packets += o.packets;
    }
}

/// Feeds `total` packets built by `make` through the worker in bursts; times only the worker.
fn drive(
    w: &mut Worker,
    gen: &mut Generator,
    pool: &mut Vec<HeapBuf>,
    total: u64,
    mut make: impl FnMut(&Generator, &mut HeapBuf, u64),
) -> Timing {
    let mut t = Timing::default();
    let mut sent = 0u64;
    let mut now_ms = gen.clock_ms;
    let mut last = Instant::now();
    let mut rx: Burst<HeapBuf> = Burst::new();
    let mut tx: Burst<HeapBuf> = Burst::new();
    while sent < total {
        let n = (total - sent).min(BURST as u64);
        for i in 0..n {
            let mut b = pool.pop().unwrap_or_default();
            b.reset();
            make(gen, &mut b, sent + i);
            rx.push(b);
        }
        let t0 = Instant::now();
        w.process_burst(now_ms, &mut rx, &mut tx);
        let t1 = Instant::now();
        t.worker_s += (t1 - t0).as_secs_f64();
        // The worker's clock advances with real time, as in a real loop.
        if (t1 - last).as_millis() > 0 {
            now_ms += (t1 - last).as_millis() as u64;
            last = t1;
        }
        pool.extend(tx.drain(..));
        sent += n;
        t.packets += n;
    }
    gen.clock_ms = now_ms;
    t
}

/// Builds client packets for flow ids: a bijection id -> (client address, port), so N ids are N
/// distinct 5-tuples spread over 100.64.0.0/10 like real clients.
pub(crate) struct Generator {
    template: [u8; 54],
    base_csum: u16,
    bits: u32,
    clock_ms: u64,
}

impl Generator {
    pub(crate) fn new(flows: u32) -> Generator {
        let mut t = [0u8; 54];
        t[0..6].copy_from_slice(&[0x02, 0xf1, 0, 0, 0, 0x01]);
        t[6..12].copy_from_slice(&[0x02, 0xf1, 0, 0, 0, 0xfe]);
        t[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut t[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[16..20].copy_from_slice(&VIP);
        let base_csum = checksum::checksum(&t[14..34]);
        let tcp = &mut t[34..54];
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        Generator { template: t, base_csum, bits: 32 - flows.max(2).leading_zeros(), clock_ms: 1 }
    }

    /// Flow id -> (client address, client port).
    #[inline(always)]
    fn tuple(&self, id: u32) -> (u32, u16) {
        // An invertible scramble within `bits` bits (odd multiply and xorshift mod 2^bits).
        let mask = (1u64 << self.bits) - 1;
        let mut x = id as u64 & mask;
        x = x.wrapping_mul(0x9e37_79b1) & mask;
        x ^= x >> (self.bits / 2 + 1);
        x = x.wrapping_mul(0x85eb_ca77) & mask;
        let src = 0x6440_0000u32 | ((x >> 14) as u32 & 0x3f_ffff);
        let port = 1024 + (x & 0x3fff) as u16;
        (src, port)
    }

    #[inline(always)]
    pub(crate) fn build<B: PacketBuf>(&self, b: &mut B, id: u32, flags: u8) {
        // As a NIC writes a received frame: at the buffer's start, 54 bytes.
        b.set_len(54);
        let f = b.data_mut();
        f.copy_from_slice(&self.template);
        let (src, port) = self.tuple(id);
        f[26..30].copy_from_slice(&src.to_be_bytes());
        let c = checksum::update32(self.base_csum, 0, src);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&port.to_be_bytes());
        f[47] = flags;
    }

    pub(crate) fn syn<B: PacketBuf>(&self, b: &mut B, id: u32) {
        self.build(b, id, 0x02);
    }

    pub(crate) fn ack<B: PacketBuf>(&self, b: &mut B, id: u32) {
        self.build(b, id, 0x10);
    }
}

/// What building a packet costs alone (reported, not subtracted).
pub(crate) fn generator_cost(gen: &mut Generator, flows: u32) -> f64 {
    let mut b = HeapBuf::new();
    let n = 4_000_000u32;
    let t = Instant::now();
    for i in 0..n {
        gen.ack(&mut b, i % flows);
        std::hint::black_box(&b);
    }
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_tuples_are_distinct() {
        for flows in [1000u32, 70_000] {
            let g = Generator::new(flows);
            let mut seen = std::collections::HashSet::new();
            for id in 0..flows {
                assert!(seen.insert(g.tuple(id)), "flow {id} repeats a tuple");
            }
        }
    }
}
