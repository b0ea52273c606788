//! Worker threads end to end over thread-safe in-memory ports: hand-off of return traffic to
//! the core that owns its SNAT port, snapshot publication, clean stop.

use fulcrum_config::{load_desired, Bootstrap};
use fulcrum_dataplane::packet::{HeapBuf, PacketBuf};
use fulcrum_dataplane::port::{Burst, Port};
use fulcrum_dataplane::runtime::{self, Idle, Shared, WorkerSpec};
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::wire::checksum;
use fulcrum_dataplane::worker::WorkerConfig;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct ChanPort {
    rx: Receiver<Vec<u8>>,
    tx: Sender<Vec<u8>>,
}

impl Port for ChanPort {
    type Buf = HeapBuf;
    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        let mut n = 0;
        while !out.is_full() {
            match self.rx.try_recv() {
                Ok(f) => {
                    out.push(HeapBuf::from_slice(&f));
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }
    fn tx_burst(&mut self, bufs: &mut Burst<HeapBuf>) -> usize {
        let n = bufs.len();
        for b in bufs.drain(..) {
            let _ = self.tx.send(b.data().to_vec());
        }
        n
    }
    fn alloc(&mut self) -> Option<HeapBuf> {
        Some(HeapBuf::new())
    }
}

const APPLIANCE_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0x01];
const GATEWAY_MAC: [u8; 6] = [0x02, 0xf1, 0, 0, 0, 0xfe];

/// An Ethernet + IPv4 + TCP frame with valid IP checksum (TCP checksum left 0: the data plane
/// updates it incrementally and does not verify it).
fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 54];
    f[0..6].copy_from_slice(&APPLIANCE_MAC);
    f[6..12].copy_from_slice(&GATEWAY_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    f
}

fn recv(rx: &Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(Duration::from_secs(5)).expect("a frame within 5 s")
}

/// The fixtures' bootstrap, and shared state for `workers` workers on their snapshot.
fn fixtures(workers: usize) -> (Bootstrap, Arc<Shared>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let boot = Bootstrap::load(&dir.join("bootstrap.yaml")).unwrap();
    let state = load_desired(&boot, &dir.join("manifests.yaml")).unwrap();
    let shared = Shared::new(Arc::new(Snapshot::compile(&boot, &state, 1).unwrap()), workers);
    (boot, shared)
}

/// Worker `core` of `n`, with small conntrack tables and SNAT ports from the start of each
/// core's range.
fn small_config(boot: &Bootstrap, core: u16, n: u16) -> WorkerConfig {
    let mut config = WorkerConfig::from_bootstrap(boot, core, n);
    config.snat_offset = 0;
    config.ct_capacity = 1024;
    config.ct_capacity_v6 = 1024;
    // These tests read the forwarded frames first; the announcements at start are covered by
    // the worker test and the lab's end-to-end test.
    config.announce_at_start = false;
    config
}

/// Starts `n` workers on channel ports (backing off when idle): what to send each, what each
/// sent, and their threads.
#[allow(clippy::type_complexity)]
fn start_chan_workers(
    boot: &Bootstrap,
    shared: &Arc<Shared>,
    n: u16,
) -> (Vec<Sender<Vec<u8>>>, Vec<Receiver<Vec<u8>>>, Vec<std::thread::JoinHandle<()>>) {
    let (mut inputs, mut outputs, mut specs) = (Vec::new(), Vec::new(), Vec::new());
    for core in 0..n {
        let (in_tx, in_rx) = channel();
        let (out_tx, out_rx) = channel();
        specs.push(WorkerSpec {
            config: small_config(boot, core, n),
            cpu: None,
            port: ChanPort { rx: in_rx, tx: out_tx },
            access_log: None,
        });
        inputs.push(in_tx);
        outputs.push(out_rx);
    }
    let handles = runtime::spawn(specs, shared.clone(), Idle::Backoff(Duration::from_micros(200))).unwrap();
    (inputs, outputs, handles)
}

