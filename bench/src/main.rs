//! Fulcrum's benchmarks and traffic generators. Every result is one JSON line on stdout.
// serde_json's `json!` recurses once per key: `l7`'s result line has outgrown the default 128.
#![recursion_limit = "256"]

use clap::{Parser, Subcommand};

mod control;
mod dpdk_common;
mod io_forward;
mod l4;
mod l4_dpdk;
mod l7;
mod pktgen;
mod report;
mod router;

// The same allocator as the appliance (see control/src/main.rs), so that control-plane figures
// are the appliance's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "fulcrum-bench", version, about = "Fulcrum benchmarks: one JSON line per result")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// L4 load balancing on one core over in-memory buffers: SYN path, then established flows.
    L4(l4::L4Args),
    /// The HTTP proxy on the real worker, in memory: keep-alive clients and backends speaking TCP.
    L7(l7::L7Args),
    /// DPDK io forwarding on two net_null vdevs through our binding, beside dpdk-testpmd.
    IoForward(io_forward::IoForwardArgs),
    /// DPDK packet generator: constant-rate open loop over many flows, round-trip latency from
    /// a timestamp in each payload, RFC 2544 throughput search.
    Pktgen(pktgen::PktgenArgs),
    /// The L7 router's cost per request for growing numbers of Ingress hosts.
    Router(router::RouterArgs),
    /// Control plane at scale: snapshot build (translate + compile) for many Services, Ingress
    /// rules and endpoints, and publish to running workers.
    Control(control::ControlArgs),
}

/// Pins the calling thread to `core` (default: the last core) and returns the core used.
pub fn pin(core: Option<usize>) -> Option<usize> {
    let ids = core_affinity::get_core_ids()?;
    let id = match core {
        Some(c) => *ids.iter().find(|i| i.id == c)?,
        None => *ids.last()?,
    };
    core_affinity::set_for_current(id).then_some(id.id)
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::L4(a) => l4::run(a),
        Cmd::IoForward(a) => io_forward::run(a),
        Cmd::L7(a) => l7::run(a),
        Cmd::Pktgen(a) => pktgen::run(a),
        Cmd::Router(a) => router::run(a),
        Cmd::Control(a) => control::run(a),
    };
    if let Err(e) = r {
        eprintln!("fulcrum-bench: {e:#}");
        std::process::exit(1);
    }
}
