//! The client side of a proxied connection, plain or TLS, behind one set of calls: the proxy
//! reads request bytes and writes response bytes without caring which. For TLS, rustls sits
//! between the TCP socket and two plaintext buffers; `pump` moves ciphertext in and out and
//! plaintext through, bounded so that a fast sender is held back by TCP flow control as it is
//! on a plain connection.

use super::stack::{SockRef, Stack};
use rustls::ServerConnection;
use std::io::Write;

/// Plaintext held per direction at most (the proxy moves it on as room allows).
const PLAIN_LIMIT: usize = 32 * 1024;

pub struct TlsSide {
    pub conn: ServerConnection,
    /// Decrypted request bytes not yet taken by the proxy.
    plain_in: Vec<u8>,
    /// Response bytes not yet encrypted.
    plain_out: Vec<u8>,
    /// The client sent close_notify (or closed).
    eof: bool,
    /// The TLS session failed (bad record, handshake failure): the alert is sent, then close.
    pub failed: bool,
}

impl TlsSide {
    pub fn new(conn: ServerConnection) -> TlsSide {
        TlsSide { conn, plain_in: Vec::new(), plain_out: Vec::new(), eof: false, failed: false }
    }

    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

pub type Tls = Option<Box<TlsSide>>;

/// What the TLS sessions of one core came to: operators watch resumption's share (a full
/// handshake costs several times a resumed one) and failures (clients that cannot agree on a
/// version or cipher, hostile records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCounters {
    /// Handshakes completed, full and resumed.
    pub handshakes: u64,
    /// Of those, resumed from a ticket or the session cache.
    pub resumed: u64,
    /// Sessions ended by a TLS error: a failed handshake or a bad record (rustls's alert sent).
    pub failures: u64,
}

impl TlsCounters {
    pub fn merge(&mut self, o: &TlsCounters) {
        self.handshakes += o.handshakes;
        self.resumed += o.resumed;
        self.failures += o.failures;
    }
}

