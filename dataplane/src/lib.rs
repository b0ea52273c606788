//! Fulcrum's data plane: packet I/O, wire formats, L4 load balancing and the worker loop.
//!
//! The fast path is per core and share-nothing: no locks, no allocation, no syscalls and no
//! shared atomic read-modify-write per packet.

pub mod l4;
pub mod l7;
pub mod mem;
pub mod neigh;
pub mod packet;
pub mod pcap;
pub mod port;
pub mod runtime;
pub mod snapshot;
pub mod stats;
pub mod wire;
pub mod worker;
