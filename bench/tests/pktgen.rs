//! `fulcrum-bench pktgen` on DPDK's `net_ring` vdev, which loops every transmitted frame back to
//! its own receive queue: every probe must come back once, with a latency, at the offered rate;
//! the RFC 2544 search must converge and say when the generator itself was the limit.
//! (Against the lab, through Fulcrum: control/tests/lab_e2e.rs.)

use std::process::Command;

fn pktgen(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench"))
        .arg("pktgen")
        .args(["--port", "net_ring0", "--dst-mac", "02:00:00:00:00:02", "--drain-ms", "100"])
        .args(args)
        .output()
        .expect("run fulcrum-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pktgen failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[test]
fn constant_rate_trial_on_a_loopback_gets_every_probe_back() {
    let lines = pktgen(&["--rate", "200000", "--seconds", "0.5", "--flows", "5000", "--src-ips", "4"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v = &lines[0];
    assert_eq!(v["bench"], "pktgen");
    assert_eq!(v["sent"], 100_000, "rate x seconds: {v}");
    assert_eq!(v["received"], 100_000, "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["generator_limited"], false, "{v}");
    let achieved = v["achieved_tx_pps"].as_f64().unwrap();
    assert!((achieved - 200_000.0).abs() < 4_000.0, "paced at the offered rate: {v}");
    let p50 = v["latency_ns"]["p50"].as_u64().unwrap();
    let max = v["latency_ns"]["max"].as_u64().unwrap();
    assert!(p50 > 0 && p50 <= max, "{v}");
    assert!(v["loadavg"].as_f64().is_some());
}

#[test]
fn frame_size_is_honoured_and_large_frames_round_trip() {
    let v = &pktgen(&["--rate", "50000", "--seconds", "0.2", "--size", "1514", "--no-learning"])[0];
    assert_eq!(v["frame_bytes"], 1514);
    assert_eq!(v["received"], v["sent"]);
    // 1514 + 24 bytes of preamble, FCS and gap per frame.
    let gbps = v["achieved_tx_gbps"].as_f64().unwrap();
    let expected = 50_000.0 * 1538.0 * 8.0 / 1e9;
    assert!((gbps - expected).abs() < expected * 0.03, "{v}");
}

#[test]
fn rfc2544_search_converges_and_flags_the_generator_limit() {
    // Far above what one core can generate: the first trials must be flagged as limited by
    // the generator and fail; the search must settle below the limit with zero loss.
    let lines =
        pktgen(&["--rate", "200000000", "--seconds", "0.2", "--search", "--precision", "0.05", "--no-learning"]);
    let summary = lines.last().unwrap();
    assert_eq!(summary["bench"], "pktgen-rfc2544", "{summary}");
    let trials: Vec<_> = lines.iter().filter(|v| v["bench"] == "pktgen").collect();
    assert_eq!(summary["trials"].as_u64().unwrap() as usize, trials.len());
    assert_eq!(trials[0]["generator_limited"], true, "{}", trials[0]);
    let found = summary["throughput_pps"].as_f64().expect("a rate was found");
    assert!(found > 100_000.0 && found < 200_000_000.0, "{summary}");
    let at = &summary["at_throughput"];
    assert_eq!(at["lost"], 0);
    assert_eq!(at["generator_limited"], false);
    // Binary search: every failed rate is above the one found.
    for t in &trials {
        let r = t["offered_pps"].as_f64().unwrap();
        let passed = t["lost"] == 0 && t["generator_limited"] == false;
        assert!(passed == (r <= found), "trial at {r} vs throughput {found}: {t}");
    }
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum-bench")).args(["pktgen", "--rate", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate and --seconds must be positive"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_fulcrum-bench")).args(["pktgen", "--dst-mac", "02:00"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("six hex bytes"));
}
