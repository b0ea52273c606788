//! Simulated peers for the L7 proxy's tests and benchmark: clients and backends that are real
//! TCP stacks (smoltcp, one IP-only interface each) exchanging IP packets in memory. Not used by
//! the appliance itself.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpEndpoint};
use std::collections::VecDeque;
use std::net::Ipv4Addr;

/// A one-port appliance with one worker on in-memory buffers, serving Ingress on 10.20.0.100
/// (port 10.10.0.2/24, MAC `APPLIANCE_MAC`, next hop 10.10.0.1): what the L7 benchmark and the
/// worker-level proxy tests run.
pub const APPLIANCE_BOOTSTRAP: &str = r#"
ports:
  - name: mem0
    device: "memory"
    mac: "02:f1:00:00:00:01"
    ipv4: 10.10.0.2/24
    next_hop: {ipv4: 10.10.0.1}
workers: {cores: [0]}
vip_pools: [{name: mem, cidrs: [10.20.0.0/24]}]
l7:
  address: 10.20.0.100
"#;

/// `APPLIANCE_BOOTSTRAP`'s port MAC.
pub const APPLIANCE_MAC: [u8; 6] = [2, 0xf1, 0, 0, 0, 1];

/// The MAC a simulated host has: 02:be and its IPv4 address.
pub fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [2, 0xbe, o[0], o[1], o[2], o[3]]
}

/// A TCP SYN from `src` to `dst` as an IPv4 packet, checksums right, with the options a
/// Linux client sends but timestamps (MSS 1460, window scale 7, SACK permitted): a client's
/// first segment, or a flooder's with a spoofed source that will never follow it up.
pub fn tcp_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
    let tcp = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(i32::from(src.1).wrapping_mul(7919)),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: src.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + tcp.header_len()];
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    let (s, d) = (IpAddress::Ipv4(src.0), IpAddress::Ipv4(dst.0));
    tcp.emit(&mut TcpPacket::new_unchecked(p.payload_mut()), &s, &d, &caps);
    buf
}

/// IPv4 packet `ip` in an Ethernet frame.
pub fn ethernet_frame(ip: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    [&dst[..], &src[..], &[0x08, 0x00], ip].concat()
}

