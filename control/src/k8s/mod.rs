//! The Kubernetes source: kube-rs reflectors mirror Services, EndpointSlices, Ingresses,
//! IngressClasses and TLS Secrets; the control loop reads the mirror when it changed, and the same
//! translation as for manifest files turns it into a snapshot. Status and Events go back through
//! the same client (see `status`).
//!
//! kube-rs is async; the rest of the control thread is not. The client, the reflectors and the
//! writers run on a current-thread tokio runtime in a thread of their own; the control loop reads
//! the stores (plain `Arc` snapshots behind a lock that only the watch tasks take to write) and
//! sends write requests over a channel, so neither side waits on the other.
//!
//! When the API server goes away the watchers back off and retry; the stores keep their last
//! contents, so the last snapshot keeps serving. When it returns, the watchers list again and what
//! changed meanwhile arrives as one more change.

pub mod lease;
pub mod status;

use anyhow::{bail, Context};
use fulcrum_config::manifests::endpoint_slice_from_v1beta1;
use fulcrum_config::{Objects, Source, Sourced};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the watch tasks keep current and the control loop reads.
pub struct Mirror {
    services: Store<Service>,
    /// `discovery.k8s.io/v1`, as served from Kubernetes 1.21, or converted from `v1beta1` as
    /// each event arrives from older servers (once per change, not per rebuild).
    slices: Store<EndpointSlice>,
    ingresses: Store<Ingress>,
    classes: Store<IngressClass>,
    secrets: Store<Secret>,
    /// Bumped on every watch event.
    changes: AtomicU64,
    /// Every watch is up (its last item was not an error).
    connected: AtomicBool,
    /// Watch errors seen, and the last one, for logs and `/readyz`.
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The API server's URL, named in errors about the objects read from it.
    pub server: String,
}

impl Mirror {
    /// Every object mirrored now, in a stable order (namespace/name) whatever order events came in.
    pub fn objects(&self) -> Objects {
        let source = Source::api(&self.server);
        fn sorted<K>(store: &Store<K>, source: &Source) -> Vec<Sourced<K>>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            let mut v: Vec<Sourced<K>> =
                store.state().iter().map(|o| Sourced { source: source.clone(), object: (**o).clone() }).collect();
            v.sort_by(|a, b| {
                let (a, b) = (a.object.meta(), b.object.meta());
                (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
            });
            v
        }
        Objects {
            services: sorted(&self.services, &source),
            endpoint_slices: sorted(&self.slices, &source),
            ingresses: sorted(&self.ingresses, &source),
            ingress_classes: sorted(&self.classes, &source),
            secrets: sorted(&self.secrets, &source),
            skipped: Vec::new(),
        }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.changes.fetch_add(1, Ordering::AcqRel);
                self.connected.store(true, Ordering::Release);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let first = self.connected.swap(false, Ordering::AcqRel);
                if first {
                    eprintln!("fulcrum: Kubernetes API: {e} (serving the last snapshot; retrying)");
                }
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }
}

