//! Wire formats. smoltcp's `wire` gives zero-copy views and `Repr`s for ARP, IPv4, IPv6, ICMP,
//! NDP, TCP and UDP; what it lacks (802.1Q, incremental checksums) is here.

pub mod checksum;
pub mod ether;

pub use smoltcp::wire as smol;
