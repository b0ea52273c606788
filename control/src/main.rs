//! `fulcrum`: the Fulcrum appliance's command line. One module per command under `cmd/`.

use clap::{Parser, Subcommand};

mod cmd;

// The control thread compiles snapshots of 10,000s of objects on several threads; with glibc's
// malloc a third of that time went to the allocator's own bookkeeping (`fulcrum-bench control`).
// The data path does not allocate, so this changes nothing per packet.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "fulcrum",
    version,
    about = "Fulcrum: kernel-bypass L4/L7 load balancer for bare-metal Kubernetes",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate a bootstrap file (and manifests) and print what the appliance would serve.
    Check(cmd::check::Args),
    /// Compile the bootstrap file and manifests and print the compiled tables as JSON.
    Snapshot(cmd::snapshot::Args),
    /// Where a request would go by the Ingress rules in the manifests: one JSON line.
    Route(cmd::route::Args),
    /// Run the appliance: DPDK on the bootstrap file's port, workers, manifests watched.
    Run(cmd::run::Args),
    /// The embedded default: the namespace lab, the appliance on DPDK, live traffic, a final JSON line.
    Lab(cmd::lab::Args),
    /// The lab's traffic generator (run by `fulcrum lab` inside the client namespace).
    #[command(hide = true)]
    LabClient(cmd::lab_client::Args),
}

fn main() {
    let cli = Cli::parse();
    // One crypto provider for the whole process (the L7 TLS server and the Kubernetes client).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // kube warns on every connection to a server whose kubeconfig skips TLS
            // verification (the user's own kubeconfig says so), and logs every failed
            // reconnection while the API server is away; Fulcrum says the latter once per
            // outage itself, and counts them in /metrics.
            "warn,kube_client::client::tls=error,kube_client::client::builder=off".into()
        }))
        .with_writer(std::io::stderr)
        .init();
    let result = match &cli.cmd {
        Cmd::Check(a) => cmd::check::run(a),
        Cmd::Snapshot(a) => cmd::snapshot::run(a),
        Cmd::Route(a) => cmd::route::run(a),
        Cmd::Run(a) => cmd::run::run(a),
        Cmd::Lab(a) => cmd::lab::run(a),
        Cmd::LabClient(a) => cmd::lab_client::run(a),
    };
    if let Err(e) = result {
        // One line: the error and its causes (config errors already name file, document,
        // object and field).
        eprintln!("fulcrum: error: {e:#}");
        std::process::exit(1);
    }
}
