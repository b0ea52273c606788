//! Everything that needs the EAL, in one test binary: the EAL can be initialised once per
//! process, so the tests share one (a OnceLock) under `cargo test`, and each initialises its
//! own under `cargo nextest` (one process per test). A mutex runs them one at a time.

use arrayvec::ArrayVec;
use fulcrum_dataplane::packet::{HeapBuf, PacketBuf, BUF_SIZE, HEADROOM};
use fulcrum_dataplane::port::{Burst, Port, BURST};
use fulcrum_dpdk::{Eal, EthPort, Mbuf, Mempool, PortConf, SOCKET_ANY};
use std::sync::{Mutex, MutexGuard, OnceLock};

static EAL: OnceLock<&'static Eal> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// The shared EAL (net_ring0 and net_ring1 echo tx back to rx; net_null0 for multi-queue),
/// and the lock that serialises the tests.
fn eal() -> (&'static Eal, MutexGuard<'static, ()>) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let eal = *EAL.get_or_init(|| {
        let args: Vec<String> = [
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            "-l",
            "0",
            "--log-level=lib.eal:warning",
            "--vdev=net_ring0",
            "--vdev=net_ring1",
            "--vdev=net_null0",
            "--file-prefix",
            &format!("fulcrum-test-{}", std::process::id()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Eal::init(&args).expect("EAL init").keep_until_exit()
    });
    (eal, guard)
}

fn frame(i: usize, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, i as u8]);
    f
}

fn one_queue() -> PortConf {
    PortConf { rx_queues: 1, tx_queues: 1, rx_desc: 512, tx_desc: 512, rss: false, mtu: None }
}

#[test]
fn ring_port_echoes_a_burst_byte_identical() {
    let (eal, _g) = eal();
    assert!(eal.port_count() >= 1);
    let pool = Mempool::new("echo_pool", 1023, 0, SOCKET_ANY).unwrap();
    let port = EthPort::open("net_ring0", &one_queue(), &pool).unwrap();
    assert!(port.link().unwrap().up);
    let mut q = port.queue(0, 0).unwrap();
    let sent_frames: Vec<Vec<u8>> = (0..BURST).map(|i| frame(i, 60 + i * 40)).collect();
    let mut burst: Burst<Mbuf> = ArrayVec::new();
    for f in &sent_frames {
        let mut m = q.alloc().unwrap();
        assert!(m.fill(f));
        burst.push(m);
    }
    assert_eq!(q.tx_burst(&mut burst), BURST);
    assert!(burst.is_empty());
    let mut got: Burst<Mbuf> = ArrayVec::new();
    while got.len() < BURST {
        if q.rx_burst(&mut got) == 0 {
            break;
        }
    }
    assert_eq!(got.len(), BURST);
    for (m, f) in got.iter().zip(&sent_frames) {
        assert_eq!(m.data(), &f[..]);
        assert_eq!(m.pkt_len() as usize, f.len());
        assert_eq!(m.nb_segs(), 1);
    }
    let st = port.stats().unwrap();
    assert_eq!((st.opackets, st.ipackets), (BURST as u64, BURST as u64));
    drop(got);
    assert_eq!(pool.available(), pool.size());
}

/// The same test as HeapBuf's in dataplane/src/packet.rs, on an mbuf, plus the two agree
/// step by step.
#[test]
fn mbuf_prepend_adj_set_len_match_heapbuf() {
    let (_eal, _g) = eal();
    let pool = Mempool::new("sem_pool", 63, 0, SOCKET_ANY).unwrap();
    let mut b = pool.alloc().unwrap();
    assert_eq!(b.headroom(), HEADROOM);
    assert_eq!(b.buf_len() as usize, BUF_SIZE);
    assert!(b.is_empty());
    assert!(b.fill(&[1, 2, 3]));
    assert!(b.prepend(2));
    b.data_mut()[..2].copy_from_slice(&[9, 9]);
    assert_eq!(b.data(), &[9, 9, 1, 2, 3]);
    assert_eq!(b.pkt_len(), 5);
    assert!(b.adj(2));
    assert_eq!(b.data(), &[1, 2, 3]);
    assert!(!b.prepend(HEADROOM + 1));
    assert!(!b.adj(4));
    assert!(b.set_len(1));
    assert_eq!(b.data(), &[1]);
    assert_eq!(b.pkt_len(), 1);
    assert!(!b.set_len(BUF_SIZE));

    // Lockstep against HeapBuf over a sequence of operations.
    let mut m = pool.alloc().unwrap();
    let mut h = HeapBuf::new();
    assert!(m.fill(&[5; 40]));
    h.fill(&[5; 40]);
    let ops: &[(u8, usize)] = &[
        (0, 14),
        (0, 20),
        (1, 34),
        (2, 100),
        (0, 94),
        (0, 1),
        (1, 300),
        (2, 2048),
        (2, 1900),
        (1, 1899),
        (0, 128),
        (2, BUF_SIZE - 1),
        (1, 0),
        (2, 0),
        (0, 0),
        (1, 1),
    ];
    for &(op, n) in ops {
        let (a, b) = match op {
            0 => (m.prepend(n), h.prepend(n)),
            1 => (m.adj(n), h.adj(n)),
            _ => (m.set_len(n), h.set_len(n)),
        };
        assert_eq!(a, b, "op {op} n {n}");
        assert_eq!(m.len(), h.len(), "op {op} n {n}");
        assert_eq!(m.pkt_len() as usize, h.len());
        assert_eq!(m.data(), h.data(), "op {op} n {n}");
    }
    drop((b, m));
    assert_eq!(pool.available(), 63);
}