#[test]
fn two_workers_hand_off_return_traffic_and_switch_snapshots() {
    let (boot, shared) = fixtures(2);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let state = load_desired(&boot, &dir.join("manifests.yaml")).unwrap();
    let (inputs, outputs, handles) = start_chan_workers(&boot, &shared, 2);

    // A SYN to the web VIP arrives on core 0: SNAT port from core 0's half (1024..=33279).
    let client = [198, 51, 100, 7];
    inputs[0].send(tcp4(client, 40000, [10, 20, 0, 10], 80, 0x02)).unwrap();
    let out = recv(&outputs[0]);
    let snat_port = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(&out[26..30], &[10, 10, 0, 2], "SNAT source");
    assert_eq!(&out[30..34], &[10, 30, 0, 11], "to the endpoint");
    assert_eq!(snat_port, 1024);

    // The SYN-ACK comes back on core 1 (RSS missed): handed to core 0, which translates it.
    inputs[1].send(tcp4([10, 30, 0, 11], 8080, [10, 10, 0, 2], snat_port, 0x12)).unwrap();
    let back = recv(&outputs[0]);
    assert_eq!(&back[26..30], &[10, 20, 0, 10], "from the VIP");
    assert_eq!(&back[30..34], &client, "to the client");
    assert_eq!(u16::from_be_bytes([back[36], back[37]]), 40000);
    assert!(outputs[1].try_recv().is_err(), "core 1 sends nothing itself");

    // A new snapshot: both workers switch.
    let mut next = Snapshot::compile(&boot, &state, 2).unwrap();
    next.generation = 2;
    shared.snapshot.publish(Arc::new(next));
    let t = Instant::now();
    while shared.running_generation.iter().any(|g| g.load(Ordering::Acquire) != 2) {
        assert!(t.elapsed() < Duration::from_secs(5), "workers did not switch");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The established flow still works after the switch.
    inputs[0].send(tcp4(client, 40000, [10, 20, 0, 10], 80, 0x10)).unwrap();
    let again = recv(&outputs[0]);
    assert_eq!(u16::from_be_bytes([again[34], again[35]]), snat_port, "same flow, same SNAT port");

    shared.stop();
    for h in handles {
        h.join().unwrap();
    }
    let total = shared.total_stats();
    assert_eq!(total.rx.packets, 4);
    assert_eq!(total.handed_off, 1);
    assert_eq!(total.handoff_received, 1);
    assert_eq!(total.total_drops(), 0);
}

/// What a port saw of the thread that drove it, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Attached(std::thread::ThreadId),
    Burst(std::thread::ThreadId),
    Detached(std::thread::ThreadId),
}

struct Detach(Arc<std::sync::Mutex<Vec<Seen>>>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(Seen::Detached(std::thread::current().id()));
    }
}

struct ThreadPort(Arc<std::sync::Mutex<Vec<Seen>>>);

impl Port for ThreadPort {
    type Buf = HeapBuf;
    fn rx_burst(&mut self, _out: &mut Burst<HeapBuf>) -> usize {
        let me = std::thread::current().id();
        let mut seen = self.0.lock().unwrap();
        // One entry per run of bursts, not per poll.
        if seen.last() != Some(&Seen::Burst(me)) {
            seen.push(Seen::Burst(me));
        }
        0
    }
    fn tx_burst(&mut self, bufs: &mut Burst<HeapBuf>) -> usize {
        let n = bufs.len();
        bufs.clear();
        n
    }
    fn alloc(&mut self) -> Option<HeapBuf> {
        Some(HeapBuf::new())
    }
    fn attach_thread(&mut self) -> Result<fulcrum_dataplane::port::ThreadAttachment, String> {
        self.0.lock().unwrap().push(Seen::Attached(std::thread::current().id()));
        Ok(Some(Box::new(Detach(self.0.clone()))))
    }
}

#[test]
fn a_worker_attaches_its_port_to_its_thread_before_the_first_burst_and_detaches_after_the_last() {
    let (boot, shared) = fixtures(1);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let specs = vec![WorkerSpec {
        config: small_config(&boot, 0, 1),
        cpu: None,
        port: ThreadPort(seen.clone()),
        access_log: None,
    }];
    let handles = runtime::spawn(specs, shared.clone(), Idle::Backoff(Duration::from_micros(200))).unwrap();
    let t = Instant::now();
    while seen.lock().unwrap().len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(5), "the worker never polled");
        std::thread::sleep(Duration::from_millis(1));
    }
    shared.stop();
    let worker = handles[0].thread().id();
    for h in handles {
        h.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(*seen, vec![Seen::Attached(worker), Seen::Burst(worker), Seen::Detached(worker)]);
}

