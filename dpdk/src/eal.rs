//! The Environment Abstraction Layer: initialised once per process, cleaned up when the last
//! handle (the [`Eal`] itself, or a mempool or port made under it) is dropped.

use crate::error::{Error, Result};
use crate::ffi;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

enum State {
    Never,
    Alive(Weak<EalInner>),
    /// rte_eal_cleanup ran: DPDK 22.11 cannot be initialised again in this process.
    Done,
}

static STATE: Mutex<State> = Mutex::new(State::Never);
static KEPT: OnceLock<Eal> = OnceLock::new();

pub(crate) struct EalInner {
    runtime_dir: Option<PathBuf>,
    cleaned: AtomicBool,
}

impl Drop for EalInner {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl EalInner {
    fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: called when the last handle is gone (no mempool or port made under this EAL
        // remains), or at process exit.
        unsafe { ffi::rte_eal_cleanup() };
        if let Some(dir) = &self.runtime_dir {
            // rte_eal_cleanup leaves the runtime directory (config, mp socket, telemetry socket).
            if dir.exists() {
                let _ = std::fs::remove_dir_all(dir);
            }
            // The parent (/var/run/dpdk) stays: another process may be creating its own
            // directory there right now.
        }
        *STATE.lock().unwrap_or_else(|e| e.into_inner()) = State::Done;
    }
}

/// A handle on the initialised EAL. Clones share it; rte_eal_cleanup runs when the last
/// handle (including those held by mempools and ports) is dropped, and the runtime directory
/// (`/var/run/dpdk/<file-prefix>`) is removed.
#[derive(Clone)]
pub struct Eal {
    pub(crate) inner: Arc<EalInner>,
}

impl std::fmt::Debug for Eal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eal").field("runtime_dir", &self.inner.runtime_dir).finish()
    }
}

extern "C" fn cleanup_at_exit() {
    if let Some(eal) = KEPT.get() {
        eal.inner.cleanup();
    }
}

impl Eal {
    /// Initialises the EAL with `args` as its command line, without the program name (e.g.
    /// `["--no-huge", "-m", "256", "--no-pci", "--vdev=net_ring0"]`). Once per process: a
    /// second call, even after the first handle was dropped, fails.
    /// The calling thread becomes the EAL main lcore (pinned to it).
    pub fn init(args: &[String]) -> Result<Eal> {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        match &*state {
            State::Never => {}
            _ => return Err(Error::AlreadyInitialised),
        }
        let mut owned = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("fulcrum").unwrap());
        for a in args {
            owned.push(
                CString::new(a.as_str()).map_err(|_| Error::Invalid(format!("EAL argument {a:?} holds a NUL byte")))?,
            );
        }
        // rte_eal_init may permute argv: give it a scratch array of pointers into `owned`.
        let mut argv: Vec<*mut c_char> = owned.iter().map(|s| s.as_ptr() as *mut c_char).collect();
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call.
        let ret = unsafe { ffi::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if ret < 0 {
            let err = Error::from_errno(format!("rte_eal_init({})", args.join(" ")));
            // EAL cannot be retried after a failed init either (it sets its run-once flag).
            *state = State::Done;
            return Err(err);
        }
        // SAFETY: returns a pointer to a static NUL-terminated string.
        let dir = unsafe { ffi::rte_eal_get_runtime_dir() };
        let runtime_dir = (!dir.is_null())
            .then(|| PathBuf::from(unsafe { CStr::from_ptr(dir) }.to_string_lossy().into_owned()))
            .filter(|p| !p.as_os_str().is_empty());
        let inner = Arc::new(EalInner { runtime_dir, cleaned: AtomicBool::new(false) });
        *state = State::Alive(Arc::downgrade(&inner));
        Ok(Eal { inner })
    }

