//! The worker's whole packet path (classify, ARP/NDP/ICMP, conntrack, Maglev, FullNAT/DSR
//! rewrites, ICMP errors) on arbitrary frames, in bursts, on the golden appliance.
//!
//! Input layout (see README.md):
//!   byte 0   flags: bit 0 = fix the IPv4 header and transport checksums of every frame before
//!            feeding it; bit 1 = worker of 2 cores (bit 2 picks core 1) instead of 1 of 1;
//!            bit 3 = FullNAT source addresses 10.10.0.20, 10.10.0.21, fd00:10::20 instead of
//!            the port's own; bit 4 = the golden appliance with on-link endpoints and no static
//!            neighbour (`golden_on_link`: neighbours resolved, left unanswered, re-picked)
//!   byte 1   burst size - 1 (mod 32)
//!   byte 2   time step between bursts: b * b * 16 ms (0 .. ~17 minutes, crosses timeouts)
//!   then     frames: u16 big-endian length, then that many bytes (the rest if fewer);
//!            frames over 2048 bytes are truncated; at most 256 frames.
#![no_main]

use fulcrum_fuzz::{burst_and_check, fix_frame, golden_on_link_worker, golden_snat_addresses, golden_worker_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (flags, burst, step) = (data[0], data[1] as usize % 32 + 1, data[2] as u64);
    let step_ms = step * step * 16;
    let (core, cores) = if flags & 2 != 0 { (((flags >> 2) & 1) as u16, 2) } else { (0, 1) };
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut rest = &data[3..];
    while rest.len() >= 2 && frames.len() < 256 {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let take = len.min(rest.len());
        let mut f = rest[..take.min(fulcrum_fuzz::MAX_FRAME)].to_vec();
        rest = &rest[take..];
        if flags & 1 != 0 {
            fix_frame(&mut f);
        }
        frames.push(f);
    }
    let snat = if flags & 8 != 0 { golden_snat_addresses() } else { vec![] };
    let mut worker = match flags & 16 {
        0 => golden_worker_with(core, cores, snat),
        _ => golden_on_link_worker(core, cores, snat),
    };
    let mut now = 1u64;
    for chunk in frames.chunks(burst) {
        let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
        burst_and_check(&mut worker, now, &refs);
        now += step_ms;
    }
    let total_rx = frames.len() as u64;
    assert_eq!(worker.stats.rx.packets, total_rx);
});