/// A connection to the API server: the mirror, and the runtime thread that keeps it.
pub struct Kube {
    pub mirror: Arc<Mirror>,
    pub client: Client,
    runtime: tokio::runtime::Handle,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long `connect` waits for the first full list of every kind.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

impl Kube {
    /// Connects with a kubeconfig file (or, without one, the in-cluster service account or
    /// `$KUBECONFIG`), starts the reflectors and waits until each has listed once.
    pub fn connect(kubeconfig: Option<&Path>) -> anyhow::Result<Kube> {
        let kubeconfig: Option<PathBuf> = kubeconfig.map(Path::to_path_buf);
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("fulcrum-kube".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("cannot start the Kubernetes client runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                match start(kubeconfig.as_deref()).await {
                    Ok((mirror, client)) => {
                        let _ = tx.send(Ok((mirror, client, tokio::runtime::Handle::current())));
                        stop2.notified().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
        let (mirror, client, runtime) = rx.recv().context("the Kubernetes client thread ended before connecting")??;
        Ok(Kube { mirror, client, runtime, stop, thread: Some(thread) })
    }

    /// Runs `fut` on the client's runtime (status writes, Events, the Lease), without waiting.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(fut);
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client and the server's URL.
async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<(Client, String)> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("{}: cannot read the kubeconfig", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("{}: cannot use the kubeconfig", path.display()))?
        }
        None => {
            kube::Config::infer().await.context("no kubeconfig given and none found (in-cluster or $KUBECONFIG)")?
        }
    };
    let url = config.cluster_url.to_string().trim_end_matches('/').to_string();
    Ok((Client::try_from(config).context("cannot build the Kubernetes client")?, url))
}

async fn start(kubeconfig: Option<&Path>) -> anyhow::Result<(Arc<Mirror>, Client)> {
    let (client, url) = client(kubeconfig).await?;
    let version =
        client.apiserver_version().await.with_context(|| format!("cannot reach the Kubernetes API server at {url}"))?;
    let discovery = kube::discovery::oneshot::group(&client, "discovery.k8s.io")
        .await
        .with_context(|| format!("{url}: the server serves no discovery.k8s.io API (EndpointSlices)"))?;
    let slices_v1 = discovery.versions().any(|v| v == "v1");
    eprintln!(
        "fulcrum: Kubernetes API {url} ({}), EndpointSlices {}",
        version.git_version,
        if slices_v1 { "discovery.k8s.io/v1" } else { "discovery.k8s.io/v1beta1" }
    );

    let services: Writer<Service> = Writer::default();
    let ingresses: Writer<Ingress> = Writer::default();
    let classes: Writer<IngressClass> = Writer::default();
    let secrets: Writer<Secret> = Writer::default();
    let slices: Writer<EndpointSlice> = Writer::default();
    let mirror = Arc::new(Mirror {
        services: services.as_reader(),
        slices: slices.as_reader(),
        ingresses: ingresses.as_reader(),
        classes: classes.as_reader(),
        secrets: secrets.as_reader(),
        changes: AtomicU64::new(0),
        connected: AtomicBool::new(true),
        errors: AtomicU64::new(0),
        last_error: Mutex::new(None),
        server: url.clone(),
    });
    let wc = watcher::Config::default;
    reflect(watcher(Api::<Service>::all(client.clone()), wc()), services, "Service", &mirror);
    reflect(watcher(Api::<Ingress>::all(client.clone()), wc()), ingresses, "Ingress", &mirror);
    reflect(watcher(Api::<IngressClass>::all(client.clone()), wc()), classes, "IngressClass", &mirror);
    // Only TLS Secrets: the others are none of our business (and may be many and large).
    let tls = wc().fields("type=kubernetes.io/tls");
    reflect(watcher(Api::<Secret>::all(client.clone()), tls), secrets, "Secret", &mirror);
    if slices_v1 {
        reflect(watcher(Api::<EndpointSlice>::all(client.clone()), wc()), slices, "EndpointSlice", &mirror);
    } else {
        let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
        let source = Source::api(&url);
        let events = watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), wc())
            .try_filter_map(move |e| futures::future::ready(Ok(slice_event_from_v1beta1(e, &source))));
        reflect(events, slices, "EndpointSlice", &mirror);
    }
    let sync = async {
        mirror.services.wait_until_ready().await?;
        mirror.ingresses.wait_until_ready().await?;
        mirror.classes.wait_until_ready().await?;
        mirror.secrets.wait_until_ready().await?;
        mirror.slices.wait_until_ready().await?;
        Ok::<_, reflector::store::WriterDropped>(())
    };
    match tokio::time::timeout(SYNC_TIMEOUT, sync).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("{url}: a watch ended before listing: {e}"),
        Err(_) => bail!(
            "{url}: not every kind listed within {}s (last error: {})",
            SYNC_TIMEOUT.as_secs(),
            mirror.last_error().unwrap_or_else(|| "none".into())
        ),
    }
    Ok((mirror, client))
}

/// One reflector task: list, then watch, backing off and retrying on errors; every event bumps
/// the change counter. What is kept of each object is trimmed first (see `trim`).
fn reflect<K, S>(events: S, writer: Writer<K>, kind: &'static str, mirror: &Arc<Mirror>)
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let m = mirror.clone();
    tokio::spawn(async move {
        let stream = events.default_backoff().modify(trim).reflect(writer);
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            m.note(item.map(|_| ()).map_err(|e| format!("{kind} watch: {e}")));
        }
    });
}

