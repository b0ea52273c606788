//! Ethernet ports: configure N rx/tx queues (RSS when asked and supported), start, and hand out
//! per-queue [`PortQueue`]s that implement the data plane's `Port` trait.

use crate::eal::{Eal, LcoreRegistration};
use crate::error::{check, Error, Result};
use crate::ffi;
use crate::mbuf::Mbuf;
use crate::mempool::Mempool;
use fulcrum_dataplane::port::{Burst, Port, ThreadAttachment};
use std::ffi::{CStr, CString};
use std::sync::Arc;

/// How to set up a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConf {
    pub rx_queues: u16,
    pub tx_queues: u16,
    /// Descriptors per rx / tx queue (adjusted to the device's limits).
    pub rx_desc: u16,
    pub tx_desc: u16,
    /// Spread received flows over the rx queues by an IP/TCP/UDP hash (ignored with one rx
    /// queue or a device without RSS).
    pub rss: bool,
    /// MTU to set; None keeps the device's default (1500).
    pub mtu: Option<u16>,
}

impl Default for PortConf {
    fn default() -> Self {
        PortConf { rx_queues: 1, tx_queues: 1, rx_desc: 1024, tx_desc: 1024, rss: true, mtu: None }
    }
}

/// Counters from rte_eth_stats_get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    /// Dropped by the device: rx queues full.
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    /// Rx failures for want of an mbuf.
    pub rx_nombuf: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub speed_mbps: u32,
    pub full_duplex: bool,
}

struct PortInner {
    id: u16,
    name: String,
    rss_hf: u64,
    // Fields drop after Drop::drop (stop + close), so pools outlive the port's queues.
    pools: Vec<Mempool>,
    _eal: Eal,
}

impl Drop for PortInner {
    fn drop(&mut self) {
        // SAFETY: no PortQueue remains (each holds the Arc).
        unsafe {
            ffi::rte_eth_dev_stop(self.id);
            ffi::rte_eth_dev_close(self.id);
        }
    }
}

/// A started port. Clones share it; it is stopped and closed when the last clone and every
/// [`PortQueue`] are gone (a closed vdev is released and cannot be opened again).
#[derive(Clone)]
pub struct EthPort {
    inner: Arc<PortInner>,
}

impl std::fmt::Debug for EthPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EthPort({} = port {})", self.inner.name, self.inner.id)
    }
}

fn port_id(name_or_index: &str) -> Result<u16> {
    if let Ok(id) = name_or_index.parse::<u16>() {
        // SAFETY: plain query.
        if unsafe { ffi::rte_eth_dev_is_valid_port(id) } == 1 {
            return Ok(id);
        }
        return Err(Error::Invalid(format!("no DPDK port {id}")));
    }
    let c = CString::new(name_or_index)
        .map_err(|_| Error::Invalid(format!("port name {name_or_index:?} holds a NUL byte")))?;
    let mut id = 0u16;
    // SAFETY: valid C string and out pointer.
    check(&format!("rte_eth_dev_get_port_by_name({name_or_index})"), unsafe {
        ffi::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut id)
    })?;
    Ok(id)
}

fn port_name(id: u16) -> String {
    let mut buf = [0 as std::os::raw::c_char; ffi::RTE_ETH_NAME_MAX_LEN as usize];
    // SAFETY: buf is RTE_ETH_NAME_MAX_LEN long, as the call requires.
    if unsafe { ffi::rte_eth_dev_get_name_by_port(id, buf.as_mut_ptr()) } == 0 {
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
    } else {
        format!("port{id}")
    }
}

impl EthPort {
    /// Opens the port named (`net_ring0`, `0000:01:00.0`) or numbered `name_or_index`, sets up
    /// its queues with every rx queue drawing mbufs from `pool`, starts it and turns on
    /// promiscuous mode (where the device has one).
    pub fn open(name_or_index: &str, conf: &PortConf, pool: &Mempool) -> Result<EthPort> {
        let pools = vec![pool.clone(); conf.rx_queues as usize];
        Self::open_with_pools(name_or_index, conf, &pools)
    }

