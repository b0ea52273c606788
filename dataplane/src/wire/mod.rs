//! Wire formats. smoltcp's `wire` gives zero-copy views and `Repr`s for ARP, IPv4, IPv6, ICMP,
//! NDP, TCP and UDP; what it lacks (802.1Q, incremental checksums, NDP addressing) is here.

pub mod checksum;
pub mod ether;
pub mod ndp;

pub use smoltcp::wire as smol;
