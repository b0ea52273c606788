//! A worker's user-space TCP: smoltcp, sharded as DESIGN.md measured it must be. smoltcp scans
//! every socket of the set it is given for every packet and has no listen backlog, so each shard
//! is a small socket set with a few sockets, our own 4-tuple table says which shard and socket a
//! segment belongs to, a listening socket is made at SYN time in a shard with no other listener
//! (one listener takes one handshake), and only shards that received segments, have sockets with
//! work or a timer due are polled.
//!
//! All shards share one IP-only interface (`Medium::Ip`: Ethernet, ARP and NDP stay the
//! worker's). smoltcp keeps nothing about sockets in an `Interface` (addresses, routes, the
//! random source and the clock; every poll takes the socket set as an argument), so one per
//! shard only added ~600 bytes of state per connection, read cold on every segment at 10,000
//! connections; the shared one stays in cache.

use super::ack_pace::QUICK_ACK_MS;
use super::buffers::BufferPool;
use super::timer_wheel::TimerWheel;
use ahash::AHashMap;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpCidr, IpEndpoint};
use std::net::Ipv4Addr;

/// Sockets per shard. DESIGN.md measured one socket per interface fastest at every
/// connection count (284 / 517 / 1,134 ns per request at 100 / 1,000 / 10,000 connections,
/// against 387 / 670 / 1,326 for eight); once egress is polled until a shard has nothing
/// left to send and its timer is asked for afterwards, each poll scans every socket of the shard
/// three times, and with eight the proxy bench fell from 95k to 75-79k requests/s at 10,000
/// connections. One socket per shard: 95k there, and 180-210k at 100 (186k with eight).
pub const SHARD_SOCKETS: usize = 1;

/// Egress rounds per shard and poll: smoltcp sends at most one segment per socket per round, so
/// a socket with a window's worth to send needs several; the cap keeps one bulk sender from
/// holding the worker (what is left goes out on the next poll).
const EGRESS_ROUNDS: usize = 64;

/// One socket: its shard and its handle there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRef {
    pub shard: u32,
    pub handle: SocketHandle,
}

/// A demux entry: the socket, and where its state lies, so that `prefetch` can start loading
/// it from the one look-up it makes anyway (reading it from the shard would wait for the
/// shard's line first).
#[derive(Clone, Copy, Debug)]
struct Demuxed {
    r: SockRef,
    /// The `tcp::Socket` in its shard's socket set (each set's storage is allocated for
    /// exactly its sockets and never grows, so it does not move).
    sock: usize,
}

/// (remote address, remote port, local port): unique, since the stack's local addresses
/// (the L7 address for clients, the appliance's own for upstreams) use disjoint ports.
pub type ConnKey = (u32, u16, u16);

/// The device smoltcp polls, made for each call over the stack's shared packet buffers: a
/// segment is processed as it arrives (no per-shard queue to copy it into and find again cold),
/// and what any shard sends lands in one list that stays in cache, whatever the connections.
struct Io<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut Vec<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

pub struct RxTok<'a>(&'a [u8]);
pub struct TxTok<'a> {
    tx: &'a mut Vec<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
}

impl smoltcp::phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b.resize(len, 0);
        let r = f(&mut b);
        self.tx.push(b);
        r
    }
}

impl<'a> Device for Io<'a> {
    type RxToken<'b>
        = RxTok<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxTok<'b>
    where
        Self: 'b;
    fn receive(&mut self, _: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let p = self.rx.take()?;
        Some((RxTok(p), TxTok { tx: self.tx, free: self.free }))
    }
    fn transmit(&mut self, _: Instant) -> Option<TxTok<'_>> {
        Some(TxTok { tx: self.tx, free: self.free })
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// A socket's two rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ring {
    Rx,
    Tx,
}

/// One socket's buffers. Each socket has a stand-in for each of its two rings, its own for
/// its life (address space only: `BufferPool::reserved`); a ring with bytes in it has a
/// buffer of memory lent from the stack's pools instead, given back as soon as the ring is
/// empty again. An idle keep-alive connection then holds no buffer memory, and the buffers
/// in use are the few that the last requests used, still in cache, instead of one pair per
/// connection read cold (16 KiB each; 655 MB at 10,000 proxied connections before).
#[derive(Clone, Copy, Debug, Default)]
struct Lent {
    handle: SocketHandle,
    stand_in_rx: usize,
    stand_in_tx: usize,
    /// The buffer lent for the receive ring, or 0 while it has its stand-in.
    rx: usize,
    /// The buffer lent for the transmit ring, or 0.
    tx: usize,
}

