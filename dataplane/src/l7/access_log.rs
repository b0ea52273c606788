//! Access log events: made on the worker without allocating, written out elsewhere.
//!
//! Why not `tracing` (or a `write` per request): the worker may not allocate, take a lock or
//! make a system call per request, and both format and write on the calling thread. Instead
//! each worker appends two small events per request to its own byte ring (`rtrb`, single
//! producer: loads and stores only): *start* when the request head is read (method, Host,
//! target, client, start time), *end* when the request is over (status, bytes sent, endpoint,
//! end time). The control side's writer thread pairs them ([`Reader`]) and writes JSON lines.
//! Events are packed (about 100 bytes a request, written in order): a fixed-size record per
//! request, copied into a slot per connection and then into the ring, cost 17% of the
//! worker's requests/s in `fulcrum-bench l7` (a dozen cold lines per request).
//!
//! A ring without room drops the request's record and counts it (`dropped`): the worker never
//! waits for a disk. A request is over when its response is complete, when the proxy answers
//! it itself (an error, a redirect), when the connection is upgraded, or when the connection
//! ends first (status then 0: no response was sent, as Envoy's access log has it). A request
//! the proxy answers without having read its head (400, 408, 431) has an end and no start.
//!
//! Layout (little-endian; every event starts with its kind and its whole length, u8 + u16):
//! - start: slot u32, seq u32, started ns u64, client ip u32 + port u16, tls u8, cut u8,
//!   method len u8, host len u8, target len u16, then the method, host and target bytes;
//! - end: slot u32, seq u32 (0: no start), ended ns u64, status u16, bytes sent u64,
//!   endpoint ip u32 + port u16 (0: none), resends u8, client ip u32 + port u16, tls u8.
//!
//! Times are nanoseconds since the epoch the worker and the reader share (an `Instant`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

/// Bytes kept of the method, the Host header and the request target; longer ones are cut
/// (and the record says so).
pub const METHOD_BYTES: usize = 16;
pub const HOST_BYTES: usize = 255;
pub const TARGET_BYTES: usize = 1024;

const START: u8 = 1;
const END: u8 = 2;
const START_FIXED: usize = 3 + 4 + 4 + 8 + 6 + 1 + 1 + 1 + 1 + 2;
const END_LEN: usize = 3 + 4 + 4 + 8 + 2 + 8 + 6 + 1 + 6 + 1;
const MAX_EVENT: usize = START_FIXED + METHOD_BYTES + HOST_BYTES + TARGET_BYTES;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// No request under way.
    #[default]
    Idle,
    /// Its start event is in the ring (with this sequence number).
    Started(u32),
    /// Its start found no room: its end is not written either.
    Dropped,
}

/// What one connection's request under way has noted since its start.
#[derive(Clone, Copy, Debug, Default)]
struct Note {
    state: State,
    status: u16,
    resends: u8,
    head_bytes: u64,
    upstream: Option<SocketAddrV4>,
}

/// The worker's side: a note per client slot, and the ring to the writer.
pub struct AccessLog {
    epoch: Instant,
    ring: rtrb::Producer<u8>,
    notes: Vec<Note>,
    seq: u32,
    event: Box<[u8; MAX_EVENT]>,
    /// Requests whose end went into the ring, and requests dropped for want of room.
    pub written: u64,
    pub dropped: u64,
}

/// Little-endian fields into an event buffer.
struct Enc<'a> {
    buf: &'a mut [u8],
    n: usize,
}

impl Enc<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.n..self.n + b.len()].copy_from_slice(b);
        self.n += b.len();
    }
    /// What every event starts with: its kind and length, the client slot, the request's
    /// sequence number and a time.
    fn header(&mut self, kind: u8, len: usize, slot: usize, seq: u32, ns: u64) {
        self.put(&[kind]);
        self.put(&(len as u16).to_le_bytes());
        self.put(&(slot as u32).to_le_bytes());
        self.put(&seq.to_le_bytes());
        self.put(&ns.to_le_bytes());
    }
    fn addr(&mut self, a: Option<SocketAddrV4>) {
        let (ip, port) = a.map_or((0, 0), |a| (u32::from(*a.ip()), a.port()));
        self.put(&ip.to_le_bytes());
        self.put(&port.to_le_bytes());
    }
}

