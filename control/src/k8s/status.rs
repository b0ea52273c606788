//! What Fulcrum writes back to the API server: `status.loadBalancer.ingress` of the Services it
//! serves (their VIPs) and of the Ingresses of its class (the L7 address), and Events on objects
//! a user must fix (pool exhausted, address taken, an invalid option).
//!
//! Deciding what to write is pure (tested without a server); writing is async, on the client's
//! runtime, and only where the object does not already show it, so a steady state writes nothing.

use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::model::ObjectRef;
use fulcrum_config::translate::{Problem, Translation};
use fulcrum_config::Objects;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The field manager and Event reporter name.
pub const CONTROLLER: &str = "fulcrum.io/lb-controller";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Ingress,
}

/// Set `status.loadBalancer.ingress` of one object to these addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    pub kind: Kind,
    pub object: ObjectRef,
    pub ips: Vec<IpAddr>,
}

/// Status requests in flight at once.
pub const STATUS_CONCURRENCY: usize = 16;

/// Writes statuses in the background, at most STATUS_CONCURRENCY requests at a time and one per
/// object, the latest wanted addresses winning. (Spawning a request per write per build sent
/// 10,000 at once for 10,000 new Services, again at every rebuild until they landed: the client
/// ran out of connections and the watches fell behind.) A failed write is not retried here:
/// the object still differs at the next build, which sends it again.
pub struct StatusWriter {
    tx: tokio::sync::mpsc::UnboundedSender<Vec<StatusWrite>>,
}

impl StatusWriter {
    /// Starts the writer on `kube`'s runtime.
    pub fn start(kube: &crate::k8s::Kube) -> StatusWriter {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        kube.spawn(write_loop(kube.client.clone(), rx));
        StatusWriter { tx }
    }

    /// Queues the writes of one build (replacing queued writes of the same objects).
    pub fn send(&self, writes: Vec<StatusWrite>) {
        if !writes.is_empty() {
            let _ = self.tx.send(writes);
        }
    }
}

async fn write_loop(client: Client, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<StatusWrite>>) {
    use futures::StreamExt;
    type Key = (Kind, ObjectRef);
    let mut queued: std::collections::BTreeMap<Key, StatusWrite> = Default::default();
    let mut in_flight: std::collections::BTreeMap<Key, Vec<IpAddr>> = Default::default();
    let mut running = futures::stream::FuturesUnordered::new();
    let mut open = true;
    while open || !running.is_empty() {
        // Start what may start: not past the limit, not an object already being written.
        while running.len() < STATUS_CONCURRENCY {
            let Some(key) = queued.keys().find(|k| !in_flight.contains_key(*k)).cloned() else { break };
            let w = queued.remove(&key).expect("found above");
            in_flight.insert(key.clone(), w.ips.clone());
            let client = client.clone();
            running.push(async move {
                let what = format!("{:?} {}", w.kind, w.object);
                match write_status(client, w).await {
                    Ok(()) => tracing::info!("status written: {what}"),
                    Err(e) => eprintln!("fulcrum: cannot write the status of {what}: {e}"),
                }
                key
            });
        }
        tokio::select! {
            batch = rx.recv(), if open => match batch {
                Some(writes) => {
                    for w in writes {
                        let key = (w.kind, w.object.clone());
                        // Being written already, with these addresses: nothing to add.
                        if in_flight.get(&key) == Some(&w.ips) {
                            queued.remove(&key);
                            continue;
                        }
                        queued.insert(key, w);
                    }
                }
                None => open = false,
            },
            Some(key) = running.next(), if !running.is_empty() => {
                in_flight.remove(&key);
            }
        }
    }
}

fn parse_ips<'a>(ips: impl Iterator<Item = Option<&'a String>>) -> Vec<Option<IpAddr>> {
    ips.map(|ip| ip.and_then(|s| s.parse().ok())).collect()
}

/// The status writes that make every object we serve show its addresses. A Service of ours that
/// could not be served (its problem is an Event) loses addresses we gave it, so that its status
/// never shows an address that does not answer.
pub fn status_writes(boot: &Bootstrap, objects: &Objects, t: &Translation) -> Vec<StatusWrite> {
    let mut out = Vec::new();
    let failed: BTreeSet<&ObjectRef> = t.problems.iter().filter(|p| p.kind == "Service").map(|p| &p.object).collect();
    for s in &objects.services {
        let object = ObjectRef::of(&s.object.metadata);
        let lb = s.object.status.as_ref().and_then(|st| st.load_balancer.as_ref());
        let current = parse_ips(lb.and_then(|l| l.ingress.as_ref()).into_iter().flatten().map(|i| i.ip.as_ref()));
        let want: Vec<IpAddr> = match t.addresses.get(&object) {
            Some(ips) => ips.clone(),
            None if failed.contains(&object) && !current.is_empty() => {
                if !current.iter().all(|ip| ip.is_some_and(|ip| boot.in_vip_pools(&ip))) {
                    continue; // not addresses of ours: leave them alone
                }
                Vec::new()
            }
            None => continue,
        };
        if current != want.iter().map(|ip| Some(*ip)).collect::<Vec<_>>() {
            out.push(StatusWrite { kind: Kind::Service, object, ips: want });
        }
    }
    if let Some(l7) = &boot.l7 {
        let ours: BTreeSet<&ObjectRef> = t.state.l7.ingresses.iter().collect();
        let want = vec![IpAddr::V4(l7.address)];
        for i in &objects.ingresses {
            let object = ObjectRef::of(&i.object.metadata);
            if !ours.contains(&object) {
                continue;
            }
            let lb = i.object.status.as_ref().and_then(|st| st.load_balancer.as_ref());
            let current = parse_ips(lb.and_then(|l| l.ingress.as_ref()).into_iter().flatten().map(|i| i.ip.as_ref()));
            if current != vec![Some(want[0])] {
                out.push(StatusWrite { kind: Kind::Ingress, object, ips: want.clone() });
            }
        }
    }
    out
}

