//! L4 load balancing: Maglev, per-core conntrack, FullNAT and DSR IP-in-IP rewrites.

pub mod conntrack;
pub mod hash;
pub mod maglev;
