//! `fulcrum-bench control`: what the control plane costs at scale. Builds Kubernetes objects in
//! memory (N Services of type LoadBalancer with E ready endpoints each, and R Ingress rules, one
//! host each), then times, over several runs, the translation into the desired state, the
//! snapshot compile (Maglev tables, VIP table, router), and the publish to running workers
//! (until every worker runs the new snapshot). One JSON line per measurement.
//!
//! The time from a change at the API server to the workers is measured end to end by the
//! Kubernetes test (control/tests/kube_e2e.rs) against the real API server.

use crate::report;
use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::manifests::{Objects, Source, Sourced};
use fulcrum_config::translate::translate_each;
use fulcrum_dataplane::port::MemoryPort;
use fulcrum_dataplane::runtime::{self, Idle, Shared, WorkerSpec};
use fulcrum_dataplane::snapshot::{Snapshot, StatIds};
use fulcrum_dataplane::worker::WorkerConfig;
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// LoadBalancer Services.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Ready endpoints per Service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Ingress rules (one host and path each, 10 per Ingress).
    #[arg(long, default_value_t = 10_000)]
    pub ingress_rules: usize,
    /// Maglev table size (prime). The default, 1021, is over 100 x the endpoints per Service,
    /// the Maglev paper's bound for even spread; 65537 (the bootstrap default) x 10,000 Services
    /// would be 2.6 GB of tables.
    #[arg(long, default_value_t = 1021)]
    pub maglev_size: u32,
    /// Timed runs of each step (the median is reported, with the minimum and maximum).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Workers (in-memory ports) that the snapshots are published to.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

fn bootstrap(maglev: u32) -> anyhow::Result<Bootstrap> {
    let text = format!(
        "eal_args: []\nports:\n  - {{name: p0, device: net_null0, mac: \"02:00:00:00:00:01\", ipv4: 10.0.0.2/24}}\n\
         workers: {{cores: [0]}}\nvip_pools:\n  - {{name: bench, cidrs: [10.128.0.0/12]}}\n\
         maglev: {{table_size: {maglev}}}\nl7: {{address: 10.0.0.100}}\n"
    );
    Ok(Bootstrap::parse(Path::new("bench"), &text)?)
}

/// The objects as the API server would hand them over (typed, as the reflectors keep them).
fn objects(a: &ControlArgs) -> anyhow::Result<Objects> {
    let source = Source::api("bench");
    fn at<T>(source: &Source, object: T) -> Sourced<T> {
        Sourced { source: source.clone(), object }
    }
    let mut o = Objects::default();
    for i in 0..a.services {
        let name = format!("svc-{i}");
        o.services.push(at(&source, serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))?));
        let endpoints: Vec<serde_json::Value> = (0..a.endpoints)
            .map(|e| {
                let n = i * a.endpoints + e;
                json!({"addresses": [format!("10.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)],
                       "conditions": {"ready": true}})
            })
            .collect();
        o.endpoint_slices.push(at(&source, serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-a"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))?));
    }
    for ing in 0..a.ingress_rules.div_ceil(10) {
        let rules: Vec<serde_json::Value> = (0..10)
            .map(|r| ing * 10 + r)
            .filter(|&n| n < a.ingress_rules)
            .map(|n| {
                json!({"host": format!("h{n}.bench.example"), "http": {"paths": [{
                    "path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": format!("svc-{}", n % a.services.max(1)), "port": {"number": 80}}}
                }]}})
            })
            .collect();
        o.ingresses.push(at(&source, serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": format!("ing-{ing}"), "namespace": "bench"},
            "spec": {"ingressClassName": "fulcrum", "rules": rules}
        }))?));
    }
    Ok(o)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// (median, min, max) in milliseconds.
fn spread(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

pub fn run(a: &ControlArgs) -> anyhow::Result<()> {
    let boot = bootstrap(a.maglev_size)?;
    let objects = objects(a)?;
    let mut translate = Vec::new();
    let mut compile = Vec::new();
    let mut last = None;
    let mut ids = StatIds::default();
    for g in 0..a.runs.max(1) {
        let t0 = Instant::now();
        let t = translate_each(&boot, &objects);
        let t1 = Instant::now();
        anyhow::ensure!(t.problems.is_empty(), "bench objects have problems: {}", t.problems[0].error);
        anyhow::ensure!(t.state.services.len() == a.services, "{} services translated", t.state.services.len());
        let snap = Snapshot::compile_with(&boot, &t.state, g as u64 + 2, &mut ids)?;
        let t2 = Instant::now();
        translate.push(t1 - t0);
        compile.push(t2 - t1);
        last = Some(snap);
    }
    let snap = last.expect("at least one run");
    let build: Vec<Duration> = translate.iter().zip(&compile).map(|(a, b)| *a + *b).collect();
    let (t_med, _, _) = spread(translate);
    let (c_med, _, _) = spread(compile);
    let (b_med, b_min, b_max) = spread(build);
    println!(
        "{}",
        json!({"bench": "control", "what": "snapshot_build", "services": a.services,
               "endpoints_per_service": a.endpoints, "ingress_rules": a.ingress_rules,
               "maglev_table_size": a.maglev_size, "runs": a.runs,
               "translate_ms": t_med, "compile_ms": c_med,
               "build_ms_median": b_med, "build_ms_min": b_min, "build_ms_max": b_max,
               "vip_ports": snap.services.len(), "backends": snap.backends.len(),
               "loadavg": report::loadavg()})
    );

    // Publish to running workers: from `publish` until every worker runs it.
    let specs: Vec<WorkerSpec<MemoryPort>> = (0..a.workers)
        .map(|i| WorkerSpec {
            config: WorkerConfig::from_bootstrap(&boot, i as u16, a.workers as u16),
            cpu: None,
            port: MemoryPort::new(),
        })
        .collect();
    let shared = Shared::new(Arc::new(snap), a.workers);
    let handles = runtime::spawn(specs, shared.clone(), Idle::BusyPoll)?;
    let t = Instant::now();
    while shared.running_generation.iter().any(|g| g.load(Ordering::Acquire) == 0) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "workers never started");
        std::thread::yield_now();
    }
    let mut h = Histogram::<u64>::new(3)?;
    let base = shared.snapshot.generation();
    let t = translate_each(&boot, &objects);
    for i in 1..=100u64 {
        let snap = Arc::new(Snapshot::compile_with(&boot, &t.state, base + i, &mut ids)?);
        let t0 = Instant::now();
        shared.snapshot.publish(snap);
        while shared.running_generation.iter().any(|g| g.load(Ordering::Acquire) < base + i) {
            std::hint::spin_loop();
        }
        h.record(t0.elapsed().as_nanos() as u64)?;
        shared.snapshot.reclaim();
        if i == 20 && a.services >= 10_000 {
            break; // each compile takes a while at this size: 20 publishes are enough
        }
    }
    shared.stop();
    for handle in handles {
        let _ = handle.join();
    }
    println!(
        "{}",
        json!({"bench": "control", "what": "publish", "workers": a.workers, "publishes": h.len(),
               "switch_us_p50": h.value_at_quantile(0.5) as f64 / 1e3,
               "switch_us_p99": h.value_at_quantile(0.99) as f64 / 1e3,
               "switch_us_max": h.max() as f64 / 1e3,
               "loadavg": report::loadavg()})
    );
    Ok(())
}
