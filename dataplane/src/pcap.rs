//! pcap files for tests and debugging: reading and writing whole files of Ethernet frames,
//! [`PcapTap`] (records every frame a [`Port`] receives and sends, as smoltcp's
//! `phy::PcapWriter` does around a device) and [`FaultInjector`] (drops, corrupts and truncates
//! received frames with given probabilities, as smoltcp's `phy::FaultInjector`).
//!
//! Neither wrapper belongs on a production fast path: the tap copies and writes every frame.

use crate::packet::PacketBuf;
use crate::port::{Burst, Port};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::{DataLink, Endianness, PcapError, TsResolution};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn to_io(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// The header every file written here has: classic pcap, little-endian, microseconds,
/// Ethernet link type.
pub fn ethernet_header() -> PcapHeader {
    PcapHeader {
        datalink: DataLink::ETHERNET,
        endianness: Endianness::Little,
        ts_resolution: TsResolution::MicroSecond,
        snaplen: 65535,
        ..PcapHeader::default()
    }
}

/// Reads every frame of a classic pcap file with the Ethernet link type.
pub fn read_pcap(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    read_pcap_from(BufReader::new(f)).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// [`read_pcap`] from any reader.
pub fn read_pcap_from<R: Read>(r: R) -> io::Result<Vec<Vec<u8>>> {
    let mut reader = PcapReader::new(r).map_err(to_io)?;
    let link = reader.header().datalink;
    if link != DataLink::ETHERNET {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("link type {link:?}, expected Ethernet")));
    }
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        let p = p.map_err(to_io)?;
        if (p.orig_len as usize) != p.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame {} was captured truncated ({} of {} bytes)", frames.len(), p.data.len(), p.orig_len),
            ));
        }
        frames.push(p.data.into_owned());
    }
    Ok(frames)
}

/// Writes `frames` as a pcap file (Ethernet link type), timestamps 1 ms apart from 0.
pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) -> io::Result<()> {
    let f = File::create(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut w = write_pcap_to(BufWriter::new(f), frames)?;
    w.flush()
}

/// [`write_pcap`] to any writer; returns the writer.
pub fn write_pcap_to<W: Write>(w: W, frames: &[Vec<u8>]) -> io::Result<W> {
    let mut pw = PcapWriter::with_header(w, ethernet_header()).map_err(to_io)?;
    for (i, f) in frames.iter().enumerate() {
        pw.write_packet(&PcapPacket::new(Duration::from_millis(i as u64), f.len() as u32, f)).map_err(to_io)?;
    }
    Ok(pw.into_writer())
}

/// Where [`PcapTap`] takes timestamps from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapClock {
    /// Wall-clock time of each burst.
    Wall,
    /// 1 ms per recorded frame from 0, shared by both directions: reproducible files.
    Synthetic,
}

/// A [`Port`] that records every received frame to one pcap stream and every sent frame to
/// another. Recording errors never fail the port: the first one is kept ([`PcapTap::error`]) and
/// recording stops.
pub struct PcapTap<P: Port, W: Write = BufWriter<File>> {
    inner: P,
    rx: Option<PcapWriter<W>>,
    tx: Option<PcapWriter<W>>,
    clock: TapClock,
    tick: u64,
    error: Option<io::Error>,
    /// Copies of a tx burst taken before the inner port consumes it (reused).
    scratch: Vec<u8>,
    lens: Vec<usize>,
}

impl<P: Port> PcapTap<P, BufWriter<File>> {
    /// Records to files at `rx_path` and `tx_path` (created or truncated), wall-clock stamps.
    pub fn create(inner: P, rx_path: &Path, tx_path: &Path) -> io::Result<Self> {
        let rx = BufWriter::new(File::create(rx_path)?);
        let tx = BufWriter::new(File::create(tx_path)?);
        Self::new(inner, rx, tx, TapClock::Wall)
    }
}

impl<P: Port, W: Write> PcapTap<P, W> {
    pub fn new(inner: P, rx: W, tx: W, clock: TapClock) -> io::Result<Self> {
        Ok(PcapTap {
            inner,
            rx: Some(PcapWriter::with_header(rx, ethernet_header()).map_err(to_io)?),
            tx: Some(PcapWriter::with_header(tx, ethernet_header()).map_err(to_io)?),
            clock,
            tick: 0,
            error: None,
            scratch: Vec::new(),
            lens: Vec::new(),
        })
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }

    /// The first recording error, if any (recording stopped then).
    pub fn error(&self) -> Option<&io::Error> {
        self.error.as_ref()
    }

