//! L7: HTTP routing by host and path (Ingress v1).

pub mod router;
