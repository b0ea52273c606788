//! The HTTP/1.1 request path of the reverse proxy: arbitrary bytes from a client -> request
//! head (httparse + our rules) -> the head written upstream -> the body's framing fed in
//! arbitrary pieces. Never panics; a head it accepts is re-parsed from what it writes upstream
//! and must mean the same (method, target, framing); the body reader never claims more bytes
//! than it was given; errors map to 4xx/5xx statuses.
#![no_main]

use fulcrum_dataplane::l7::http::body::BodyReader;
use fulcrum_dataplane::l7::http::head::{self, ClientInfo, Framing};
use fulcrum_dataplane::l7::http::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size for feeding the body.
    let Some((&piece, data)) = data.split_first() else { return };
    let limits = Limits { max_header_bytes: 4096, max_headers: 32, max_uri_bytes: 1024, max_body_bytes: 1 << 20 };
    let mut storage = [httparse::EMPTY_HEADER; 32];
    let r = match head::parse_request(data, &limits, &mut storage) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            assert!(matches!(e.status(), 400 | 413 | 414 | 431 | 501 | 505), "{e:?}");
            return;
        }
    };
    assert!(r.head_len <= data.len());
    let mut up = Vec::new();
    head::write_upstream_request(&r, ClientInfo { addr: "192.0.2.1", proto: "http" }, &mut up);
    let mut storage2 = [httparse::EMPTY_HEADER; 64];
    let big = Limits { max_header_bytes: 1 << 16, max_headers: 64, ..limits.clone() };
    let again = head::parse_request(&up, &big, &mut storage2).expect("our own head parses").expect("complete");
    assert_eq!((again.method, again.target, again.framing), (r.method, r.target, r.framing));
    assert_eq!(again.head_len, up.len());
    let mut body = BodyReader::new(r.framing, limits.max_body_bytes);
    let mut rest = &data[r.head_len..];
    let step = piece.max(1) as usize;
    while !rest.is_empty() && !body.is_done() {
        let chunk = &rest[..step.min(rest.len())];
        match body.feed(chunk) {
            Ok(n) => {
                assert!(n <= chunk.len());
                if n < chunk.len() {
                    assert!(body.is_done(), "stopped short without finishing");
                }
                rest = &rest[n..];
            }
            Err(_) => return,
        }
    }
    if r.framing == Framing::Empty {
        assert!(body.is_done());
    }
});
