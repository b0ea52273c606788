//! `fulcrum-bench control`: what the control plane costs at scale. Builds Kubernetes objects in
//! memory (N Services of type LoadBalancer with E ready endpoints each, and R Ingress rules, one
//! host each), then times, over several runs, the translation into the desired state, the
//! snapshot compile (Maglev tables, VIP table, router), and the publish to running workers
//! (until every worker runs the new snapshot). One JSON line per measurement.
//!
//! With `--kubeconfig`, also the time from a change at the API server to the workers: the real
//! control loop (`fulcrum_control::serve`, reflectors, debounce, translate, compile, publish)
//! feeding a worker on an in-memory port; 100 EndpointSlice changes, each timed from just before
//! its PATCH is sent until every worker runs a snapshot that has the new endpoint.

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
    /// Also measure API server -> worker latency against this cluster (it creates namespace
    /// `fulcrum-bench` if missing, and a Service and an EndpointSlice there that it deletes after).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Changes timed in the latency run.
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    /// Other LoadBalancer Services (each with an EndpointSlice of --endpoints) created at the API
    /// server before the latency run, so that every change is a rebuild of that many; deleted
    /// after.
    #[arg(long, default_value_t = 0)]
    pub api_services: usize,
    /// Seconds to wait after the first full snapshot before timing changes (the statuses of new
    /// Services are written meanwhile; each write is a watch event and a rebuild).
    #[arg(long, default_value_t = 0.0)]
    pub api_settle: f64,
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
        o.services.push(at(
            &source,
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
            }))?,
        ));
        let endpoints: Vec<serde_json::Value> = (0..a.endpoints)
            .map(|e| {
                let n = i * a.endpoints + e;
                json!({"addresses": [format!("10.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)],
                       "conditions": {"ready": true}})
            })
            .collect();
        o.endpoint_slices.push(at(
            &source,
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-a"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints
            }))?,
        ));
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
        o.ingresses.push(at(
            &source,
            serde_json::from_value(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": format!("ing-{ing}"), "namespace": "bench"},
                "spec": {"ingressClassName": "fulcrum", "rules": rules}
            }))?,
        ));
    }
    Ok(o)
}

/// `n` workers on in-memory ports, unpinned.
fn memory_workers(boot: &Bootstrap, n: usize) -> Vec<WorkerSpec<MemoryPort>> {
    (0..n)
        .map(|i| WorkerSpec {
            config: WorkerConfig::from_bootstrap(boot, i as u16, n as u16),
            cpu: None,
            port: MemoryPort::new(),
            access_log: None,
        })
        .collect()
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
    build_and_publish(a)?;
    if let Some(k) = &a.kubeconfig {
        api_latency(a, k)?;
    }
    Ok(())
}

fn build_and_publish(a: &ControlArgs) -> anyhow::Result<()> {
    let boot = bootstrap(a.maglev_size)?;
    let objects = objects(a)?;
    let mut translate = Vec::new();
    let mut compile = Vec::new();
    let mut last = None;
    let mut ids = StatIds::default();
    let mut state = None;
    for g in 0..a.runs.max(1) {
        // Cold: nothing kept from an earlier compile (as at start-up).
        ids = StatIds::default();
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
        state = Some(t.state);
    }
    // Warm: one endpoint of one Service changed since the last compile (what a live update is).
    let mut state = state.expect("at least one run");
    let mut warm = Vec::new();
    for r in 0..a.runs.max(1) {
        let i = r % state.services.len().max(1);
        state.services[i].endpoints[0].port += 1;
        let t0 = Instant::now();
        let snap = Snapshot::compile_with(&boot, &state, 100 + r as u64, &mut ids)?;
        warm.push(t0.elapsed());
        drop(snap);
    }
    let snap = last.expect("at least one run");
    let build: Vec<Duration> = translate.iter().zip(&compile).map(|(a, b)| *a + *b).collect();
    let (t_med, _, _) = spread(translate);
    let (c_med, _, _) = spread(compile);
    let (b_med, b_min, b_max) = spread(build);
    let (w_med, _, _) = spread(warm);
    println!(
        "{}",
        json!({"bench": "control", "what": "snapshot_build", "services": a.services,
               "endpoints_per_service": a.endpoints, "ingress_rules": a.ingress_rules,
               "maglev_table_size": a.maglev_size, "runs": a.runs,
               "threads": std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
               "translate_ms": t_med, "compile_cold_ms": c_med,
               "build_cold_ms_median": b_med, "build_cold_ms_min": b_min, "build_cold_ms_max": b_max,
               "compile_after_one_change_ms": w_med,
               "build_after_one_change_ms": ((t_med + w_med) * 1e3).round() / 1e3,
               "vip_ports": snap.services.len(), "backends": snap.backends.len(),
               "loadavg": report::loadavg()})
    );

    // Publish to running workers: from `publish` until every worker runs it.
    let specs = memory_workers(&boot, a.workers);
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
    // The workers' loop iterations so far (their copies land every 100 ms).
    std::thread::sleep(Duration::from_millis(250));
    let loops_publishing = shared.total_stats().loop_times;

    // /metrics rendered while the workers run, every endpoint's counters in it: the scrape
    // copies each worker's counters under their lock, which a worker never waits for.
    let state = fulcrum_control::admin::ControlState::new(None);
    *state.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone());
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for _ in 0..10 {
        let t0 = Instant::now();
        bytes = fulcrum_control::admin::render_metrics(&state).len();
        scrapes.push(t0.elapsed());
    }
    shared.stop();
    for handle in handles {
        let _ = handle.join();
    }
    let mut loops_scraping = shared.total_stats().loop_times;
    for (c, p) in loops_scraping.counts.iter_mut().zip(loops_publishing.counts) {
        *c -= p;
    }
    let over = |t: &fulcrum_dataplane::stats::LoopTimes| json!({"over_100us": t.over(1), "over_1ms": t.over(2), "over_10ms": t.over(3), "iterations": t.count()});
    let (s_med, _, s_max) = spread(scrapes);
    println!(
        "{}",
        json!({"bench": "control", "what": "publish", "workers": a.workers, "publishes": h.len(),
               "switch_us_p50": h.value_at_quantile(0.5) as f64 / 1e3,
               "switch_us_p99": h.value_at_quantile(0.99) as f64 / 1e3,
               "switch_us_max": h.max() as f64 / 1e3,
               "worker_loops_while_publishing": over(&loops_publishing),
               "metrics_scrapes": 10, "metrics_bytes": bytes, "scrape_ms_median": s_med, "scrape_ms_max": s_max,
               "worker_loops_while_scraping": over(&loops_scraping),
               "loadavg": report::loadavg()})
    );
    Ok(())
}