    /// As [`open`](Self::open), with one pool per rx queue (e.g. each on its worker's socket).
    pub fn open_with_pools(name_or_index: &str, conf: &PortConf, pools: &[Mempool]) -> Result<EthPort> {
        let eal = Eal::current()?;
        let id = port_id(name_or_index)?;
        let name = port_name(id);
        if pools.len() != conf.rx_queues as usize {
            return Err(Error::Invalid(format!("{name}: {} rx queues but {} pools", conf.rx_queues, pools.len())));
        }
        if conf.rx_queues == 0 || conf.tx_queues == 0 {
            return Err(Error::Invalid(format!("{name}: needs at least one rx and one tx queue")));
        }
        // SAFETY (whole block): id is a valid port; every pointer passed is valid for its call.
        unsafe {
            let mut info: ffi::rte_eth_dev_info = std::mem::zeroed();
            check(&format!("rte_eth_dev_info_get({name})"), ffi::rte_eth_dev_info_get(id, &mut info))?;
            if conf.rx_queues > info.max_rx_queues || conf.tx_queues > info.max_tx_queues {
                return Err(Error::Invalid(format!(
                    "{name}: asked for {} rx / {} tx queues, the device has at most {} / {}",
                    conf.rx_queues, conf.tx_queues, info.max_rx_queues, info.max_tx_queues
                )));
            }
            let mut eth_conf: ffi::rte_eth_conf = std::mem::zeroed();
            let mut rss_hf = 0;
            if conf.rss && conf.rx_queues > 1 {
                rss_hf = ffi::fl_rss_hf_default() & info.flow_type_rss_offloads;
                if rss_hf != 0 {
                    eth_conf.rxmode.mq_mode = ffi::RTE_ETH_MQ_RX_RSS;
                    eth_conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
                }
            }
            if let Some(mtu) = conf.mtu {
                if mtu < info.min_mtu || mtu > info.max_mtu {
                    return Err(Error::Invalid(format!(
                        "{name}: MTU {mtu} outside the device's {}..={}",
                        info.min_mtu, info.max_mtu
                    )));
                }
                eth_conf.rxmode.mtu = mtu as u32;
            }
            check(
                &format!("rte_eth_dev_configure({name}, {} rxq, {} txq)", conf.rx_queues, conf.tx_queues),
                ffi::rte_eth_dev_configure(id, conf.rx_queues, conf.tx_queues, &eth_conf),
            )?;
            // From here on a failure must close the port again.
            let fail = |e: Error| {
                ffi::rte_eth_dev_close(id);
                e
            };
            let (mut rxd, mut txd) = (conf.rx_desc, conf.tx_desc);
            check(
                &format!("rte_eth_dev_adjust_nb_rx_tx_desc({name})"),
                ffi::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut rxd, &mut txd),
            )
            .map_err(fail)?;
            let socket = ffi::rte_eth_dev_socket_id(id);
            let socket = if socket < 0 { ffi::FL_SOCKET_ID_ANY } else { socket };
            for (q, pool) in pools.iter().enumerate() {
                check(
                    &format!("rte_eth_rx_queue_setup({name}, q{q}, {rxd} desc)"),
                    ffi::rte_eth_rx_queue_setup(id, q as u16, rxd, socket as u32, std::ptr::null(), pool.as_ptr()),
                )
                .map_err(fail)?;
            }
            for q in 0..conf.tx_queues {
                check(
                    &format!("rte_eth_tx_queue_setup({name}, q{q}, {txd} desc)"),
                    ffi::rte_eth_tx_queue_setup(id, q, txd, socket as u32, std::ptr::null()),
                )
                .map_err(fail)?;
            }
            check(&format!("rte_eth_dev_start({name})"), ffi::rte_eth_dev_start(id)).map_err(fail)?;
            let ret = ffi::rte_eth_promiscuous_enable(id);
            if ret < 0 && ret != -libc::ENOTSUP {
                ffi::rte_eth_dev_stop(id);
                return Err(fail(Error::rte(format!("rte_eth_promiscuous_enable({name})"), ret)));
            }
            Ok(EthPort { inner: Arc::new(PortInner { id, name, rss_hf, pools: pools.to_vec(), _eal: eal }) })
        }
    }

    pub fn id(&self) -> u16 {
        self.inner.id
    }
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The RSS hash functions in use (0: no RSS).
    pub fn rss_hf(&self) -> u64 {
        self.inner.rss_hf
    }

    pub fn mac(&self) -> Result<[u8; 6]> {
        // SAFETY: valid port, valid out pointer.
        unsafe {
            let mut a: ffi::rte_ether_addr = std::mem::zeroed();
            check(
                &format!("rte_eth_macaddr_get({})", self.inner.name),
                ffi::rte_eth_macaddr_get(self.inner.id, &mut a),
            )?;
            Ok(a.addr_bytes)
        }
    }

    pub fn stats(&self) -> Result<PortStats> {
        // SAFETY: valid port, valid out pointer.
        unsafe {
            let mut s: ffi::rte_eth_stats = std::mem::zeroed();
            check(&format!("rte_eth_stats_get({})", self.inner.name), ffi::rte_eth_stats_get(self.inner.id, &mut s))?;
            Ok(PortStats {
                ipackets: s.ipackets,
                opackets: s.opackets,
                ibytes: s.ibytes,
                obytes: s.obytes,
                imissed: s.imissed,
                ierrors: s.ierrors,
                oerrors: s.oerrors,
                rx_nombuf: s.rx_nombuf,
            })
        }
    }

    pub fn link(&self) -> Result<Link> {
        // SAFETY: valid port, valid out pointer.
        unsafe {
            let mut l: ffi::rte_eth_link = std::mem::zeroed();
            check(
                &format!("rte_eth_link_get_nowait({})", self.inner.name),
                ffi::rte_eth_link_get_nowait(self.inner.id, &mut l),
            )?;
            Ok(Link { up: l.link_status() != 0, speed_mbps: l.link_speed, full_duplex: l.link_duplex() != 0 })
        }
    }

    /// A handle on rx queue `rxq` and tx queue `txq`, allocating from `rxq`'s pool. One
    /// thread per queue: DPDK queues are not thread-safe.
    pub fn queue(&self, rxq: u16, txq: u16) -> Result<PortQueue> {
        let pool = self
            .inner
            .pools
            .get(rxq as usize)
            .ok_or_else(|| Error::Invalid(format!("{}: no rx queue {rxq}", self.inner.name)))?
            .clone();
        if txq as usize >= self.tx_queues() {
            return Err(Error::Invalid(format!("{}: no tx queue {txq}", self.inner.name)));
        }
        Ok(PortQueue { port_id: self.inner.id, rxq, txq, pool, port: self.clone() })
    }

    fn tx_queues(&self) -> usize {
        // SAFETY: valid port, valid out pointer.
        unsafe {
            let mut info: ffi::rte_eth_dev_info = std::mem::zeroed();
            ffi::rte_eth_dev_info_get(self.inner.id, &mut info);
            info.nb_tx_queues as usize
        }
    }
}