struct Shard {
    sockets: SocketSet<'static>,
    /// The first `used` are its sockets' buffers (in the shard itself: one line fewer to
    /// load than a list of its own).
    lent: [Lent; SHARD_SOCKETS],
    used: usize,
    /// A socket in Listen state (at most one per shard).
    listening: bool,
    /// In `Stack::dirty`.
    dirty: bool,
    /// In `Stack::roomy`.
    roomy: bool,
    /// When its sockets next need a poll without new segments (smoltcp's `poll_at`, in
    /// milliseconds), as of its last poll.
    wanted: Option<u64>,
    /// The millisecond of its timer wheel entry that counts (others are stale), never after
    /// `wanted`. A later `wanted` leaves the entry in place, to file the new time when it fires
    /// (see `due_shards`): a keep-alive connection's retransmission and delayed-ACK times move
    /// later with every segment, and filing each move took an entry, and a cold look at the
    /// shard when it expired, two or three times a request.
    filed: Option<u64>,
}

/// Where a socket lies in memory (from [`Stack::socket_at`]): only to prefetch it, never
/// read through, so a stale one costs a useless prefetch and nothing else. (Its rings need
/// none: a ring about to take bytes gets the buffer its pool gave back last, in cache.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketAt {
    sock: usize,
}

/// Starts loading a socket's lines (`at` from [`Stack::socket_at`]) before it is worked on.
#[inline(always)]
pub fn prefetch_socket(at: SocketAt) {
    crate::mem::prefetch_all(at.sock as *const tcp::Socket);
}

/// Socket buffer sizes and addresses.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Where clients connect (the L7 address).
    pub l7_addr: Ipv4Addr,
    /// The appliance's own address: the source of upstream connections.
    pub own_addr: Ipv4Addr,
    pub mtu: usize,
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    pub seed: u64,
}

/// How much of a lent buffer's start is prefetched: an HTTP head or a keep-alive request's
/// segment (4 lines; 2 were slower at 10,000 connections).
const RING_PREFETCH_BYTES: usize = 256;

/// Starts loading the first lines of the buffer `pool` lends next, where the next ring to get
/// one places its bytes (a ring given a buffer starts at its first byte). A buffer given back
/// just now is in cache already; one given back long ago (a transmit ring's, held until the
/// peer acknowledged) is not, and is needed a request or so later.
#[inline(always)]
fn prefetch_next(pool: &BufferPool) {
    if let Some(p) = pool.next() {
        crate::mem::prefetch_bytes(p, RING_PREFETCH_BYTES);
    }
}

/// Whether an IPv4 packet's TCP segment carries payload (true when the headers do not say:
/// lending a buffer is never wrong, only a little work).
fn tcp_payload(ip: &[u8]) -> bool {
    let ihl = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
    match (ip.get(2..4), ip.get(ihl + 12)) {
        (Some(len), Some(&off)) => usize::from(u16::from_be_bytes([len[0], len[1]])) > ihl + usize::from(off >> 4) * 4,
        _ => true,
    }
}

pub struct Stack {
    cfg: StackConfig,
    /// The one interface every shard's sockets are polled through (see the module's comment).
    iface: Interface,
    shards: Vec<Shard>,
    demux: AHashMap<ConnKey, Demuxed>,
    /// Sockets to forget once closed (after their last segment went out).
    removals: Vec<(SockRef, ConnKey)>,
    /// Shards with segments queued or sockets that changed: to poll.
    dirty: Vec<u32>,
    /// `dirty`'s other buffer: swapped in while the dirty shards are polled.
    scratch: Vec<u32>,
    /// Shards with room for a socket (some may have filled since: checked when taken).
    roomy: Vec<u32>,
    /// When shards' sockets next need a poll without new segments.
    timers: TimerWheel,
    /// Shards whose entry fired before their time, with that time: filed again after expiry.
    refile: Vec<(u64, u32)>,
    /// IP packets the shards sent, in order, until `poll_egress` hands them out.
    out: Vec<Vec<u8>>,
    /// Packet buffers to reuse.
    free: Vec<Vec<u8>>,
    now: Instant,
    // Declared after `shards`: fields drop in order, so the sockets holding these buffers go
    // first.
    /// Buffers lent to rings with bytes in them (see `Lent`).
    rx_buffers: BufferPool,
    tx_buffers: BufferPool,
    /// Sockets' own stand-ins for idle rings.
    rx_stand_ins: BufferPool,
    tx_stand_ins: BufferPool,
}