const NS: &str = "fulcrum-bench";

/// The API server's EndpointSlice resource: v1, or v1beta1 on servers before 1.21.
async fn slice_api(client: &kube::Client) -> anyhow::Result<kube::Api<kube::api::DynamicObject>> {
    let group = kube::discovery::oneshot::group(client, "discovery.k8s.io").await?;
    let version = if group.versions().any(|v| v == "v1") { "v1" } else { "v1beta1" };
    let gvk = kube::api::GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice");
    let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    Ok(kube::Api::namespaced_with(client.clone(), NS, &ar))
}

fn endpoints(addr: &str) -> serde_json::Value {
    json!([{"addresses": [addr], "conditions": {"ready": true}}])
}

/// Requests in flight while creating or deleting the background Services.
const CONCURRENT_REQUESTS: usize = 32;

/// Creates Services `bg-0`.. with an EndpointSlice each (`e` endpoints), as many requests in
/// flight as CONCURRENT_REQUESTS; those already there are left as they are.
async fn background_services(
    client: &kube::Client,
    slices: &kube::Api<kube::api::DynamicObject>,
    apiv: &str,
    n: usize,
    e: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, PostParams};
    let svc: Api<Service> = Api::namespaced(client.clone(), NS);
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let (svc, slices) = (svc.clone(), slices.clone());
            async move {
                let name = format!("bg-{i}");
                let service: Service = serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?;
                let eps: Vec<serde_json::Value> = (0..e)
                    .map(|k| {
                        let m = i * e + k;
                        json!({"addresses": [format!("10.{}.{}.{}", 64 + (m >> 16) % 64, (m >> 8) & 255, m & 255)],
                               "conditions": {"ready": true}})
                    })
                    .collect();
                let slice: kube::api::DynamicObject = serde_json::from_value(json!({
                    "apiVersion": format!("discovery.k8s.io/{apiv}"), "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-a"), "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": eps
                }))?;
                for r in [
                    svc.create(&PostParams::default(), &service).await.map(|_| ()),
                    slices.create(&PostParams::default(), &slice).await.map(|_| ()),
                ] {
                    match r {
                        Ok(()) => {}
                        Err(kube::Error::Api(s)) if s.code == 409 => {} // there from an earlier run
                        Err(err) => return Err(err.into()),
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENT_REQUESTS)
        .collect()
        .await;
    results.into_iter().collect()
}

