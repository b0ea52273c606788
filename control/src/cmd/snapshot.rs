//! `fulcrum snapshot`: the compiled tables as pretty JSON on stdout.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bootstrap file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    #[command(flatten)]
    pub input: super::InputArgs,
    /// Include every Maglev table slot (65537 numbers per service by default).
    #[arg(long)]
    pub full_tables: bool,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let (_, _, _, snap) = super::compile(&a.config, &a.input)?;
    let text = serde_json::to_string_pretty(&snap.to_json(a.full_tables))?;
    println!("{text}");
    Ok(())
}
