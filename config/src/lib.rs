//! Fulcrum configuration: the bootstrap file and the service model.
//!
//! Pure: no sockets, no threads. Kubernetes objects (from files here, from the API server in the
//! control crate) go through one translation into a [`model::DesiredState`].

pub mod bootstrap;
pub mod error;
pub mod ingress;
pub mod manifests;
pub mod model;
pub mod translate;

pub use bootstrap::Bootstrap;
pub use error::ConfigError;
pub use manifests::{Objects, Source, Sourced};
pub use model::DesiredState;
pub use translate::{load_desired, translate};
