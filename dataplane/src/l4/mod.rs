//! L4 load balancing: Maglev, per-core conntrack, SNAT ports, FullNAT and DSR IP-in-IP
//! rewrites (in the worker) and ICMP errors about tracked flows.

pub mod conntrack;
pub mod hash;
pub(crate) mod icmp_error;
pub mod maglev;
pub mod snat;
pub mod unanswered;
