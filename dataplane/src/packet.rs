//! Packet buffers: the one abstraction the fast path needs over DPDK mbufs and in-memory buffers.
//!
//! A buffer is a fixed room with headroom in front (like an mbuf's `data_off`) so that
//! encapsulation can grow a packet at the front without copying it.

/// Bytes reserved in front of the packet, as DPDK's RTE_PKTMBUF_HEADROOM.
pub const HEADROOM: usize = 128;
/// Total room per buffer, as DPDK's default mbuf data room.
pub const BUF_SIZE: usize = 2048 + HEADROOM;

use std::cell::RefCell;
use std::mem::ManuallyDrop;

pub trait PacketBuf {
    /// The packet's bytes.
    fn data(&self) -> &[u8];
    fn data_mut(&mut self) -> &mut [u8];
    /// Grows the packet at the front by `n` bytes (uninitialised contents); false if there is
    /// not enough headroom.
    fn prepend(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the front; false if the packet is shorter.
    fn adj(&mut self, n: usize) -> bool;
    /// Sets the length, growing into tailroom (zero-filled not guaranteed) or shrinking;
    /// false if it does not fit.
    fn set_len(&mut self, len: usize) -> bool;
    fn len(&self) -> usize {
        self.data().len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An in-memory buffer laid out like an mbuf. For tests, benches and the in-memory port.
pub struct HeapBuf {
    room: ManuallyDrop<Box<[u8; BUF_SIZE]>>,
    off: u16,
    len: u16,
}

/// Rooms kept per thread for reuse, at most this many: the size of a large DPDK mempool. The L7
/// bench at 10,000 connections has ~20,000 frames in flight at once; with 4,096 kept, the rest
/// went back to the allocator and came back as fresh pages (5% of the worker's time in page
/// faults, none of them the worker's).
const SPARE_ROOMS: usize = 32768;

thread_local! {
    /// Rooms of dropped buffers, for the next `HeapBuf::new` on this thread: as a DPDK mempool
    /// takes freed mbufs back (so that a benchmark on in-memory buffers does not time the
    /// allocator and page faults). A reused room holds old bytes, as a reused mbuf does.
    // Boxed rooms: a buffer takes one out and gives it back without copying 2 KiB.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<[u8; BUF_SIZE]>>> = const { RefCell::new(Vec::new()) };
}

impl HeapBuf {
    pub fn new() -> Self {
        let room = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| Box::new([0u8; BUF_SIZE]));
        HeapBuf { room: ManuallyDrop::new(room), off: HEADROOM as u16, len: 0 }
    }

    /// A buffer holding a copy of `bytes` after the standard headroom.
    /// Panics if `bytes` does not fit, which only a test or generator can cause.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = HeapBuf::new();
        b.fill(bytes);
        b
    }

    /// Replaces the contents with `bytes`, resetting the headroom (recycling a buffer).
    pub fn fill(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= BUF_SIZE - HEADROOM, "packet of {} bytes does not fit a buffer", bytes.len());
        self.off = HEADROOM as u16;
        self.len = bytes.len() as u16;
        self.room[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
    }

    /// Resets to an empty packet after the standard headroom.
    pub fn reset(&mut self) {
        self.off = HEADROOM as u16;
        self.len = 0;
    }
}

impl Drop for HeapBuf {
    fn drop(&mut self) {
        // SAFETY: `room` is not used again: this is the buffer's end.
        let room = unsafe { ManuallyDrop::take(&mut self.room) };
        // During thread exit the spare list may be gone already; the room is then just freed.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_ROOMS {
                s.push(room);
            }
        });
    }
}

impl Default for HeapBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HeapBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeapBuf({} bytes)", self.len)
    }
}

impl PacketBuf for HeapBuf {
    #[inline(always)]
    fn data(&self) -> &[u8] {
        let (off, end) = (self.off as usize, (self.off + self.len) as usize);
        debug_assert!(end <= BUF_SIZE);
        // SAFETY: every method that moves off/len keeps off + len <= BUF_SIZE. Unchecked
        // because this runs several times per packet.
        unsafe { self.room.get_unchecked(off..end) }
    }
    #[inline(always)]
    fn data_mut(&mut self) -> &mut [u8] {
        let (off, end) = (self.off as usize, (self.off + self.len) as usize);
        debug_assert!(end <= BUF_SIZE);
        // SAFETY: as in data().
        unsafe { self.room.get_unchecked_mut(off..end) }
    }
    #[inline]
    fn prepend(&mut self, n: usize) -> bool {
        if n > self.off as usize {
            return false;
        }
        self.off -= n as u16;
        self.len += n as u16;
        true
    }
    #[inline]
    fn adj(&mut self, n: usize) -> bool {
        if n > self.len as usize {
            return false;
        }
        self.off += n as u16;
        self.len -= n as u16;
        true
    }
    #[inline]
    fn set_len(&mut self, len: usize) -> bool {
        if self.off as usize + len > BUF_SIZE {
            return false;
        }
        self.len = len as u16;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_and_adj_move_the_front() {
        let mut b = HeapBuf::from_slice(&[1, 2, 3]);
        assert!(b.prepend(2));
        b.data_mut()[..2].copy_from_slice(&[9, 9]);
        assert_eq!(b.data(), &[9, 9, 1, 2, 3]);
        assert!(b.adj(2));
        assert_eq!(b.data(), &[1, 2, 3]);
        assert!(!b.prepend(HEADROOM + 1));
        assert!(!b.adj(4));
        assert!(b.set_len(1));
        assert_eq!(b.data(), &[1]);
        assert!(!b.set_len(BUF_SIZE));
    }
}
