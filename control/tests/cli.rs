//! Runs the real `fulcrum` binary against config/examples.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
}

const BOOTSTRAP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/bootstrap.yaml");
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/manifests");

fn fulcrum(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fulcrum")).args(args).output().expect("run fulcrum")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Runs and requires exit 0; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = fulcrum(args);
    assert_eq!(o.status.code(), Some(0), "fulcrum {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Runs and requires exit 1 with one error line on stderr and nothing on stdout; returns it.
fn fails(args: &[&str]) -> String {
    let o = fulcrum(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "fulcrum {args:?} should fail: stdout {} stderr {err}", stdout(&o));
    assert!(o.stdout.is_empty(), "nothing on stdout on error: {}", stdout(&o));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("fulcrum: error: "), "{err}");
    err
}

/// The VIP table row of `vip` `port/proto`, split into cells (two spaces or more apart).
fn row<'a>(out: &'a str, vip: &str, port_proto: &str) -> Vec<&'a str> {
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect::<Vec<_>>())
        .filter(|cells| cells.len() >= 2 && cells[0] == vip && cells[1] == port_proto)
        .collect();
    assert_eq!(rows.len(), 1, "exactly one row for {vip} {port_proto} in:\n{out}");
    rows.into_iter().next().unwrap()
}

/// The backend lines under a VIP table row.
fn backend_lines<'a>(out: &'a str, vip: &str, port_proto: &str) -> Vec<&'a str> {
    let head = row(out, vip, port_proto).join("  ");
    let mut lines = out
        .lines()
        .skip_while(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect::<Vec<_>>().join("  ") != head);
    lines.next().expect("row");
    lines.take_while(|l| l.starts_with("    ")).collect()
}

#[test]
fn check_prints_the_vip_table_of_the_examples() {
    let out = ok(&["check", "--config", BOOTSTRAP, "--manifests", MANIFESTS]);
    assert!(out.contains("bootstrap.yaml: ok"), "{out}");
    assert!(out.contains("manifests: ok: 8 VIP ports, 15 backends"), "{out}");
    let header = out.lines().find(|l| l.starts_with("VIP ")).expect("table header");
    for col in ["PORT", "MODE", "SERVICE (PORT NAME)", "AFFINITY", "READY", "TERMINATING", "NOT-READY", "SOURCES"] {
        assert!(header.contains(col), "{header}");
    }
    // VIP, port/proto, mode, service (port name), affinity, ready, terminating, not ready,
    // sources.
    let api = "10.10.0.0/16,fd00:10::/64";
    let expected: &[[&str; 9]] = &[
        ["10.20.0.1", "53/UDP", "fullnat", "demo/dns-echo (dns)", "-", "1", "0", "1", "any"],
        ["10.20.0.10", "80/TCP", "fullnat", "demo/web (http)", "-", "2", "1", "0", "any"],
        ["10.20.0.20", "443/TCP", "dsr-ipip", "media/video", "-", "2", "0", "0", "any"],
        ["10.20.0.30", "443/TCP", "fullnat", "demo/api (https)", "-", "1", "0", "0", api],
        ["10.20.0.30", "9090/TCP", "fullnat", "demo/api (grpc)", "-", "1", "0", "0", api],
        ["10.20.0.40", "8080/TCP", "fullnat", "shop/cart (http)", "ClientIP 600s", "2", "0", "0", "any"],
        ["fd00:20::30", "443/TCP", "fullnat", "demo/api (https)", "-", "2", "0", "0", api],
        ["fd00:20::30", "9090/TCP", "fullnat", "demo/api (grpc)", "-", "2", "0", "0", api],
    ];
    for e in expected {
        assert_eq!(row(&out, e[0], e[1]), e.to_vec());
    }
    let rows = out.lines().filter(|l| !l.starts_with(' ') && (l.contains("/TCP") || l.contains("/UDP"))).count();
    assert_eq!(rows, expected.len(), "no other rows:\n{out}");

    // Backends with their state and Maglev share: the terminating one takes no slots, the two
    // ready ones split the 65537 slots.
    let web = backend_lines(&out, "10.20.0.10", "80/TCP");
    assert_eq!(web.len(), 3, "{web:?}");
    let slots = |l: &str| -> u32 {
        let w: Vec<&str> = l.split_whitespace().collect();
        let i = w.iter().position(|&x| x == "maglev").expect("maglev column");
        w[i + 1].parse().unwrap()
    };
    assert!(web[0].contains("10.244.1.10:8080") && web[0].contains("ready") && web[0].ends_with("web-5d9c7b8f6-abcde"));
    assert!(web[2].contains("10.244.3.12:8080") && web[2].contains("terminating"), "{}", web[2]);
    assert_eq!(slots(web[2]), 0);
    assert_eq!(slots(web[0]) + slots(web[1]), 65537);
    assert!(slots(web[0]).abs_diff(slots(web[1])) <= 1, "{web:?}");
    let dns = backend_lines(&out, "10.20.0.1", "53/UDP");
    assert!(dns[0].contains("10.244.1.20:5353") && dns[0].contains("(100.0%)"), "{dns:?}");
    assert!(dns[1].contains("10.244.2.21:5353") && dns[1].contains("not-ready") && slots(dns[1]) == 0, "{dns:?}");
    let v6 = backend_lines(&out, "fd00:20::30", "9090/TCP");
    assert!(v6[0].contains("[fd00:244::1e]:9090") && v6[1].contains("[fd00:244::1f]:9090"), "{v6:?}");
}

