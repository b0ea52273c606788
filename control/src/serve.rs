//! The control thread of `fulcrum run`: starts the workers, then follows its input (manifest
//! files, on change and on SIGHUP; or the Kubernetes API), recompiles and publishes snapshots,
//! writes Service and Ingress status and Events (Kubernetes), serves the admin endpoint, prints
//! counters, and stops everything on SIGINT/SIGTERM.
//!
//! Nothing the input says can disturb what runs: manifest files that do not translate are
//! rejected whole (the last good snapshot keeps serving); from the API server, an object with a
//! problem is left out (an Event says why) and everything else is served.

use crate::access_log;
use crate::admin::{self, ControlState};
use crate::k8s::status::{self, EventLog};
use crate::k8s::{Debounce, Kube};
use anyhow::Context;
use fulcrum_config::model::EndpointState;
use fulcrum_config::translate::{translate_each, Translation};
use fulcrum_config::{Bootstrap, DesiredState, Objects};
use fulcrum_dataplane::port::Port;
use fulcrum_dataplane::runtime::{self, Idle, Shared, WorkerSpec};
use fulcrum_dataplane::snapshot::{HealthTarget, Snapshot, StatIds};
use std::net::{IpAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Where the objects come from.
pub enum Input {
    /// A YAML file or directory, checked for changes this often (None: only on SIGHUP).
    Manifests { path: PathBuf, watch_every: Option<Duration> },
    /// The API server, through reflectors; status and Events are written back.
    Kubernetes(Kube),
}

/// How a run is fed and reported.
pub struct ServeOptions {
    pub input: Input,
    /// Print a counters line this often (None: never).
    pub stats_every: Option<Duration>,
    /// Where the loop reports itself (a new one when None); a caller that keeps a clone can
    /// watch the published snapshots and the workers (the control-plane benchmark does).
    pub control: Option<Arc<ControlState>>,
}

/// What a file set looked like: (path, length, mtime) of every manifest file, sorted.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            (p, m.as_ref().map(|m| m.len()).unwrap_or(0), m.and_then(|m| m.modified().ok()))
        })
        .collect()
}

/// One built snapshot and what went into it.
pub struct Built {
    pub snapshot: Snapshot,
    pub objects: Objects,
    pub translation: Translation,
}

/// Translates and compiles. Strict (manifest files): the first problem fails the build.
pub fn build(
    boot: &Bootstrap,
    objects: Objects,
    strict: bool,
    generation: u64,
    ids: &mut StatIds,
    source: &str,
    down: &[HealthTarget],
) -> anyhow::Result<Built> {
    let mut translation = translate_each(boot, &objects);
    mark_down(&mut translation.state, down);
    if strict {
        if let Some(p) = translation.problems.first() {
            return Err(anyhow::anyhow!("{}", p.error));
        }
    }
    let snapshot = Snapshot::compile_with(boot, &translation.state, generation, ids)
        .with_context(|| format!("{source}: cannot compile the snapshot"))?;
    Ok(Built { snapshot, objects, translation })
}

/// Endpoints failing their Service's active health check take no new flows (established ones
/// stay, as for an endpoint that is not ready).
fn mark_down(state: &mut DesiredState, down: &[HealthTarget]) {
    if down.is_empty() {
        return;
    }
    for s in &mut state.services {
        let Some(check) = &s.health else { continue };
        for e in &mut s.endpoints {
            let IpAddr::V4(a) = e.addr else { continue };
            let t = HealthTarget { endpoint: SocketAddrV4::new(a, e.port), check: check.clone() };
            if down.binary_search(&t).is_ok() {
                e.state = EndpointState::NotReady;
            }
        }
    }
}

/// Reads the objects of an input now (the manifests, or the API server's mirror).
fn read(input: &Input) -> anyhow::Result<Objects> {
    match input {
        Input::Manifests { path, .. } => Ok(fulcrum_config::manifests::load(path)?),
        Input::Kubernetes(k) => Ok(k.mirror.objects()),
    }
}

fn describe(input: &Input) -> String {
    match input {
        Input::Manifests { path, .. } => path.display().to_string(),
        Input::Kubernetes(k) => k.mirror.server.clone(),
    }
}