    /// The live EAL, if any (what mempools and ports hold on to).
    pub fn current() -> Result<Eal> {
        match &*STATE.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Alive(w) => w.upgrade().map(|inner| Eal { inner }).ok_or(Error::NotInitialised),
            _ => Err(Error::NotInitialised),
        }
    }

    /// Keeps the EAL for the rest of the process and cleans it up at exit (an `atexit` hook
    /// runs rte_eal_cleanup and removes the runtime directory, whatever handles remain): for
    /// an EAL shared through a `static` (tests), which Rust never drops.
    pub fn keep_until_exit(self) -> &'static Eal {
        let mut fresh = false;
        let kept = KEPT.get_or_init(|| {
            fresh = true;
            self.clone()
        });
        if fresh {
            // SAFETY: registers a plain extern "C" fn.
            unsafe { libc::atexit(cleanup_at_exit) };
        }
        kept
    }

    /// The runtime directory (`/var/run/dpdk/<file-prefix>` as root), removed at cleanup.
    pub fn runtime_dir(&self) -> Option<&std::path::Path> {
        self.inner.runtime_dir.as_deref()
    }

    /// Ethernet ports available (probed vdevs and bound NICs).
    pub fn port_count(&self) -> u16 {
        // SAFETY: the EAL is initialised.
        unsafe { ffi::rte_eth_dev_count_avail() }
    }

    /// Hot-plugs a device after init, e.g. `net_ring5` or `net_null2,size=128`.
    pub fn probe(&self, devargs: &str) -> Result<()> {
        let c = CString::new(devargs).map_err(|_| Error::Invalid(format!("devargs {devargs:?} holds a NUL byte")))?;
        // SAFETY: c is a valid C string for the call.
        crate::error::check(&format!("rte_dev_probe({devargs})"), unsafe { ffi::rte_dev_probe(c.as_ptr()) })
    }
}

/// What [`lcore_id`] returns on a thread that is not an lcore (DPDK's LCORE_ID_ANY).
pub const LCORE_ID_ANY: u32 = ffi::FL_LCORE_ID_ANY as u32;

/// The calling thread's lcore id ([`LCORE_ID_ANY`] for a thread that is not an lcore).
pub fn lcore_id() -> u32 {
    // SAFETY: reads a thread-local.
    unsafe { ffi::fl_lcore_id() }
}

/// The calling thread as an lcore of its own (`rte_thread_register`) for as long as this lives;
/// dropped on the same thread (it is not `Send`), it gives the lcore back.
///
/// Why a worker needs one: DPDK keeps a mempool's per-lcore cache only for lcores. A thread
/// Rust spawned is not one, so every mbuf it allocates or frees (its own, and those its port's
/// driver takes and returns in its bursts) goes to the pool's shared ring: a compare-and-swap
/// on lines every core's workers contend for, per packet. As an lcore it takes and returns
/// mbufs through its own cache, and the ring only in bulk.
#[derive(Debug)]
pub struct LcoreRegistration {
    lcore: u32,
    /// Whether this registration made the lcore (a thread that already was one keeps it).
    registered: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl LcoreRegistration {
    /// Makes the calling thread an lcore, unless it is one already (the EAL's own threads, or
    /// a thread registered before). Fails when the EAL is not running or has no lcore id left
    /// (RTE_MAX_LCORE in all).
    pub fn register_current_thread() -> Result<LcoreRegistration> {
        Eal::current()?;
        let lcore = lcore_id();
        if lcore != LCORE_ID_ANY {
            return Ok(LcoreRegistration { lcore, registered: false, _not_send: std::marker::PhantomData });
        }
        // SAFETY: the EAL is initialised (checked above); the call changes only this thread's
        // lcore state (and turns off multi-process support, which Fulcrum does not use).
        if unsafe { ffi::rte_thread_register() } != 0 {
            return Err(Error::from_errno("rte_thread_register".to_string()));
        }
        let lcore = lcore_id();
        if lcore == LCORE_ID_ANY {
            // DPDK registers the thread without an lcore when all RTE_MAX_LCORE are taken.
            // SAFETY: undoes the registration above on the same thread.
            unsafe { ffi::rte_thread_unregister() };
            return Err(Error::Invalid("rte_thread_register: no lcore id left".to_string()));
        }
        Ok(LcoreRegistration { lcore, registered: true, _not_send: std::marker::PhantomData })
    }

    /// The thread's lcore id.
    pub fn lcore(&self) -> u32 {
        self.lcore
    }
}

impl Drop for LcoreRegistration {
    fn drop(&mut self) {
        if self.registered {
            // SAFETY: `!Send`: this runs on the thread that registered. The lcore's mempool
            // caches keep their mbufs for the next thread that gets the id (the pools count
            // them as available).
            unsafe { ffi::rte_thread_unregister() };
        }
    }
}

/// The NUMA socket of the calling thread's lcore.
pub fn socket_id() -> i32 {
    // SAFETY: reads a thread-local.
    unsafe { ffi::rte_socket_id() as i32 }
}

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: reads the TSC.
    unsafe { ffi::fl_rdtsc() }
}

/// TSC ticks per second as the EAL measured them.
pub fn tsc_hz() -> u64 {
    // SAFETY: the EAL is initialised (0 otherwise).
    unsafe { ffi::fl_get_tsc_hz() }
}
