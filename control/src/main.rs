//! `fulcrum`: the Fulcrum appliance's command line. One module per command under `cmd/`.

use clap::{Parser, Subcommand};

mod cmd;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Check(a) => cmd::check::run(a),
        Cmd::Snapshot(a) => cmd::snapshot::run(a),
    };
    if let Err(e) = result {
        // One line: the error and its causes (config errors already name file, document,
        // object and field).
        eprintln!("fulcrum: error: {e:#}");
        std::process::exit(1);
    }
}
