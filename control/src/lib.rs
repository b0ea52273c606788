//! The appliance's control plane as a library, for the `fulcrum` binary and for
//! `fulcrum-bench control`: the Kubernetes source and write-back (`k8s`), the serve loop that
//! builds and publishes snapshots (`serve`), and the admin endpoint (`admin`).

pub mod admin;
pub mod k8s;
pub mod serve;
