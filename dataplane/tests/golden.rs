//! Golden packet tests (Katran-style): each fixture's input frames go through a fresh worker,
//! one burst per frame, and what it sends must equal the fixture's expected frames byte for
//! byte, and what it drops must be counted under the expected reasons, in order. The expected
//! frames are built by `fixtures/gen.py` with scapy, independently of this code.
//! On a mismatch the actual output is written to `target/golden-actual/NAME.out.pcap`.

use fulcrum_config::{load_desired, Bootstrap};
use fulcrum_dataplane::pcap::{read_pcap, write_pcap};
use fulcrum_dataplane::port::MemoryPort;
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::stats::DropReason;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fresh_worker() -> Worker {
    let dir = fixtures();
    let boot = Bootstrap::load(&dir.join("bootstrap.yaml")).expect("fixture bootstrap");
    let state = load_desired(&boot, &dir.join("manifests.yaml")).expect("fixture manifests");
    let snap = Snapshot::compile(&boot, &state, 1).expect("compile");
    let mut cfg = WorkerConfig::from_bootstrap(&boot, 0, 1);
    cfg.seed = 7;
    cfg.snat_offset = 0;
    cfg.ct_capacity = 4096;
    Worker::new(cfg, Arc::new(snap)).expect("worker")
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replays one case; returns (frames sent, drop reasons in order).
fn replay(name: &str) -> (Vec<Vec<u8>>, Vec<String>) {
    let input = read_pcap(&fixtures().join(format!("{name}.in.pcap"))).expect("input pcap");
    let mut w = fresh_worker();
    let mut port = MemoryPort::new();
    let mut sent = Vec::new();
    let mut drops = Vec::new();
    for (i, frame) in input.iter().enumerate() {
        let before = w.stats.drops;
        port.push_rx(frame);
        w.poll(&mut port, i as u64);
        sent.extend(port.take_tx());
        for r in DropReason::ALL {
            for _ in before[*r as usize]..w.stats.drops[*r as usize] {
                drops.push(r.name().to_string());
            }
        }
    }
    (sent, drops)
}

fn golden(name: &str) {
    let expected = read_pcap(&fixtures().join(format!("{name}.out.pcap"))).expect("expected pcap");
    let expected_drops: Vec<String> = std::fs::read_to_string(fixtures().join(format!("{name}.drops")))
        .expect("drops file")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let (sent, drops) = replay(name);
    if sent != expected {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/golden-actual");
        std::fs::create_dir_all(&out).unwrap();
        write_pcap(&out.join(format!("{name}.out.pcap")), &sent).unwrap();
        let first = sent.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(sent.len().min(expected.len()));
        panic!(
            "{name}: sent {} frames, expected {}; first difference at frame {first}\n--- got:\n{}\n--- expected:\n{}\n(actual output written to {})",
            sent.len(),
            expected.len(),
            sent.get(first).map(|f| hex(f)).unwrap_or_default(),
            expected.get(first).map(|f| hex(f)).unwrap_or_default(),
            out.display()
        );
    }
    assert_eq!(drops, expected_drops, "{name}: drop reasons");
}

macro_rules! golden_cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { golden(stringify!($name)); } )* };
}

golden_cases!(
    arp,
    ndp,
    ping_vip,
    tcp_fullnat,
    udp_fullnat,
    dsr_ipip,
    ipv6_fullnat,
    unknown_vip,
    vlan,
    malformed,
    icmp_fullnat
);

/// Every fixture directory entry is covered by a test above (a new fixture cannot be forgotten).
#[test]
fn every_fixture_has_a_test() {
    let known = [
        "arp",
        "ndp",
        "ping_vip",
        "tcp_fullnat",
        "udp_fullnat",
        "dsr_ipip",
        "ipv6_fullnat",
        "unknown_vip",
        "vlan",
        "malformed",
        "icmp_fullnat",
    ];
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        if let Some(case) = n.strip_suffix(".in.pcap") {
            assert!(known.contains(&case), "fixture {case} has no golden test");
        }
    }
}