/// Status and Events for what was just built (Kubernetes input only; written asynchronously).
struct Writeback {
    events: EventLog,
    recorder: kube::runtime::events::Recorder,
    statuses: status::StatusWriter,
}

impl Writeback {
    fn write(&mut self, boot: &Bootstrap, kube: &Kube, built: &Built) {
        self.statuses.send(status::status_writes(boot, &built.objects, &built.translation));
        for w in self.events.new_warnings(&built.objects, &built.translation.problems) {
            eprintln!("fulcrum: {}: {}", w.reason, w.note);
            let recorder = self.recorder.clone();
            kube.spawn(async move {
                if let Err(e) = status::publish(&recorder, &w).await {
                    eprintln!("fulcrum: cannot publish an Event ({}): {e}", w.reason);
                }
            });
        }
    }
}

/// Hands `snap` to the workers; returns its generation and when, to time their switch.
fn publish(shared: &Shared, control: &ControlState, snap: Snapshot) -> (u64, Instant) {
    let g = snap.generation;
    shared.snapshot.publish(Arc::new(snap));
    control.snapshots_published.fetch_add(1, Ordering::Relaxed);
    (g, Instant::now())
}

/// The graceful stop on SIGTERM (`l7.timeouts.drain_ms`), as ingress-nginx's on a pod's
/// SIGTERM: the workers refuse new client connections, close idle ones and the others after
/// their response, while the appliance keeps its addresses (and the Lease, released after);
/// done when no client connection is left, at `limit`, or at SIGINT or a second SIGTERM
/// (`flags`: stop, term), whichever comes first. The L4 path forwards as before meanwhile.
fn drain_l7(shared: &Shared, flags: [&AtomicBool; 2], control: &ControlState, limit: Duration) {
    let open = |shared: &Shared| shared.total_stats().l7.clients_open;
    let at_start = open(shared);
    if at_start == 0 {
        return;
    }
    flags[1].store(false, Ordering::Relaxed);
    shared.drain();
    eprintln!(
        "fulcrum: draining {at_start} client connections (up to {} ms; a second signal stops at once)",
        limit.as_millis()
    );
    let start = Instant::now();
    // The workers copy their counters every 100 ms: the count lags, never leads.
    loop {
        std::thread::sleep(Duration::from_millis(20));
        control.tick();
        let left = open(shared);
        if left == 0 {
            eprintln!("fulcrum: drained in {} ms", start.elapsed().as_millis());
            return;
        }
        if flags.iter().any(|f| f.load(Ordering::Relaxed)) || start.elapsed() >= limit {
            eprintln!("fulcrum: stopping with {left} client connections still open");
            return;
        }
    }
}

