//! Fulcrum as a Kubernetes LoadBalancer provider, end to end: a real kube-apiserver
//! (../shared/k8s, v1.20, so EndpointSlices are discovery.k8s.io/v1beta1 and loadBalancerClass is
//! dropped), objects made with kubectl, `fulcrum run --kubeconfig` on DPDK in the namespace lab,
//! real clients. Needs root; skipped otherwise. Runs alone (nextest group `lab`).
//!
//! The API server runs on the loopback of the appliance's namespace (fl-lb), the appliance's
//! management network here; kubectl runs there too.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Everything this test started, stopped in reverse order even when it fails.
struct Teardown {
    fulcrum: Option<Child>,
    apiserver: Option<PathBuf>,
    /// The API server as restarted by the test (the first one is the start script's).
    restarted: Option<Child>,
    /// Anything else started (the second appliance, a relay).
    others: Vec<Child>,
}

fn stop_apiserver(dir: &Path) {
    for f in ["apiserver.pid", "etcd.pid"] {
        if let Ok(pid) = std::fs::read_to_string(dir.join(f)) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(c) = self.fulcrum.as_mut() {
            stop(c);
        }
        for c in self.others.iter_mut() {
            stop(c);
        }
        if let Some(dir) = &self.apiserver {
            stop_apiserver(dir);
        }
        if let Some(c) = self.restarted.as_mut() {
            stop(c);
        }
        lab(&["down"]);
    }
}

struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut c = Command::new("ip")
            .args(["netns", "exec", "fl-lb", "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(text) = stdin {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let o = c.wait_with_output().unwrap();
        let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.success(), out)
    }
    fn apply(&self, yaml: &str) {
        let (ok, out) = self.run(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "kubectl apply: {out}\n{yaml}");
    }
    /// `status.loadBalancer.ingress[*].ip` of a Service or Ingress.
    fn lb_ips(&self, kind: &str, ns: &str, name: &str) -> String {
        let (_, out) =
            self.run(&["-n", ns, "get", kind, name, "-o", "jsonpath={.status.loadBalancer.ingress[*].ip}"], None);
        out.trim().to_string()
    }
    fn wait_lb_ips(&self, kind: &str, ns: &str, name: &str, want: &str) {
        let t = Instant::now();
        loop {
            let got = self.lb_ips(kind, ns, name);
            if got == want {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{kind} {ns}/{name}: status {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn service(name: &str, extra_meta: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n{extra_meta}spec:\n  \
         type: LoadBalancer\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"
    )
}

/// A v1beta1 EndpointSlice (what a 1.20 server serves) for Service `svc` with these backends.
fn slice(svc: &str, backends: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-a\n  namespace: shop\n  \
         labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, \
         protocol: TCP}}\nendpoints:\n"
    );
    for b in backends {
        s.push_str(&format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n"));
    }
    s
}

#[test]
fn kubernetes_end_to_end() {
    if !is_root() {
        eprintln!("skipped: the lab needs root (network namespaces, DPDK)");
        return;
    }
    let start = repo().join("../shared/k8s/start-apiserver.sh");
    assert!(start.exists(), "{} missing: the test API server comes from ../shared/k8s", start.display());
    let fulcrum = env!("CARGO_BIN_EXE_fulcrum");
    let dir = std::env::temp_dir().join(format!("fulcrum-kube-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let api_dir = dir.join("apiserver");

    assert!(lab(&["up"]).status.success(), "lab.sh up");
    let mut teardown =
        Teardown { fulcrum: None, apiserver: Some(api_dir.clone()), restarted: None, others: Vec::new() };
    let start_api = || {
        let o = Command::new("ip")
            .args(["netns", "exec", "fl-lb", "bash"])
            .arg(&start)
            .arg(&api_dir)
            .output()
            .expect("start-apiserver.sh");
        assert!(o.status.success(), "start-apiserver.sh: {}", String::from_utf8_lossy(&o.stderr));
    };
    start_api();
    let k = Kubectl { kubeconfig: api_dir.join("kubeconfig") };
    let (ok, out) = k.run(&["create", "namespace", "shop"], None);
    assert!(ok, "{out}");

    // Objects before Fulcrum starts: one Service with endpoints be1 and be2, one of another
    // implementation's class (dropped by a 1.20 server, so marked by the pool it asks for
    // instead: outside ours, an Event and no status), one asking for an address outside the pools.
    k.apply(&(service("web", "") + "---\n" + &slice("web", &["10.10.0.11", "10.10.0.12"])));
    k.apply(&service("outside", "  annotations: {fulcrum.io/load-balancer-ips: 192.0.2.50}\n"));

    let boot = std::fs::read_to_string(repo().join("config/examples/bootstrap.yaml")).unwrap();
    // A small pool so that exhausting it is quick: 10.20.0.1-10.20.0.2 (a /30's hosts).
    let boot = boot.replace("      - 10.20.0.0/24\n", "      - 10.20.0.0/30\n      - 10.20.0.100/32\n");
    assert!(boot.contains("10.20.0.0/30"), "the example bootstrap's pool changed");
    std::fs::write(dir.join("bootstrap.yaml"), &boot).unwrap();
    let log = std::fs::File::create(dir.join("fulcrum.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", "fl-lb", fulcrum, "run", "--config"])
        .arg(dir.join("bootstrap.yaml"))
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["--device", "net_af_xdp0,iface=veth-lb"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("fulcrum run");
    teardown.fulcrum = Some(child);
    let log = || std::fs::read_to_string(dir.join("fulcrum.log")).unwrap_or_default();

    // 1. The Service gets the pool's first address in its status, and traffic to it reaches
    // its endpoints.
    k.wait_lb_ips("service", "shop", "web", "10.20.0.1");
    let t = Instant::now();
    while curl("http://10.20.0.1/").is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "VIP never served:\n{}", log());
    }
    let seen = backends_seen("http://10.20.0.1/", 30);
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["be1", "be2"]);
    // Out of the pools: an Event says so, and no status.
    let t = Instant::now();
    loop {
        let (_, ev) = k.run(&["-n", "shop", "get", "events.events.k8s.io", "-o", "wide"], None);
        if ev.contains("outside every VIP pool") || ev.contains("InvalidSpec") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no Event for shop/outside: {ev}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(k.lb_ips("service", "shop", "outside"), "");

    // 2. More endpoints: new flows reach be3 too; a connection open before the change lives on
    // (a 1 MiB download at 64 KiB/s, ~16 s).
    let download = Command::new("ip")
        .args(["netns", "exec", "fl-client", "curl", "-s", "--fail"])
        .args(["-o", "/dev/null", "-w", "%{size_download} %{http_code}", "http://10.20.0.1/big.bin"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    k.apply(&slice("web", &["10.10.0.11", "10.10.0.12", "10.10.0.13"]));
    let mut reached = false;
    while t.elapsed() < Duration::from_secs(10) {
        if curl("http://10.20.0.1/").as_deref() == Some("be3") {
            reached = true;
            break;
        }
    }
    assert!(reached, "be3 never reached after it was added:\n{}", log());
    eprintln!("endpoint added -> first new flow to it: {:?}", t.elapsed());

    // 3. Pool exhausted: the second Service takes 10.20.0.2, the third gets an Event and no
    // status; the first keeps serving.
    k.apply(&(service("api", "") + "---\n" + &slice("api", &["10.10.0.13"])));
    k.wait_lb_ips("service", "shop", "api", "10.20.0.2");
    assert_eq!(curl("http://10.20.0.2/").as_deref(), Some("be3"));
    // spec.loadBalancerSourceRanges through the API server: a range without the lab client's
    // network closes the VIP to it (its SYNs dropped, no flow); applied without the field, it
    // serves again.
    let fenced = service("api", "").replace("  ports:\n", "  loadBalancerSourceRanges: [\"192.0.2.0/24\"]\n  ports:\n");
    assert_ne!(fenced, service("api", ""));
    k.apply(&fenced);
    let t = Instant::now();
    while curl("http://10.20.0.2/").is_some() {
        assert!(t.elapsed() < Duration::from_secs(15), "the source range never applied:\n{}", log());
    }
    eprintln!("source range applied -> client refused: {:?}", t.elapsed());
    k.apply(&service("api", ""));
    let t = Instant::now();
    while curl("http://10.20.0.2/").is_none() {
        assert!(t.elapsed() < Duration::from_secs(15), "the VIP never opened again:\n{}", log());
    }
    k.apply(&service("late", ""));
    let t = Instant::now();
    loop {
        let (_, ev) = k.run(&["-n", "shop", "get", "events.events.k8s.io", "-o", "wide"], None);
        if ev.contains("AllocationFailed") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no AllocationFailed Event: {ev}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(k.lb_ips("service", "shop", "late"), "");

    // 4. The API server killed mid-run (etcd keeps the data): traffic goes on. Then restarted
    // with the same command line; a change made right after it is back arrives.
    let pid = std::fs::read_to_string(api_dir.join("apiserver.pid")).unwrap().trim().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> =
        cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    // SIGKILL, a crash: a SIGTERM'd kube-apiserver stops listening but keeps serving the watches
    // it has (it drains them for up to a minute), so the watchers would not notice.
    let _ = Command::new("kill").args(["-9", &pid]).status();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!k.run(&["get", "ns", "shop"], None).0, "the API server is down");
    assert!(admin("/metrics").contains("fulcrum_kubernetes_connected 0"), "the outage is seen: {}", admin("/metrics"));
    assert!(admin("/readyz").contains("Kubernetes API unreachable"), "{}", admin("/readyz"));
    for _ in 0..10 {
        assert!(curl("http://10.20.0.1/").is_some(), "traffic stopped with the API server:\n{}", log());
    }
    let restarted = Command::new("ip")
        .args(["netns", "exec", "fl-lb"])
        .args(&argv)
        .current_dir(&api_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(api_dir.join("apiserver-2.log")).unwrap())
        .spawn()
        .expect("restart kube-apiserver");
    std::fs::write(api_dir.join("apiserver.pid"), restarted.id().to_string()).unwrap();
    teardown.restarted = Some(restarted);
    let t = Instant::now();
    while !k.run(&["get", "ns", "shop"], None).0 {
        assert!(t.elapsed() < Duration::from_secs(30), "API server did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    k.run(&["-n", "shop", "delete", "service", "late"], None);
    k.apply(&slice("api", &["10.10.0.12"]));
    let t = Instant::now();
    while curl("http://10.20.0.2/").as_deref() != Some("be2") {
        assert!(t.elapsed() < Duration::from_secs(30), "change after the restart never arrived:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = download.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "1048576 200", "the download open across the endpoint change broke");

    // 5. Admin endpoint: /metrics parses as Prometheus text and counts what was served.
    let (scrape, metrics) = scrape_metrics();
    let value = |name: &str, label: Option<(&str, &str)>| metric_value(&scrape, name, label);
    assert!(value("fulcrum_vip_packets_total", Some(("service", "shop/web"))) > 100.0, "{metrics}");
    assert_eq!(value("fulcrum_kubernetes_connected", None), 1.0, "{metrics}");
    // Published after the first: the endpoint added, the second Service, the restart change.
    assert!(value("fulcrum_snapshots_published_total", None) >= 3.0, "{metrics}");

    // 6. 1,000 changes at the API server while wrk loads the VIP: the Service's slice loses and
    // regains be3, over and over (each a new snapshot); not one request fails.
    let wrk = Command::new("ip")
        .args(["netns", "exec", "fl-client", "wrk", "-t1", "-c8", "-d30s", "http://10.20.0.1/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk");
    std::thread::sleep(Duration::from_secs(1));
    let changes = Command::new("ip")
        .args(["netns", "exec", "fl-lb", "bash", "-c"])
        .arg(
            r#"url=https://127.0.0.1:16443/apis/discovery.k8s.io/v1beta1/namespaces/shop/endpointslices/web-a
            ep() { printf '{"addresses":["%s"],"conditions":{"ready":true}}' "$1"; }
            two="[$(ep 10.10.0.11),$(ep 10.10.0.12)]"; three="[$(ep 10.10.0.11),$(ep 10.10.0.12),$(ep 10.10.0.13)]"
            ok=0
            for i in $(seq 1 1000); do
                if [ $((i % 2)) = 1 ]; then eps=$two; else eps=$three; fi
                code=$(curl -sk -o /dev/null -w '%{http_code}' -X PATCH -H 'Authorization: Bearer testtoken'                     -H 'Content-Type: application/merge-patch+json' -d "{\"endpoints\":$eps}" "$url")
                [ "$code" = 200 ] && ok=$((ok + 1))
            done
            echo "$ok (last: HTTP $code)""#,
        )
        .output()
        .unwrap();
    let applied = String::from_utf8_lossy(&changes.stdout).trim().to_string();
    assert!(
        applied.starts_with("1000 "),
        "changes accepted by the API server: {applied} {}",
        String::from_utf8_lossy(&changes.stderr)
    );
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("wrk during 1,000 API changes:\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Socket errors") && !text.contains("Non-2xx"),
        "requests failed during the changes:\n{text}"
    );
    let (scrape, _) = scrape_metrics();
    eprintln!("fulcrum_snapshots_published_total {}", metric_value(&scrape, "fulcrum_snapshots_published_total", None));

    // 7. Ingress + TLS Secret made with kubectl: the Ingress shows the L7 address in its
    // status; HTTPS to the host works with the Secret's certificate; the Secret replaced: new
    // handshakes get the new certificate, a connection open across the change lives on.
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    make_ca(&tls);
    let ca = tls.join("ca.crt");
    k.apply(&secure_ingress(&tls_secret(&tls, "v1", "shop"), "shop"));
    k.wait_lb_ips("ingress", "shop", "secure", "10.20.0.100");
    let https = || {
        client(&[
            "curl",
            "-s",
            "-m",
            "5",
            "--fail",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            "secure.lab:443:10.20.0.100",
            "https://secure.lab/",
        ])
    };
    let t = Instant::now();
    while !https().0 {
        assert!(t.elapsed() < Duration::from_secs(10), "HTTPS to secure.lab never worked:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(["be1", "be2", "be3"].contains(&https().1.trim()), "{:?}", https());
    assert!(tls_subject(&ca).contains("O = v1"), "{}", tls_subject(&ca));
    let flag = tls.join("swapped");
    let held = hold_tls_connection(&ca, &flag);
    std::thread::sleep(Duration::from_millis(1000));
    k.apply(&tls_secret(&tls, "v2", "shop"));
    let t = Instant::now();
    while !tls_subject(&ca).contains("O = v2") {
        assert!(t.elapsed() < Duration::from_secs(10), "the new certificate never served: {}", tls_subject(&ca));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&flag, "").unwrap();
    let out = held.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().collect::<Vec<_>>(), ["v1", "HTTP/1.1 200 OK"], "the open TLS connection lived on: {text}");
    // The appliance counted those HTTPS connections' handshakes (curl twice at least, openssl
    // s_client twice at least, the held one). Failures are not asserted: a try before the
    // Secret's certificate reached the workers may have failed its handshake.
    let (scrape, metrics) = scrape_metrics();
    assert!(metric_value(&scrape, "fulcrum_l7_tls_handshakes_total", None) >= 5.0, "{metrics}");

    // 8. Service deleted: the VIP stops answering.
    let (ok, out) = k.run(&["-n", "shop", "delete", "service", "web"], None);
    assert!(ok, "{out}");
    let t = Instant::now();
    while curl("http://10.20.0.1/").is_some() {
        assert!(t.elapsed() < Duration::from_secs(10), "deleted Service still served");
    }

    // 9. Two appliances as a pair: a Lease elects the one that claims the VIPs. The client
    // reaches the VIP on-link here (ARP for the VIP itself, as in an L2 deployment), so the
    // takeover is visible: the leader killed, the other announces the VIP and serves it.
    if let Some(mut a) = teardown.fulcrum.take() {
        stop(&mut a);
    }
    let election =
        "leader_election:\n  identity: IDENT\n  lease_namespace: default\n  lease_seconds: 4\n  renew_seconds: 1\n";
    std::fs::write(dir.join("a.yaml"), format!("{boot}{}", election.replace("IDENT", "lb-a"))).unwrap();
    let boot_b = boot
        .replace("02:f1:00:00:00:01", "02:f1:00:00:00:03")
        .replace("10.10.0.2/24", "10.10.0.3/24")
        .replace("fd00:10::2/64", "fd00:10::3/64")
        .replace("\"--file-prefix\", \"fulcrum\"", "\"--file-prefix\", \"fulcrum-b\"");
    assert!(boot_b.contains("fulcrum-b") && boot_b.contains("10.10.0.3/24"), "the example bootstrap's port changed");
    std::fs::write(dir.join("b.yaml"), format!("{boot_b}{}", election.replace("IDENT", "lb-b"))).unwrap();
    // The API server listens on fl-lb's loopback; fl-lb2 reaches it through a relay.
    let relay = Command::new("ip")
        .args(["netns", "exec", "fl-lb2", "socat", "TCP-LISTEN:16443,bind=127.0.0.1,fork,reuseaddr"])
        .arg("EXEC:ip netns exec fl-lb socat STDIO TCP\\:127.0.0.1\\:16443")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat relay");
    teardown.others.push(relay);
    let appliance = |ns: &str, config: &str, iface: &str, logname: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, fulcrum, "run", "--config"])
            .arg(dir.join(config))
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args(["--device", &format!("net_af_packet0,iface={iface}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(logname)).unwrap())
            .spawn()
            .expect("fulcrum run")
    };
    let holder =
        || k.run(&["-n", "default", "get", "lease", "fulcrum", "-o", "jsonpath={.spec.holderIdentity}"], None).1;
    let mut a = appliance("fl-lb", "a.yaml", "veth-lb", "a.log");
    let t = Instant::now();
    while holder().trim() != "lb-a" {
        assert!(t.elapsed() < Duration::from_secs(20), "lb-a never took the Lease: {}", holder());
        std::thread::sleep(Duration::from_millis(200));
    }
    teardown.others.push(appliance("fl-lb2", "b.yaml", "veth-lb2", "b.log"));
    let b_pid = teardown.others.last().map(|c| c.id() as i32).unwrap();
    let (ok, _) = client(&["ip", "route", "replace", "10.20.0.2/32", "dev", "veth-client"]);
    assert!(ok, "on-link route to the VIP");
    let t = Instant::now();
    while curl("http://10.20.0.2/").is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "VIP not served by the leader");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holder().trim(), "lb-a", "the standby took the Lease from a live leader");
    let neigh = client(&["ip", "neigh", "show", "10.20.0.2"]).1;
    assert!(neigh.contains("02:f1:00:00:00:01"), "VIP resolved to the leader: {neigh}");
    // The leader dies without a word (SIGKILL: no Lease release, no goodbye).
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(a.id() as i32, libc::SIGKILL) };
    let _ = a.wait();
    let t = Instant::now();
    loop {
        let neigh = client(&["ip", "neigh", "show", "10.20.0.2"]).1;
        if neigh.contains("02:f1:00:00:00:03") && curl("http://10.20.0.2/").is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no takeover: {neigh} holder {}\n{}",
            holder(),
            std::fs::read_to_string(dir.join("b.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("leader killed -> VIP served by the other appliance: {:?}", t.elapsed());
    assert_eq!(holder().trim(), "lb-b");
    let b_log = std::fs::read_to_string(dir.join("b.log")).unwrap_or_default();
    assert!(b_log.contains("became the leader") && b_log.contains("claiming the VIPs"), "{b_log}");

    // A clean stop hands over at once: lb-a back as the standby, lb-b stopped with SIGTERM
    // releases the Lease, and lb-a takes it well before lease_seconds (4 s) would have run out.
    teardown.others.push(appliance("fl-lb", "a.yaml", "veth-lb", "a2.log"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holder().trim(), "lb-b", "the restarted standby took the Lease from a live leader");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(b_pid, libc::SIGTERM) };
    let t = Instant::now();
    while holder().trim() != "lb-a" {
        assert!(t.elapsed() < Duration::from_secs(10), "no handover after a clean stop: {}", holder());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("leader stopped cleanly -> Lease taken by the other after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "the Lease was not released: {:?}", t.elapsed());
    let t = Instant::now();
    while !client(&["ip", "neigh", "show", "10.20.0.2"]).1.contains("02:f1:00:00:00:01")
        || curl("http://10.20.0.2/").is_none()
    {
        assert!(t.elapsed() < Duration::from_secs(10), "lb-a does not serve the VIP after the handover");
        std::thread::sleep(Duration::from_millis(100));
    }

    drop(teardown);
    eprintln!("{}", log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The appliance's /metrics, parsed as Prometheus text (the test fails if it does not parse),
/// and its text.
fn scrape_metrics() -> (prometheus_parse::Scrape, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", "fl-lb", "curl", "-s", "--fail", "http://127.0.0.1:9100/metrics"])
        .output()
        .unwrap();
    assert!(o.status.success(), "GET /metrics");
    let metrics = String::from_utf8_lossy(&o.stdout).into_owned();
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
    (scrape, metrics)
}

/// The sum of a metric's samples, over every core, or those with the label given.
fn metric_value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum::<f64>()
}