/// Writes one status with a JSON merge patch on the status subresource (the list is replaced
/// whole; no resourceVersion, so it never conflicts with other writers of other fields).
pub async fn write_status(client: Client, w: StatusWrite) -> Result<(), kube::Error> {
    let ingress: Vec<serde_json::Value> = w.ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect();
    let patch = Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}}));
    let pp = PatchParams::default();
    match w.kind {
        Kind::Service => {
            let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client, &w.object.namespace);
            api.patch_status(&w.object.name, &pp, &patch).await.map(|_| ())
        }
        Kind::Ingress => {
            let api: Api<k8s_openapi::api::networking::v1::Ingress> = Api::namespaced(client, &w.object.namespace);
            api.patch_status(&w.object.name, &pp, &patch).await.map(|_| ())
        }
    }
}

/// An Event to publish: on which object, why, and the message (the translation error, which
/// names the object and field).
#[derive(Clone, Debug, PartialEq)]
pub struct Warning {
    pub regarding: ObjectReference,
    pub reason: String,
    pub note: String,
}

/// Remembers which problems were already reported, so each is an Event once while it lasts
/// (and again if it comes back after being fixed).
#[derive(Default)]
pub struct EventLog {
    sent: BTreeSet<(String, ObjectRef, String, String)>,
}

impl EventLog {
    /// The Events to publish for these problems: the ones not reported yet.
    pub fn new_warnings(&mut self, objects: &Objects, problems: &[Problem]) -> Vec<Warning> {
        let mut now = BTreeSet::new();
        let mut out = Vec::new();
        for p in problems {
            let note = p.error.to_string();
            let key = (p.kind.to_string(), p.object.clone(), p.reason.to_string(), note.clone());
            if !self.sent.contains(&key) {
                if let Some(regarding) = reference(objects, p.kind, &p.object) {
                    out.push(Warning { regarding, reason: p.reason.to_string(), note });
                }
            }
            now.insert(key);
        }
        self.sent = now;
        out
    }
}

/// A reference to the object (with its uid, so `kubectl describe` lists the Event).
fn reference(objects: &Objects, kind: &str, object: &ObjectRef) -> Option<ObjectReference> {
    match kind {
        "Service" => objects
            .services
            .iter()
            .find(|s| ObjectRef::of(&s.object.metadata) == *object)
            .map(|s| s.object.object_ref(&())),
        "Ingress" => objects
            .ingresses
            .iter()
            .find(|s| ObjectRef::of(&s.object.metadata) == *object)
            .map(|s| s.object.object_ref(&())),
        _ => None,
    }
}

/// The Event recorder, reporting as this controller from this host.
pub fn recorder(client: Client) -> Recorder {
    let instance = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string());
    Recorder::new(client, Reporter { controller: CONTROLLER.into(), instance })
}