/// Runs the workers until SIGINT or SIGTERM (or `stop` is set). Returns the final counters.
pub fn serve<P>(
    boot: &Bootstrap,
    mut specs: Vec<WorkerSpec<P>>,
    opts: &ServeOptions,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<fulcrum_dataplane::stats::CoreStats>
where
    P: Port + Send + 'static,
    P::Buf: Send + 'static,
{
    // The access log first: a path that cannot be opened stops the start before anything runs.
    let log_writer = match boot.l7.as_ref().and_then(|l7| l7.access_log.as_ref()) {
        Some(cfg) => {
            let (writer, rings) = access_log::Writer::open(cfg, specs.len())?;
            for (spec, ring) in specs.iter_mut().zip(rings) {
                spec.access_log = Some(ring);
            }
            Some(writer)
        }
        None => None,
    };
    let kube = match &opts.input {
        Input::Kubernetes(k) => Some(k),
        Input::Manifests { .. } => None,
    };
    let strict = kube.is_none();
    let source = describe(&opts.input);
    let control = opts.control.clone().unwrap_or_else(|| ControlState::new(kube.map(|k| k.mirror.clone())));
    let mut ids = StatIds::default();
    let mut generation = 1;
    let mut debounce = Debounce::new(Duration::from_millis(50), Duration::from_millis(300));
    if let Some(k) = kube {
        debounce.mark_seen(k.mirror.changes());
    }
    let t0 = Instant::now();
    let first = build(boot, read(&opts.input)?, strict, generation, &mut ids, &source, &[])?;
    control.record_build(t0.elapsed(), first.translation.problems.len());
    let mut writeback = kube.map(|k| Writeback {
        events: EventLog::default(),
        recorder: status::recorder(k.client.clone()),
        statuses: status::StatusWriter::start(k),
    });
    // Who claims the VIPs and writes status: the Lease's holder when two appliances run as a
    // pair, else this appliance alone.
    let mut election_end = None;
    let leader = match (kube, &boot.leader_election) {
        (Some(k), Some(le)) => {
            let identity = le.identity.clone().unwrap_or_else(|| crate::k8s::lease::default_identity(boot));
            let mut election = crate::k8s::lease::Election::new(k.client.clone(), le.clone(), identity);
            election_end = Some((election.stop.clone(), election.on_stopped()));
            let flag = election.leader.clone();
            k.spawn(election.run());
            flag
        }
        (None, Some(_)) => {
            eprintln!("fulcrum: note: leader_election applies with --kubeconfig only; serving as the only appliance");
            Arc::new(AtomicBool::new(true))
        }
        _ => Arc::new(AtomicBool::new(true)),
    };
    let mut leading = leader.load(Ordering::Acquire);
    if let (Some(k), Some(wb), true) = (kube, writeback.as_mut(), leading) {
        wb.write(boot, k, &first);
    }
    let mut first = first;
    first.snapshot.answers_vips = leading;
    let mut last_state: DesiredState = first.translation.state.clone();
    eprintln!("fulcrum: serving {} VIP ports (snapshot {generation}) from {source}", first.snapshot.services.len());
    let shared = Shared::new(Arc::new(first.snapshot), specs.len());
    *control.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone());
    let idle = if boot.workers.idle_backoff { Idle::Backoff(Duration::from_millis(1)) } else { Idle::BusyPoll };
    let log_stop = Arc::new(AtomicBool::new(false));
    let log_writer = match log_writer {
        Some(w) => Some(w.spawn(log_stop.clone()).context("cannot start the access log's writer")?),
        None => None,
    };
    let handles = runtime::spawn(specs, shared.clone(), idle).context("cannot start the workers")?;
    let admin_stop = Arc::new(AtomicBool::new(false));
    let admin = match boot.admin.listen {
        Some(addr) => Some(admin::start(addr, control.clone(), admin_stop.clone())?),
        None => None,
    };

    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    // SIGINT (Ctrl-C) stops at once; SIGTERM (systemd's and Kubernetes' stop) drains the L7
    // proxies first (`drain_l7`).
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;

    let mut seen = match &opts.input {
        Input::Manifests { path, .. } => fingerprint(path),
        Input::Kubernetes(_) => Vec::new(),
    };
    let mut last_watch = Instant::now();
    let mut last_stats = Instant::now();
    let mut down: Vec<HealthTarget> = Vec::new();
    // A published generation not yet running on every worker, and when it was published.
    let mut pending: Option<(u64, Instant)> = None;
    while !stop.load(Ordering::Relaxed) && !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(if pending.is_some() { 1 } else { 20 }));
        control.tick();
        if let Some((g, at)) = pending {
            if shared.running_generation.iter().all(|r| r.load(Ordering::Acquire) >= g) {
                let us = at.elapsed().as_micros() as u64;
                control.publish_latency_us.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(us);
                pending = None;
                shared.snapshot.reclaim();
            }
        }
        let mut forced = hup.swap(false, Ordering::AcqRel);
        // Active health checks (worker 0 probes): a changed down set rebuilds the tables.
        let now_down = shared.stats[0].lock().unwrap_or_else(|e| e.into_inner()).health_down.clone();
        let health_changed = now_down != down;
        if health_changed {
            for t in now_down.iter().filter(|t| !down.contains(t)) {
                eprintln!("fulcrum: health check: {} down", t.endpoint);
            }
            for t in down.iter().filter(|t| !now_down.contains(t)) {
                eprintln!("fulcrum: health check: {} up", t.endpoint);
            }
            down = now_down;
        }
        let lead = leader.load(Ordering::Acquire);
        if lead != leading {
            // Claim (or release) the VIPs now, without a recompile; a new leader also writes
            // status, so it rebuilds right after.
            leading = lead;
            generation += 1;
            pending = Some(publish(&shared, &control, shared.snapshot.current().with_vip_owner(lead, generation)));
            eprintln!("fulcrum: {} the VIPs (snapshot {generation})", if lead { "claiming" } else { "releasing" });
            forced |= lead;
        }
        let due = match &opts.input {
            Input::Manifests { path, watch_every } => {
                if forced || watch_every.is_some_and(|w| last_watch.elapsed() >= w) {
                    last_watch = Instant::now();
                    let now = fingerprint(path);
                    let changed = forced || now != seen;
                    seen = now;
                    changed
                } else {
                    false
                }
            }
            Input::Kubernetes(k) => debounce.due(k.mirror.changes(), Instant::now()) || forced,
        } || health_changed;
        if due {
            let t0 = Instant::now();
            let built =
                read(&opts.input).and_then(|o| build(boot, o, strict, generation + 1, &mut ids, &source, &down));
            match built {
                Ok(mut b) => {
                    b.snapshot.answers_vips = leading;
                    control.record_build(t0.elapsed(), b.translation.problems.len());
                    if let (Some(k), Some(wb), true) = (kube, writeback.as_mut(), leading) {
                        wb.write(boot, k, &b);
                    }
                    // Our own status writes come back as changes; an unchanged state is not
                    // published again.
                    if b.translation.state != last_state || forced {
                        generation += 1;
                        let n = b.snapshot.services.len();
                        last_state = b.translation.state;
                        pending = Some(publish(&shared, &control, b.snapshot));
                        eprintln!("fulcrum: {source} changed: serving {n} VIP ports (snapshot {generation})");
                    }
                }
                Err(e) => {
                    control.snapshots_rejected.fetch_add(1, Ordering::Relaxed);
                    eprintln!("fulcrum: {source} rejected, still serving snapshot {generation}: {e:#}");
                }
            }
        }
        if let Some(every) = opts.stats_every {
            if last_stats.elapsed() >= every {
                last_stats = Instant::now();
                eprintln!("fulcrum: {}", shared.total_stats().to_json());
            }
        }
    }
    let drain_ms = boot.l7.as_ref().map_or(0, |l7| l7.timeouts.drain_ms);
    if drain_ms > 0 && !stop.load(Ordering::Relaxed) {
        drain_l7(&shared, [&stop, &term], &control, Duration::from_millis(drain_ms));
    }
    shared.stop();
    admin_stop.store(true, Ordering::Relaxed);
    // A clean stop hands the Lease over at once (the election task releases it).
    if let Some((stop_election, stopped)) = election_end {
        stop_election.store(true, Ordering::Release);
        if stopped.recv_timeout(Duration::from_secs(3)).is_err() {
            eprintln!("fulcrum: the leader election did not end within 3 s");
        }
    }
    for h in handles {
        if h.join().is_err() {
            anyhow::bail!("a worker thread panicked");
        }
    }
    if let Some(a) = admin {
        let _ = a.join();
    }
    // After the workers: their last records are written.
    log_stop.store(true, Ordering::Release);
    if let Some(w) = log_writer {
        let _ = w.join();
    }
    Ok(shared.total_stats())
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn fingerprint_sees_edits_new_files_and_removals() {
        let dir = std::env::temp_dir().join(format!("fulcrum-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "one").unwrap();
        let a = fingerprint(&dir);
        assert_eq!(a, fingerprint(&dir), "unchanged");
        std::fs::write(dir.join("a.yaml"), "two!").unwrap();
        let b = fingerprint(&dir);
        assert_ne!(a, b, "edited");
        std::fs::write(dir.join("b.yaml"), "x").unwrap();
        let c = fingerprint(&dir);
        assert_ne!(b, c, "added");
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(b, fingerprint(&dir), "removed again");
        let file = fingerprint(&dir.join("a.yaml"));
        assert_eq!(file.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
