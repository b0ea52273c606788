//! Packet-buffer pools (rte_pktmbuf_pool_create).

use crate::eal::Eal;
use crate::error::{Error, Result};
use crate::ffi;
use crate::mbuf::Mbuf;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

/// Any NUMA socket.
pub const SOCKET_ANY: i32 = ffi::FL_SOCKET_ID_ANY;
/// Data room per mbuf: headroom (128) + 2048, as DPDK's RTE_MBUF_DEFAULT_BUF_SIZE and
/// `fulcrum_dataplane::packet::BUF_SIZE`.
pub const MBUF_BUF_SIZE: u16 = ffi::FL_MBUF_DEFAULT_BUF_SIZE as u16;
/// RTE_PKTMBUF_HEADROOM.
pub const MBUF_HEADROOM: u16 = ffi::FL_PKTMBUF_HEADROOM as u16;

struct PoolInner {
    ptr: NonNull<ffi::rte_mempool>,
    name: String,
    size: u32,
    _eal: Eal,
}

// SAFETY: a DPDK mempool is thread-safe (lock-free ring underneath; per-lcore caches are
// per-thread).
unsafe impl Send for PoolInner {}
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Freeing a pool with mbufs still out would leave them dangling: leak it instead.
        // By now every port using the pool is closed, so what is still out is held by a
        // driver or leaked by us. DPDK 22.11's AF_XDP driver is one such driver: it keeps the
        // mbufs of its fill ring (2048 per queue) when the port closes. Nothing outlives the
        // process either way (the pool's memory goes with it), so say so plainly.
        // SAFETY: ptr is a live mempool.
        let avail = unsafe { ffi::fl_mempool_avail_count(self.ptr.as_ptr()) };
        if avail < self.size {
            eprintln!(
                "fulcrum-dpdk: note: {} mbufs of pool {} were not given back after its ports closed \
                 (DPDK 22.11's AF_XDP driver keeps those of its fill ring, 2048 per queue); the \
                 pool is left for the process's exit to free",
                self.size - avail,
                self.name,
            );
            return;
        }
        // SAFETY: no mbuf of this pool is in use and no port holds it (ports hold a Mempool).
        unsafe { ffi::rte_mempool_free(self.ptr.as_ptr()) };
    }
}

/// A pool of packet mbufs with the default data room (2176 bytes: 128 headroom + 2048).
/// Clones share the pool; it is freed when the last clone and every port using it are gone.
#[derive(Clone)]
pub struct Mempool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Mempool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mempool({}, {} mbufs, {} available)", self.inner.name, self.inner.size, self.available())
    }
}

impl Mempool {
    /// Creates a pool of `n_mbufs` mbufs (best as 2^k - 1) with a per-lcore cache of `cache`
    /// (0 for none; at most 512) on NUMA socket `socket` ([`SOCKET_ANY`] for any).
    /// The name must be unique in the process.
    pub fn new(name: &str, n_mbufs: u32, cache: u32, socket: i32) -> Result<Mempool> {
        Self::create(name, n_mbufs, cache, socket, false)
    }

    /// As [`Mempool::new`], with the mbufs packed back to back in one block of equal frames
    /// (objects may straddle pages; DPDK otherwise keeps each inside one page, which without
    /// hugepages leaves them 4 KiB apart). For AF_XDP ports, whose driver registers the pool's
    /// memory as the socket's UMEM sized `mbufs x frame`: with page-aligned objects that covers
    /// only ~58% of the pool, and the kernel refuses (and never returns) mbufs beyond it. Not
    /// for NICs that DMA by physical address.
    pub fn new_packed(name: &str, n_mbufs: u32, cache: u32, socket: i32) -> Result<Mempool> {
        Self::create(name, n_mbufs, cache, socket, true)
    }