fn api_latency(a: &ControlArgs, kubeconfig: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let client = rt.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        anyhow::Ok(kube::Client::try_from(config)?)
    })?;
    let slices = rt.block_on(slice_api(&client))?;
    let apiv = slices.resource_url().split('/').nth(3).unwrap_or("v1").to_string();
    rt.block_on(async {
        let ns: Api<Namespace> = Api::all(client.clone());
        // A namespace left terminating by an earlier run takes no new objects: wait it out.
        let t = Instant::now();
        while let Some(n) = ns.get_opt(NS).await? {
            if n.metadata.deletion_timestamp.is_none() {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "namespace {NS} stays terminating");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = ns.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}}))?).await;
        let svc: Api<Service> = Api::namespaced(client.clone(), NS);
        let _ = svc
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"type": "LoadBalancer",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?,
            )
            .await;
        let slice: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("discovery.k8s.io/{apiv}"), "kind": "EndpointSlice",
            "metadata": {"name": "web-a", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints("10.1.0.1")
        }))?;
        let _ = slices.create(&PostParams::default(), &slice).await;
        anyhow::Ok(())
    })?;
    let t = Instant::now();
    rt.block_on(background_services(&client, &slices, &apiv, a.api_services, a.endpoints))?;
    if a.api_services > 0 {
        eprintln!("created {} Services and EndpointSlices in {:.1} s", a.api_services, t.elapsed().as_secs_f64());
    }

    // The appliance's control loop on in-memory workers, fed by the API server.
    let mut boot = bootstrap(a.maglev_size)?;
    boot.admin.listen = None;
    // The worker sleeps when idle, as in the lab: on a small machine a busy-polling worker
    // would take a core from the control loop being measured.
    boot.workers.idle_backoff = true;
    let kube = fulcrum_control::k8s::Kube::connect(Some(kubeconfig))?;
    let control = fulcrum_control::admin::ControlState::new(Some(kube.mirror.clone()));
    let specs = memory_workers(&boot, a.workers);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = fulcrum_control::serve::ServeOptions {
        input: fulcrum_control::serve::Input::Kubernetes(kube),
        stats_every: None,
        control: Some(control.clone()),
    };
    let stop2 = stop.clone();
    let serving = std::thread::spawn(move || fulcrum_control::serve::serve(&boot, specs, &opts, stop2).map(|_| ()));

    // Whether every worker runs a snapshot in which web's endpoint is `addr`.
    let has = |addr: std::net::IpAddr| -> bool {
        let Some(shared) = control.shared() else { return false };
        let snap = shared.snapshot.current();
        let found = snap.services.iter().any(|s| {
            s.service.name == "web"
                && s.service.namespace == NS
                && snap.backends[s.backends.start as usize..s.backends.end as usize].iter().any(|b| b.addr == addr)
        });
        found && shared.running_generation.iter().all(|g| g.load(Ordering::Acquire) >= snap.generation)
    };
    let t = Instant::now();
    let complete = || control.shared().is_some_and(|sh| sh.snapshot.current().services.len() > a.api_services);
    while !has("10.1.0.1".parse()?) || !complete() {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "the first snapshot never had the bench Services");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs_f64(a.api_settle));
    let mut h = Histogram::<u64>::new(3)?;
    for i in 2..a.changes + 2 {
        let addr = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        let patch = Patch::Merge(json!({"endpoints": endpoints(&addr)}));
        let t0 = Instant::now();
        rt.block_on(slices.patch("web-a", &PatchParams::default(), &patch))?;
        let ip: std::net::IpAddr = addr.parse()?;
        while !has(ip) {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "change {i} never reached the workers");
            std::thread::sleep(Duration::from_micros(200));
        }
        h.record(t0.elapsed().as_micros() as u64)?;
    }
    stop.store(true, Ordering::Relaxed);
    let served = serving.join().map_err(|_| anyhow::anyhow!("the control loop panicked"))?;
    // The Service and slice go; the namespace stays (deleting one needs the namespace
    // controller, which a bare API server like ../shared/k8s does not run).
    rt.block_on(async {
        use futures::StreamExt;
        let svc: Api<Service> = Api::namespaced(client.clone(), NS);
        let _ = svc.delete("web", &DeleteParams::default()).await;
        let _ = slices.delete("web-a", &DeleteParams::default()).await;
        let names: Vec<String> = (0..a.api_services).map(|i| format!("bg-{i}")).collect();
        futures::stream::iter(names.iter())
            .for_each_concurrent(CONCURRENT_REQUESTS, |n| {
                let (svc, slices) = (svc.clone(), slices.clone());
                async move {
                    let _ = svc.delete(n, &DeleteParams::default()).await;
                    let _ = slices.delete(&format!("{n}-a"), &DeleteParams::default()).await;
                }
            })
            .await;
    });
    served?;
    println!(
        "{}",
        json!({"bench": "control", "what": "api_to_worker", "changes": h.len(),
               "endpointslice_version": apiv, "other_services": a.api_services, "settle_s": a.api_settle,
               "endpoints_per_other_service": if a.api_services > 0 { a.endpoints } else { 0 },
               "p50_ms": h.value_at_quantile(0.5) as f64 / 1e3,
               "p99_ms": h.value_at_quantile(0.99) as f64 / 1e3,
               "max_ms": h.max() as f64 / 1e3,
               "loadavg": report::loadavg()})
    );
    Ok(())
}