/// Moves bytes through rustls: ciphertext from the socket, plaintext out of rustls into
/// `plain_in`, `plain_out` into rustls, ciphertext to the socket. A handshake that completes
/// or a session that fails here is counted in `counters`.
pub fn pump(stack: &mut Stack, sock: SockRef, tls: &mut Tls, counters: &mut TlsCounters) {
    let Some(t) = tls.as_mut() else { return };
    // Records may go out (the handshake's, or data's): a transmit buffer is lent.
    let s = stack.tcp_to_send(sock);
    while !t.failed && s.can_recv() && t.conn.wants_read() && t.plain_in.len() < PLAIN_LIMIT {
        let n = s
            .recv(|d| {
                let mut r: &[u8] = d;
                let n = t.conn.read_tls(&mut r).unwrap_or(0);
                (n, n)
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        let handshaking = t.conn.is_handshaking();
        if t.conn.process_new_packets().is_err() {
            t.failed = true;
            counters.failures += 1;
        } else if handshaking && !t.conn.is_handshaking() {
            counters.handshakes += 1;
            counters.resumed += u64::from(t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        }
        read_plain(t);
    }
    if !t.failed {
        read_plain(t);
    }
    if !t.plain_out.is_empty() && !t.conn.is_handshaking() {
        if let Ok(n) = t.conn.writer().write(&t.plain_out) {
            t.plain_out.drain(..n);
        }
    }
    while t.conn.wants_write() && s.may_send() {
        let n = s
            .send(|buf| {
                let mut w: &mut [u8] = buf;
                let n = t.conn.write_tls(&mut w).unwrap_or(0);
                (n, n)
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    // The client closed its side (not: the handshake is still being set up).
    use smoltcp::socket::tcp::State;
    if !s.can_recv()
        && matches!(s.state(), State::CloseWait | State::LastAck | State::Closing | State::TimeWait | State::Closed)
    {
        t.eof = true;
    }
    stack.mark_dirty(sock);
}

/// Takes decrypted bytes straight out of rustls's buffer into `plain_in` (`fill_buf`: one
/// copy; a zeroed 4 KiB stack buffer between them cost a `memset` and a second copy per call,
/// 0.5 µs of every TLS connection's ~95 in `fulcrum-bench l7 --tls --new-conn`).
fn read_plain(t: &mut TlsSide) {
    use std::io::BufRead;
    while t.plain_in.len() < PLAIN_LIMIT {
        let mut r = t.conn.reader();
        match r.fill_buf() {
            Ok([]) => {
                t.eof = true;
                break;
            }
            Ok(d) => {
                let n = d.len().min(PLAIN_LIMIT - t.plain_in.len());
                t.plain_in.extend_from_slice(&d[..n]);
                r.consume(n);
            }
            Err(_) => break, // WouldBlock: nothing more decrypted yet
        }
    }
}

/// Request bytes are waiting.
pub fn can_recv(stack: &mut Stack, sock: SockRef, tls: &Tls) -> bool {
    match tls {
        Some(t) => !t.plain_in.is_empty(),
        None => stack.tcp(sock).can_recv(),
    }
}

/// More request bytes may still come.
pub fn may_recv(stack: &Stack, sock: SockRef, tls: &Tls) -> bool {
    match tls {
        Some(t) => !t.plain_in.is_empty() || (!t.eof && !t.failed && stack.view(sock).may_recv()),
        None => stack.view(sock).may_recv(),
    }
}

/// Appends up to `max` request bytes to `out`; returns how many.
pub fn recv_into(stack: &mut Stack, sock: SockRef, tls: &mut Tls, out: &mut Vec<u8>, max: usize) -> usize {
    match tls {
        Some(t) => {
            let n = t.plain_in.len().min(max);
            out.extend_from_slice(&t.plain_in[..n]);
            t.plain_in.drain(..n);
            n
        }
        None => recv_tcp_into(stack.tcp(sock), out, max),
    }
}

/// Appends up to `max` received bytes of a TCP socket to `out`. smoltcp's `recv` hands over
/// only the contiguous part of its receive ring, so a head that straddles the ring's end comes
/// in two pieces: one call took the first, the head looked incomplete, and with nothing more
/// to arrive the connection waited for the once-a-second sweep (every ~100 keep-alive requests
/// per connection in the lab).
pub fn recv_tcp_into(s: &mut smoltcp::socket::tcp::Socket, out: &mut Vec<u8>, max: usize) -> usize {
    let mut got = 0;
    while got < max {
        let n = s
            .recv(|d| {
                let n = d.len().min(max - got);
                out.extend_from_slice(&d[..n]);
                (n, n)
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

/// Copies request bytes into `buf` without taking them.
pub fn peek(stack: &mut Stack, sock: SockRef, tls: &Tls, buf: &mut [u8]) -> usize {
    match tls {
        Some(t) => {
            let n = t.plain_in.len().min(buf.len());
            buf[..n].copy_from_slice(&t.plain_in[..n]);
            n
        }
        None => stack.tcp(sock).peek_slice(buf).unwrap_or(0),
    }
}

/// Takes `n` request bytes already peeked.
pub fn discard(stack: &mut Stack, sock: SockRef, tls: &mut Tls, n: usize) {
    match tls {
        Some(t) => {
            t.plain_in.drain(..n.min(t.plain_in.len()));
        }
        None => discard_tcp(stack.tcp(sock), n),
    }
}

/// Consumes `n` bytes of a TCP socket already peeked (the receive ring may hand them over in
/// two pieces).
pub fn discard_tcp(s: &mut smoltcp::socket::tcp::Socket, mut n: usize) {
    while n > 0 {
        match s.recv(|d| {
            let k = d.len().min(n);
            (k, k)
        }) {
            Ok(0) | Err(_) => break,
            Ok(k) => n -= k,
        }
    }
}

/// Whether response bytes can still be sent.
pub fn may_send(stack: &mut Stack, sock: SockRef, tls: &Tls) -> bool {
    tls.as_ref().is_none_or(|t| !t.failed) && stack.tcp(sock).may_send()
}

/// How many response bytes `send` takes now.
pub fn room(stack: &mut Stack, sock: SockRef, tls: &Tls) -> usize {
    match tls {
        Some(t) => PLAIN_LIMIT.saturating_sub(t.plain_out.len()),
        None => {
            let s = stack.tcp(sock);
            s.send_capacity() - s.send_queue()
        }
    }
}

/// Queues response bytes; returns how many were taken.
pub fn send(stack: &mut Stack, sock: SockRef, tls: &mut Tls, data: &[u8]) -> usize {
    match tls {
        Some(t) => {
            let n = data.len().min(PLAIN_LIMIT.saturating_sub(t.plain_out.len()));
            t.plain_out.extend_from_slice(&data[..n]);
            n
        }
        None => stack.tcp_to_send(sock).send_slice(data).unwrap_or(0),
    }
}

/// Everything queued has left (for TLS: encrypted and handed to TCP).
pub fn drained(tls: &Tls) -> bool {
    tls.as_ref().is_none_or(|t| t.plain_out.is_empty() && !t.conn.wants_write())
}

/// Starts an orderly close: TLS close_notify first.
pub fn close_notify(tls: &mut Tls) {
    if let Some(t) = tls.as_mut() {
        t.conn.send_close_notify();
    }
}