pub async fn publish(recorder: &Recorder, w: &Warning) -> Result<(), kube::Error> {
    let ev = Event {
        type_: EventType::Warning,
        reason: w.reason.clone(),
        // Event notes are at most 1 kB.
        note: Some(w.note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&ev, &w.regarding).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_config::translate::translate_each;
    use std::path::Path;

    fn boot() -> Bootstrap {
        let mut b =
            Bootstrap::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/bootstrap.yaml")))
                .unwrap();
        b.vip_pools[0].cidrs = vec!["10.20.0.4/31".parse().unwrap()];
        b
    }

    fn svc(name: &str, status_ip: Option<&str>) -> String {
        let status =
            status_ip.map(|ip| format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n")).unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo, uid: u-{name}}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 80}}]}}\n{status}"
        )
    }

    const INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web, namespace: demo}\n\
        spec: {ingressClassName: fulcrum, defaultBackend: {service: {name: a, port: {number: 80}}}}\n";

    fn objects(docs: &[String]) -> Objects {
        Objects::parse(Path::new("t.yaml"), &docs.join("---\n")).unwrap()
    }

    #[test]
    fn status_is_written_only_where_it_differs() {
        let b = boot();
        let o = objects(&[svc("a", None), svc("b", Some("10.20.0.5")), svc("c", None), INGRESS.to_string()]);
        let t = translate_each(&b, &o);
        let writes = status_writes(&b, &o, &t);
        // a gets 10.20.0.4; b keeps what its status says (nothing to write); c finds the pool
        // exhausted (an Event, no status); the Ingress shows the L7 address.
        assert_eq!(
            writes,
            vec![
                StatusWrite {
                    kind: Kind::Service,
                    object: ObjectRef { namespace: "demo".into(), name: "a".into() },
                    ips: vec!["10.20.0.4".parse().unwrap()]
                },
                StatusWrite {
                    kind: Kind::Ingress,
                    object: ObjectRef { namespace: "demo".into(), name: "web".into() },
                    ips: vec!["10.20.0.100".parse().unwrap()]
                },
            ]
        );
        let mut log = EventLog::default();
        let w = log.new_warnings(&o, &t.problems);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].reason, "AllocationFailed");
        assert_eq!(w[0].regarding.uid.as_deref(), Some("u-c"));
        assert!(w[0].note.contains("no free IPv4 address"), "{}", w[0].note);
        assert!(log.new_warnings(&o, &t.problems).is_empty(), "reported once while it lasts");
        assert!(log.new_warnings(&o, &[]).is_empty());
        assert_eq!(log.new_warnings(&o, &t.problems).len(), 1, "and again when it comes back");
    }

    #[test]
    fn a_failed_service_loses_only_our_addresses() {
        let b = boot();
        let bad = |ip: &str| svc("x", Some(ip)).replace("ports: [{port: 80}]", "ports: []");
        let o = objects(&[bad("10.20.0.4")]);
        let t = translate_each(&b, &o);
        assert_eq!(status_writes(&b, &o, &t)[0].ips, Vec::<IpAddr>::new());
        let o = objects(&[bad("192.0.2.9")]);
        assert!(status_writes(&b, &o, &translate_each(&b, &o)).is_empty());
    }

    /// The writer against a mock API server that answers when the test says: a write of an
    /// object being written waits for it and only the latest addresses go; no more than
    /// STATUS_CONCURRENCY requests are ever in flight; a failed write does not stop the others.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_one_per_object_latest_wins_and_bounded() {
        use http::{Request, Response};
        use kube::client::Body;
        use tower_test::mock;
        let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(client, rx));
        let w = |name: &str, ip: &str| StatusWrite {
            kind: Kind::Service,
            object: ObjectRef { namespace: "shop".into(), name: name.into() },
            ips: vec![ip.parse().unwrap()],
        };
        // What one request asks for: (path, the addresses in its merge patch).
        async fn body_of(req: Request<Body>) -> (String, String) {
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (path, v["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().unwrap().to_string())
        }
        let ok = || Response::builder().status(200).body(Body::from(b"{}".to_vec())).unwrap();
        // No request within 50 ms.
        async fn quiet(api: &mut mock::Handle<Request<Body>, Response<Body>>) -> bool {
            tokio::time::timeout(std::time::Duration::from_millis(50), api.next_request()).await.is_err()
        }

        tx.send(vec![w("web", "10.20.0.4")]).unwrap();
        let (req, first) = api.next_request().await.unwrap();
        assert_eq!(body_of(req).await, ("/api/v1/namespaces/shop/services/web/status".into(), "10.20.0.4".into()));
        // Two newer versions while the first is in flight: they wait, and only the last goes.
        tx.send(vec![w("web", "10.20.0.5")]).unwrap();
        tx.send(vec![w("web", "10.20.0.6")]).unwrap();
        assert!(quiet(&mut api).await, "a second write of the object went out while the first was in flight");
        first.send_response(ok());
        let (req, second) = api.next_request().await.unwrap();
        assert_eq!(body_of(req).await.1, "10.20.0.6", "the latest addresses, the one in between skipped");
        // The same addresses again while they are being written: nothing more to send.
        tx.send(vec![w("web", "10.20.0.6")]).unwrap();
        tokio::task::yield_now().await;
        second.send_response(ok());
        assert!(quiet(&mut api).await, "the same addresses were written twice");

        // 40 objects at once: 16 requests go out, the rest wait for answers.
        tx.send((0..40).map(|i| w(&format!("svc-{i}"), "10.20.0.7")).collect()).unwrap();
        let mut pending = Vec::new();
        for _ in 0..STATUS_CONCURRENCY {
            pending.push(api.next_request().await.unwrap());
        }
        assert!(quiet(&mut api).await, "a 17th request went out before any answer");
        // Answer them (the first with a server error: the others go on), then the rest arrive.
        let mut answered = 0;
        for (i, (_, send)) in pending.drain(..).enumerate() {
            if i == 0 {
                send.send_response(Response::builder().status(500).body(Body::from(b"{}".to_vec())).unwrap());
            } else {
                send.send_response(ok());
            }
            answered += 1;
        }
        while answered < 40 {
            let (_, send) = api.next_request().await.unwrap();
            send.send_response(ok());
            answered += 1;
        }
        drop(tx);
        writer.await.unwrap();
        assert!(api.next_request().await.is_none(), "nothing after the last write");
    }
}