/// Drops what nobody here reads and every rebuild would otherwise copy: the managed fields and
/// kubectl's copy of the last applied object (each about as large as the object itself).
fn trim<K: kube::Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice event as v1 (servers before 1.21), converted as it
/// arrives. The server validated the object; one we still cannot read is said and left out: a
/// new version of it takes the old one out of the store, and a listed one is skipped.
fn slice_event_from_v1beta1(
    e: watcher::Event<DynamicObject>,
    source: &Source,
) -> Option<watcher::Event<EndpointSlice>> {
    use watcher::Event;
    // A slice with the key only, for deletions: a deleted or unreadable object's metadata moves.
    let key = |o: DynamicObject| EndpointSlice { metadata: o.metadata, ..Default::default() };
    let convert = |o: &DynamicObject| -> Option<EndpointSlice> {
        let mut value = serde_json::to_value(o).ok()?;
        value["apiVersion"] = "discovery.k8s.io/v1beta1".into();
        value["kind"] = "EndpointSlice".into();
        endpoint_slice_from_v1beta1(value, source).map_err(|e| tracing::warn!("EndpointSlice left out: {e}")).ok()
    };
    Some(match e {
        Event::Apply(o) => match convert(&o) {
            Some(s) => Event::Apply(s),
            None => Event::Delete(key(o)),
        },
        Event::InitApply(o) => Event::InitApply(convert(&o)?),
        Event::Delete(o) => Event::Delete(key(o)),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

/// Hands the control loop a new set of objects when the mirror changed and then stayed quiet for
/// `quiet` (or has been changing for `max_wait`): a burst of edits is one rebuild, and a steady
/// trickle still gets through.
pub struct Debounce {
    seen: u64,
    first_unseen: Option<Instant>,
    last_count: u64,
    last_change: Instant,
    pub quiet: Duration,
    pub max_wait: Duration,
}

impl Debounce {
    pub fn new(quiet: Duration, max_wait: Duration) -> Debounce {
        Debounce { seen: 0, first_unseen: None, last_count: 0, last_change: Instant::now(), quiet, max_wait }
    }

    /// Everything up to `changes` has been read already.
    pub fn mark_seen(&mut self, changes: u64) {
        self.seen = changes;
        self.first_unseen = None;
    }

    /// Whether to rebuild now, given the mirror's change counter.
    pub fn due(&mut self, changes: u64, now: Instant) -> bool {
        if changes == self.seen {
            self.first_unseen = None;
            return false;
        }
        if changes != self.last_count {
            self.last_count = changes;
            self.last_change = now;
        }
        let first = *self.first_unseen.get_or_insert(now);
        if now.duration_since(self.last_change) >= self.quiet || now.duration_since(first) >= self.max_wait {
            self.seen = changes;
            self.first_unseen = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Debounce;
    use std::time::{Duration, Instant};

    #[test]
    fn debounce_waits_for_quiet_but_not_forever() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut d = Debounce::new(ms(50), ms(200));
        assert!(!d.due(0, t0), "nothing changed");
        assert!(!d.due(1, t0), "just changed");
        assert!(!d.due(1, t0 + ms(30)));
        assert!(d.due(1, t0 + ms(50)), "quiet for 50 ms");
        assert!(!d.due(1, t0 + ms(60)), "already handed over");
        // A steady trickle: a change every 20 ms never leaves 50 ms of quiet.
        let mut n = 1;
        let mut fired = None;
        for i in 1..20u64 {
            n += 1;
            if d.due(n, t0 + ms(60 + 20 * i)) {
                fired = Some(i);
                break;
            }
        }
        // The first unseen change came at i = 1 (80 ms): 200 ms later is i = 11.
        assert_eq!(fired, Some(11), "max_wait (200 ms) after the first unseen change");
    }

    /// What the reflectors keep: no managed fields, no kubectl copy of the object, everything
    /// else (our annotations included) as it came.
    #[test]
    fn trimmed_objects_keep_what_translation_reads() {
        let mut svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                "annotations": {"fulcrum.io/forwarding": "dsr-ipip",
                                "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"type": "LoadBalancer"}
        }))
        .unwrap();
        super::trim(&mut svc);
        assert_eq!(svc.metadata.managed_fields, None);
        let a = svc.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a["fulcrum.io/forwarding"], "dsr-ipip");
        assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));
    }

    /// v1beta1 slices become v1 as their events arrive; one that cannot be read is left out:
    /// skipped while listing, removed (a deletion of its key) when it changes later.
    #[test]
    fn v1beta1_slice_events_are_converted_once() {
        use kube::runtime::watcher::Event;
        let source = fulcrum_config::Source::api("https://api.example:6443");
        let slice = |topology: serde_json::Value| -> kube::api::DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "web-a", "namespace": "shop", "resourceVersion": "7",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "topology": topology}]
            }))
            .unwrap()
        };
        let good = slice(serde_json::json!({"kubernetes.io/hostname": "node-1"}));
        let bad = slice(serde_json::json!("not a map"));
        let Some(Event::Apply(v1)) = super::slice_event_from_v1beta1(Event::Apply(good.clone()), &source) else {
            panic!("a valid slice is applied");
        };
        assert_eq!(v1.metadata.name.as_deref(), Some("web-a"));
        assert_eq!(v1.endpoints[0].addresses, vec!["10.1.0.5".to_string()]);
        assert_eq!(v1.endpoints[0].node_name.as_deref(), Some("node-1"), "topology's hostname is v1's nodeName");
        assert!(matches!(
            super::slice_event_from_v1beta1(Event::InitApply(good.clone()), &source),
            Some(Event::InitApply(_))
        ));
        match super::slice_event_from_v1beta1(Event::Apply(bad.clone()), &source) {
            Some(Event::Delete(k)) => {
                assert_eq!(
                    (k.metadata.namespace.as_deref(), k.metadata.name.as_deref()),
                    (Some("shop"), Some("web-a"))
                );
                assert!(k.endpoints.is_empty());
            }
            other => panic!("an unreadable new version removes the old one: {other:?}"),
        }
        assert!(super::slice_event_from_v1beta1(Event::InitApply(bad), &source).is_none(), "skipped while listing");
        assert!(matches!(super::slice_event_from_v1beta1(Event::Delete(good), &source), Some(Event::Delete(_))));
        assert!(matches!(super::slice_event_from_v1beta1(Event::InitDone, &source), Some(Event::InitDone)));
    }
}
