//! The control thread of `fulcrum run`: starts the workers, then watches the manifests (on
//! change and on SIGHUP), recompiles and publishes snapshots, prints counters, and stops
//! everything on SIGINT/SIGTERM.
//!
//! A manifest change that does not translate or compile is reported and ignored: the workers
//! keep the last good snapshot, and nothing running is disturbed.

use anyhow::Context;
use fulcrum_config::Bootstrap;
use fulcrum_dataplane::port::Port;
use fulcrum_dataplane::runtime::{self, Idle, Shared, WorkerSpec};
use fulcrum_dataplane::snapshot::{Snapshot, StatIds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How a run is watched and reported.
pub struct ServeOptions {
    pub manifests: PathBuf,
    /// Print a counters line this often (None: never).
    pub stats_every: Option<Duration>,
    /// How often the manifests are checked for changes (None: only on SIGHUP).
    pub watch_every: Option<Duration>,
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

/// Recompiles from the manifests; the error names the file, object and field.
fn compile(boot: &Bootstrap, manifests: &Path, generation: u64, ids: &mut StatIds) -> anyhow::Result<Snapshot> {
    let state = fulcrum_config::load_desired(boot, manifests)?;
    Snapshot::compile_with(boot, &state, generation, ids)
        .with_context(|| format!("{}: cannot compile the snapshot", manifests.display()))
}

/// Runs the workers until SIGINT or SIGTERM (or `stop` is set). Returns the final counters.
pub fn serve<P>(
    boot: &Bootstrap,
    specs: Vec<WorkerSpec<P>>,
    opts: &ServeOptions,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<fulcrum_dataplane::stats::CoreStats>
where
    P: Port + Send + 'static,
    P::Buf: Send + 'static,
{
    let mut ids = StatIds::default();
    let mut generation = 1;
    let first = compile(boot, &opts.manifests, generation, &mut ids)?;
    eprintln!("fulcrum: serving {} VIP ports (snapshot {generation})", first.services.len());
    let shared = Shared::new(Arc::new(first), specs.len());
    let idle = if boot.workers.idle_backoff { Idle::Backoff(Duration::from_millis(1)) } else { Idle::BusyPoll };
    let handles = runtime::spawn(specs, shared.clone(), idle).context("cannot start the workers")?;

    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    let mut seen = fingerprint(&opts.manifests);
    let mut last_watch = Instant::now();
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        let forced = hup.swap(false, Ordering::AcqRel);
        if forced || opts.watch_every.is_some_and(|w| last_watch.elapsed() >= w) {
            last_watch = Instant::now();
            let now = fingerprint(&opts.manifests);
            if forced || now != seen {
                seen = now;
                match compile(boot, &opts.manifests, generation + 1, &mut ids) {
                    Ok(s) => {
                        generation += 1;
                        let n = s.services.len();
                        shared.snapshot.publish(Arc::new(s));
                        eprintln!("fulcrum: manifests changed: serving {n} VIP ports (snapshot {generation})");
                    }
                    Err(e) => eprintln!("fulcrum: manifests rejected, still serving snapshot {generation}: {e:#}"),
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
    shared.stop();
    for h in handles {
        if h.join().is_err() {
            anyhow::bail!("a worker thread panicked");
        }
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
