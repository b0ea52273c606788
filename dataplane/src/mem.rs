//! Large preallocated tables on huge pages. Conntrack for 1M flows is >100 MiB, far beyond
//! cache; with 4 KiB pages every lookup also misses the TLB (DESIGN.md measured 190 ns vs 139 ns
//! per miss). So the tables are anonymous mappings with transparent huge pages requested.

use std::marker::PhantomData;
use std::ptr::NonNull;

/// Plain data that is valid when all-zero (the mapping is zero-filled).
///
/// # Safety
/// Implementors must be valid for the all-zero bit pattern and need no Drop.
pub unsafe trait Zeroable: Copy {}

// SAFETY: integers are valid when zero.
unsafe impl Zeroable for u64 {}
unsafe impl Zeroable for u32 {}

/// A fixed-length, zero-initialised array in its own anonymous mapping.
pub struct HugeArray<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
    _t: PhantomData<T>,
}

// The array owns its memory like a Box<[T]>.
unsafe impl<T: Zeroable + Send> Send for HugeArray<T> {}
unsafe impl<T: Zeroable + Sync> Sync for HugeArray<T> {}

const HUGE_PAGE: usize = 2 << 20;

impl<T: Zeroable> HugeArray<T> {
    /// What `new(len)` maps, without mapping it.
    pub fn bytes_for(len: usize) -> usize {
        (len.max(1) * std::mem::size_of::<T>()).div_ceil(HUGE_PAGE) * HUGE_PAGE
    }

    /// Maps `len` zeroed elements, all pages faulted in (committed) before it returns.
    pub fn new(len: usize) -> std::io::Result<Self> {
        let len = len.max(1);
        let bytes = Self::bytes_for(len);
        // SAFETY: anonymous private mapping, no file; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Best effort: THP may be disabled; the table still works on small pages.
        // SAFETY: p..p+bytes is the mapping just created.
        unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
        // Fault every page in now, after the advice so they come as huge pages: a first touch
        // on the fast path would be a trip into the kernel (and 2 MiB of zeroing) per page.
        let base = p as *mut u8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: off < bytes, inside the mapping; a volatile write so it is not elided.
            unsafe { std::ptr::write_volatile(base.add(off), 0) };
            off += 4096;
        }
        Ok(HugeArray { ptr: NonNull::new(p as *mut T).expect("mmap returned null"), len, bytes, _t: PhantomData })
    }

    #[inline(always)]
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes mapped (what the table may cost once fully touched).
    pub fn mapped_bytes(&self) -> usize {
        self.bytes
    }
}

impl<T: Zeroable> std::ops::Deref for HugeArray<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: the mapping holds len zero-initialised (hence valid) T's and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> std::ops::DerefMut for HugeArray<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for HugeArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in new().
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.bytes) };
    }
}

/// Hints the CPU to pull the cache line holding `p` (read intent, all cache levels).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults, even on an invalid address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `prefetch` for every cache line of a `T` at `p` (e.g. a struct that spans several lines).
#[inline(always)]
pub fn prefetch_all<T>(p: *const T) {
    prefetch_bytes(p as *const u8, std::mem::size_of::<T>());
}

/// `prefetch` for the cache lines of the `bytes` bytes from `p` (from `p`'s line on, one per
/// 64 bytes).
#[inline(always)]
pub fn prefetch_bytes(p: *const u8, bytes: usize) {
    for line in 0..bytes.div_ceil(64) {
        prefetch(p.wrapping_add(line * 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_writable() {
        let mut a: HugeArray<u64> = HugeArray::new(1000).unwrap();
        assert_eq!(a.len(), 1000);
        assert!(a.iter().all(|&x| x == 0));
        a[999] = 7;
        assert_eq!(a[999], 7);
        assert_eq!(a.mapped_bytes() % HUGE_PAGE, 0);
    }
}
