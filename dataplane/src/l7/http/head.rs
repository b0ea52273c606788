//! HTTP/1.1 message heads for a reverse proxy, sans I/O: parse a request head from the bytes a
//! client sent (httparse does the tokenising; the rules of RFC 9110/9112 that matter to a proxy
//! are here), decide how its body is framed and whether the connection stays open, and write
//! the head to send upstream (hop-by-hop headers removed, X-Forwarded-* and Forwarded set).
//! The same for the upstream's response head.
//!
//! Nothing here allocates per request except the upstream head written into a caller's
//! reusable buffer.

use super::Limits;
use std::io::Write;

/// How a message body is delimited (RFC 9112 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    /// `Transfer-Encoding: chunked` (as the final coding).
    Chunked,
    /// A response without length: until the upstream closes.
    UntilClose,
}

/// Why a head cannot be forwarded; each maps to the status the client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// 400: not HTTP, or ambiguous (e.g. both Content-Length and Transfer-Encoding).
    Malformed(&'static str),
    /// 431: the header section is larger than the limit, or has too many fields.
    HeadersTooLarge,
    /// 414: the request target is longer than the limit.
    UriTooLong,
    /// 413: the declared body is larger than the limit.
    BodyTooLarge,
    /// 501: a transfer coding other than chunked.
    NotImplemented(&'static str),
    /// 505: not HTTP/1.x.
    Version,
}

impl HeadError {
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Malformed(_) => 400,
            HeadError::HeadersTooLarge => 431,
            HeadError::UriTooLong => 414,
            HeadError::BodyTooLarge => 413,
            HeadError::NotImplemented(_) => 501,
            HeadError::Version => 505,
        }
    }
}