impl AccessLog {
    /// A worker's log into `ring` (its core is the reader's to know); times count from
    /// `epoch` (the reader's too).
    pub fn new(ring: rtrb::Producer<u8>, epoch: Instant) -> AccessLog {
        AccessLog { epoch, ring, notes: Vec::new(), seq: 0, event: Box::new([0; MAX_EVENT]), written: 0, dropped: 0 }
    }

    fn note(&mut self, slot: usize) -> &mut Note {
        if slot >= self.notes.len() {
            // Grows with the client slots (to the peak of open connections), not per request.
            self.notes.resize(slot + 1, Note::default());
        }
        &mut self.notes[slot]
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Puts `event[..len]` in the ring; false when it has no room.
    fn push(&mut self, len: usize) -> bool {
        let Ok(mut chunk) = self.ring.write_chunk_uninit(len) else { return false };
        let (a, b) = chunk.as_mut_slices();
        let (x, y) = self.event[..len].split_at(a.len());
        // SAFETY: `MaybeUninit<u8>` is laid out as `u8`; the chunk is exactly `len` slots, so
        // `a` takes `x` and `b` takes `y` whole; every slot is written before the commit.
        unsafe {
            std::ptr::copy_nonoverlapping(x.as_ptr(), a.as_mut_ptr().cast::<u8>(), x.len());
            std::ptr::copy_nonoverlapping(y.as_ptr(), b.as_mut_ptr().cast::<u8>(), y.len());
            chunk.commit_all();
        }
        true
    }

    /// A request head was read on client slot `slot`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        slot: usize,
        started: Instant,
        peer: SocketAddrV4,
        tls: bool,
        method: &str,
        host: &str,
        target: &str,
    ) {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let (m, h, t) = (method.as_bytes(), host.as_bytes(), target.as_bytes());
        let (ml, hl, tl) = (m.len().min(METHOD_BYTES), h.len().min(HOST_BYTES), t.len().min(TARGET_BYTES));
        let cut = ml < m.len() || hl < h.len() || tl < t.len();
        let ns = self.ns(started);
        let len = START_FIXED + ml + hl + tl;
        let mut e = Enc { buf: &mut self.event[..], n: 0 };
        e.header(START, len, slot, seq, ns);
        e.addr(Some(peer));
        e.put(&[tls as u8, cut as u8, ml as u8, hl as u8]);
        e.put(&(tl as u16).to_le_bytes());
        e.put(&m[..ml]);
        e.put(&h[..hl]);
        e.put(&t[..tl]);
        debug_assert_eq!(e.n, len);
        let state = if self.push(len) {
            State::Started(seq)
        } else {
            self.dropped += 1;
            State::Dropped
        };
        *self.note(slot) = Note { state, ..Note::default() };
    }

    /// The request went to `ep` (again, after `resends` failures to connect).
    pub fn upstream(&mut self, slot: usize, ep: SocketAddrV4, resends: u8) {
        if let Some(n) = self.notes.get_mut(slot) {
            (n.upstream, n.resends) = (Some(ep), resends);
        }
    }

    /// A response head of `head_bytes` went out with `status`.
    pub fn response_head(&mut self, slot: usize, status: u16, head_bytes: usize) {
        if let Some(n) = self.notes.get_mut(slot) {
            n.status = status;
            n.head_bytes += head_bytes as u64;
        }
    }

