//! An owned mbuf, read and written in Rust through the field offsets the shim exports:
//! no FFI call per packet except freeing it.

use crate::ffi;
use fulcrum_dataplane::packet::PacketBuf;
use std::ptr::NonNull;

const OFF_BUF_ADDR: usize = ffi::FL_MBUF_OFF_BUF_ADDR as usize;
const OFF_DATA_OFF: usize = ffi::FL_MBUF_OFF_DATA_OFF as usize;
const OFF_NB_SEGS: usize = ffi::FL_MBUF_OFF_NB_SEGS as usize;
const OFF_PKT_LEN: usize = ffi::FL_MBUF_OFF_PKT_LEN as usize;
const OFF_DATA_LEN: usize = ffi::FL_MBUF_OFF_DATA_LEN as usize;
const OFF_BUF_LEN: usize = ffi::FL_MBUF_OFF_BUF_LEN as usize;

/// An owned, single-segment packet mbuf (freed on drop). `pkt_len` is kept equal to
/// `data_len`. Laid out as a bare pointer, so a `Burst<Mbuf>` is an array of `rte_mbuf *`.
#[repr(transparent)]
pub struct Mbuf(NonNull<ffi::rte_mbuf>);

// SAFETY: an mbuf is owned by one thread at a time; freeing it from any thread is allowed.
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// Takes ownership of a raw mbuf (None if null).
    /// # Safety
    /// `m` must be a valid mbuf nobody else owns.
    #[inline(always)]
    pub unsafe fn from_raw(m: *mut ffi::rte_mbuf) -> Option<Mbuf> {
        NonNull::new(m).map(Mbuf)
    }

    /// Gives up ownership (the caller must free or send it).
    #[inline(always)]
    pub fn into_raw(self) -> *mut ffi::rte_mbuf {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }

    #[inline(always)]
    pub fn as_ptr(&self) -> *mut ffi::rte_mbuf {
        self.0.as_ptr()
    }

    #[inline(always)]
    fn field<T>(&self, off: usize) -> *mut T {
        // SAFETY: off is a field offset inside struct rte_mbuf (checked by the shim).
        unsafe { (self.0.as_ptr() as *mut u8).add(off) as *mut T }
    }
    #[inline(always)]
    fn buf_addr(&self) -> *mut u8 {
        unsafe { *self.field::<*mut u8>(OFF_BUF_ADDR) }
    }
    /// Offset of the packet's first byte in the buffer (the headroom).
    #[inline(always)]
    pub fn data_off(&self) -> u16 {
        unsafe { *self.field::<u16>(OFF_DATA_OFF) }
    }
    #[inline(always)]
    fn data_len(&self) -> u16 {
        unsafe { *self.field::<u16>(OFF_DATA_LEN) }
    }
    /// The buffer's total size (headroom + data room).
    #[inline(always)]
    pub fn buf_len(&self) -> u16 {
        unsafe { *self.field::<u16>(OFF_BUF_LEN) }
    }
    /// Total packet length as DPDK sees it (== `len()` for the single-segment mbufs we make).
    #[inline(always)]
    pub fn pkt_len(&self) -> u32 {
        unsafe { *self.field::<u32>(OFF_PKT_LEN) }
    }
    /// Segments in the chain. Received packets are single-segment unless the port scatters
    /// (we never enable it); `data()` covers the first segment only.
    #[inline(always)]
    pub fn nb_segs(&self) -> u16 {
        unsafe { *self.field::<u16>(OFF_NB_SEGS) }
    }
    #[inline(always)]
    fn set_off_len(&mut self, off: u16, len: u16) {
        unsafe {
            *self.field::<u16>(OFF_DATA_OFF) = off;
            *self.field::<u16>(OFF_DATA_LEN) = len;
            *self.field::<u32>(OFF_PKT_LEN) = len as u32;
        }
    }
    /// Bytes free in front of the packet.
    #[inline(always)]
    pub fn headroom(&self) -> usize {
        self.data_off() as usize
    }
    /// Bytes free after the packet.
    #[inline(always)]
    pub fn tailroom(&self) -> usize {
        self.buf_len() as usize - self.data_off() as usize - self.data_len() as usize
    }
    /// Replaces the contents with `bytes` at the standard headroom; false if it does not fit.
    pub fn fill(&mut self, bytes: &[u8]) -> bool {
        let off = crate::mempool::MBUF_HEADROOM.min(self.buf_len());
        if off as usize + bytes.len() > self.buf_len() as usize {
            return false;
        }
        self.set_off_len(off, bytes.len() as u16);
        self.data_mut().copy_from_slice(bytes);
        true
    }
}

impl Drop for Mbuf {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we own it.
        unsafe { ffi::fl_pktmbuf_free(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mbuf({} bytes, headroom {})", self.data_len(), self.data_off())
    }
}

impl PacketBuf for Mbuf {
    #[inline(always)]
    fn data(&self) -> &[u8] {
        // SAFETY: buf_addr + data_off .. + data_len lies inside the mbuf's buffer, which we own.
        unsafe { std::slice::from_raw_parts(self.buf_addr().add(self.data_off() as usize), self.data_len() as usize) }
    }
    #[inline(always)]
    fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in data(); &mut self gives exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.buf_addr().add(self.data_off() as usize), self.data_len() as usize)
        }
    }
    #[inline]
    fn prepend(&mut self, n: usize) -> bool {
        let (off, len) = (self.data_off() as usize, self.data_len() as usize);
        if n > off {
            return false;
        }
        self.set_off_len((off - n) as u16, (len + n) as u16);
        true
    }
    #[inline]
    fn adj(&mut self, n: usize) -> bool {
        let (off, len) = (self.data_off() as usize, self.data_len() as usize);
        if n > len {
            return false;
        }
        self.set_off_len((off + n) as u16, (len - n) as u16);
        true
    }
    #[inline]
    fn set_len(&mut self, len: usize) -> bool {
        let off = self.data_off();
        if off as usize + len > self.buf_len() as usize {
            return false;
        }
        self.set_off_len(off, len as u16);
        true
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_len() as usize
    }
}