#[test]
fn null_port_with_two_queues_and_rss_starts() {
    let (_eal, _g) = eal();
    let pool = Mempool::new("mq_pool", 4095, 0, SOCKET_ANY).unwrap();
    let conf = PortConf { rx_queues: 2, tx_queues: 2, rx_desc: 256, tx_desc: 256, rss: true, mtu: Some(1500) };
    let port = EthPort::open("net_null0", &conf, &pool).unwrap();
    assert_ne!(port.rss_hf(), 0, "net_null supports RSS");
    let _ = port.mac().unwrap();
    for q in 0..2 {
        let mut pq = port.queue(q, q).unwrap();
        let mut b: Burst<Mbuf> = ArrayVec::new();
        assert_eq!(pq.rx_burst(&mut b), BURST, "net_null rx fills a burst");
        assert!(b.iter().all(|m| m.len() == 64));
        assert_eq!(pq.tx_burst(&mut b), BURST);
    }
    assert!(port.queue(2, 0).is_err());
    assert!(port.queue(0, 2).is_err());
    drop(port);
    assert_eq!(pool.available(), pool.size());
}

#[test]
fn nothing_leaks_after_traffic_and_drops() {
    let (_eal, _g) = eal();
    let pool = Mempool::new("leak_pool", 511, 0, SOCKET_ANY).unwrap();
    let initial = pool.available();
    assert_eq!(initial, 511);
    {
        let port = EthPort::open("1", &one_queue(), &pool).unwrap(); // net_ring1 by index
        assert_eq!(port.name(), "net_ring1");
        let mut q = port.queue(0, 0).unwrap();
        for round in 0..50 {
            let mut burst: Burst<Mbuf> = ArrayVec::new();
            for i in 0..BURST {
                let mut m = q.alloc().unwrap();
                m.fill(&frame(i + round, 64));
                burst.push(m);
            }
            q.tx_burst(&mut burst);
            let mut got: Burst<Mbuf> = ArrayVec::new();
            q.rx_burst(&mut got);
            // Rewrite a few, drop the rest; half are sent again and received in the next round.
            for (i, m) in got.into_iter().enumerate() {
                if i % 2 == 0 {
                    let mut one: Burst<Mbuf> = ArrayVec::new();
                    one.push(m);
                    q.tx_burst(&mut one);
                }
            }
            let mut again: Burst<Mbuf> = ArrayVec::new();
            q.rx_burst(&mut again);
        }
        assert_eq!(pool.available(), initial, "all mbufs back while the port is open");
    }
    assert_eq!(pool.available(), initial, "all mbufs back after the port closed");
    // Errors carry rte_strerror's text.
    let e = EthPort::open("net_nope", &one_queue(), &pool).unwrap_err().to_string();
    assert!(e.contains("rte_eth_dev_get_port_by_name(net_nope)"), "{e}");
    let e = Mempool::new("leak_pool", 15, 0, SOCKET_ANY).unwrap_err().to_string();
    assert!(e.contains("rte_pktmbuf_pool_create") && e.contains("exists"), "{e}");
}

#[test]
fn eal_init_twice_fails_and_runtime_dir_is_known() {
    let (eal, _g) = eal();
    let dir = eal.runtime_dir().expect("runtime dir").to_path_buf();
    assert!(dir.ends_with(format!("fulcrum-test-{}", std::process::id())), "{dir:?}");
    assert!(dir.exists());
    assert!(matches!(Eal::init(&[]), Err(fulcrum_dpdk::Error::AlreadyInitialised)));
}

#[test]
fn vdev_hotplugged_after_init_opens_and_queues_are_send() {
    let (eal, _g) = eal();
    fn is_send<T: Send>() {}
    is_send::<fulcrum_dpdk::PortQueue>();
    is_send::<Mbuf>();
    eal.probe("net_ring_hotplug").unwrap();
    let pool = Mempool::new("hotplug_pool", 255, 0, SOCKET_ANY).unwrap();
    let port = EthPort::open("net_ring_hotplug", &one_queue(), &pool).unwrap();
    let mut q = port.queue(0, 0).unwrap();
    // A queue moves to a worker thread and works there.
    let n = std::thread::spawn(move || {
        let mut b: Burst<Mbuf> = ArrayVec::new();
        let mut m = q.alloc().unwrap();
        m.fill(&frame(1, 64));
        b.push(m);
        q.tx_burst(&mut b);
        q.rx_burst(&mut b)
    })
    .join()
    .unwrap();
    assert_eq!(n, 1);
    drop(port);
    assert_eq!(pool.available(), 255);
    let e = eal.probe("net_bogus0").unwrap_err().to_string();
    assert!(e.contains("rte_dev_probe(net_bogus0)"), "{e}");
}