    /// Flushes and returns the port and the two writers (rx, tx), or the first recording error.
    pub fn finish(mut self) -> io::Result<(P, W, W)> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let (Some(rx), Some(tx)) = (self.rx.take(), self.tx.take()) else {
            return Err(io::Error::other("pcap tap writers already gone"));
        };
        let (mut rx, mut tx) = (rx.into_writer(), tx.into_writer());
        rx.flush()?;
        tx.flush()?;
        Ok((self.inner, rx, tx))
    }

    fn stamp(&mut self) -> Duration {
        match self.clock {
            TapClock::Wall => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            TapClock::Synthetic => {
                self.tick += 1;
                Duration::from_millis(self.tick - 1)
            }
        }
    }

    fn record(&mut self, tx: bool, frame: &[u8], ts: Duration) {
        if self.error.is_some() {
            return;
        }
        let w = if tx { self.tx.as_mut() } else { self.rx.as_mut() };
        if let Some(w) = w {
            if let Err(e) = w.write_packet(&PcapPacket::new(ts, frame.len() as u32, frame)) {
                self.error = Some(to_io(e));
            }
        }
    }
}

impl<P: Port, W: Write> Port for PcapTap<P, W> {
    type Buf = P::Buf;

    fn attach_thread(&mut self) -> Result<crate::port::ThreadAttachment, String> {
        self.inner.attach_thread()
    }

    fn rx_burst(&mut self, out: &mut Burst<Self::Buf>) -> usize {
        let start = out.len();
        let n = self.inner.rx_burst(out);
        for b in &out[start..] {
            let ts = self.stamp();
            self.record(false, b.data(), ts);
        }
        n
    }

    fn tx_burst(&mut self, bufs: &mut Burst<Self::Buf>) -> usize {
        self.scratch.clear();
        self.lens.clear();
        for b in bufs.iter() {
            self.scratch.extend_from_slice(b.data());
            self.lens.push(b.len());
        }
        let n = self.inner.tx_burst(bufs);
        let scratch = std::mem::take(&mut self.scratch);
        let mut off = 0;
        for i in 0..n.min(self.lens.len()) {
            let len = self.lens[i];
            let ts = self.stamp();
            self.record(true, &scratch[off..off + len], ts);
            off += len;
        }
        self.scratch = scratch;
        n
    }

    fn alloc(&mut self) -> Option<Self::Buf> {
        self.inner.alloc()
    }
}

/// Probabilities (0.0 to 1.0) of each fault per received frame, checked in this order:
/// drop, else truncate, else corrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// The frame disappears (its buffer is dropped, which frees it).
    pub drop: f64,
    /// The frame is cut to a uniformly random shorter length (0 to len - 1).
    pub truncate: f64,
    /// One random byte of the frame is XORed with a random non-zero value.
    pub corrupt: f64,
}

/// What a [`FaultInjector`] did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub seen: u64,
    pub dropped: u64,
    pub truncated: u64,
    pub corrupted: u64,
}

/// xorshift64* (Vigna): small, seeded, good enough to pick faults.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // Zero is a fixed point of xorshift; any other seed works.
        XorShift64(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// A [`Port`] whose received frames are dropped, truncated or corrupted at random (seeded, so
/// a failing run can be replayed). Sending is passed through untouched.
pub struct FaultInjector<P: Port> {
    inner: P,
    config: FaultConfig,
    rng: XorShift64,
    counts: FaultCounts,
}

impl<P: Port> FaultInjector<P> {
    pub fn new(inner: P, config: FaultConfig, seed: u64) -> Self {
        FaultInjector { inner, config, rng: XorShift64::new(seed), counts: FaultCounts::default() }
    }
    pub fn counts(&self) -> FaultCounts {
        self.counts
    }
    pub fn inner(&self) -> &P {
        &self.inner
    }
    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }
    pub fn into_inner(self) -> P {
        self.inner
    }
}

impl<P: Port> Port for FaultInjector<P> {
    type Buf = P::Buf;

    fn attach_thread(&mut self) -> Result<crate::port::ThreadAttachment, String> {
        self.inner.attach_thread()
    }