impl Stack {
    pub fn new(cfg: StackConfig) -> Stack {
        let mut out = Vec::new();
        let mut free = Vec::new();
        let mut dev = Io { rx: None, tx: &mut out, free: &mut free, mtu: cfg.mtu };
        let mut config = Config::new(HardwareAddress::Ip);
        // smoltcp's default seed is 0: predictable initial sequence numbers.
        config.random_seed = cfg.seed;
        let now = Instant::from_millis(0);
        let mut iface = Interface::new(config, &mut dev, now);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(cfg.l7_addr.into(), 32));
            let _ = a.push(IpCidr::new(cfg.own_addr.into(), 32));
        });
        // A /32 interface still needs a route to answer anyone (DESIGN.md); the gateway is
        // never resolved on an IP-only interface.
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.own_addr);
        Stack {
            iface,
            rx_buffers: BufferPool::new(cfg.rx_buffer),
            tx_buffers: BufferPool::new(cfg.tx_buffer),
            rx_stand_ins: BufferPool::reserved(cfg.rx_buffer),
            tx_stand_ins: BufferPool::reserved(cfg.tx_buffer),
            cfg,
            shards: Vec::new(),
            demux: AHashMap::new(),
            removals: Vec::new(),
            dirty: Vec::new(),
            scratch: Vec::new(),
            roomy: Vec::new(),
            timers: TimerWheel::new(0),
            refile: Vec::new(),
            out,
            free,
            now,
        }
    }

    /// Bytes of memory held for socket buffers (lent to rings now, or kept for the next).
    pub fn buffer_bytes(&self) -> usize {
        self.rx_buffers.held_bytes() + self.tx_buffers.held_bytes()
    }

    /// Buffers lent to rings now: receive, transmit.
    pub fn buffers_lent(&self) -> (usize, usize) {
        (self.rx_buffers.in_use(), self.tx_buffers.in_use())
    }

    /// Sockets alive (each holds two stand-ins), listeners included.
    pub fn sockets_in_use(&self) -> usize {
        self.rx_stand_ins.in_use()
    }

    pub fn set_now(&mut self, now_ms: u64) {
        self.now = Instant::from_millis(now_ms as i64);
    }

    pub fn now_ms(&self) -> u64 {
        self.now.total_millis() as u64
    }

    fn new_shard(&mut self) -> u32 {
        self.shards.push(Shard {
            // Room for exactly the shard's sockets: a growing Vec would hold 4 slots of ~470
            // bytes for one socket.
            sockets: SocketSet::new(Vec::with_capacity(SHARD_SOCKETS)),
            lent: [Lent::default(); SHARD_SOCKETS],
            used: 0,
            listening: false,
            dirty: false,
            roomy: true,
            wanted: None,
            filed: None,
        });
        let i = (self.shards.len() - 1) as u32;
        self.roomy.push(i);
        i
    }

    /// A shard with room for one more socket (and, for a listener, no listener yet): one of the
    /// last shards to have room, so that the cost does not grow with the shards.
    fn shard_with_room(&mut self, listener: bool) -> u32 {
        let mut k = self.roomy.len();
        // Listeners live only until their SYN is processed: a few shards back is far enough.
        while k > 0 && self.roomy.len() - k < 4 {
            k -= 1;
            let i = self.roomy[k];
            let s = &mut self.shards[i as usize];
            if s.used >= SHARD_SOCKETS {
                s.roomy = false;
                self.roomy.swap_remove(k);
                continue;
            }
            if !(listener && s.listening) {
                return i;
            }
        }
        self.new_shard()
    }

    /// A new socket on its stand-ins, and their addresses (see `add` and `discard`).
    fn socket(&mut self) -> (tcp::Socket<'static>, usize, usize) {
        // SAFETY: the stand-ins go back to their pools only when the socket is gone
        // (`discard`, `flush_removals`), and the pools outlive every socket (field order of
        // `Stack`).
        let (rx, tx) = unsafe { (self.rx_stand_ins.take(), self.tx_stand_ins.take()) };
        let (rx_at, tx_at) = (rx.as_mut_ptr() as usize, tx.as_mut_ptr() as usize);
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_nagle_enabled(false);
        s.set_ack_delay(Some(Duration::from_millis(QUICK_ACK_MS)));
        (s, rx_at, tx_at)
    }

    /// Puts a socket from `socket` into a shard.
    fn add(&mut self, shard: u32, sock: (tcp::Socket<'static>, usize, usize)) -> SocketHandle {
        let s = &mut self.shards[shard as usize];
        let handle = s.sockets.add(sock.0);
        s.lent[s.used] = Lent { handle, stand_in_rx: sock.1, stand_in_tx: sock.2, rx: 0, tx: 0 };
        s.used += 1;
        // A shard that fills stays in `roomy` until `shard_with_room` passes it (its check is
        // the one that counts), so filling one costs no search of the list.
        handle
    }

    /// Drops a socket from `socket` that was never added.
    fn discard(&mut self, sock: (tcp::Socket<'static>, usize, usize)) {
        drop(sock.0);
        // SAFETY: the socket that held them is gone; each is given back once.
        unsafe {
            self.rx_stand_ins.give_back(sock.1 as *mut u8);
            self.tx_stand_ins.give_back(sock.2 as *mut u8);
        }
    }

    /// Lends socket `r` a buffer for its `ring` if it has its stand-in there: the receive ring
    /// before a segment with payload is processed (the only time smoltcp writes to it), the
    /// transmit ring before the caller may queue bytes (`tcp_to_send`).
    fn lend(&mut self, r: SockRef, ring: Ring) {
        let s = &mut self.shards[r.shard as usize];
        let Some(l) = s.lent[..s.used].iter_mut().find(|l| l.handle == r.handle) else { return };
        let (lent, pool) = match ring {
            Ring::Rx => (&mut l.rx, &mut self.rx_buffers),
            Ring::Tx => (&mut l.tx, &mut self.tx_buffers),
        };
        if *lent != 0 {
            return;
        }
        // SAFETY: held by the socket until `give_back_idle` or `flush_removals` returns it.
        let buf = unsafe { pool.take() };
        prefetch_next(pool);
        let at = buf.as_mut_ptr() as usize;
        let sock = s.sockets.get_mut::<tcp::Socket>(r.handle);
        let swapped = match ring {
            Ring::Rx => sock.swap_recv_storage(buf),
            Ring::Tx => sock.swap_send_storage(buf),
        };
        match swapped {
            Ok(()) => *lent = at,
            // A stand-in is swapped in only for an idle ring, and bytes go in only after this:
            // not reached. Then the socket keeps its stand-in (memory on first touch).
            // SAFETY: the socket refused it; given back once.
            Err(b) => unsafe { pool.give_back(b.as_mut_ptr()) },
        }
    }

    /// Takes back the buffers lent to shard `i`'s sockets whose rings are empty again (all
    /// read; all sent and acknowledged), putting their stand-ins back.
    fn give_back_idle(&mut self, i: u32) {
        let s = &mut self.shards[i as usize];
        for l in s.lent[..s.used].iter_mut().filter(|l| l.rx != 0 || l.tx != 0) {
            let sock = s.sockets.get_mut::<tcp::Socket>(l.handle);
            for ring in [Ring::Rx, Ring::Tx] {
                let (lent, stand_in, size, pool, idle) = match ring {
                    Ring::Rx => {
                        (&mut l.rx, l.stand_in_rx, self.cfg.rx_buffer, &mut self.rx_buffers, sock.recv_storage_idle())
                    }
                    Ring::Tx => {
                        (&mut l.tx, l.stand_in_tx, self.cfg.tx_buffer, &mut self.tx_buffers, sock.send_storage_idle())
                    }
                };
                if *lent == 0 || !idle {
                    continue;
                }
                // SAFETY: the stand-in is this socket's own and not in use (the socket has the
                // lent buffer, which it lets go of here); the pool outlives the socket.
                let stand_in = unsafe { std::slice::from_raw_parts_mut(stand_in as *mut u8, size) };
                let swapped = match ring {
                    Ring::Rx => sock.swap_recv_storage(stand_in),
                    Ring::Tx => sock.swap_send_storage(stand_in),
                };
                if swapped.is_ok() {
                    // SAFETY: the socket no longer holds it; lent once, given back once.
                    unsafe { pool.give_back(*lent as *mut u8) };
                    prefetch_next(pool);
                    *lent = 0;
                }
            }
        }
    }

    /// Prefetches what `ingress` will touch for this connection's segment: its shard (the
    /// socket set's lines `poll_ingress_single` reads) and its socket. (The receive buffer a
    /// payload goes to is lent then: the one given back last, prefetched when it was.)
    #[inline]
    pub fn prefetch(&self, key: ConnKey) {
        if let Some(d) = self.demux.get(&key) {
            crate::mem::prefetch_all(&self.shards[d.r.shard as usize] as *const Shard);
            crate::mem::prefetch_all(d.sock as *const tcp::Socket);
        }
    }

    /// The demux entry for socket `r` (just added to its shard).
    fn demuxed(&self, r: SockRef) -> Demuxed {
        Demuxed { r, sock: self.view(r) as *const tcp::Socket as usize }
    }

    /// Takes one IP packet (a TCP segment to the L7 address or to an upstream connection's
    /// local port). A SYN to `listen_port` from an unknown peer gets a new listening socket.
    /// Returns the socket it went to and whether that socket was made for it; None for a
    /// segment no socket wants (the caller drops and counts it).
    pub fn ingress(&mut self, ip: &[u8], key: ConnKey, syn: bool, listen_port: bool) -> Option<(SockRef, bool)> {
        let (r, made) = match self.demux.get(&key) {
            Some(d) => (d.r, false),
            None if syn && listen_port => {
                let shard = self.shard_with_room(true);
                let mut sock = self.socket();
                if sock.0.listen(IpEndpoint::new(self.cfg.l7_addr.into(), key.2)).is_err() {
                    self.discard(sock);
                    return None;
                }
                let handle = self.add(shard, sock);
                self.shards[shard as usize].listening = true;
                let r = SockRef { shard, handle };
                self.demux.insert(key, self.demuxed(r));
                (r, true)
            }
            None => return None,
        };
        if tcp_payload(ip) {
            self.lend(r, Ring::Rx);
        }
        let s = &mut self.shards[r.shard as usize];
        let mut io = Io { rx: Some(ip), tx: &mut self.out, free: &mut self.free, mtu: self.cfg.mtu };
        self.iface.poll_ingress_single(self.now, &mut io, &mut s.sockets);
        if s.listening {
            s.listening = s.sockets.iter().any(|(_, sock)| match sock {
                smoltcp::socket::Socket::Tcp(t) => t.state() == tcp::State::Listen,
                #[allow(unreachable_patterns)]
                _ => false,
            });
        }
        self.mark(r.shard);
        Some((r, made))
    }

    fn mark(&mut self, shard: u32) {
        let s = &mut self.shards[shard as usize];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(shard);
        }
    }

    /// Adds the shards that received segments or whose sockets the caller touched since the
    /// last `poll_egress` (their sockets have news for the caller) to `busy`.
    pub fn busy_shards(&self, busy: &mut Vec<u32>) {
        busy.extend_from_slice(&self.dirty);
    }

    /// Sends what sockets have to send (data, ACKs, retransmissions due) on the given shards
    /// and the dirty ones; `out` gets each IP packet. Then files each polled shard's next
    /// timer.
    pub fn poll_egress(&mut self, also: &[u32], mut out: impl FnMut(&[u8])) {
        for &a in also {
            self.mark(a);
        }
        let now = self.now;
        let now_ms = self.now_ms();
        let fresh = std::mem::take(&mut self.scratch);
        let mut shards = std::mem::replace(&mut self.dirty, fresh);
        let mut again = Vec::new();
        // What ingress answered at once (an RST, a challenge ACK) goes first.
        self.free.extend(self.out.drain(..).inspect(|p| out(p)));
        for &i in &shards {
            let s = &mut self.shards[i as usize];
            s.dirty = false;
            let mut rounds = 0;
            loop {
                let mut io = Io { rx: None, tx: &mut self.out, free: &mut self.free, mtu: self.cfg.mtu };
                if self.iface.poll_egress(now, &mut io, &mut s.sockets) != PollResult::SocketStateChanged {
                    break;
                }
                self.free.extend(self.out.drain(..).inspect(|p| out(p)));
                rounds += 1;
                if rounds == EGRESS_ROUNDS {
                    again.push(i);
                    break;
                }
            }
            // Every socket with news passes here after its segments and its caller's reads
            // and writes (both mark the shard): where rings that emptied give their buffers
            // back.
            self.give_back_idle(i);
            let s = &mut self.shards[i as usize];
            // Anything left is for a timer (or for the next poll, when capped): smoltcp's
            // microseconds rounded up to the wheel's milliseconds.
            let at = self.iface.poll_at(now, &s.sockets).map(|t| (t.total_micros().max(0) as u64).div_ceil(1000));
            let at = at.map(|t| t.max(now_ms + 1));
            s.wanted = at;
            if let Some(t) = at.filter(|&t| s.filed.is_none_or(|f| t < f)) {
                s.filed = Some(self.timers.schedule(t, i));
            }
        }
        for i in again {
            self.mark(i);
        }
        shards.clear();
        self.scratch = shards;
    }

    /// Shards whose timers are due (retransmission, delayed ACK, keep-alive, TIME-WAIT).
    pub fn due_shards(&mut self, out: &mut Vec<u32>) {
        let (shards, refile) = (&mut self.shards, &mut self.refile);
        let now_ms = self.now.total_millis().max(0) as u64;
        self.timers.expire(now_ms, |at, i| {
            let s = &mut shards[i as usize];
            if s.filed == Some(at) {
                s.filed = None;
                match s.wanted {
                    Some(w) if w <= now_ms => out.push(i),
                    Some(w) => refile.push((w, i)),
                    None => {}
                }
            }
        });
        for (w, i) in self.refile.drain(..) {
            self.shards[i as usize].filed = Some(self.timers.schedule(w, i));
        }
    }

    /// A socket to read or change, but not to send on (see `tcp_to_send`): its shard is polled
    /// at the end of this run (what the caller does may open the window or close it).
    pub fn tcp(&mut self, r: SockRef) -> &mut tcp::Socket<'static> {
        self.mark(r.shard);
        self.shards[r.shard as usize].sockets.get_mut::<tcp::Socket>(r.handle)
    }

    /// A socket to queue bytes on (and to read or change): it is lent a transmit buffer if
    /// its ring has none. Bytes queued through `tcp` would go to the ring's stand-in: a crash
    /// with debug assertions, a page of memory the socket keeps without them.
    pub fn tcp_to_send(&mut self, r: SockRef) -> &mut tcp::Socket<'static> {
        self.lend(r, Ring::Tx);
        self.tcp(r)
    }

    /// How long the socket may hold back an ACK for the peer's next segments (see `ack_pace`).
    /// A delayed-ACK timer already running keeps its time; nothing is due to send, so the
    /// shard is not marked for a poll.
    pub fn set_ack_delay(&mut self, r: SockRef, ms: u64) {
        let s = self.shards[r.shard as usize].sockets.get_mut::<tcp::Socket>(r.handle);
        s.set_ack_delay(Some(Duration::from_millis(ms)));
    }

    /// A socket's state, without marking its shard for a poll.
    pub fn state(&self, r: SockRef) -> tcp::State {
        self.view(r).state()
    }

    /// Where socket `r` lies, for [`prefetch_socket`]. Right while the socket lives: a
    /// shard's socket storage is allocated once, and never grows (see `prefetch`).
    pub fn socket_at(&self, r: SockRef) -> SocketAt {
        SocketAt { sock: self.view(r) as *const tcp::Socket as usize }
    }

    /// A socket to look at only: its shard is not marked for a poll (see `tcp`).
    pub fn view(&self, r: SockRef) -> &tcp::Socket<'static> {
        self.shards[r.shard as usize].sockets.get::<tcp::Socket>(r.handle)
    }

    /// Opens a connection from the appliance's address and `local_port` to `remote`.
    pub fn connect(&mut self, remote: (Ipv4Addr, u16), local_port: u16) -> Option<SockRef> {
        let shard = self.shard_with_room(false);
        let mut sock = self.socket();
        let remote_ep = IpEndpoint::new(remote.0.into(), remote.1);
        let local = IpEndpoint::new(self.cfg.own_addr.into(), local_port);
        if sock.0.connect(self.iface.context(), remote_ep, local).is_err() {
            self.discard(sock);
            return None;
        }
        let handle = self.add(shard, sock);
        let r = SockRef { shard, handle };
        self.demux.insert((u32::from(remote.0), remote.1, local_port), self.demuxed(r));
        self.mark(shard);
        Some(r)
    }

    pub fn lookup(&self, key: ConnKey) -> Option<SockRef> {
        self.demux.get(&key).map(|d| d.r)
    }

    /// Forgets a socket once it is closed (closed or in TIME-WAIT); until then it stays, so
    /// that its FIN or RST still goes out and late segments still find it.
    pub fn remove_later(&mut self, r: SockRef, key: ConnKey) {
        self.removals.push((r, key));
    }

    /// Forgets the sockets queued for removal that are done.
    pub fn flush_removals(&mut self) {
        let mut i = 0;
        while i < self.removals.len() {
            let (r, key) = self.removals[i];
            let st = self.state(r);
            if matches!(st, tcp::State::Closed | tcp::State::TimeWait) {
                let s = &mut self.shards[r.shard as usize];
                drop(s.sockets.remove(r.handle));
                s.used -= 1;
                if !s.roomy {
                    s.roomy = true;
                    self.roomy.push(r.shard);
                }
                if let Some(i) = s.lent[..=s.used].iter().position(|l| l.handle == r.handle) {
                    let l = s.lent[i];
                    s.lent.swap(i, s.used);
                    // SAFETY: the socket that held them was just dropped; each given back once.
                    unsafe {
                        self.rx_stand_ins.give_back(l.stand_in_rx as *mut u8);
                        self.tx_stand_ins.give_back(l.stand_in_tx as *mut u8);
                        if l.rx != 0 {
                            self.rx_buffers.give_back(l.rx as *mut u8);
                        }
                        if l.tx != 0 {
                            self.tx_buffers.give_back(l.tx as *mut u8);
                        }
                    }
                }
                if self.demux.get(&key).is_some_and(|d| d.r == r) {
                    self.demux.remove(&key);
                }
                self.removals.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    pub fn mark_dirty(&mut self, r: SockRef) {
        self.mark(r.shard);
    }
}

#[cfg(test)]
mod tests {
    use super::{SocketAt, Stack, StackConfig};
    use crate::l7::sim::Host;
    use std::net::Ipv4Addr;

    /// `prefetch` loads what the demux entry says; the entry must say where the socket and its
    /// receive ring are, also after sockets went and their slots and buffers were reused.
    #[test]
    fn demux_entries_and_socket_at_point_at_their_sockets() {
        let mut st = Stack::new(StackConfig {
            l7_addr: Ipv4Addr::new(10, 0, 0, 100),
            own_addr: Ipv4Addr::new(10, 0, 0, 2),
            mtu: 1500,
            rx_buffer: 4096,
            tx_buffer: 4096,
            seed: 1,
        });
        let backend = Ipv4Addr::new(10, 0, 0, 7);
        let check = |st: &mut Stack, ports: std::ops::Range<u16>| {
            for port in ports {
                let key = (u32::from(backend), 8080, port);
                let d = *st.demux.get(&key).expect("demuxed");
                let sock = st.view(d.r) as *const _ as usize;
                assert_eq!(d.sock, sock, "port {port}: socket address");
                let s = &st.shards[d.r.shard as usize];
                assert!(s.lent[..s.used].iter().any(|l| l.handle == d.r.handle), "port {port}: its buffers");
                assert_eq!(st.socket_at(d.r), SocketAt { sock }, "port {port}: socket_at");
            }
        };
        for port in 40000..40100 {
            st.connect((backend, 8080), port).unwrap();
        }
        check(&mut st, 40000..40100);
        // Half of them go; new ones take their shards' slots and their buffers.
        for port in 40000..40050 {
            let r = st.lookup((u32::from(backend), 8080, port)).unwrap();
            st.tcp(r).abort();
            st.remove_later(r, (u32::from(backend), 8080, port));
        }
        st.poll_egress(&[], |_| {});
        st.flush_removals();
        assert_eq!(st.sockets_in_use(), 50, "the aborted sockets went");
        for port in 41000..41050 {
            st.connect((backend, 8080), port).unwrap();
        }
        check(&mut st, 40050..40100);
        check(&mut st, 41000..41050);
    }

    /// A connection whose retransmission time moves later with every acknowledged send keeps
    /// one timer wheel entry, not one per move, and still retransmits when the last move says:
    /// the entry that fires early is filed again for the later time, without a poll.
    #[test]
    fn a_timer_that_moves_later_keeps_one_entry_and_fires_at_its_last_time() {
        let (backend, own) = (Ipv4Addr::new(10, 0, 0, 7), Ipv4Addr::new(10, 0, 0, 2));
        let mut st = Stack::new(StackConfig {
            l7_addr: Ipv4Addr::new(10, 0, 0, 100),
            own_addr: own,
            mtu: 1500,
            rx_buffer: 4096,
            tx_buffer: 4096,
            seed: 1,
        });
        let mut server = Host::new(backend, 2);
        let ls = server.socket(4096);
        server.tcp(ls).listen(8080).unwrap();
        let key = (u32::from(backend), 8080, 40000);
        let r = st.connect((backend, 8080), 40000).unwrap();
        // One millisecond: the stack's due shards and sends, then the server's answers (or
        // nothing, when the link is cut). Returns the stack's segments carrying data.
        let tick = |st: &mut Stack, server: &mut Host, now: u64, linked: bool| -> usize {
            st.set_now(now);
            let mut due = Vec::new();
            st.due_shards(&mut due);
            let mut sent = Vec::new();
            st.poll_egress(&due, |p| sent.push(p.to_vec()));
            let data = sent.iter().filter(|p| p.len() > 40).count();
            if linked {
                server.dev.rx.extend(sent);
                server.poll(now);
                for p in server.dev.tx.drain(..).collect::<Vec<_>>() {
                    st.ingress(&p, key, false, false);
                }
            }
            data
        };
        let mut now = 0;
        while now < 100 {
            now += 1;
            tick(&mut st, &mut server, now, true);
        }
        assert_eq!(st.state(r), smoltcp::socket::tcp::State::Established);
        // 50 sends 20 ms apart, each acknowledged: each moves the retransmission time later.
        for k in 0..50u8 {
            st.tcp_to_send(r).send_slice(&[k; 100]).unwrap();
            for _ in 0..20 {
                now += 1;
                tick(&mut st, &mut server, now, true);
                let _ = server.tcp(ls).recv(|d| (d.len(), ()));
            }
        }
        assert!(st.timers.len() <= 2, "{} wheel entries for one connection", st.timers.len());
        // One more send, never acknowledged: its retransmission comes one minimum RTO
        // (smoltcp's 1 s, the round trip here being nothing) after it, not before.
        st.tcp_to_send(r).send_slice(&[9; 100]).unwrap();
        now += 1;
        let sent_at = now;
        assert_eq!(tick(&mut st, &mut server, now, false), 1, "the send");
        let mut resent = None;
        while now < sent_at + 1500 && resent.is_none() {
            now += 1;
            if tick(&mut st, &mut server, now, false) > 0 {
                resent = Some(now - sent_at);
            }
        }
        let after = resent.expect("retransmitted");
        assert!((1000..=1002).contains(&after), "retransmitted {after} ms after the send");
    }

    /// Buffers are lent to rings with bytes in them only: a connection that sent its request
    /// and read its response holds none, so buffer memory follows the bytes in flight, not the
    /// connections open (200 here, one at a time: one buffer each way, where one per socket
    /// took 2 chunks each way), and a buffer given back is the next one lent. Bytes held out
    /// of order keep their buffer until the hole is filled and they are read.
    #[test]
    fn buffers_are_lent_to_rings_with_bytes_only() {
        let (backend, own) = (Ipv4Addr::new(10, 0, 0, 7), Ipv4Addr::new(10, 0, 0, 2));
        let mut st = Stack::new(StackConfig {
            l7_addr: Ipv4Addr::new(10, 0, 0, 100),
            own_addr: own,
            mtu: 1500,
            rx_buffer: 16384,
            tx_buffer: 16384,
            seed: 1,
        });
        let mut server = Host::new(backend, 2);
        const N: u16 = 200;
        let listeners: Vec<_> = (0..N)
            .map(|_| {
                let h = server.socket(4096);
                server.tcp(h).listen(8080).unwrap();
                server.tcp(h).set_nagle_enabled(false);
                h
            })
            .collect();
        let conns: Vec<_> = (0..N).map(|i| st.connect((backend, 8080), 40000 + i).unwrap()).collect();
        // The stack's due shards and sends to the server, and what the server sends back
        // (unless `hold` keeps it for the test to deliver).
        let mut now = 0;
        let mut tick = |st: &mut Stack, server: &mut Host, hold: bool| -> Vec<Vec<u8>> {
            now += 1;
            st.set_now(now);
            let mut due = Vec::new();
            st.due_shards(&mut due);
            let mut sent = Vec::new();
            st.poll_egress(&due, |p| sent.push(p.to_vec()));
            server.dev.rx.extend(sent);
            server.poll(now);
            let back: Vec<Vec<u8>> = server.dev.tx.drain(..).collect();
            if hold {
                return back;
            }
            for p in back {
                let port = u16::from_be_bytes([p[22], p[23]]);
                st.ingress(&p, (u32::from(backend), 8080, port), false, false);
            }
            Vec::new()
        };
        for _ in 0..50 {
            tick(&mut st, &mut server, false);
        }
        assert!(conns.iter().all(|&r| st.state(r) == smoltcp::socket::tcp::State::Established));
        assert_eq!(st.buffers_lent(), (0, 0), "handshakes carry no bytes");
        let peer = |server: &mut Host, port: u16| {
            *listeners.iter().find(|&&h| server.tcp(h).remote_endpoint().is_some_and(|e| e.port == port)).unwrap()
        };
        let mut last_rx = None;
        for (i, &r) in conns.iter().enumerate() {
            let port = 40000 + i as u16;
            st.tcp_to_send(r).send_slice(&[7; 300]).unwrap();
            assert_eq!(st.buffers_lent().1, 1, "a transmit buffer for the request");
            // Sent, acknowledged (the server's delayed ACK), answered.
            for _ in 0..30 {
                tick(&mut st, &mut server, false);
            }
            assert_eq!(st.buffers_lent().1, 0, "connection {i}: acknowledged, its transmit buffer went back");
            let h = peer(&mut server, port);
            assert_eq!(server.tcp(h).recv(|d| (d.len(), d.len())).unwrap(), 300);
            server.tcp(h).send_slice(&[8; 500]).unwrap();
            tick(&mut st, &mut server, false);
            assert_eq!(st.buffers_lent(), (1, 0), "connection {i}: a receive buffer for the response");
            let rx = st.shards[r.shard as usize].lent[0].rx;
            if let Some(last) = last_rx {
                assert_eq!(rx, last, "connection {i}: not the buffer given back last");
            }
            last_rx = Some(rx);
            assert_eq!(st.tcp(r).recv(|d| (d.len(), d.len())).unwrap(), 500);
            tick(&mut st, &mut server, false);
            assert_eq!(st.buffers_lent(), (0, 0), "connection {i}: read, its receive buffer went back");
        }
        assert_eq!(st.sockets_in_use(), N as usize);
        assert_eq!(st.buffer_bytes(), 2 * (2 << 20), "one chunk each way for {N} connections");

        // Two segments from the server; the second arrives first.
        let (r, h) = (conns[0], peer(&mut server, 40000));
        server.tcp(h).send_slice(&[1; 100]).unwrap();
        let first = tick(&mut st, &mut server, true);
        server.tcp(h).send_slice(&[2; 100]).unwrap();
        let second = tick(&mut st, &mut server, true);
        assert_eq!((first.len(), second.len()), (1, 1), "one segment each");
        st.ingress(&second[0], (u32::from(backend), 8080, 40000), false, false);
        assert!(!st.view(r).can_recv(), "out of order: nothing to read yet");
        tick(&mut st, &mut server, true);
        assert_eq!(st.buffers_lent().0, 1, "bytes held out of order keep their buffer");
        st.ingress(&first[0], (u32::from(backend), 8080, 40000), false, false);
        let mut got = Vec::new();
        st.tcp(r).recv(|d| (d.len(), got.extend_from_slice(d))).unwrap();
        assert_eq!(got, [[1u8; 100], [2u8; 100]].concat(), "both, in order");
        tick(&mut st, &mut server, false);
        assert_eq!(st.buffers_lent(), (0, 0));
    }

    /// The vendored smoltcp's one patch (vendor/README.md): a segment into a drained receive
    /// buffer is placed from the buffer's first byte. Unpatched, 400-byte messages land at
    /// offsets 0, 400 and 800 of a 1,024-byte ring, the third wraps and `recv` hands it out in
    /// two pieces (224 + 176 bytes): on a keep-alive connection every request lands further
    /// round the ring. (400 bytes stay within the window the client last heard of, so each
    /// message arrives whole in one segment.)
    #[test]
    fn drained_receive_buffer_starts_over() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut server = Host::new(a, 1);
        let mut client = Host::new(b, 2);
        let ls = server.socket(1024);
        server.tcp(ls).listen(8080).unwrap();
        let cs = client.connect((a, 8080), 40000, 1024);
        // 20 ms a round: past smoltcp's delayed ACK, which the client's Nagle waits for.
        let mut now = 0;
        let mut exchange = |client: &mut Host, server: &mut Host| {
            for _ in 0..10 {
                now += 20;
                client.poll(now);
                server.dev.rx.extend(client.dev.tx.drain(..));
                server.poll(now);
                client.dev.rx.extend(server.dev.tx.drain(..));
            }
        };
        exchange(&mut client, &mut server);
        for round in 0..3 {
            client.tcp(cs).send_slice(&[round as u8; 400]).unwrap();
            exchange(&mut client, &mut server);
            let first_piece = server.tcp(ls).recv(|d| (d.len(), d.len())).unwrap();
            assert_eq!(first_piece, 400, "message {round} came out of the receive buffer in pieces");
            assert!(!server.tcp(ls).can_recv());
        }
    }
}
