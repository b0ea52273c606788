//! Socket buffers for one worker's TCP stack: carved from 2 MiB chunks that the kernel backs
//! with transparent huge pages, and kept for the next connection when a socket goes.
//!
//! Why not `vec![0; n]` per socket (what smoltcp's examples do): every new connection then asks
//! the allocator for two fresh 16 KiB buffers, the allocator returns freed ones to the kernel
//! after a short delay, and every first touch of a 4 KiB page is a fault and a page clear.
//! With 10,000 client connections and their upstream connections that was 35-45% of the
//! worker's time in `fulcrum-bench l7` (perf: `clear_page_rep` under `Stack::socket`). Here a
//! chunk faults once per 2 MiB (when THP is `always` or `madvise`), a reused buffer not at all,
//! and nothing is zeroed: smoltcp's ring buffers only hand out bytes that were written since.
//! Memory grows to the worker's peak of open sockets and stays for reuse (as a DPDK mempool
//! does); it goes back to the system with the stack.
//!
//! Buffers are laid out an odd number of cache lines apart, and each chunk starts its first
//! buffer one line further in than the chunk before (slab colouring, as Linux's and Solaris's
//! slab allocators do). A connection touches only the first lines of its buffers (smoltcp's
//! transmit ring, and our patched receive ring, start again at offset 0 when drained), and
//! caches pick a line's set from the low bits of its address: at a stride of exactly 16 KiB
//! every buffer's first line fell in the same L1 set and in 8 of the L2's 2,048, so the lines
//! the requests of a few hundred connections needed evicted each other however much cache was
//! free.
//!
//! A socket holds a buffer from here only while it has bytes in it (`Stack` lends them on
//! demand). Idle, it holds a stand-in of the same size from a [`BufferPool::reserved`] pool:
//! address space that no memory backs and nothing reads or writes (smoltcp keeps the size
//! for the window it advertises, and touches a ring's bytes only to store or hand out data).
//! Each stand-in is the socket's own, so nothing is aliased, and an idle keep-alive connection
//! costs no buffer memory and no cache lines.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

/// The size of one chunk: one transparent huge page on x86-64 and arm64.
const CHUNK: usize = 2 << 20;

/// A cache line (x86-64; arm64's are 64 bytes too, save Apple's 128, where an odd number of
/// 64-byte lines still spreads buffers over every set).
const LINE: usize = 64;

/// The size of one chunk of stand-ins: address space only, so larger (fewer mappings).
const RESERVED_CHUNK: usize = 32 << 20;

/// What a pool's chunks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// Memory, from the allocator (huge pages where the kernel gives them).
    Memory,
    /// Address space only (`mmap` with `MAP_NORESERVE`): stand-ins for idle sockets' buffers.
    /// With debug assertions (tests, fuzzing) it is `PROT_NONE`, so that a byte read or
    /// written there is a crash, not a quiet page of memory; in release builds a stray access
    /// would fault in a zero page of the socket's own stand-in and nothing else.
    AddressSpace,
}

/// A pool of equal-sized buffers for one worker (not shared, not `Send`).
pub struct BufferPool {
    backing: Backing,
    size: usize,
    /// From one buffer's start to the next's in a chunk: an odd number of lines.
    stride: usize,
    per_chunk: usize,
    /// Offsets a chunk's first buffer can start at (in lines): the chunk's room left over.
    colours: usize,
    chunk: Layout,
    chunks: Vec<NonNull<u8>>,
    free: Vec<NonNull<u8>>,
}

// SAFETY: the pool owns its chunks outright (no aliasing handle elsewhere), so moving it to
// the worker's thread is fine; it is used by one thread at a time (it is not `Sync`).
unsafe impl Send for BufferPool {}

impl BufferPool {
    /// Buffers of `size` bytes (at least 1).
    pub fn new(size: usize) -> BufferPool {
        BufferPool::with_backing(size, Backing::Memory, CHUNK)
    }

    /// Stand-ins of `size` bytes: address space that holds no memory (see the module's
    /// comment). `held_bytes` counts the address space.
    pub fn reserved(size: usize) -> BufferPool {
        BufferPool::with_backing(size, Backing::AddressSpace, RESERVED_CHUNK)
    }

    fn with_backing(size: usize, backing: Backing, chunk_bytes: usize) -> BufferPool {
        let size = size.max(1);
        // Buffers larger than a chunk get a chunk of their own, rounded up to whole chunks.
        let bytes = size.div_ceil(chunk_bytes) * chunk_bytes;
        let chunk = Layout::from_size_align(bytes, CHUNK.min(chunk_bytes)).expect("chunk layout");
        let lines = size.div_ceil(LINE) | 1;
        // A buffer of a whole chunk or more has no room to move, and no neighbour in its chunk.
        let stride = if lines * LINE <= bytes { lines * LINE } else { size };
        let per_chunk = bytes / stride;
        let colours = (bytes - per_chunk * stride) / LINE + 1;
        BufferPool { backing, size, stride, per_chunk, colours, chunk, chunks: Vec::new(), free: Vec::new() }
    }