#[test]
fn check_without_manifests_summarises_the_bootstrap() {
    let out = ok(&["check", "--config", BOOTSTRAP]);
    assert!(out.contains("port lab0:  device net_af_xdp0,iface=veth-lb  mac 02:f1:00:00:00:01  mtu 1500"), "{out}");
    assert!(out.contains("ipv4 10.10.0.2/24  ipv6 fd00:10::2/64  next hop 10.10.0.1 / fd00:10::1"), "{out}");
    assert!(out.contains("workers:    1 on cores 0 (idle backoff)"), "{out}");
    assert!(out.contains("SNAT ports: core 0: 1024-65535"), "{out}");
    assert!(out.contains("VIP pool lab: 10.20.0.0/24, fd00:20::/120"), "{out}");
    assert!(out.contains("conntrack:  65536 flows per core; reserves "), "{out}");
    assert!(out.contains("established 600s") && out.contains("udp 30s"), "{out}");
    assert!(out.contains("maglev:     table size 65537"), "{out}");
    assert!(out.contains("neighbors:  4096 per core; re-checked 30000 ms after an answer"), "{out}");
    assert!(
        out.contains(
            "passive health: a TCP endpoint passed over by new flows for 10000 ms after 3 SYNs sent again unanswered"
        ),
        "{out}"
    );
    assert!(
        out.contains("l7:         10.20.0.100 (class fulcrum); http 80; https 443; socket buffers 16384 bytes"),
        "{out}"
    );
    assert!(out.contains("timeouts: header 10000 ms, connect 2000 ms, upstream 15000 ms, idle 60000 ms"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("VIP ")), "no VIP table without manifests:\n{out}");
    assert!(out.contains("    access log: off"), "{out}");
    // An access log: shown, with a warning when its directory is missing (not an error: the
    // file is opened where fulcrum run runs).
    let dir = std::env::temp_dir().join(format!("fulcrum-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let boot = std::fs::read_to_string(BOOTSTRAP).unwrap();
    for (path, want) in [
        (dir.join("access.log"), "(a ring of 4194304 bytes per worker)\n".to_string()),
        (dir.join("gone/access.log"), format!("warning: {} is not a directory here", dir.join("gone").display())),
    ] {
        let with_log = boot.replace(
            "    upstream_ms: 15000\n",
            &format!("    upstream_ms: 15000\n  access_log:\n    path: {}\n", path.display()),
        );
        std::fs::write(dir.join("boot.yaml"), with_log).unwrap();
        let out = ok(&["check", "--config", p(&dir.join("boot.yaml"))]);
        assert!(out.contains(&format!("    access log: {} ", path.display())) && out.contains(&want), "{out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the workspace says 1.85
fn check_json() {
    let v: Value = serde_json::from_str(&ok(&["check", "--config", BOOTSTRAP, "--json"])).unwrap();
    assert_eq!(v["bootstrap"]["conntrack"]["capacity"], 65536);
    assert!(v.get("vips").is_none());
    let mem = &v["conntrack_memory"];
    // 65536 IPv4 flows are at least 65536 records of 64 bytes, rounded to 2 MiB pages.
    let per_core = mem["bytes_per_core"].as_u64().unwrap();
    assert!(per_core >= 65536 * 64 && per_core % (2 << 20) == 0, "{mem}");
    assert_eq!(mem["bytes_total"], per_core);

    let args = ["check", "--config", BOOTSTRAP, "--manifests", MANIFESTS, "--json"];
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    let vips = v["vips"].as_array().unwrap();
    assert_eq!(vips.len(), 8);
    let web = vips.iter().find(|s| s["vip"] == "10.20.0.10").unwrap();
    assert_eq!(web["endpoints"], serde_json::json!({"ready": 2, "terminating": 1, "not_ready": 0}));
    let share: f64 = web["backends"].as_array().unwrap().iter().map(|b| b["maglev_share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "{share}");
}

#[test]
fn snapshot_prints_the_compiled_tables() {
    let v: Value = serde_json::from_str(&ok(&["snapshot", "--config", BOOTSTRAP, "--manifests", MANIFESTS])).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["maglev_table_size"], 65537);
    let services = v["services"].as_array().unwrap();
    let keys: Vec<(String, String, u64, String, String)> = services
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().into(),
                s["vip"].as_str().unwrap().into(),
                s["port"].as_u64().unwrap(),
                s["protocol"].as_str().unwrap().into(),
                s["mode"].as_str().unwrap().into(),
            )
        })
        .collect();
    let k =
        |svc: &str, vip: &str, port, proto: &str, mode: &str| (svc.into(), vip.into(), port, proto.into(), mode.into());
    assert_eq!(
        keys,
        vec![
            k("demo/dns-echo", "10.20.0.1", 53, "UDP", "fullnat"),
            k("demo/web", "10.20.0.10", 80, "TCP", "fullnat"),
            k("media/video", "10.20.0.20", 443, "TCP", "dsr-ipip"),
            k("demo/api", "10.20.0.30", 443, "TCP", "fullnat"),
            k("demo/api", "10.20.0.30", 9090, "TCP", "fullnat"),
            k("shop/cart", "10.20.0.40", 8080, "TCP", "fullnat"),
            k("demo/api", "fd00:20::30", 443, "TCP", "fullnat"),
            k("demo/api", "fd00:20::30", 9090, "TCP", "fullnat"),
        ]
    );
    let cart = &services[5];
    assert_eq!(cart["session_affinity_timeout_s"], 600);
    let addrs: Vec<&str> = cart["backends"].as_array().unwrap().iter().map(|b| b["addr"].as_str().unwrap()).collect();
    assert_eq!(addrs, ["10.244.1.50", "10.244.2.51"]);
    assert!(services.iter().all(|s| s.get("maglev_table").is_none()), "no full tables unless asked");
}

#[test]
fn snapshot_full_tables() {
    let args = ["snapshot", "--config", BOOTSTRAP, "--manifests", MANIFESTS, "--full-tables"];
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    let web = &v["services"][1];
    assert_eq!(web["service"], "demo/web");
    let table = web["maglev_table"].as_array().unwrap();
    assert_eq!(table.len(), 65537);
    // Slots index the service's backends; only the two ready ones (0 and 1) appear.
    let mut seen = [0u32; 3];
    for s in table {
        seen[s.as_u64().unwrap() as usize] += 1;
    }
    assert_eq!(seen[2], 0);
    assert_eq!(seen[0], web["backends"][0]["maglev_slots"].as_u64().unwrap() as u32);
}

#[test]
fn every_broken_example_is_rejected_with_its_message() {
    let dir = examples().join("broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 11, "broken cases: {files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("# expect: line").trim();
        let name = file.file_name().unwrap().to_str().unwrap();
        let args: Vec<&str> = if name.starts_with("bootstrap-") {
            vec!["check", "--config", p(file)]
        } else {
            vec!["check", "--config", BOOTSTRAP, "--manifests", p(file)]
        };
        let err = fails(&args);
        assert!(err.contains(expect), "{name}: {err:?} does not contain {expect:?}");
        assert!(err.contains(name), "{name}: error does not name its file: {err}");
        if !name.starts_with("bootstrap-") {
            // snapshot rejects them the same way.
            let err = fails(&["snapshot", "--config", BOOTSTRAP, "--manifests", p(file)]);
            assert!(err.contains(expect), "snapshot {name}: {err}");
        }
    }
}

#[test]
fn missing_files_are_named() {
    let err = fails(&["check", "--config", "/nonexistent/boot.yaml"]);
    assert!(err.contains("/nonexistent/boot.yaml: cannot read: No such file or directory"), "{err}");
    let err = fails(&["check", "--config", BOOTSTRAP, "--manifests", "/nonexistent/manifests"]);
    assert!(err.contains("/nonexistent/manifests: cannot read: No such file or directory"), "{err}");
    let err = fails(&["snapshot", "--config", "/nonexistent/boot.yaml", "--manifests", MANIFESTS]);
    assert!(err.contains("/nonexistent/boot.yaml: cannot read"), "{err}");
}

#[test]
fn usage_errors_and_help() {
    let o = fulcrum(&["snapshot", "--config", BOOTSTRAP]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--manifests <PATH>"), "{}", stderr(&o));
    assert_eq!(fulcrum(&[]).status.code(), Some(2));
    assert_eq!(fulcrum(&["check"]).status.code(), Some(2));
    assert_eq!(fulcrum(&["frobnicate"]).status.code(), Some(2));
    for cmd in [&["--help"][..], &["check", "--help"], &["snapshot", "--help"], &["help", "check"]] {
        let out = ok(cmd);
        assert!(out.contains("Usage: fulcrum"), "{cmd:?}: {out}");
    }
    assert!(ok(&["check", "--help"]).contains("--manifests <PATH>"));
    assert!(ok(&["snapshot", "--help"]).contains("--full-tables"));
    // Times that cannot be a duration are usage errors before anything starts, not a panic.
    let manifests = examples().join("manifests");
    for bad in
        [&["--stats-every=-1"][..], &["--stats-every", "NaN"], &["--watch-every", "inf"], &["--watch-every", "soon"]]
    {
        let mut args = vec!["run", "--config", BOOTSTRAP, "--manifests", p(&manifests)];
        args.extend_from_slice(bad);
        let o = fulcrum(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("seconds"), "{bad:?}: {}", stderr(&o));
    }
}

fn route(host: &str, path: &str) -> Value {
    let dir = examples().join("ingress");
    serde_json::from_str(ok(&["route", "--manifests", p(&dir), "--host", host, "--path", path]).trim()).unwrap()
}

#[test]
fn route_by_host_and_path_through_the_example_ingresses() {
    // Prefix by port name, resolved through the Service; Exact wins over Prefix; merged Ingress.
    assert_eq!(
        route("shop.example.com", "/api/v1/cart"),
        serde_json::json!({"status": 200, "service": "shop/api", "port": 8081})
    );
    assert_eq!(
        route("Shop.Example.com:443", "/api/health"),
        serde_json::json!({"status": 200, "service": "shop/web", "port": 80})
    );
    assert_eq!(
        route("shop.example.com", "/admin"),
        serde_json::json!({"status": 200, "service": "shop/api", "port": 8081})
    );
    assert_eq!(route("shop.example.com", "/adminx")["service"], "shop/web");
    // One-label wildcard; beyond it, and for other hosts, the default backend.
    assert_eq!(route("img.cdn.example.com", "/a.png")["service"], "shop/static");
    assert_eq!(route("a.b.cdn.example.com", "/a.png")["service"], "shop/fallback");
    assert_eq!(route("other.example.com", "/")["service"], "shop/fallback", "the nginx-class Ingress is ignored");
    // A rule whose Service does not exist, and a request that cannot be routed.
    assert_eq!(route("shop.example.com", "/old/x")["status"], 503);
    assert_eq!(route("shop.example.com", "*")["status"], 400);
    // The first line of the output is exactly the documented form.
    let out =
        ok(&["route", "--manifests", p(&examples().join("ingress")), "--host", "shop.example.com", "--path", "/"]);
    assert_eq!(out, "{\"status\":200,\"service\":\"shop/web\",\"port\":80}\n");
}

#[test]
fn route_without_a_match_is_404_and_broken_ingresses_are_named() {
    let dir = std::env::temp_dir().join(format!("fulcrum-route-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("i.yaml");
    std::fs::write(
        &f,
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a}\nspec:\n  ingressClassName: fulcrum\n  rules:\n  - host: a.example\n    http:\n      paths:\n      - {path: /x, pathType: Exact, backend: {service: {name: s, port: {number: 80}}}}\n",
    )
    .unwrap();
    let out = ok(&["route", "--manifests", p(&f), "--host", "a.example", "--path", "/y", "--method", "POST"]);
    assert_eq!(out.trim(), "{\"status\":404}");
    std::fs::write(
        &f,
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a}\nspec:\n  ingressClassName: fulcrum\n  rules:\n  - host: a.example\n    http:\n      paths:\n      - {path: x, pathType: Exact, backend: {service: {name: s, port: {number: 80}}}}\n",
    )
    .unwrap();
    let err = fails(&["route", "--manifests", p(&f), "--host", "a.example", "--path", "/"]);
    assert!(err.contains("i.yaml: document 1: Ingress default/a: field spec.rules[0].http.paths[0].path"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_lists_the_ingress_routes_and_what_it_ignored() {
    let dir = examples().join("ingress");
    let out = ok(&["check", "--config", BOOTSTRAP, "--manifests", p(&dir)]);
    assert!(out.contains("Ingress (class fulcrum): 2 Ingresses, 6 routes"), "{out}");
    assert!(out.contains("*.cdn.example.com") && out.contains("shop/static:8000"), "{out}");
    assert!(out.contains("503 (Service shop/retired not found)"), "{out}");
    assert!(out.contains("warning: Ingress shop/other: not ours"), "{out}");
    let v: Value =
        serde_json::from_str(&ok(&["check", "--config", BOOTSTRAP, "--manifests", p(&dir), "--json"])).unwrap();
    assert_eq!(v["ingress"]["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["ingress"]["default_backend"]["service"],
        serde_json::json!({"namespace": "shop", "name": "fallback"})
    );
    // Manifests without Ingresses print no Ingress section.
    assert!(!ok(&["check", "--config", BOOTSTRAP, "--manifests", MANIFESTS]).contains("Ingress (class"));
}
