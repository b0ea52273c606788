//! The HTTP proxy on the worker, where it meets what only the worker knows: its neighbour
//! table. Simulated client and backend (smoltcp hosts) exchange Ethernet frames with a real
//! worker over an in-memory port.

use fulcrum_config::bootstrap::Bootstrap;
use fulcrum_config::model::DesiredState;
use fulcrum_dataplane::l7::sim::{
    ethernet_frame, mac_of, one_route, response_complete, Backend, Host, APPLIANCE_BOOTSTRAP, APPLIANCE_MAC,
};
use fulcrum_dataplane::port::MemoryPort;
use fulcrum_dataplane::snapshot::Snapshot;
use fulcrum_dataplane::worker::{Worker, WorkerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

const L7_ADDR: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 1);
const BE1: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
/// On the link in the tables, silent on it: never answers ARP.
const BE2: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 12);

/// `from`'s ARP reply to the asker at `to_mac` / `to_ip`.
fn arp_reply(from: Ipv4Addr, to_mac: &[u8], to_ip: &[u8]) -> Vec<u8> {
    let head = [0, 1, 8, 0, 6, 4, 0, 2];
    let arp = [&head[..], &mac_of(from), &from.octets(), to_mac, to_ip].concat();
    [to_mac, &mac_of(from), &[0x08, 0x06], &arp].concat()
}

struct Lab {
    w: Worker,
    /// be1's MAC is learned from its ARP answers, not configured.
    be1_by_arp: bool,
    port: MemoryPort,
    client: Host,
    be1: Backend,
    now: u64,
}

impl Lab {
    /// be1 and be2 behind the route, be1's MAC configured.
    fn new() -> Lab {
        Lab::with(&[BE1, BE2], false)
    }

    fn with(endpoints: &[Ipv4Addr], be1_by_arp: bool) -> Lab {
        let boot = Bootstrap::parse(Path::new("appliance.yaml"), APPLIANCE_BOOTSTRAP).unwrap();
        let l7 = one_route("shop.example", endpoints.iter().map(|&b| SocketAddr::new(b.into(), 8080)).collect());
        let snap = Arc::new(Snapshot::compile(&boot, &DesiredState { l7, ..Default::default() }, 1).unwrap());
        let mut cfg = WorkerConfig::from_bootstrap(&boot, 0, 1);
        (cfg.ct_capacity, cfg.ct_capacity_v6) = (1024, 1024);
        // The router and be1 are known; be2 is left to ARP, which it never answers.
        cfg.static_neighbors.push((IpAddr::V4(ROUTER), mac_of(ROUTER)));
        if !be1_by_arp {
            cfg.static_neighbors.push((IpAddr::V4(BE1), mac_of(BE1)));
        }
        Lab {
            w: Worker::new(cfg, snap).unwrap(),
            be1_by_arp,
            port: MemoryPort::new(),
            client: Host::new(CLIENT, 1),
            be1: Backend::new(BE1, "be1"),
            now: 1,
        }
    }

    /// One millisecond: the hosts, then the worker, then the worker's frames to the hosts
    /// (be2's are lost: the worker never learns its MAC, so it sends it nothing but ARP).
    fn tick(&mut self) {
        self.now += 1;
        self.client.poll(self.now);
        self.be1.host.poll(self.now);
        self.be1.serve();
        self.be1.host.poll(self.now);
        for p in self.client.dev.tx.drain(..) {
            self.port.push_rx(&ethernet_frame(&p, APPLIANCE_MAC, mac_of(ROUTER)));
        }
        for p in self.be1.host.dev.tx.drain(..) {
            self.port.push_rx(&ethernet_frame(&p, APPLIANCE_MAC, mac_of(BE1)));
        }
        while self.w.poll(&mut self.port, self.now) > 0 {}
        for f in self.port.take_tx() {
            if f[12..14] == [0x08, 0x06] && f[21] == 1 && f[38..42] == BE1.octets() && self.be1_by_arp {
                self.port.push_rx(&arp_reply(BE1, &f[22..28], &f[28..32]));
            }
            if f[12..14] != [0x08, 0x00] {
                continue;
            }
            let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
            if dst == CLIENT {
                self.client.dev.rx.push_back(f[14..].to_vec());
            } else if dst == BE1 {
                self.be1.host.dev.rx.push_back(f[14..].to_vec());
            }
        }
    }

