//! Byte buffers lent to connections for the length of one step and taken back when left empty.
//!
//! A keep-alive connection's head and output buffers (`Client::buf`, `Client::out`,
//! `Upstream::buf`, `Upstream::out`) are empty between requests almost always: a request head
//! is read, parsed and passed on in the same step. Owned by each connection, those buffers
//! were four more heap blocks per request and connection, cold at 10,000 connections (and
//! 1 KiB each, held for as long as the connection). Lent from here instead, last in first out,
//! the same few buffers serve every connection and stay in cache; a connection keeps one only
//! while it holds bytes (a head cut in two, a body that did not fit, pipelined requests).

/// Buffers kept for lending; more are freed.
const KEEP: usize = 64;
/// Larger buffers (grown by a large head) are freed when given back rather than kept.
const KEEP_BYTES: usize = 16 << 10;

#[derive(Default)]
pub struct SpareBufs {
    free: Vec<Vec<u8>>,
}

impl SpareBufs {
    /// Gives `v` a buffer if it has none (an empty one, allocated already when one is free).
    #[inline]
    pub fn lend(&mut self, v: &mut Vec<u8>) {
        if v.capacity() == 0 {
            if let Some(b) = self.free.pop() {
                *v = b;
            }
        }
    }

    /// Takes `v`'s buffer back if it is empty, leaving `v` without one.
    #[inline]
    pub fn settle(&mut self, v: &mut Vec<u8>) {
        if v.is_empty() && v.capacity() > 0 {
            let b = std::mem::take(v);
            if self.free.len() < KEEP && b.capacity() <= KEEP_BYTES {
                self.free.push(b);
            }
        }
    }

    /// Like `settle` for an output buffer with a send offset: taken back once all was sent.
    #[inline]
    pub fn settle_sent(&mut self, v: &mut Vec<u8>, off: &mut usize) {
        if *off >= v.len() {
            v.clear();
            *off = 0;
            self.settle(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SpareBufs;

    #[test]
    fn an_empty_buffer_comes_back_and_is_lent_again_a_full_one_stays() {
        let mut spare = SpareBufs::default();
        let mut a: Vec<u8> = Vec::new();
        spare.lend(&mut a);
        assert_eq!(a.capacity(), 0, "nothing to lend yet");
        a.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let at = a.as_ptr();
        spare.settle(&mut a);
        assert_eq!(a.len(), 16, "bytes still held stay with the connection");
        a.clear();
        spare.settle(&mut a);
        assert_eq!(a.capacity(), 0, "an empty buffer goes back");
        let mut b: Vec<u8> = Vec::new();
        spare.lend(&mut b);
        assert_eq!(b.as_ptr(), at, "and is the next one lent");
        assert!(b.is_empty());
        // A sent output buffer goes back, a partly sent one stays.
        let mut out = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        let mut off = 5;
        spare.settle_sent(&mut out, &mut off);
        assert_eq!((out.len(), off), (19, 5));
        off = 19;
        spare.settle_sent(&mut out, &mut off);
        assert_eq!((out.capacity(), off), (0, 0));
    }

    #[test]
    fn large_buffers_and_those_beyond_the_keep_are_freed() {
        let mut spare = SpareBufs::default();
        let mut big: Vec<u8> = Vec::with_capacity(1 << 20);
        spare.settle(&mut big);
        assert_eq!(big.capacity(), 0);
        assert!(spare.free.is_empty(), "a 1 MiB buffer is not kept");
        for _ in 0..super::KEEP + 10 {
            let mut v: Vec<u8> = Vec::with_capacity(100);
            spare.settle(&mut v);
        }
        assert_eq!(spare.free.len(), super::KEEP);
    }
}
