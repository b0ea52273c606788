//! One arbitrary frame against a warmed-up golden appliance: a fresh worker first replays every
//! golden fixture's input (`dataplane/tests/fixtures/*.in.pcap`: flows established for TCP, UDP,
//! IPv6 and DSR services, neighbours learned), then gets the fuzzed frame as it is, then the
//! same frame with its checksums fixed. Seeded with the fixtures' single frames (`seed.sh`),
//! so mutations start from valid packets of every kind.
//!
//! Per frame (one input, at most one output): the invariants of `burst_and_check`, plus: when
//! the input's transport checksum is valid, the output's is too.
#![no_main]

use fulcrum_fuzz::{burst_and_check, fix_frame, golden_worker, pcap_frames, GOLDEN_PCAPS, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn warmup() -> &'static Vec<Vec<Vec<u8>>> {
    static W: OnceLock<Vec<Vec<Vec<u8>>>> = OnceLock::new();
    W.get_or_init(|| GOLDEN_PCAPS.iter().map(|(_, p)| pcap_frames(p)).collect())
}

fuzz_target!(|data: &[u8]| {
    let frame = &data[..data.len().min(MAX_FRAME)];
    let mut worker = golden_worker(0, 1);
    let mut now = 0u64;
    for case in warmup() {
        for chunk in case.chunks(fulcrum_dataplane::port::BURST) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
            burst_and_check(&mut worker, now, &refs);
            now += 1;
        }
    }
    let out = burst_and_check(&mut worker, now, &[frame]);
    assert!(out.len() <= 1);
    let mut fixed = frame.to_vec();
    fix_frame(&mut fixed);
    let out = burst_and_check(&mut worker, now + 1, &[&fixed]);
    assert!(out.len() <= 1);
});
