//! The appliance's control plane as a library, for the `fulcrum` binary and for
//! `fulcrum-bench control`: the Kubernetes source and write-back (`k8s`), the serve loop that
//! builds and publishes snapshots (`serve`), the admin endpoint (`admin`) and the access log's
//! writer (`access_log`).

pub mod access_log;
pub mod admin;
pub mod k8s;
pub mod serve;