/// A port that delivers one frame, stalling `stall` inside that poll, and nothing after.
struct StallingPort {
    stall: Duration,
    done: bool,
}

impl Port for StallingPort {
    type Buf = HeapBuf;
    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        if self.done {
            return 0;
        }
        self.done = true;
        std::thread::sleep(self.stall);
        out.push(HeapBuf::from_slice(&tcp4([198, 51, 100, 7], 40000, [192, 0, 2, 1], 80, 0x02)));
        1
    }
    fn tx_burst(&mut self, bufs: &mut Burst<HeapBuf>) -> usize {
        let n = bufs.len();
        bufs.clear();
        n
    }
    fn alloc(&mut self) -> Option<HeapBuf> {
        Some(HeapBuf::new())
    }
}

/// Runs one worker on `port` for `run`, and returns its loop times.
fn loop_times_of(port: StallingPort, idle: Idle, run: Duration) -> fulcrum_dataplane::stats::LoopTimes {
    let (boot, shared) = fixtures(1);
    let specs = vec![WorkerSpec { config: small_config(&boot, 0, 1), cpu: None, port, access_log: None }];
    let handles = runtime::spawn(specs, shared.clone(), idle).unwrap();
    std::thread::sleep(run);
    shared.stop();
    for h in handles {
        h.join().unwrap();
    }
    let t = shared.stats[0].lock().unwrap().loop_times;
    t
}

#[test]
fn a_stalled_loop_iteration_is_counted_and_an_idle_workers_chosen_pause_is_not() {
    // A poll that stalls 30 ms with a packet: one iteration between 10 and 100 ms.
    let busy = loop_times_of(
        StallingPort { stall: Duration::from_millis(30), done: false },
        Idle::BusyPoll,
        Duration::from_millis(300),
    );
    assert!(busy.over(3) >= 1, "{busy:?}");
    assert!(busy.count() > 100, "busy polling counts every iteration: {busy:?}");
    // Idle for 2 s with pauses growing to 200 ms: none of them is an iteration's time.
    let idle = loop_times_of(
        StallingPort { stall: Duration::ZERO, done: false },
        Idle::Backoff(Duration::from_millis(200)),
        Duration::from_secs(2),
    );
    assert_eq!(idle.over(4), 0, "{idle:?}");
    assert!(idle.count() > 10, "idle iterations count too, less their pauses: {idle:?}");
}

#[test]
fn a_reader_holding_the_counters_does_not_stall_the_worker() {
    let (boot, shared) = fixtures(1);
    let (in_tx, in_rx) = channel();
    let (out_tx, out_rx) = channel();
    let specs = vec![WorkerSpec {
        config: small_config(&boot, 0, 1),
        cpu: None,
        port: ChanPort { rx: in_rx, tx: out_tx },
        access_log: None,
    }];
    let handles = runtime::spawn(specs, shared.clone(), Idle::BusyPoll).unwrap();
    let client = [198, 51, 100, 7];
    {
        // The control thread's side holds the worker's counters for a while (as a scrape of
        // many endpoints' counters does), past the worker's next copy (every 100 ms).
        let held = shared.stats[0].lock().unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let t = Instant::now();
        in_tx.send(tcp4(client, 40001, [10, 20, 0, 10], 80, 0x02)).unwrap();
        let out =
            out_rx.recv_timeout(Duration::from_millis(150)).expect("the worker forwards while the counters are held");
        assert_eq!(&out[30..34], &[10, 30, 0, 11], "to the endpoint");
        assert!(t.elapsed() < Duration::from_millis(150));
        drop(held);
    }
    // The counters are copied again once the lock is free.
    let t = Instant::now();
    while shared.stats[0].lock().unwrap().rx.packets < 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "the counters were never copied after the lock was free");
        std::thread::sleep(Duration::from_millis(10));
    }
    shared.stop();
    for h in handles {
        h.join().unwrap();
    }
}

