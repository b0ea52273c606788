//! Leader election between two appliances with a coordination.k8s.io/v1 Lease, as client-go's
//! leaderelection does it: the holder renews every `renew_seconds`; another may take the Lease
//! once it has seen the same record unchanged for `lease_seconds` by its own clock (so the two
//! clocks never need to agree); every write carries the resourceVersion it read, so of two
//! contenders exactly one wins. A leader that cannot renew for `lease_seconds` steps down by
//! itself, before the other may take over.
//!
//! The result is one flag, read by the control loop: the leader claims the VIPs (ARP/NDP
//! answers, announcements on takeover) and writes status and Events.

use fulcrum_config::bootstrap::LeaderElectionConfig;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the last read showed, and since when (our clock).
#[derive(PartialEq)]
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
}

pub struct Election {
    cfg: LeaderElectionConfig,
    identity: String,
    api: Api<Lease>,
    observed: Option<(Observed, Instant)>,
    last_renewed: Option<Instant>,
    pub leader: Arc<AtomicBool>,
    /// Set to end the election: the task then gives the Lease up if it holds it, and says so
    /// on `stopped`.
    pub stop: Arc<AtomicBool>,
    stopped: Option<std::sync::mpsc::Sender<()>>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Election {
    pub fn new(client: Client, cfg: LeaderElectionConfig, identity: String) -> Election {
        let api = Api::namespaced(client, &cfg.lease_namespace);
        Election {
            cfg,
            identity,
            api,
            observed: None,
            last_renewed: None,
            leader: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            stopped: None,
        }
    }

    /// A receiver that gets one message when the election has ended (after `stop`).
    pub fn on_stopped(&mut self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.stopped = Some(tx);
        rx
    }

    fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.cfg.lease_seconds as u64)
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_seconds as i32),
            acquire_time: acquire,
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: read the Lease, then create, renew or take it when that is ours to do.
    /// Ok(true): we hold it now.
    async fn round(&mut self) -> Result<bool, kube::Error> {
        let name = self.cfg.lease_name.clone();
        let Some(lease) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name), ..Default::default() },
                spec: Some(self.spec(Some(now()), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // the other one was first
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Observed { holder: spec.holder_identity.clone(), renew: spec.renew_time.clone() };
        let changed = self.observed.as_ref().is_none_or(|(o, _)| *o != seen);
        if changed {
            self.observed = Some((seen, Instant::now()));
        }
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let vacant = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let expired = self.observed.as_ref().is_some_and(|(_, at)| at.elapsed() >= self.lease_duration());
        if !(ours || vacant || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire = if ours { spec.acquire_time.clone() } else { Some(now()) };
        let updated = Lease { metadata: lease.metadata.clone(), spec: Some(self.spec(acquire, transitions)) };
        match self.api.replace(&name, &PostParams::default(), &updated).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // changed since we read it
            Err(e) => Err(e),
        }
    }

    /// Runs forever on the client's runtime, keeping `leader` current.
    pub async fn run(mut self) {
        let renew = Duration::from_secs(self.cfg.renew_seconds as u64);
        loop {
            if self.stop.load(Ordering::Acquire) {
                // A clean stop hands the Lease over at once (a crash leaves it to expire).
                if self.leader.load(Ordering::Acquire) {
                    match release(&self.api, &self.cfg, &self.identity).await {
                        Ok(true) => eprintln!("fulcrum: Lease released"),
                        Ok(false) => {}
                        Err(e) => eprintln!("fulcrum: cannot release the Lease: {e}"),
                    }
                    self.leader.store(false, Ordering::Release);
                }
                if let Some(tx) = self.stopped.take() {
                    let _ = tx.send(());
                }
                return;
            }
            let result = self.round().await;
            let was = self.leader.load(Ordering::Acquire);
            let now_leader = match result {
                Ok(true) => {
                    self.last_renewed = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    eprintln!("fulcrum: Lease {}/{}: {e}", self.cfg.lease_namespace, self.cfg.lease_name);
                    // Keep leading only while the Lease we last renewed is still ours by time.
                    was && self.last_renewed.is_some_and(|t| t.elapsed() < self.lease_duration())
                }
            };
            if now_leader != was {
                eprintln!(
                    "fulcrum: {} the leader (Lease {}/{}, identity {})",
                    if now_leader { "became" } else { "no longer" },
                    self.cfg.lease_namespace,
                    self.cfg.lease_name,
                    self.identity
                );
                self.leader.store(now_leader, Ordering::Release);
            }
            // The standby looks more often than the leader renews, so that it notices expiry
            // within a second of it.
            let wait = if now_leader { renew } else { renew.min(Duration::from_secs(1)) };
            let until = Instant::now() + wait;
            while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Gives the Lease up if this appliance holds it (a clean stop): the holder is cleared, so the
/// other appliance takes over at its next look instead of after `lease_seconds`.
async fn release(api: &Api<Lease>, cfg: &LeaderElectionConfig, identity: &str) -> Result<bool, kube::Error> {
    let Some(lease) = api.get_opt(&cfg.lease_name).await? else { return Ok(false) };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    let updated = Lease { metadata: lease.metadata, spec: Some(spec) };
    match api.replace(&cfg.lease_name, &PostParams::default(), &updated).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The default identity: the host name and the MAC of the first port.
pub fn default_identity(boot: &fulcrum_config::Bootstrap) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let mac = boot.ports.first().map(|p| p.mac.to_string()).unwrap_or_default();
    format!("{host}/{mac}")
}