/// A parsed request head, borrowing from the receive buffer.
#[derive(Debug)]
pub struct RequestHead<'b> {
    pub method: &'b str,
    pub target: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub host: Option<&'b str>,
    pub framing: Framing,
    /// Whether the client's connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Upgrade` requested (with `Connection: upgrade`), e.g. `websocket`.
    pub upgrade: Option<&'b str>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Bytes of the head, including the blank line; the body starts here.
    pub head_len: usize,
    pub headers: &'b [httparse::Header<'b>],
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead<'b> {
    pub status: u16,
    pub minor: u8,
    pub framing: Framing,
    pub keep_alive: bool,
    pub head_len: usize,
    pub headers: &'b [httparse::Header<'b>],
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn lists(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Headers a proxy must not forward (RFC 9110 section 7.6.1), besides those `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// What the message's headers say about framing and the connection.
struct Fields<'b> {
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade: Option<&'b str>,
    host: Option<&'b str>,
    expect_continue: bool,
}

fn fields<'b>(headers: &[httparse::Header<'b>]) -> Result<Fields<'b>, HeadError> {
    let mut f = Fields {
        content_length: None,
        chunked: false,
        close: false,
        keep_alive: false,
        upgrade_token: false,
        upgrade: None,
        host: None,
        expect_continue: false,
    };
    let mut te_seen = false;
    for h in headers {
        let n = h.name;
        if eq(n, "content-length") {
            // Repeated or comma-listed values must all agree (RFC 9112 6.3 item 5).
            for part in h.value.split(|&b| b == b',') {
                let s =
                    std::str::from_utf8(part.trim_ascii()).map_err(|_| HeadError::Malformed("bad Content-Length"))?;
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 19 {
                    return Err(HeadError::Malformed("bad Content-Length"));
                }
                let v: u64 = s.parse().map_err(|_| HeadError::Malformed("bad Content-Length"))?;
                if f.content_length.is_some_and(|c| c != v) {
                    return Err(HeadError::Malformed("conflicting Content-Length values"));
                }
                f.content_length = Some(v);
            }
        } else if eq(n, "transfer-encoding") {
            te_seen = true;
            // Only chunked, and only as the last coding, can be framed; anything else is 501.
            let codings: Vec<&[u8]> = h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).collect();
            match codings.last() {
                Some(c) if c.eq_ignore_ascii_case(b"chunked") => {
                    if f.chunked || codings.len() > 1 {
                        return Err(HeadError::NotImplemented("transfer codings other than chunked"));
                    }
                    f.chunked = true;
                }
                _ => return Err(HeadError::NotImplemented("transfer codings other than chunked")),
            }
        } else if eq(n, "connection") {
            f.close |= lists(h.value, "close");
            f.keep_alive |= lists(h.value, "keep-alive");
            f.upgrade_token |= lists(h.value, "upgrade");
        } else if eq(n, "upgrade") {
            f.upgrade = std::str::from_utf8(h.value).ok();
        } else if eq(n, "host") {
            if f.host.is_some() {
                return Err(HeadError::Malformed("more than one Host header"));
            }
            f.host = Some(std::str::from_utf8(h.value).map_err(|_| HeadError::Malformed("bad Host header"))?);
        } else if eq(n, "expect") {
            f.expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if te_seen && f.content_length.is_some() {
        // Request smuggling's classic: refuse rather than guess which one the upstream uses.
        return Err(HeadError::Malformed("both Transfer-Encoding and Content-Length"));
    }
    Ok(f)
}

/// Parses a request head from the start of `buf`. Ok(None): incomplete, read more (unless the
/// buffer already holds `limits.max_header_bytes`, which is an error).
pub fn parse_request<'b>(
    buf: &'b [u8],
    limits: &Limits,
    storage: &'b mut [httparse::Header<'b>],
) -> Result<Option<RequestHead<'b>>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    let max_headers = storage.len().min(limits.max_headers);
    let mut req = httparse::Request::new(&mut storage[..max_headers]);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_header_bytes => {
            // The request line alone may be what is too long.
            let line_end = window.iter().position(|&b| b == b'\n');
            return Err(if line_end.is_none() { HeadError::UriTooLong } else { HeadError::HeadersTooLarge });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadersTooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Malformed("not an HTTP/1.x request")),
    };
    let (method, target, minor) = (req.method.unwrap_or(""), req.path.unwrap_or(""), req.version.unwrap_or(1));
    if target.len() > limits.max_uri_bytes {
        return Err(HeadError::UriTooLong);
    }
    let headers: &'b [httparse::Header<'b>] = req.headers;
    let f = fields(headers)?;
    if minor == 1 && f.host.is_none() {
        return Err(HeadError::Malformed("HTTP/1.1 request without Host"));
    }
    let framing = if f.chunked {
        Framing::Chunked
    } else {
        match f.content_length {
            Some(0) | None => Framing::Empty,
            Some(n) if n > limits.max_body_bytes => return Err(HeadError::BodyTooLarge),
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = if minor == 0 { f.keep_alive && !f.close } else { !f.close };
    let upgrade = if f.upgrade_token { f.upgrade } else { None };
    Ok(Some(RequestHead {
        method,
        target,
        minor,
        host: f.host,
        framing,
        keep_alive,
        upgrade,
        expect_continue: f.expect_continue && minor == 1,
        head_len,
        headers,
    }))
}

/// Parses an upstream's response head to a request made with `method`.
pub fn parse_response<'b>(
    buf: &'b [u8],
    method: &str,
    limits: &Limits,
    storage: &'b mut [httparse::Header<'b>],
) -> Result<Option<ResponseHead<'b>>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    let max_headers = storage.len().min(limits.max_headers);
    let mut res = httparse::Response::new(&mut storage[..max_headers]);
    let head_len = match res.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_header_bytes => {
            return Err(HeadError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadersTooLarge),
        Err(_) => return Err(HeadError::Malformed("not an HTTP/1.x response")),
    };
    let status = res.code.unwrap_or(0);
    let minor = res.version.unwrap_or(1);
    let headers: &'b [httparse::Header<'b>] = res.headers;
    let f = fields(headers)?;
    // RFC 9112 6.3: no body for HEAD, 1xx, 204, 304, and a 2xx to CONNECT.
    let framing = if eq(method, "HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if f.chunked {
        Framing::Chunked
    } else {
        match f.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let keep_alive = framing != Framing::UntilClose && if minor == 0 { f.keep_alive && !f.close } else { !f.close };
    Ok(Some(ResponseHead { status, minor, framing, keep_alive, head_len, headers }))
}

/// What the proxy adds about the client.
#[derive(Clone, Copy, Debug)]
pub struct ClientInfo<'a> {
    /// The client's address as text (IPv6 without brackets).
    pub addr: &'a str,
    /// `http` or `https`: how the client reached us.
    pub proto: &'a str,
}

/// Whether header `name` is one not to forward: hop-by-hop, named in `Connection`, or one we
/// set ourselves.
fn dropped(name: &str, connection_tokens: &[&[u8]]) -> bool {
    HOP_BY_HOP.iter().any(|h| eq(name, h))
        || eq(name, "x-forwarded-proto")
        || eq(name, "x-forwarded-host")
        // `Connection: Host, Content-Length` must not strip what routing and framing rest on
        // (found by the http_request fuzz target).
        || (!eq(name, "host")
            && !eq(name, "content-length")
            && connection_tokens.iter().any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

/// The `Connection` header's tokens (the headers they name are hop-by-hop too).
fn connection_tokens<'b>(headers: &[httparse::Header<'b>], out: &mut arrayvec::ArrayVec<&'b [u8], 16>) {
    for h in headers.iter().filter(|h| eq(h.name, "connection")) {
        for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
            let _ = out.try_push(t);
        }
    }
}

/// Writes the head to send upstream for `req` into `out` (cleared first): HTTP/1.1, end-to-end
/// headers kept in order, hop-by-hop ones removed, framing restated, the client appended to
/// `X-Forwarded-For` and `Forwarded`, `X-Forwarded-Proto` / `-Host` set, and either
/// `Connection: upgrade` with the `Upgrade` token (a tunnel) or nothing (HTTP/1.1 keep-alive
/// to the upstream, whatever the client asked).
pub fn write_upstream_request(req: &RequestHead, client: ClientInfo, out: &mut Vec<u8>) {
    out.clear();
    let mut tokens = arrayvec::ArrayVec::new();
    connection_tokens(req.headers, &mut tokens);
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if req.host.is_none() {
        // An HTTP/1.0 client may omit Host; HTTP/1.1 requires one, empty when the target has
        // no authority (RFC 9112 section 3.2). Found by the http_request fuzz target.
        out.extend_from_slice(b"Host: \r\n");
    }
    let mut xff_done = false;
    let mut fwd_done = false;
    for h in req.headers {
        if dropped(h.name, &tokens) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        if eq(h.name, "x-forwarded-for") && !xff_done {
            out.extend_from_slice(b", ");
            out.extend_from_slice(client.addr.as_bytes());
            xff_done = true;
        } else if eq(h.name, "forwarded") && !fwd_done {
            out.extend_from_slice(b", ");
            forwarded_element(out, client.addr, client.proto, req.host);
            fwd_done = true;
        }
        out.extend_from_slice(b"\r\n");
    }
    if !xff_done {
        out.extend_from_slice(b"X-Forwarded-For: ");
        out.extend_from_slice(client.addr.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !fwd_done {
        out.extend_from_slice(b"Forwarded: ");
        forwarded_element(out, client.addr, client.proto, req.host);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-Proto: ");
    out.extend_from_slice(client.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(host) = req.host {
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if req.framing == Framing::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if let Some(u) = req.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        out.extend_from_slice(u.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// One RFC 7239 element: `for=...;proto=...;host="..."` (an IPv6 node quoted and bracketed).
fn forwarded_element(out: &mut Vec<u8>, addr: &str, proto: &str, host: Option<&str>) {
    out.extend_from_slice(b"for=");
    if addr.contains(':') {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(addr.as_bytes());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(addr.as_bytes());
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto.as_bytes());
    if let Some(h) = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')) {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(h.as_bytes());
        out.push(b'"');
    }
}

/// Appends the head to send the client for an upstream `res` to `out` (the client's pending
/// output, so no buffer of its own per response):
/// end-to-end headers kept, hop-by-hop removed, framing restated, and `Connection: close` when
/// the client's connection will not be kept.
pub fn write_client_response(res: &ResponseHead, client_keep_alive: bool, out: &mut Vec<u8>) {
    let mut tokens = arrayvec::ArrayVec::new();
    connection_tokens(res.headers, &mut tokens);
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", res.status, reason(res.status));
    let upgrade = res.status == 101;
    for h in res.headers {
        let keep_for_upgrade = upgrade && (eq(h.name, "upgrade") || eq(h.name, "connection"));
        if !keep_for_upgrade && HOP_BY_HOP.iter().chain(["x-forwarded-proto"].iter()).any(|x| eq(h.name, x)) {
            continue;
        }
        if !keep_for_upgrade && tokens.iter().any(|t| t.eq_ignore_ascii_case(h.name.as_bytes())) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if res.framing == Framing::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !upgrade && (!client_keep_alive || res.framing == Framing::UntilClose) {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reason phrases for the statuses a proxy commonly relays or makes.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Appends a 308 to `location` (HTTP to HTTPS), closing the connection after it.
pub fn redirect_response(location: &str, out: &mut Vec<u8>) {
    let _ = write!(
        out,
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// Appends a complete response the proxy makes itself (errors): small body, connection closed
/// after it unless `keep_alive`. To a HEAD request (`to_head`) the same head without the body
/// (RFC 9110 9.3.2): a client reading a body there would take it for its next response.
pub fn error_response(status: u16, keep_alive: bool, to_head: bool, out: &mut Vec<u8>) {
    let r = reason(status);
    // Body: "STATUS REASON\n".
    let _ = write!(
        out,
        "HTTP/1.1 {status} {r}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
        4 + r.len() + 1,
        if keep_alive { "" } else { "Connection: close\r\n" }
    );
    if !to_head {
        let _ = writeln!(out, "{status} {r}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (target, framing, keep-alive, upgrade, head length)
    type Parsed = (String, Framing, bool, Option<String>, usize);

    fn req(raw: &str) -> Result<Option<Parsed>, HeadError> {
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let r = parse_request(raw.as_bytes(), &Limits::default(), &mut storage)?;
        Ok(r.map(|r| (r.target.to_string(), r.framing, r.keep_alive, r.upgrade.map(str::to_string), r.head_len)))
    }

    #[test]
    fn framing_and_keep_alive() {
        let (t, f, ka, up, n) = req("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\nrest").unwrap().unwrap();
        assert_eq!((t.as_str(), f, ka, up, n), ("/a?b", Framing::Empty, true, None, 30));
        let r = req("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.1, r.2), (Framing::Length(5), false));
        let r = req("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.1, Framing::Chunked);
        // HTTP/1.0: closed unless asked to keep alive; no Host needed.
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().2);
        assert!(req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap().2);
        // ... and forwarded as HTTP/1.1 with an empty Host, which parses again.
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let r = parse_request(b"GET / HTTP/1.0\r\n\r\n", &Limits::default(), &mut storage).unwrap().unwrap();
        let mut out = Vec::new();
        write_upstream_request(&r, ClientInfo { addr: "192.0.2.1", proto: "http" }, &mut out);
        assert!(out.starts_with(b"GET / HTTP/1.1\r\nHost: \r\n"));
        let mut storage = [httparse::EMPTY_HEADER; 64];
        assert!(parse_request(&out, &Limits::default(), &mut storage).unwrap().is_some());
        // WebSocket upgrade needs both headers.
        let r = req("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.3.as_deref(), Some("websocket"));
        assert_eq!(req("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap().3, None);
        // Incomplete.
        assert!(req("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn hostile_heads_get_the_right_status() {
        let cases: &[(&str, u16)] = &[
            ("GET / HTTP/1.1\r\n\r\n", 400),                       // no Host
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400), // two Hosts
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400), // smuggling
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400), // conflicting
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000000\r\n\r\n", 413),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03", 400), // TLS on the plain port
            ("GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            match req(raw) {
                Err(e) => assert_eq!(e.status(), *status, "{raw:?}: {e:?}"),
                Ok(r) => panic!("{raw:?} accepted: {r:?}"),
            }
        }
        // Too large: the header section, the number of fields, the request line.
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(20_000));
        assert_eq!(req(&big).unwrap_err().status(), 431);
        let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).unwrap_err().status(), 431);
        let uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(10_000));
        assert_eq!(req(&uri).unwrap_err().status(), 414);
        let uri = format!("GET /{}", "u".repeat(20_000));
        assert_eq!(req(&uri).unwrap_err().status(), 414, "a request line that never ends");
    }

    #[test]
    fn upstream_head_drops_hop_by_hop_and_adds_forwarding_headers() {
        let raw = "POST /api HTTP/1.1\r\nHost: shop.example:8080\r\nConnection: keep-alive, X-Secret, Host\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nTransfer-Encoding: chunked\r\nUser-Agent: t\r\n\r\n";
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let r = parse_request(raw.as_bytes(), &Limits::default(), &mut storage).unwrap().unwrap();
        let mut out = Vec::new();
        write_upstream_request(&r, ClientInfo { addr: "2001:db8::1", proto: "http" }, &mut out);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "POST /api HTTP/1.1\r\nHost: shop.example:8080\r\nX-Forwarded-For: 203.0.113.7, 2001:db8::1\r\nUser-Agent: t\r\n\
             Forwarded: for=\"[2001:db8::1]\";proto=http;host=\"shop.example:8080\"\r\nX-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: shop.example:8080\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn responses_framing_and_client_head() {
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let l = Limits::default();
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=4\r\n\r\nabc";
        let r = parse_response(raw, "GET", &l, &mut storage).unwrap().unwrap();
        assert_eq!((r.status, r.framing, r.keep_alive), (200, Framing::Length(3), true));
        let mut out = Vec::new();
        write_client_response(&r, false, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n");
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD", &l, &mut storage).unwrap().unwrap();
        assert_eq!(r.framing, Framing::Empty, "HEAD has no body");
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", "GET", &l, &mut storage).unwrap().unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n";
        let r = parse_response(raw, "GET", &l, &mut storage).unwrap().unwrap();
        // Appended after what the client still has to receive (here the 200's head).
        write_client_response(&r, true, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n\
             HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n"
        );
        out.clear();
        error_response(503, false, false, &mut out);
        let s = String::from_utf8(out.clone()).unwrap();
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        assert!(s.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && s.contains("Connection: close"), "{s}");
        assert!(s.contains(&format!("Content-Length: {}\r\n", body.len())), "{s}");
        // To HEAD: the same head, no body.
        let mut to_head = Vec::new();
        error_response(503, false, true, &mut to_head);
        assert_eq!(to_head, &out[..out.len() - body.len()]);
    }
}
