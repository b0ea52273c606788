use crate::ffi;
use std::ffi::CStr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A DPDK call failed; `msg` is rte_strerror's text for `errno`.
    #[error("{call}: {msg} (errno {errno})")]
    Rte { call: String, errno: i32, msg: String },
    #[error("the DPDK EAL is already initialised in this process (it can be initialised once)")]
    AlreadyInitialised,
    #[error("the DPDK EAL is not initialised (call Eal::init first)")]
    NotInitialised,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// rte_strerror's text for an errno value (DPDK's own codes included).
pub fn strerror(errno: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::rte_strerror(errno)) }.to_string_lossy().into_owned()
}

/// The calling thread's rte_errno.
pub fn rte_errno() -> i32 {
    // SAFETY: reads a thread-local int.
    unsafe { ffi::fl_errno() }
}

impl Error {
    pub(crate) fn rte(call: impl Into<String>, errno: i32) -> Error {
        let errno = errno.abs();
        Error::Rte { call: call.into(), errno, msg: strerror(errno) }
    }
    /// From a call that reports failure through rte_errno.
    pub(crate) fn from_errno(call: impl Into<String>) -> Error {
        Error::rte(call, rte_errno())
    }
}

/// For ethdev-style calls returning 0 or a negative errno.
pub(crate) fn check(call: &str, ret: i32) -> Result<()> {
    if ret < 0 {
        Err(Error::rte(call, ret))
    } else {
        Ok(())
    }
}