    /// A request on a new connection from `port`: the response and the milliseconds it took.
    fn request(&mut self, port: u16) -> (String, u64) {
        let h = self.client.connect((L7_ADDR, 80), port, 16384);
        let start = self.now;
        let mut sent = false;
        let mut got = Vec::new();
        while self.now < start + 20_000 {
            self.tick();
            let s = self.client.tcp(h);
            if !sent && s.may_send() {
                s.send_slice(b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n").unwrap();
                sent = true;
            }
            while s.can_recv() {
                let _ = s.recv(|d| {
                    got.extend_from_slice(d);
                    (d.len(), ())
                });
            }
            if response_complete(&got).is_some() {
                break;
            }
        }
        self.client.close(h);
        (String::from_utf8_lossy(&got).into_owned(), self.now - start)
    }

    fn connect_failures(&self) -> u64 {
        self.w.proxy_stats().unwrap().upstream_connect_failures
    }
}

/// A request whose upstream connection goes to an endpoint whose host does not answer ARP:
/// the first waits the connect timeout (5 s, the default: by then the worker has asked twice,
/// at the SYN and at its retransmission, and gives the neighbour up only a second after its
/// third question, at the next retransmission), and the endpoint is passed over for 10 s. When
/// a request tries it again, the neighbour is known unreachable: the worker tells the proxy as
/// it drops the SYN, and the request goes to the other endpoint at once. Before, the proxy
/// knew nothing of the neighbour table and waited the connect timeout each time.
#[test]
fn a_request_to_an_endpoint_whose_host_stopped_answering_arp_goes_elsewhere_without_waiting_the_connect_timeout() {
    let mut lab = Lab::new();
    let mut port = 40000;
    let mut next = |lab: &mut Lab| {
        port += 1;
        let (resp, took) = lab.request(port);
        assert!(resp.starts_with("HTTP/1.1 200 ") && resp.contains("\r\n\r\nbe1 "), "port {port}: {resp:?}");
        took
    };
    // Requests until one tried be2: it waited the connect timeout.
    let mut first = None;
    for _ in 0..40 {
        let took = next(&mut lab);
        if lab.connect_failures() > 0 {
            first = Some(took);
            break;
        }
        assert!(took < 100, "a request to be1 took {took} ms");
    }
    let first = first.expect("no request tried be2");
    assert!((5_000..5_100).contains(&first), "the first request to be2 took {first} ms");
    let resends = lab.w.proxy_stats().unwrap().upstream_resends;
    assert_eq!((lab.connect_failures(), resends), (1, 1));
    // be2 is passed over for 10 s, then tried again: its neighbour is known unreachable now,
    // so that request, like every other, is answered by be1 at once.
    let failed_at = lab.now;
    while lab.connect_failures() < 2 {
        assert!(lab.now < failed_at + 30_000, "be2 never tried again");
        let took = next(&mut lab);
        assert!(took < 100, "a request took {took} ms {} ms after the first failure", lab.now - failed_at);
    }
    assert!(lab.now >= failed_at + 9_000, "be2 tried again {} ms after its failure", lab.now - failed_at);
    assert_eq!(lab.connect_failures(), 2, "be2 tried again after its pass-over");
}

/// The Ingress routes' endpoints are resolved when the worker takes its tables, as the L4
/// backends are: the first request to an endpoint on the link is answered at once. Before,
/// the proxy's first SYN to it was dropped while its neighbour was asked, and the request
/// waited a second for smoltcp's retransmission (an Ingress usually points at ClusterIP
/// Services, whose endpoints no L4 VIP resolves).
#[test]
fn the_first_request_finds_its_endpoints_neighbour_resolved_ahead() {
    let mut lab = Lab::with(&[BE1], true);
    let (resp, took) = lab.request(40000);
    assert!(resp.starts_with("HTTP/1.1 200 ") && resp.contains("\r\n\r\nbe1 "), "{resp:?}");
    assert!(took < 100, "the first request took {took} ms");
}