    /// The proxy answered the request itself (`status`, `bytes` of response), and it is over.
    /// The endpoint noted, if any, is the one that failed. For a request whose head was never
    /// read, the end goes alone.
    pub fn answered(
        &mut self,
        slot: usize,
        peer: SocketAddrV4,
        tls: bool,
        status: u16,
        bytes: usize,
        at: Option<Instant>,
    ) {
        let n = self.note(slot);
        if n.state == State::Idle {
            *n = Note { state: State::Started(0), ..Note::default() };
        }
        n.status = status;
        n.head_bytes += bytes as u64;
        self.done(slot, peer, tls, 0, at);
    }

    /// The request on `slot` is over (`body_bytes` sent after its head; `at` the time if the
    /// caller has just read the clock, else it is read here): its end goes to the writer.
    /// Nothing happens for a slot with no request under way.
    pub fn done(&mut self, slot: usize, peer: SocketAddrV4, tls: bool, body_bytes: u64, at: Option<Instant>) {
        let Some(n) = self.notes.get_mut(slot) else { return };
        let note = std::mem::take(n);
        let State::Started(seq) = note.state else { return };
        let ns = self.ns(at.unwrap_or_else(Instant::now));
        let mut e = Enc { buf: &mut self.event[..], n: 0 };
        e.header(END, END_LEN, slot, seq, ns);
        e.put(&note.status.to_le_bytes());
        e.put(&(note.head_bytes + body_bytes).to_le_bytes());
        e.addr(note.upstream);
        e.put(&[note.resends]);
        e.addr(Some(peer));
        e.put(&[tls as u8]);
        debug_assert_eq!(e.n, END_LEN);
        if self.push(END_LEN) {
            self.written += 1;
        } else {
            self.dropped += 1;
        }
    }
}

/// One request, as the log line shows it (made by [`Reader`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRecord {
    /// When the request head was complete (for a request the proxy could not read: when it
    /// answered), in ns since the epoch.
    pub started_ns: u64,
    /// From then to the request's end.
    pub duration_us: u64,
    pub core: u16,
    pub client: Option<SocketAddrV4>,
    pub tls: bool,
    /// Empty for a request whose head could not be read (400, 408, 431 before a head).
    pub method: Vec<u8>,
    pub host: Vec<u8>,
    pub target: Vec<u8>,
    /// The method, host or target was longer than its room and cut.
    pub cut: bool,
    /// The status sent (relayed or made here); 0: the connection ended before a response.
    pub status: u16,
    /// Bytes of the response handed to the client (head and body, before TLS).
    pub bytes_sent: u64,
    /// The endpoint that answered or failed (the last one tried); None for answers made here.
    pub upstream: Option<SocketAddrV4>,
    /// Times the request went to another endpoint after one failed to connect.
    pub resends: u8,
}

/// The writer's side for one worker's ring: pairs starts with their ends.
pub struct Reader {
    core: u16,
    /// Per client slot, the request started there (its sequence number and fields).
    started: Vec<Option<(u32, AccessRecord)>>,
    bytes: Vec<u8>,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}
fn addr_at(b: &[u8], i: usize) -> Option<SocketAddrV4> {
    let (ip, port) = (u32_at(b, i), u16_at(b, i + 4));
    (ip != 0 || port != 0).then(|| SocketAddrV4::new(Ipv4Addr::from(ip), port))
}

impl Reader {
    pub fn new(core: u16) -> Reader {
        Reader { core, started: Vec::new(), bytes: Vec::new() }
    }