/// Lowest and highest mbuf address of a pool, all of its mbufs taken out and given back.
fn mbuf_span(pool: &Mempool) -> (usize, usize) {
    let all: Vec<Mbuf> = (0..pool.size()).map(|_| pool.alloc().expect("every mbuf")).collect();
    assert!(pool.alloc().is_none(), "the pool is empty now");
    let addrs: Vec<usize> = all.iter().map(|m| m.as_ptr() as usize).collect();
    (*addrs.iter().min().unwrap(), *addrs.iter().max().unwrap())
}

#[test]
fn packed_pool_is_one_block_of_equal_frames() {
    // What AF_XDP's driver assumes when it registers a pool as its UMEM (base, mbufs x frame).
    let (_eal, _g) = eal();
    let packed = Mempool::new_packed("packed_pool", 1023, 0, SOCKET_ANY).unwrap();
    assert_eq!(packed.mem_chunks(), 1);
    let frame = packed.frame_size() as usize;
    assert!(frame >= 128 + fulcrum_dpdk::MBUF_BUF_SIZE as usize, "{frame}");
    let (lo, hi) = mbuf_span(&packed);
    assert_eq!(hi - lo, (packed.size() as usize - 1) * frame, "mbufs back to back, {frame} bytes apart");
    assert_eq!(packed.available(), packed.size(), "all given back");
    // Packed mbufs are ordinary mbufs: data in and out, across a page boundary too.
    let mut m = packed.alloc().unwrap();
    assert!(m.fill(&frame_bytes(1500)));
    assert_eq!(m.data(), &frame_bytes(1500)[..]);
    assert_eq!(m.data_off(), fulcrum_dpdk::MBUF_HEADROOM);
    drop(m);
    // The default pool (no hugepages here) keeps each mbuf inside a 4 KiB page: spread wider
    // than mbufs x frame, the reason the packed one exists.
    let paged = Mempool::new("paged_pool", 1023, 0, SOCKET_ANY).unwrap();
    let (lo, hi) = mbuf_span(&paged);
    assert!(hi - lo > (paged.size() as usize - 1) * paged.frame_size() as usize, "default pool packed after all?");
    let e = Mempool::new_packed("packed_pool", 15, 0, SOCKET_ANY).unwrap_err().to_string();
    assert!(e.contains("packed pool(packed_pool") && e.contains("exists"), "{e}");
}

fn frame_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|b| (b * 13) as u8).collect()
}

#[test]
fn an_attached_worker_thread_recycles_mbufs_through_its_own_cache() {
    let (eal, _g) = eal();
    eal.probe("net_null_cache").unwrap();
    let pool = Mempool::new("cache_pool", 1023, 64, SOCKET_ANY).unwrap();
    let port = EthPort::open("net_null_cache", &one_queue(), &pool).unwrap();
    let mut q = port.queue(0, 0).unwrap();
    let pool2 = pool.clone();
    let lcores = std::thread::spawn(move || {
        // A thread Rust spawned is no lcore: its mbufs go through the pool's shared ring.
        let before = fulcrum_dpdk::lcore_id();
        assert_eq!(pool2.cached_here(), None);
        let attachment = q.attach_thread().expect("attach");
        let during = fulcrum_dpdk::lcore_id();
        // What net_null's rx takes and its tx frees now moves through this thread's cache.
        let mut b: Burst<Mbuf> = ArrayVec::new();
        for _ in 0..4 {
            q.rx_burst(&mut b);
            q.tx_burst(&mut b);
        }
        let cached = pool2.cached_here().expect("an lcore has a cache of the pool");
        assert!(cached > 0, "freed mbufs stay in the thread's cache");
        drop(attachment);
        (before, during, fulcrum_dpdk::lcore_id())
    })
    .join()
    .unwrap();
    assert_eq!(lcores.0, fulcrum_dpdk::LCORE_ID_ANY, "not an lcore before");
    assert!(
        lcores.1 != fulcrum_dpdk::LCORE_ID_ANY && lcores.1 != 0,
        "an lcore of its own while attached: {}",
        lcores.1
    );
    assert_eq!(lcores.2, fulcrum_dpdk::LCORE_ID_ANY, "the lcore given back when the attachment drops");
    drop(port);
    assert_eq!(pool.available(), pool.size(), "mbufs left in the old lcore's cache still count");
    // A thread that is an lcore already keeps its id, and a nested registration going does
    // not take it away.
    let outer = fulcrum_dpdk::LcoreRegistration::register_current_thread().unwrap();
    let id = fulcrum_dpdk::lcore_id();
    assert_eq!(outer.lcore(), id);
    let inner = fulcrum_dpdk::LcoreRegistration::register_current_thread().unwrap();
    assert_eq!(inner.lcore(), id);
    drop(inner);
    assert_eq!(fulcrum_dpdk::lcore_id(), id);
}
