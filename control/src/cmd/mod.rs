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
use std::path::{Path, PathBuf};

/// Where the Kubernetes objects come from: manifest files, or the API server.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct InputArgs {
    /// Kubernetes manifests: a YAML file or a directory of them.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// The Kubernetes API server, from this kubeconfig file ("in-cluster": the pod's service
    /// account, or $KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

impl InputArgs {
    /// The kubeconfig to use; None for in-cluster / $KUBECONFIG.
    pub fn kubeconfig(&self) -> Option<PathBuf> {
        self.kubeconfig.clone().filter(|p| p.as_os_str() != "in-cluster")
    }

    /// Reads the objects: from the files, or one full list from the API server.
    pub fn objects(&self) -> anyhow::Result<(Objects, String)> {
        match &self.manifests {
            Some(m) => Ok((fulcrum_config::manifests::load(m)?, m.display().to_string())),
            None => {
                let k = fulcrum_control::k8s::Kube::connect(self.kubeconfig().as_deref())?;
                Ok((k.mirror.objects(), k.mirror.server.clone()))
            }
        }
    }
}

/// A time in seconds on the command line: finite and not negative (fractions allowed), so that
/// turning it into a `Duration` cannot panic.
pub fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: seconds must be a finite number, 0 or more"));
    }
    Ok(v)
}

/// Generation number of a snapshot compiled for inspection (the first one a run would publish).
const FIRST_GENERATION: u64 = 1;

/// Loads the bootstrap file, reads and translates the manifests and compiles the snapshot; the
/// objects read come back too, for what looks at them beyond the snapshot.
pub fn compile(config: &Path, input: &InputArgs) -> anyhow::Result<(Bootstrap, Objects, DesiredState, Snapshot)> {
    let boot = Bootstrap::load(config)?;
    let (objects, source) = input.objects()?;
    let state = if input.manifests.is_some() {
        fulcrum_config::translate(&boot, &objects)?
    } else {
        // From the API server, as `run` serves it: an object with a problem is left out.
        let t = fulcrum_config::translate::translate_each(&boot, &objects);
        for p in &t.problems {
            eprintln!("fulcrum: left out: {}: {}", p.reason, p.error);
        }
        t.state
    };
    let snap = Snapshot::compile(&boot, &state, FIRST_GENERATION)
        .with_context(|| format!("{source}: cannot compile the snapshot"))?;
    Ok((boot, objects, state, snap))
}