    /// Buffers handed out and not given back.
    pub fn in_use(&self) -> usize {
        self.chunks.len() * self.per_chunk - self.free.len()
    }

    /// Bytes of memory held (in use or free for reuse); of address space, for a reserved pool.
    pub fn held_bytes(&self) -> usize {
        self.chunks.len() * self.chunk.size()
    }

    /// The buffer `take` hands out next, if one is free: to prefetch it.
    #[inline(always)]
    pub fn next(&self) -> Option<*const u8> {
        self.free.last().map(|p| p.as_ptr() as *const u8)
    }

    /// A buffer (contents unspecified: earlier connections' bytes or zeroes).
    ///
    /// # Safety
    /// The slice is valid until it is given back with [`BufferPool::give_back`] or the pool is
    /// dropped, whichever comes first; the caller must stop using it before either.
    pub unsafe fn take(&mut self) -> &'static mut [u8] {
        let p = match self.free.pop() {
            Some(p) => p,
            None => {
                self.grow();
                self.free.pop().expect("a new chunk has buffers")
            }
        };
        // SAFETY: `p` starts `size` bytes inside a live chunk that no other handed-out slice
        // overlaps; the lifetime is the caller's promise (above).
        unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), self.size) }
    }

    /// Takes back a buffer from [`BufferPool::take`].
    ///
    /// # Safety
    /// `buf` came from this pool's `take`, is given back once, and is not used afterwards.
    pub unsafe fn give_back(&mut self, buf: *mut u8) {
        debug_assert!(self.owns(buf), "a buffer from elsewhere");
        if let Some(p) = NonNull::new(buf) {
            self.free.push(p);
        }
    }

    fn owns(&self, buf: *mut u8) -> bool {
        let a = buf as usize;
        self.chunks.iter().enumerate().any(|(j, c)| {
            let first = c.as_ptr() as usize + self.colour(j);
            a >= first && a < first + self.per_chunk * self.stride && (a - first).is_multiple_of(self.stride)
        })
    }

    /// Where chunk `j`'s first buffer starts: one line further in than chunk `j - 1`'s, round
    /// the room the chunk has spare.
    fn colour(&self, j: usize) -> usize {
        (j % self.colours) * LINE
    }

    fn grow(&mut self) {
        let chunk = match self.backing {
            Backing::Memory => {
                // SAFETY: the layout has a non-zero size.
                let p = unsafe { alloc(self.chunk) };
                let Some(chunk) = NonNull::new(p) else { std::alloc::handle_alloc_error(self.chunk) };
                // Best effort: without THP (or with it `never`) the chunk is plain 4 KiB pages.
                // SAFETY: the range is the allocation just made.
                unsafe { libc::madvise(p.cast(), self.chunk.size(), libc::MADV_HUGEPAGE) };
                chunk
            }
            Backing::AddressSpace => reserve(self.chunk.size()),
        };
        let p = chunk.as_ptr();
        let first = self.colour(self.chunks.len());
        self.chunks.push(chunk);
        // Pushed in reverse so that the first buffer taken is the chunk's first: the pages
        // are touched in order.
        for i in (0..self.per_chunk).rev() {
            // SAFETY: colour + i * stride + size <= colour + per_chunk * stride <= chunk size.
            self.free.push(unsafe { NonNull::new_unchecked(p.add(first + i * self.stride)) });
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        for c in self.chunks.drain(..) {
            match self.backing {
                // SAFETY: allocated in `grow` with this layout.
                Backing::Memory => unsafe { dealloc(c.as_ptr(), self.chunk) },
                // SAFETY: mapped in `grow` with this size; no stand-in is in use any more.
                Backing::AddressSpace => unsafe {
                    libc::munmap(c.as_ptr().cast(), self.chunk.size());
                },
            }
        }
    }
}

