//! Fulcrum's own thin binding to DPDK 22.11 LTS (Debian's `libdpdk-dev`): bindgen over an
//! allowlist of EAL, ethdev, mbuf and mempool calls, a small C shim for DPDK's static inlines
//! (`shim/shim.c`), and safe wrappers. [`PortQueue`] implements the data plane's `Port` trait
//! with [`Mbuf`]s whose bytes are read in Rust (`buf_addr + data_off`): the only FFI calls per
//! packet are the burst calls (and freeing an mbuf that is dropped).

pub mod eal;
pub mod error;
pub mod ffi;
pub mod mbuf;
pub mod mempool;
pub mod port;

pub use eal::{lcore_id, rdtsc, socket_id, tsc_hz, Eal, LcoreRegistration, LCORE_ID_ANY};
pub use error::{strerror, Error, Result};
pub use mbuf::Mbuf;
pub use mempool::{Mempool, MBUF_BUF_SIZE, MBUF_HEADROOM, SOCKET_ANY};
pub use port::{EthPort, Link, PortConf, PortQueue, PortStats};