    fn create(name: &str, n_mbufs: u32, cache: u32, socket: i32, packed: bool) -> Result<Mempool> {
        let eal = Eal::current()?;
        let cname =
            CString::new(name).map_err(|_| Error::Invalid(format!("mempool name {name:?} holds a NUL byte")))?;
        // SAFETY: valid C string; the EAL is alive.
        let ptr = unsafe {
            if packed {
                ffi::fl_pktmbuf_pool_create_packed(cname.as_ptr(), n_mbufs, cache, MBUF_BUF_SIZE, socket)
            } else {
                ffi::rte_pktmbuf_pool_create(cname.as_ptr(), n_mbufs, cache, 0, MBUF_BUF_SIZE, socket)
            }
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            let call = if packed { "packed pool" } else { "rte_pktmbuf_pool_create" };
            Error::from_errno(format!("{call}({name}, n={n_mbufs}, cache={cache}, socket={socket})"))
        })?;
        Ok(Mempool { inner: Arc::new(PoolInner { ptr, name: name.to_string(), size: n_mbufs, _eal: eal }) })
    }

    /// Memory chunks the pool lies in (an AF_XDP UMEM must be one).
    pub fn mem_chunks(&self) -> u32 {
        // SAFETY: live mempool.
        unsafe { ffi::fl_mempool_nb_mem_chunks(self.inner.ptr.as_ptr()) }
    }

    /// Bytes per mbuf in memory: object header, mbuf, data room and trailer (the distance
    /// between neighbours in a packed pool).
    pub fn frame_size(&self) -> u32 {
        // SAFETY: live mempool.
        unsafe { ffi::fl_mempool_obj_stride(self.inner.ptr.as_ptr()) }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Mbufs in the pool.
    pub fn size(&self) -> u32 {
        self.inner.size
    }

    /// Mbufs not in use (in the pool or in a per-lcore cache): `size()` when nothing leaks.
    pub fn available(&self) -> u32 {
        // SAFETY: live mempool.
        unsafe { ffi::fl_mempool_avail_count(self.inner.ptr.as_ptr()) }
    }

    /// Mbufs in the calling thread's own cache of this pool; None where it has none (a pool
    /// made without caches, or a thread that is not an lcore: see [`crate::LcoreRegistration`]).
    pub fn cached_here(&self) -> Option<u32> {
        // SAFETY: live mempool; reads the calling lcore's cache header.
        let n = unsafe { ffi::fl_mempool_cache_len(self.inner.ptr.as_ptr()) };
        u32::try_from(n).ok()
    }

    /// A fresh mbuf: empty, data at the standard headroom. None when the pool is exhausted.
    #[inline]
    pub fn alloc(&self) -> Option<Mbuf> {
        // SAFETY: live mempool; the mbuf returned (if any) is ours.
        unsafe { Mbuf::from_raw(ffi::fl_pktmbuf_alloc(self.inner.ptr.as_ptr())) }
    }

    /// Appends `n` fresh mbufs to `out` in one call (all or none, as DPDK does; `n` is capped
    /// at the room left): a generator's way to get a burst without an FFI call per packet.
    /// Returns how many were added (0 when the pool cannot supply them all).
    pub fn alloc_bulk(&self, out: &mut fulcrum_dataplane::port::Burst<Mbuf>, n: usize) -> usize {
        let (len, room) = (out.len(), out.remaining_capacity().min(n));
        if room == 0 {
            return 0;
        }
        // SAFETY: Mbuf is a transparent non-null `rte_mbuf *`; on success DPDK wrote `room`
        // valid mbuf pointers, now ours, into the spare capacity; on failure it wrote none.
        unsafe {
            let dst = out.as_mut_ptr().add(len) as *mut *mut ffi::rte_mbuf;
            if ffi::fl_pktmbuf_alloc_bulk(self.inner.ptr.as_ptr(), dst, room as u32) != 0 {
                return 0;
            }
            out.set_len(len + room);
        }
        room
    }

    pub fn as_ptr(&self) -> *mut ffi::rte_mempool {
        self.inner.ptr.as_ptr()
    }
}