/// `bytes` of address space that no memory backs until touched (nor, without debug
/// assertions, counts against the kernel's overcommit limit), never in huge pages.
fn reserve(bytes: usize) -> NonNull<u8> {
    let prot = if cfg!(debug_assertions) { libc::PROT_NONE } else { libc::PROT_READ | libc::PROT_WRITE };
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping; nothing else is at the address the kernel picks.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        panic!(
            "reserving {bytes} bytes of address space for idle sockets' buffers: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the range is the mapping just made. Best effort, as above.
    unsafe { libc::madvise(p, bytes, libc::MADV_NOHUGEPAGE) };
    NonNull::new(p.cast()).expect("mmap without MAP_FIXED maps nothing at address 0")
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn buffers_are_distinct_reused_and_counted() {
        let mut pool = BufferPool::new(16 << 10);
        // 16 KiB and a line apart: 127 in a chunk.
        let per_chunk = (2 << 20) / ((16 << 10) + 64);
        let mut held: Vec<*mut u8> = Vec::new();
        for i in 0..per_chunk + 3 {
            // SAFETY: every buffer is given back before the pool is dropped.
            let b = unsafe { pool.take() };
            assert_eq!(b.len(), 16 << 10);
            b.fill(i as u8);
            held.push(b.as_mut_ptr());
        }
        assert_eq!(pool.held_bytes(), 2 * (2 << 20), "a second chunk when the first ran out");
        assert_eq!(pool.in_use(), per_chunk + 3);
        // Each buffer kept what was written to it: none overlaps another.
        for (i, &p) in held.iter().enumerate() {
            // SAFETY: still handed out.
            let b = unsafe { std::slice::from_raw_parts(p, 16 << 10) };
            assert!(b.iter().all(|&x| x == i as u8), "buffer {i} overwritten");
        }
        let last = held.pop().unwrap();
        // SAFETY: from this pool, given back once.
        unsafe { pool.give_back(last) };
        // SAFETY: given back below.
        let again = unsafe { pool.take() };
        assert_eq!(again.as_mut_ptr(), last, "the buffer given back is the next one taken");
        held.push(again.as_mut_ptr());
        for p in held {
            // SAFETY: from this pool, given back once.
            unsafe { pool.give_back(p) };
        }
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.held_bytes(), 2 * (2 << 20), "kept for reuse");
    }

    #[test]
    fn first_lines_spread_over_the_cache_sets() {
        // Caches that pick a line's set from the address bits just above the line's own: an
        // L1 of 64 sets (48 KiB, 12 ways) and an L2 of 2,048 (2 MiB, 16 ways). 16 KiB
        // buffers back to back put all 1,000 first lines in 1 and 8 of them.
        let mut pool = BufferPool::new(16 << 10);
        // SAFETY: none is used; all are given back before the pool is dropped.
        let held: Vec<*mut u8> = (0..1000).map(|_| unsafe { pool.take() }.as_mut_ptr()).collect();
        let sets = |n: usize| {
            let mut count = vec![0usize; n];
            for &p in &held {
                count[(p as usize / 64) % n] += 1;
            }
            count
        };
        let l1 = sets(64);
        assert!(l1.iter().all(|&c| c <= 2 * 1000 / 64), "L1 sets: {l1:?}");
        let l2 = sets(2048);
        assert_eq!(l2.iter().filter(|&&c| c > 0).count(), 1000, "every first line in a set of its own");
        for (i, &p) in held.iter().enumerate() {
            assert_eq!(p as usize % 64, 0, "buffer {i} starts on a line");
            // SAFETY: from this pool, given back once.
            unsafe { pool.give_back(p) };
        }
        assert_eq!(pool.in_use(), 0);
    }

    /// Stand-ins: distinct, reused last-in-first-out, announced by `next`, and address space
    /// only (32 MiB a chunk; nothing of it is touched here: with debug assertions a touch
    /// would crash).
    #[test]
    fn stand_ins_are_distinct_address_space() {
        let mut pool = BufferPool::reserved(16 << 10);
        // SAFETY: never read or written; all given back before the pool is dropped.
        let held: Vec<*mut u8> = (0..3000).map(|_| unsafe { pool.take() }.as_mut_ptr()).collect();
        let mut sorted = held.clone();
        sorted.sort();
        assert!(sorted.windows(2).all(|w| w[1] as usize - w[0] as usize >= 16 << 10), "overlapping stand-ins");
        assert_eq!(pool.in_use(), 3000);
        assert_eq!(pool.held_bytes(), 2 * (32 << 20), "3,000 stand-ins of 16 KiB in two 32 MiB reservations");
        for &p in &held {
            // SAFETY: from this pool, given back once.
            unsafe { pool.give_back(p) };
        }
        assert_eq!(pool.next(), Some(held[2999] as *const u8), "the last given back is lent next");
        // SAFETY: given back below.
        let again = unsafe { pool.take() }.as_mut_ptr();
        assert_eq!(again, held[2999]);
        // SAFETY: from this pool, given back once.
        unsafe { pool.give_back(again) };
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_buffer_larger_than_a_chunk_gets_its_own() {
        let mut pool = BufferPool::new(3 << 20);
        // SAFETY: given back before the pool is dropped.
        let a = unsafe { pool.take() };
        let b = unsafe { pool.take() };
        assert_eq!((a.len(), b.len()), (3 << 20, 3 << 20));
        assert_ne!(a.as_mut_ptr(), b.as_mut_ptr());
        assert_eq!(pool.held_bytes(), 2 * (4 << 20));
        unsafe {
            pool.give_back(a.as_mut_ptr());
            pool.give_back(b.as_mut_ptr());
        }
    }
}
