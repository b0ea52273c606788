//! HTTP/1.1 for the reverse proxy, sans I/O: message heads (parse, forward, make) and body
//! framing. The transport (smoltcp sockets, TLS) feeds bytes in and takes bytes out.

pub mod body;
pub mod head;

/// Limits on what a client may send (the bootstrap file's `l7.limits`; these are the defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers together (431 beyond; 414 if the request line alone is).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// Declared or chunked body (413 beyond).
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // nginx's large_client_header_buffers is 4 x 8 KiB; Envoy's max_request_headers_kb 60.
        Limits { max_header_bytes: 16 * 1024, max_headers: 100, max_uri_bytes: 8 * 1024, max_body_bytes: 1 << 30 }
    }
}