    fn rx_burst(&mut self, out: &mut Burst<Self::Buf>) -> usize {
        let start = out.len();
        self.inner.rx_burst(out);
        let mut i = start;
        while i < out.len() {
            self.counts.seen += 1;
            if self.rng.next_f64() < self.config.drop {
                self.counts.dropped += 1;
                out.remove(i);
                continue;
            }
            let b = &mut out[i];
            if self.rng.next_f64() < self.config.truncate && !b.is_empty() {
                let len = self.rng.below(b.len());
                b.set_len(len);
                self.counts.truncated += 1;
            } else if self.rng.next_f64() < self.config.corrupt && !b.is_empty() {
                let at = self.rng.below(b.len());
                let x = (self.rng.below(255) + 1) as u8;
                b.data_mut()[at] ^= x;
                self.counts.corrupted += 1;
            }
            i += 1;
        }
        out.len() - start
    }

    fn tx_burst(&mut self, bufs: &mut Burst<Self::Buf>) -> usize {
        self.inner.tx_burst(bufs)
    }

    fn alloc(&mut self) -> Option<Self::Buf> {
        self.inner.alloc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neigh::{self, Interface, NeighborTable, Verdict};
    use crate::packet::HeapBuf;
    use crate::port::MemoryPort;
    use crate::stats::CoreStats;
    use crate::wire::ether::{parse_l2, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::path::PathBuf;

    fn frames() -> Vec<Vec<u8>> {
        (0..5u8).map(|i| (0..(60 + i as usize * 7)).map(|j| j as u8 ^ i).collect()).collect()
    }

    #[test]
    fn write_then_read_back() {
        let dir = std::env::temp_dir().join(format!("fulcrum-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.pcap");
        write_pcap(&p, &frames()).unwrap();
        assert_eq!(read_pcap(&p).unwrap(), frames());
        // Timestamps 1 ms apart, Ethernet link type.
        let mut r = PcapReader::new(File::open(&p).unwrap()).unwrap();
        assert_eq!(r.header().datalink, DataLink::ETHERNET);
        let mut ts = Vec::new();
        while let Some(p) = r.next_packet() {
            ts.push(p.unwrap().timestamp);
        }
        assert_eq!(ts, (0..5).map(Duration::from_millis).collect::<Vec<_>>());
        write_pcap(&p, &[]).unwrap();
        assert!(read_pcap(&p).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(read_pcap(&dir.join("missing.pcap")).is_err());
        assert!(read_pcap_from(&b"not a pcap file at all"[..]).is_err());
    }

    #[test]
    fn tap_records_rx_and_what_was_actually_sent() {
        let mut port = MemoryPort::new();
        for f in frames() {
            port.push_rx(&f);
        }
        port.tx_limit = Some(2);
        let mut tap = PcapTap::new(port, Vec::new(), Vec::new(), TapClock::Synthetic).unwrap();
        let mut burst: Burst<HeapBuf> = Burst::new();
        assert_eq!(tap.rx_burst(&mut burst), 5);
        burst.reverse();
        assert_eq!(tap.tx_burst(&mut burst), 2);
        assert_eq!(burst.len(), 3);
        assert_eq!(tap.tx_burst(&mut burst), 2);
        assert!(tap.alloc().is_some());
        let (port, rx, tx) = tap.finish().unwrap();
        assert_eq!(port.tx.len(), 4);
        assert_eq!(read_pcap_from(&rx[..]).unwrap(), frames());
        let mut sent = frames();
        sent.reverse();
        sent.truncate(4);
        assert_eq!(read_pcap_from(&tx[..]).unwrap(), sent);
    }

    #[test]
    fn tap_write_error_is_kept_not_fatal() {
        /// Takes the 24-byte file header, then fails.
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 + b.len() <= 24 {
                    self.0 += b.len();
                    Ok(b.len())
                } else {
                    Err(io::Error::other("disk full"))
                }
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut port = MemoryPort::new();
        port.push_rx(&[1u8; 60]);
        let mut tap = PcapTap::new(port, Full(0), Full(0), TapClock::Wall).unwrap();
        let mut burst: Burst<HeapBuf> = Burst::new();
        assert_eq!(tap.rx_burst(&mut burst), 1);
        assert!(tap.error().is_some());
        assert_eq!(tap.tx_burst(&mut burst), 1);
        assert!(tap.finish().is_err());
    }

    #[test]
    fn fault_injector_is_seeded_and_counts() {
        let run = |seed| {
            let mut port = MemoryPort::new();
            for _ in 0..1000 {
                port.push_rx(&[0u8; 100]);
            }
            let cfg = FaultConfig { drop: 0.1, truncate: 0.1, corrupt: 0.2 };
            let mut fi = FaultInjector::new(port, cfg, seed);
            let mut got = Vec::new();
            loop {
                let mut burst: Burst<HeapBuf> = Burst::new();
                let n = fi.rx_burst(&mut burst);
                assert_eq!(n, burst.len());
                got.extend(burst.iter().map(|b| b.data().to_vec()));
                if fi.inner().rx.is_empty() {
                    break;
                }
            }
            (got, fi.counts())
        };
        let (a, ca) = run(42);
        let (b, cb) = run(42);
        let (c, _) = run(43);
        assert_eq!(a, b);
        assert_eq!(ca, cb);
        assert_ne!(a, c);
        assert_eq!(ca.seen, 1000);
        assert_eq!(a.len() as u64, 1000 - ca.dropped);
        for (lo, n) in [(50, ca.dropped), (50, ca.truncated), (100, ca.corrupted)] {
            assert!(n > lo && n < lo * 3, "{ca:?}");
        }
        let short = a.iter().filter(|f| f.len() < 100).count() as u64;
        assert_eq!(short, ca.truncated);
        let changed = a.iter().filter(|f| f.len() == 100 && f.iter().any(|&x| x != 0)).count() as u64;
        assert_eq!(changed, ca.corrupted);

        // No faults configured: untouched.
        let mut port = MemoryPort::new();
        port.push_rx(&[7u8; 64]);
        let mut fi = FaultInjector::new(port, FaultConfig::default(), 0);
        let mut burst: Burst<HeapBuf> = Burst::new();
        assert_eq!(fi.rx_burst(&mut burst), 1);
        assert_eq!(burst[0].data(), &[7u8; 64]);
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn fixture_iface() -> Interface {
        let mac = [0x02, 0xf1, 0, 0, 0, 1];
        Interface {
            mac,
            ipv4: Some((Ipv4Addr::new(10, 10, 0, 2), 24)),
            ipv6: Some(("fd00:10::2".parse().unwrap(), 64)),
            ipv6_link_local: crate::wire::ndp::eui64_link_local(mac),
            next_hop_v4: Some(Ipv4Addr::new(10, 10, 0, 1)),
            next_hop_v6: Some("fd00:10::1".parse().unwrap()),
            mtu: 1500,
        }
    }

    /// The committed golden fixtures read back, and the ARP/NDP/ping ones (which only `neigh` is
    /// involved in) replayed through the handlers: a cross-check of scapy against our code.
    /// The full replay of every fixture through the worker lives with the worker.
    #[test]
    fn fixtures_read_back_and_neighbour_cases_match() {
        for case in ["arp", "ndp", "ping_vip"] {
            let input = read_pcap(&fixture(&format!("{case}.in.pcap"))).unwrap();
            let want = read_pcap(&fixture(&format!("{case}.out.pcap"))).unwrap();
            let drops = std::fs::read_to_string(fixture(&format!("{case}.drops"))).unwrap();
            let want_drops: Vec<&str> = drops.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(!input.is_empty());
            let iface = fixture_iface();
            let vip4 = IpAddr::V4(Ipv4Addr::new(10, 20, 0, 10));
            let vip6 = IpAddr::V6("fd00:20::10".parse::<Ipv6Addr>().unwrap());
            let is_vip = |ip: IpAddr| ip == vip4 || ip == vip6;
            let mut neigh = NeighborTable::new(16);
            let mut stats = CoreStats::default();
            let (mut got, mut got_drops) = (Vec::new(), Vec::new());
            for f in &input {
                let mut b = HeapBuf::from_slice(f);
                let l2 = parse_l2(f).unwrap();
                let v = match l2.ethertype {
                    ETHERTYPE_ARP => neigh::handle_arp(&mut b, &l2, &iface, &is_vip, &mut neigh, 0, &mut stats),
                    ETHERTYPE_IPV4 => neigh::handle_icmpv4_local(&mut b, &l2, iface.mac, &mut stats),
                    ETHERTYPE_IPV6 => {
                        neigh::handle_icmpv6_local(&mut b, &l2, &iface, &is_vip, &mut neigh, 0, &mut stats)
                    }
                    et => panic!("{case}: unexpected ethertype {et:#x}"),
                };
                match v {
                    Verdict::Tx => got.push(b.data().to_vec()),
                    Verdict::Drop(r) => got_drops.push(r.name()),
                    Verdict::Consumed => {}
                }
            }
            assert_eq!(got.len(), want.len(), "{case}: number of frames sent");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{case}: frame {i}");
            }
            assert_eq!(got_drops, want_drops, "{case}: drops");
        }
    }
}