/// One rx and one tx queue of a port and the pool for packets made here: what one worker
/// owns. Implements the data plane's `Port` with `Mbuf`s (zero-copy bursts).
pub struct PortQueue {
    port_id: u16,
    pub rxq: u16,
    pub txq: u16,
    pub pool: Mempool,
    pub port: EthPort,
}

impl std::fmt::Debug for PortQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortQueue({} rx{} tx{})", self.port.name(), self.rxq, self.txq)
    }
}

impl Port for PortQueue {
    type Buf = Mbuf;

    #[inline]
    fn rx_burst(&mut self, out: &mut Burst<Mbuf>) -> usize {
        let (len, room) = (out.len(), out.remaining_capacity());
        if room == 0 {
            return 0;
        }
        // SAFETY: Mbuf is a transparent non-null `rte_mbuf *`; rx_burst writes `n <= room`
        // valid mbuf pointers, which we then own, into the spare capacity.
        unsafe {
            let dst = out.as_mut_ptr().add(len) as *mut *mut ffi::rte_mbuf;
            let n = ffi::fl_rx_burst(self.port_id, self.rxq, dst, room as u16) as usize;
            out.set_len(len + n);
            n
        }
    }

    #[inline]
    fn tx_burst(&mut self, bufs: &mut Burst<Mbuf>) -> usize {
        let len = bufs.len();
        if len == 0 {
            return 0;
        }
        // SAFETY: the driver takes ownership of the first `sent` mbufs; we forget them and
        // move the rest to the front.
        unsafe {
            let p = bufs.as_mut_ptr();
            let sent = ffi::fl_tx_burst(self.port_id, self.txq, p as *mut *mut ffi::rte_mbuf, len as u16) as usize;
            bufs.set_len(0);
            std::ptr::copy(p.add(sent), p, len - sent);
            bufs.set_len(len - sent);
            sent
        }
    }

    #[inline]
    fn alloc(&mut self) -> Option<Mbuf> {
        self.pool.alloc()
    }

    fn attach_thread(&mut self) -> std::result::Result<ThreadAttachment, String> {
        let r = LcoreRegistration::register_current_thread().map_err(|e| e.to_string())?;
        Ok(Some(Box::new(r)))
    }
}
