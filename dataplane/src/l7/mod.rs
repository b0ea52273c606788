//! L7: HTTP routing by host and path (Ingress v1), HTTP/1.1 message handling, the worker's
//! user-space TCP (smoltcp, sharded) and the reverse proxy on top of it.

pub mod access_log;
mod ack_pace;
pub mod buffers;
pub mod client_io;
pub mod http;
pub mod proxy;
pub mod router;
pub mod script;
pub mod sim;
mod spare;
pub mod stack;
pub mod timer_wheel;
pub mod tls;
