//! The `fulcrum` subcommands, one module each, and what they share.

pub mod check;
pub mod lab;
pub mod lab_client;
pub mod route;
pub mod run;
pub mod snapshot;

use anyhow::Context;
use fulcrum_config::{Bootstrap, DesiredState, Objects};
use fulcrum_dataplane::snapshot::Snapshot;
use std::path::Path;

/// Generation number of a snapshot compiled for inspection (the first one a run would publish).
const FIRST_GENERATION: u64 = 1;

/// Loads the bootstrap file, reads and translates the manifests and compiles the snapshot; the
/// objects read come back too, for what looks at them beyond the snapshot.
pub fn compile(config: &Path, manifests: &Path) -> anyhow::Result<(Bootstrap, Objects, DesiredState, Snapshot)> {
    let boot = Bootstrap::load(config)?;
    let objects = fulcrum_config::manifests::load(manifests)?;
    let state = fulcrum_config::translate(&boot, &objects)?;
    let snap = Snapshot::compile(&boot, &state, FIRST_GENERATION)
        .with_context(|| format!("{}: cannot compile the snapshot", manifests.display()))?;
    Ok((boot, objects, state, snap))
}