    /// Reads every event in `ring`; each request that ended goes to `out`. Returns how many.
    pub fn drain(&mut self, ring: &mut rtrb::Consumer<u8>, mut out: impl FnMut(&AccessRecord)) -> usize {
        let Ok(chunk) = ring.read_chunk(ring.slots()) else { return 0 };
        let (a, b) = chunk.as_slices();
        self.bytes.clear();
        self.bytes.extend_from_slice(a);
        self.bytes.extend_from_slice(b);
        chunk.commit_all();
        // The worker commits whole events only.
        let bytes = std::mem::take(&mut self.bytes);
        let mut done = 0;
        let mut i = 0;
        while i + 3 <= bytes.len() {
            let len = usize::from(u16_at(&bytes, i + 1));
            let Some(e) = bytes.get(i..i + len) else { break };
            match e[0] {
                START if len >= START_FIXED => self.start(e),
                END if len == END_LEN => {
                    out(&self.end(e));
                    done += 1;
                }
                // Not what the worker writes: a bug; the rest of the batch cannot be framed.
                _ => {
                    debug_assert!(false, "access log event of kind {} and length {len}", e[0]);
                    break;
                }
            }
            i += len;
        }
        self.bytes = bytes;
        done
    }

    fn start(&mut self, e: &[u8]) {
        let slot = u32_at(e, 3) as usize;
        let (ml, hl, tl) = (usize::from(e[27]), usize::from(e[28]), usize::from(u16_at(e, 29)));
        let s = START_FIXED;
        let text = |from: usize, n: usize| e.get(from..from + n).unwrap_or_default().to_vec();
        let r = AccessRecord {
            started_ns: u64_at(e, 11),
            core: self.core,
            client: addr_at(e, 19),
            tls: e[25] != 0,
            cut: e[26] != 0,
            method: text(s, ml),
            host: text(s + ml, hl),
            target: text(s + ml + hl, tl),
            ..AccessRecord::default()
        };
        if slot >= self.started.len() {
            self.started.resize_with(slot + 1, || None);
        }
        // A start still here was a request whose end found no room (counted by the worker).
        self.started[slot] = Some((u32_at(e, 7), r));
    }