/// Ingress for one host: `/` (Prefix) to `endpoints`, as Service bench/web port 80.
pub fn one_route(host: &str, endpoints: Vec<std::net::SocketAddr>) -> fulcrum_config::ingress::L7State {
    use fulcrum_config::ingress::{HostMatch, L7Backend, L7Host, L7Path, L7State, PathType};
    use fulcrum_config::model::ObjectRef;
    L7State {
        hosts: vec![L7Host {
            host: HostMatch::Exact(host.into()),
            paths: vec![L7Path {
                path: "/".into(),
                path_type: PathType::Prefix,
                backend: L7Backend {
                    service: ObjectRef { namespace: "bench".into(), name: "web".into() },
                    port: Some(80),
                    unresolved: None,
                    endpoints,
                },
                ingress: ObjectRef { namespace: "bench".into(), name: "bench".into() },
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// IP packets in and out of a simulated host.
#[derive(Default)]
pub struct Wire {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

/// A host: one IP-only interface with TCP sockets.
pub struct Host {
    pub addr: Ipv4Addr,
    pub iface: Interface,
    pub dev: Wire,
    pub sockets: SocketSet<'static>,
}

impl Host {
    pub fn new(addr: Ipv4Addr, seed: u64) -> Host {
        let mut dev = Wire::default();
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(addr.into(), 24));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(addr);
        Host { addr, iface, dev, sockets: SocketSet::new(vec![]) }
    }

    pub fn socket(&mut self, buffer: usize) -> SocketHandle {
        let s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; buffer]), tcp::SocketBuffer::new(vec![0; buffer]));
        self.sockets.add(s)
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(h)
    }

    pub fn poll(&mut self, now_ms: u64) {
        self.iface.poll(Instant::from_millis(now_ms as i64), &mut self.dev, &mut self.sockets);
    }

    /// Closes `h` as a Linux client does: its FIN, and what the server sends from then on
    /// (its FIN above all) acknowledged at once. Linux acknowledges a FIN that reaches it in
    /// FIN-WAIT-2 without delay (`tcp_fin`: `tcp_send_ack`, then TIME-WAIT); smoltcp delays
    /// that ACK like any other (10 ms), which kept every server socket of `fulcrum-bench l7
    /// --new-conn` in LAST-ACK, with its buffers, 10 ms longer: 704 sockets for 64
    /// connections, each new connection's buffers cold in cache.
    pub fn close(&mut self, h: SocketHandle) {
        let s = self.tcp(h);
        s.set_ack_delay(None);
        s.close();
    }

    pub fn connect(&mut self, to: (Ipv4Addr, u16), local_port: u16, buffer: usize) -> SocketHandle {
        let h = self.socket(buffer);
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, IpEndpoint::new(to.0.into(), to.1), local_port)
            .expect("connect");
        h
    }
}

/// An HTTP/1.1 backend on port 8080: answers every request with its name, the request line
/// and the `X-Forwarded-For` it got, then the request body; keep-alive.
pub struct Backend {
    pub host: Host,
    pub name: &'static str,
    conns: Vec<BackendConn>,
    pub requests: usize,
    /// Listening sockets kept ready (smoltcp has no backlog: a SYN finding none is reset).
    pub listeners: usize,
    /// Receive and send buffer per connection.
    pub buffer: usize,
    /// Write each response's head, and its body only at the next `serve`: two writes, as
    /// servers that do not gather them do (with Nagle's algorithm, the smoltcp default here,
    /// the body then waits for the head's ACK).
    pub split_writes: bool,
}

/// One of a backend's sockets and its bytes.
struct BackendConn {
    sock: SocketHandle,
    /// Received, not yet answered.
    inbuf: Vec<u8>,
    /// Still to send.
    out: Vec<u8>,
    /// To send from the next `serve` on (`split_writes`).
    later: Vec<u8>,
    /// Answered an `Upgrade: websocket` request with 101: echoes raw bytes from then on.
    upgraded: bool,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, name: &'static str) -> Backend {
        Self::with_listeners(addr, name, 4)
    }

    pub fn with_listeners(addr: Ipv4Addr, name: &'static str, listeners: usize) -> Backend {
        let mut b = Backend {
            host: Host::new(addr, u32::from(addr) as u64),
            name,
            conns: vec![],
            requests: 0,
            listeners,
            buffer: 65536,
            split_writes: false,
        };
        b.keep_listening();
        b
    }

    fn keep_listening(&mut self) {
        let listening =
            self.conns.iter().filter(|c| self.host.sockets.get::<tcp::Socket>(c.sock).is_listening()).count();
        for _ in listening..self.listeners {
            let h = self.host.socket(self.buffer);
            self.host.tcp(h).listen(8080).expect("listen");
            self.conns.push(BackendConn { sock: h, inbuf: vec![], out: vec![], later: vec![], upgraded: false });
        }
    }

    /// Reads requests and queues responses; closed sockets are recycled.
    pub fn serve(&mut self) {
        let split = self.split_writes;
        for BackendConn { sock, inbuf, out, later, upgraded } in self.conns.iter_mut() {
            let s = self.host.sockets.get_mut::<tcp::Socket>(*sock);
            out.append(later);
            if !out.is_empty() && s.may_send() {
                let n = s.send_slice(out).unwrap_or(0);
                out.drain(..n);
            }
            if s.can_recv() {
                let _ = s.recv(|d| {
                    inbuf.extend_from_slice(d);
                    (d.len(), ())
                });
            }
            if *upgraded {
                out.append(inbuf); // a WebSocket's bytes, echoed
            }
            while let Some(end) = inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !later.is_empty() {
                    break; // the next response's head waits for this one's body
                }
                let head = String::from_utf8_lossy(&inbuf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if inbuf.len() < end + 4 + len {
                    break;
                }
                if head.lines().any(|l| l.eq_ignore_ascii_case("upgrade: websocket")) {
                    inbuf.drain(..end + 4);
                    out.extend_from_slice(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                    );
                    out.append(inbuf);
                    *upgraded = true;
                    break;
                }
                let body = inbuf[end + 4..end + 4 + len].to_vec();
                inbuf.drain(..end + 4 + len);
                self.requests += 1;
                let line = head.lines().next().unwrap_or("").to_string();
                let xff = head.lines().find(|l| l.starts_with("X-Forwarded-For")).unwrap_or("").to_string();
                let mut resp_body = format!("{} {} {}\n", self.name, line, xff).into_bytes();
                resp_body.extend_from_slice(&body);
                out.extend_from_slice(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", resp_body.len()).as_bytes(),
                );
                if split {
                    later.extend_from_slice(&resp_body);
                } else {
                    out.extend_from_slice(&resp_body);
                }
            }
            if !out.is_empty() && s.may_send() {
                let n = s.send_slice(out).unwrap_or(0);
                out.drain(..n);
            }
            if matches!(s.state(), tcp::State::CloseWait) && out.is_empty() && later.is_empty() {
                s.close();
            }
        }
        // Recycle closed sockets, keep listeners available.
        let closed: Vec<SocketHandle> = self
            .conns
            .iter()
            .filter(|c| self.host.sockets.get::<tcp::Socket>(c.sock).state() == tcp::State::Closed)
            .map(|c| c.sock)
            .collect();
        for h in closed {
            self.host.sockets.remove(h);
            self.conns.retain(|c| c.sock != h);
        }
        self.keep_listening();
    }
}

/// An IPv4 TCP segment with no payload and no flag but ACK: an acknowledgement that rode on
/// nothing (a delayed ACK that fired alone, or a window update).
pub fn is_pure_ack(ip: &[u8]) -> bool {
    if ip.len() < 20 || ip[9] != 6 {
        return false;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let Some(tcp) = ip.get(ihl..total) else { return false };
    tcp.len() >= 20 && tcp.len() == ((tcp[12] >> 4) as usize) * 4 && tcp[13] == 0x10
}

/// Whether `resp` holds a complete response with a Content-Length body.
pub fn response_complete(resp: &[u8]) -> Option<usize> {
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    (resp.len() >= end + 4 + len).then_some(end + 4 + len)
}

/// The test PKI of `dataplane/tests/fixtures/tls` (see its README), compiled in for the
/// simulations that speak TLS (the l7 bench, `script`): a CA, and the certificate and key for
/// `shop.example` that it signed.
pub mod test_pki {
    use fulcrum_config::ingress::{HostMatch, L7Certificate};
    use fulcrum_config::model::ObjectRef;

    pub const CA: &[u8] = include_bytes!("../../tests/fixtures/tls/ca.crt");
    pub const SHOP_CERT: &[u8] = include_bytes!("../../tests/fixtures/tls/shop.crt");
    pub const SHOP_KEY: &[u8] = include_bytes!("../../tests/fixtures/tls/shop.key");
    pub const SHOP_HOST: &str = "shop.example";

    /// `shop.example`'s certificate as the proxy gets it from the TLS Secret `secret`.
    pub fn shop_certificate(secret: ObjectRef) -> L7Certificate {
        L7Certificate {
            secret,
            hosts: vec![HostMatch::Exact(SHOP_HOST.into())],
            cert_pem: SHOP_CERT.to_vec(),
            key_pem: SHOP_KEY.to_vec(),
        }
    }
}

/// A TLS client over a simulated TCP socket (rustls client side), for tests and benchmarks.
pub struct TlsClient {
    pub conn: rustls::ClientConnection,
}

impl TlsClient {
    /// Trusts the certificates in `ca_pem`; offers ALPN http/1.1.
    pub fn new(ca_pem: &[u8], sni: &str) -> TlsClient {
        Self::with_config(Self::config(ca_pem, &[&rustls::version::TLS13, &rustls::version::TLS12]), sni)
    }

    /// A connection with a shared config (its session store makes later connections resume).
    pub fn with_config(cfg: std::sync::Arc<rustls::ClientConfig>, sni: &str) -> TlsClient {
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
        TlsClient { conn: rustls::ClientConnection::new(cfg, name).expect("client") }
    }

    /// A client config trusting `ca_pem`, offering `versions` and ALPN http/1.1.
    pub fn config(
        ca_pem: &[u8],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.expect("CA PEM")).expect("CA certificate");
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(cfg)
    }

    /// Moves ciphertext between the socket and rustls; appends decrypted bytes to `got`.
    /// Panics on a TLS error from the server (a test failure).
    pub fn pump(&mut self, s: &mut tcp::Socket<'static>, got: &mut Vec<u8>) {
        self.try_pump(s, got).expect("TLS from the server");
    }

    /// As `pump`, but a TLS error from the server (an alert, a bad record) is returned; what
    /// it left unread stays in the socket. Returns the bytes decrypted.
    pub fn try_pump(&mut self, s: &mut tcp::Socket<'static>, got: &mut Vec<u8>) -> Result<usize, rustls::Error> {
        use std::io::BufRead;
        while s.can_recv() {
            let n = s
                .recv(|d| {
                    let mut r: &[u8] = d;
                    let n = self.conn.read_tls(&mut r).unwrap_or(0);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            self.conn.process_new_packets()?;
        }
        let mut moved = 0;
        loop {
            let mut r = self.conn.reader();
            match r.fill_buf() {
                Ok(d) if !d.is_empty() => {
                    let n = d.len();
                    got.extend_from_slice(d);
                    r.consume(n);
                    moved += n;
                }
                _ => break,
            }
        }
        while self.conn.wants_write() && s.may_send() {
            let n = s
                .send(|b| {
                    let mut w: &mut [u8] = b;
                    let n = self.conn.write_tls(&mut w).unwrap_or(0);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
        }
        Ok(moved)
    }

    pub fn send(&mut self, data: &[u8]) {
        use std::io::Write;
        self.conn.writer().write_all(data).expect("TLS write");
    }
}
