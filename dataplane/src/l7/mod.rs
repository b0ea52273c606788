//! L7: HTTP routing by host and path (Ingress v1) and HTTP/1.1 message handling.

pub mod http;
pub mod router;