/// An ARP reply from `mac` at `ip` to the appliance (10.10.0.2).
fn arp_reply(ip: [u8; 4], mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 42];
    f[0..6].copy_from_slice(&APPLIANCE_MAC);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f[32..38].copy_from_slice(&APPLIANCE_MAC);
    f[38..42].copy_from_slice(&[10, 10, 0, 2]);
    f
}

#[test]
fn a_neighbour_one_worker_learns_is_learned_by_the_others() {
    // The fixtures' appliance, but its next hop's MAC is found by ARP, not configured.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let text = std::fs::read_to_string(dir.join("bootstrap.yaml")).unwrap();
    assert!(text.contains("      mac: \"02:f1:00:00:00:fe\"\n"));
    let boot =
        Bootstrap::parse(&dir.join("bootstrap.yaml"), &text.replace("      mac: \"02:f1:00:00:00:fe\"\n", "")).unwrap();
    let state = load_desired(&boot, &dir.join("manifests.yaml")).unwrap();
    let shared = Shared::new(Arc::new(Snapshot::compile(&boot, &state, 1).unwrap()), 2);
    let (inputs, outputs, handles) = start_chan_workers(&boot, &shared, 2);
    // A SYN on worker 0 finds the next hop unresolved: worker 0 asks for it.
    let client = [198, 51, 100, 7];
    inputs[0].send(tcp4(client, 40000, [10, 20, 0, 10], 80, 0x02)).unwrap();
    let t = Instant::now();
    loop {
        let f = recv(&outputs[0]);
        if f[12..14] == [0x08, 0x06] && f[38..42] == [10, 10, 0, 1] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "worker 0 never asked for the next hop");
    }
    // The answer reaches worker 1 (as the NIC's queue 0, or its hash, may have it).
    inputs[1].send(arp_reply([10, 10, 0, 1], GATEWAY_MAC)).unwrap();
    // Worker 0 forwards to the next hop it never heard from itself.
    let t = Instant::now();
    let out = loop {
        inputs[0].send(tcp4(client, 40000, [10, 20, 0, 10], 80, 0x02)).unwrap();
        match outputs[0].recv_timeout(Duration::from_millis(100)) {
            Ok(f) if f[12..14] == [0x08, 0x00] => break f,
            _ => assert!(t.elapsed() < Duration::from_secs(3), "worker 0 never learned the next hop's MAC"),
        }
    };
    assert_eq!(&out[0..6], &GATEWAY_MAC, "to the next hop");
    assert_eq!(&out[30..34], &[10, 30, 0, 11], "to the endpoint");
    shared.stop();
    for h in handles {
        h.join().unwrap();
    }
    // The tables' fill is in the counters (the next hop in both).
    for core in 0..2 {
        let c = shared.stats[core].lock().unwrap();
        assert!(
            c.neighbors >= 1 && c.neighbors <= c.neighbors_capacity,
            "core {core}: {} of {}",
            c.neighbors,
            c.neighbors_capacity
        );
    }
}

/// An endpoint one worker passes over for SYNs it left unanswered is passed over by the other
/// worker too, from the verdict passed between them (the other worker saw none of its flows).
#[test]
fn an_endpoint_one_worker_passes_over_is_passed_over_by_the_others() {
    let (boot, shared) = fixtures(2);
    let (inputs, outputs, handles) = start_chan_workers(&boot, &shared, 2);
    // One client's SYN on worker 0, sent again four times 300 ms apart: 10.30.0.11 never
    // answers (nothing does here), so the third time passes it over.
    let syn = tcp4([198, 51, 100, 7], 40000, [10, 20, 0, 10], 80, 0x02);
    for _ in 0..4 {
        inputs[0].send(syn.clone()).unwrap();
        recv(&outputs[0]);
        std::thread::sleep(Duration::from_millis(300));
    }
    let endpoint = (std::net::IpAddr::from([10, 30, 0, 11]), 8080);
    let t = Instant::now();
    loop {
        let passed_over = |core: usize| shared.stats[core].lock().unwrap().passed_over.contains(&endpoint);
        if passed_over(0) && passed_over(1) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "passed over on worker 0 {}, on worker 1 {}",
            passed_over(0),
            passed_over(1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(shared.stats[1].lock().unwrap().unanswered_syns, 0, "worker 1 saw no miss itself");
    shared.stop();
    for h in handles {
        h.join().unwrap();
    }
}