    fn end(&mut self, e: &[u8]) -> AccessRecord {
        let (slot, seq, ended) = (u32_at(e, 3) as usize, u32_at(e, 7), u64_at(e, 11));
        // Its own start, if that went in (a start of another sequence stays for its own end).
        let place = self.started.get_mut(slot).filter(|p| seq != 0 && p.as_ref().is_some_and(|(s, _)| *s == seq));
        let mut r = match place.and_then(Option::take) {
            Some((_, r)) => r,
            None => AccessRecord { started_ns: ended, core: self.core, ..AccessRecord::default() },
        };
        r.duration_us = ended.saturating_sub(r.started_ns) / 1000;
        r.status = u16_at(e, 19);
        r.bytes_sent = u64_at(e, 21);
        r.upstream = addr_at(e, 29);
        r.resends = e[35];
        r.client = addr_at(e, 36);
        r.tls = e[42] != 0;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 10), 40000)
    }

    fn read(reader: &mut Reader, ring: &mut rtrb::Consumer<u8>) -> Vec<AccessRecord> {
        let mut got = Vec::new();
        reader.drain(ring, |r| got.push(r.clone()));
        got
    }

    #[test]
    fn a_request_goes_out_once_with_what_was_noted() {
        let (tx, mut rx) = rtrb::RingBuffer::new(4096);
        let epoch = Instant::now();
        let mut log = AccessLog::new(tx, epoch);
        let mut reader = Reader::new(3);
        let ep = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 11), 8080);
        let started = Instant::now();
        log.start(5, started, peer(), true, "GET", "shop.example", "/a?b=1");
        assert!(read(&mut reader, &mut rx).is_empty(), "nothing until the request is over");
        log.upstream(5, ep, 1);
        log.response_head(5, 200, 100);
        log.done(5, peer(), true, 23, None);
        log.done(5, peer(), true, 99, None);
        let got = read(&mut reader, &mut rx);
        assert_eq!(got.len(), 1, "one record per request");
        let r = &got[0];
        assert_eq!(
            (r.core, r.client, r.tls, r.status, r.bytes_sent, r.upstream, r.resends),
            (3, Some(peer()), true, 200, 123, Some(ep), 1)
        );
        assert_eq!(
            (&r.method[..], &r.host[..], &r.target[..], r.cut),
            (&b"GET"[..], &b"shop.example"[..], &b"/a?b=1"[..], false)
        );
        assert_eq!(r.started_ns, started.duration_since(epoch).as_nanos() as u64);
        assert!(r.duration_us < 1_000_000);
        assert_eq!((log.written, log.dropped), (1, 0));
    }

    #[test]
    fn long_fields_are_cut_and_said_so_and_unread_heads_have_none() {
        let (tx, mut rx) = rtrb::RingBuffer::new(1 << 16);
        let mut log = AccessLog::new(tx, Instant::now());
        let mut reader = Reader::new(0);
        let long = format!("/{}", "x".repeat(2000));
        log.start(0, Instant::now(), peer(), false, "GET", "h", &long);
        log.answered(0, peer(), false, 404, 150, None);
        // A 408 with no head read: a record without request fields.
        log.answered(7, peer(), false, 408, 120, None);
        let got = read(&mut reader, &mut rx);
        assert_eq!((got[0].target.len(), got[0].cut, got[0].status, got[0].upstream), (TARGET_BYTES, true, 404, None));
        let r = &got[1];
        assert_eq!(
            (r.method.len(), r.host.len(), r.target.len(), r.cut, r.status, r.bytes_sent),
            (0, 0, 0, false, 408, 120)
        );
        assert_eq!(r.client, Some(peer()));
    }

    #[test]
    fn a_full_ring_drops_whole_requests_and_counts_them() {
        // Room for two starts (36 and 37 bytes), not for an end (43) after them.
        let (tx, mut rx) = rtrb::RingBuffer::new(80);
        let mut log = AccessLog::new(tx, Instant::now());
        let mut reader = Reader::new(0);
        log.start(0, Instant::now(), peer(), false, "GET", "h", "/");
        log.start(1, Instant::now(), peer(), false, "GET", "h", "/x");
        log.done(1, peer(), false, 0, None);
        assert_eq!((log.written, log.dropped), (0, 1), "the end found no room");
        assert!(read(&mut reader, &mut rx).is_empty());
        log.done(0, peer(), false, 0, None);
        let got = read(&mut reader, &mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].target[..], b"/", "the request that got in, with its own start");
        // The next request on the dropped one's slot is its own, whole.
        log.start(1, Instant::now(), peer(), false, "GET", "h", "/y");
        log.done(1, peer(), false, 0, None);
        assert_eq!(&read(&mut reader, &mut rx)[0].target[..], b"/y");
        // A start that finds no room: neither half goes, one request counted.
        let long = format!("/{}", "z".repeat(100));
        log.start(2, Instant::now(), peer(), false, "GET", "h", &long);
        log.done(2, peer(), false, 0, None);
        assert_eq!((log.written, log.dropped), (2, 2));
        assert!(read(&mut reader, &mut rx).is_empty());
    }

    #[test]
    fn ends_pair_with_their_own_starts_across_slots_and_wraps() {
        let (tx, mut rx) = rtrb::RingBuffer::new(300);
        let mut log = AccessLog::new(tx, Instant::now());
        let mut reader = Reader::new(0);
        let mut got = Vec::new();
        // Interleaved requests on three slots, over a small ring that wraps many times.
        for i in 0..200u32 {
            let slot = (i % 3) as usize;
            log.start(slot, Instant::now(), peer(), false, "GET", "h", &format!("/{i}"));
            log.response_head(slot, 200 + (i % 3) as u16, i as usize);
            log.done(slot, peer(), false, 0, None);
            reader.drain(&mut rx, |r| got.push(r.clone()));
        }
        assert_eq!(got.len(), 200);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(
                (r.target.clone(), r.status, r.bytes_sent),
                (format!("/{i}").into_bytes(), 200 + (i % 3) as u16, i as u64)
            );
        }
    }
}
