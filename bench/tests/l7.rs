//! `fulcrum-bench l7` runs the real worker's HTTP proxy against simulated TCP clients and
//! backends and reports one JSON line with requests per second and latency percentiles.

use std::process::Command;

#[test]
fn l7_bench_completes_every_request_without_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench"))
        .args(["l7", "--conns", "8", "--requests", "400", "--backends", "2"])
        .output()
        .expect("run fulcrum-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["bench"], "l7");
    assert_eq!(v["conns"], 8);
    assert_eq!(v["tls"], false);
    assert!(v["requests"].as_u64().unwrap() >= 400);
    assert_eq!(v["errors_local"], 0);
    assert!(v["rps_per_core"].as_f64().unwrap() > 0.0);
    let (p50, p99) = (v["p50_us"].as_f64().unwrap(), v["p99_us"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
    // Keep-alive on both sides: a handful of upstream connections carried all the requests.
    assert!(v["upstream_reused"].as_u64().unwrap() >= 380, "{v}");
    // The timed part is the run after its warm-up, and the worker's time a part of it.
    let (wall, timed, worker) = (
        v["wall_seconds"].as_f64().unwrap(),
        v["timed_wall_seconds"].as_f64().unwrap(),
        v["worker_seconds"].as_f64().unwrap(),
    );
    assert!(0.0 < worker && worker <= timed && timed < wall, "{v}");
}

#[test]
fn l7_bench_over_tls_reports_handshakes_beside_raw_rustls() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench"))
        .args(["l7", "--conns", "4", "--requests", "40", "--backends", "1", "--tls", "--new-conn"])
        .output()
        .expect("run fulcrum-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["tls"], true);
    assert_eq!(v["errors_local"], 0);
    let hs = v["handshakes_per_s_per_core"].as_f64().unwrap();
    let raw = v["raw_rustls_handshakes_per_s"].as_f64().unwrap();
    assert!(hs > 0.0 && raw > 0.0, "{v}");
    assert!((v["ratio_to_raw_rustls"].as_f64().unwrap() - hs / raw).abs() < 1e-6);
}

#[test]
fn more_connections_than_the_upstream_ports_of_the_endpoints_is_refused_up_front() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench"))
        .args(["l7", "--conns", "5000", "--backends", "1"])
        .output()
        .expect("run fulcrum-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--conns 5000 needs at least 2 --backends"), "{stderr}");
    assert!(out.stdout.is_empty(), "no result line for a run that cannot complete");
}

/// Under a SYN flood at `--max-connections`, new client connections still get in (each in
/// the place of the oldest spoofed handshake) and every request is answered.
#[test]
fn l7_bench_under_a_syn_flood_serves_every_request() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench"))
        .args([
            "l7",
            "--conns",
            "8",
            "--requests",
            "300",
            "--backends",
            "2",
            "--new-conn",
            "--syn-flood",
            "16",
            "--max-connections",
            "64",
        ])
        .output()
        .expect("run fulcrum-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["errors_local"], 0);
    assert!(v["requests"].as_u64().unwrap() >= 300);
    let f = &v["syn_flood"];
    let (spoofed, evicted) = (f["spoofed_syns"].as_u64().unwrap(), f["handshakes_evicted"].as_u64().unwrap());
    assert!(spoofed > 1000 && evicted > spoofed / 2, "the table full of spoofed handshakes: {v}");
    assert_eq!(v["max_connections"], 64);
}
