//! `fulcrum snapshot`: the compiled tables as pretty JSON on stdout.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bootstrap file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Kubernetes manifests: a YAML file or a directory of them.
    #[arg(long, value_name = "PATH")]
    pub manifests: PathBuf,
    /// Include every Maglev table slot (65537 numbers per service by default).
    #[arg(long)]
    pub full_tables: bool,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let (_, _, _, snap) = super::compile(&a.config, &a.manifests)?;
    let text = serde_json::to_string_pretty(&snap.to_json(a.full_tables))?;
    println!("{text}");
    Ok(())
}
