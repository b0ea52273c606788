//! The bootstrap file: what the appliance is (NICs, cores, its own addresses, VIP pools, modes,
//! table sizes). YAML, unknown keys rejected, every error names the file and the field.

use crate::error::ConfigError;
use crate::model::ForwardingMode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Bootstrap {
    /// Extra EAL arguments (e.g. `--no-huge`, `-m 512`, `--file-prefix`).
    #[serde(default)]
    pub eal_args: Vec<String>,
    /// Data ports; workers own one rx and one tx queue on each.
    pub ports: Vec<PortConfig>,
    pub workers: WorkersConfig,
    /// Address pools that VIPs are taken from; a VIP outside every pool is rejected.
    pub vip_pools: Vec<VipPool>,
    #[serde(default)]
    pub forwarding: ForwardingConfig,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    #[serde(default)]
    pub maglev: MaglevConfig,
    #[serde(default)]
    pub neighbors: NeighborsConfig,
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
    /// Ingress (HTTP) serving; absent: L4 only.
    #[serde(default)]
    pub l7: Option<L7Config>,
    /// Which `type: LoadBalancer` Services are ours.
    #[serde(default)]
    pub load_balancer: LoadBalancerConfig,
    /// The management endpoint (`/metrics`, `/healthz`, `/readyz`, `/snapshot`, `/neighbors`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Two appliances as a pair (Kubernetes mode): a Lease elects the one that claims the VIPs
    /// (answers ARP/NDP) and writes status. Absent: this appliance always claims them.
    #[serde(default)]
    pub leader_election: Option<LeaderElectionConfig>,
}

/// The Lease (coordination.k8s.io/v1) two appliances contend for.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LeaderElectionConfig {
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
    /// This appliance's name in the Lease (must differ between the two); default: the host
    /// name and the first port's MAC.
    #[serde(default)]
    pub identity: Option<String>,
    /// How long a leader that stops renewing keeps the Lease (the takeover time after a crash).
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
    /// How often the leader renews, and the standby looks.
    #[serde(default = "default_renew_seconds")]
    pub renew_seconds: u32,
}

fn default_lease_name() -> String {
    "fulcrum".into()
}
fn default_lease_namespace() -> String {
    "kube-system".into()
}
fn default_lease_seconds() -> u32 {
    15
}
fn default_renew_seconds() -> u32 {
    5
}

/// Which `type: LoadBalancer` Services Fulcrum serves and gives addresses to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct LoadBalancerConfig {
    /// `spec.loadBalancerClass` of the Services we own; Services of any other class are ignored.
    pub class: String,
    /// Also serve Services without a class, as MetalLB does by default. API servers before 1.21
    /// drop `spec.loadBalancerClass` altogether, so there this must stay on.
    pub unclassed: bool,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        LoadBalancerConfig { class: "fulcrum.io/lb".into(), unclassed: true }
    }
}

/// The management HTTP endpoint, on a kernel socket (never on the data ports).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct AdminConfig {
    /// Where to listen; `null` turns the endpoint off.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9100))) }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PortConfig {
    pub name: String,
    /// PCI address (`0000:03:00.0`) or a vdev string (`net_af_xdp0,iface=veth-lb`).
    pub device: String,
    /// The MAC this port answers ARP/NDP with.
    pub mac: MacAddr,
    /// The appliance's own IPv4 address on this port with its on-link prefix; also the FullNAT
    /// source address.
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
    /// Gateway for destinations that are not on-link.
    #[serde(default)]
    pub next_hop: NextHop,
    /// IP MTU of the link; DSR encapsulation that would exceed it is refused with ICMP.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// FullNAT source addresses (LVS's local addresses), IPv4 and IPv6, at most 16 of each:
    /// new flows take (address, port) pairs from them in turn instead of the port's own
    /// address, so each backend has that many times the tuples (a tuple a backend holds in
    /// TIME-WAIT comes round that much later). Fulcrum answers ARP/NDP and ping for them; ones
    /// outside the port's prefix must be routed to it. Empty: the port's own addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat_addresses: Vec<IpAddr>,
}

/// Most `snat_addresses` of one family on a port.
pub const MAX_SNAT_ADDRESSES: usize = 16;

fn default_mtu() -> u16 {
    1500
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct NextHop {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// The gateway's MAC, if known in advance (as Katran's default-gateway MAC). Otherwise it is
    /// learned from ARP/NDP and solicited when missing.
    pub mac: Option<MacAddr>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct WorkersConfig {
    /// CPU cores, one pinned worker each.
    pub cores: Vec<usize>,
    /// Sleep when idle instead of busy polling (for labs and laptops).
    #[serde(default)]
    pub idle_backoff: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct VipPool {
    pub name: String,
    pub cidrs: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ForwardingConfig {
    /// Mode for Services without the `fulcrum.io/forwarding` annotation.
    #[serde(default)]
    pub default_mode: ForwardingMode,
    /// DSR IP-in-IP: outer source addresses are taken from this prefix, the host part varied per
    /// flow (client port XOR the low 16 bits of the client address, as Katran does) so that
    /// backends spread encapsulated traffic over their receive queues.
    #[serde(default = "default_dsr_source_v4")]
    pub dsr_source_v4: Ipv4Net,
    #[serde(default = "default_dsr_source_v6")]
    pub dsr_source_v6: Ipv6Net,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            default_mode: ForwardingMode::default(),
            dsr_source_v4: default_dsr_source_v4(),
            dsr_source_v6: default_dsr_source_v6(),
        }
    }
}

/// Ingress serving: where, which class, and the limits a client must keep to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct L7Config {
    /// The address Ingresses of our class are served on (answered for by ARP like a VIP).
    pub address: std::net::Ipv4Addr,
    /// TCP ports served with plain HTTP.
    #[serde(default = "default_l7_ports")]
    pub http_ports: Vec<u16>,
    /// TCP ports served with TLS (certificates from the Ingresses' TLS Secrets).
    #[serde(default = "default_l7_tls_ports")]
    pub https_ports: Vec<u16>,
    #[serde(default = "default_ingress_class")]
    pub ingress_class: String,
    #[serde(default)]
    pub limits: L7Limits,
    #[serde(default)]
    pub timeouts: L7Timeouts,
    /// Bytes of receive and of send buffer per TCP connection (each way, client and upstream).
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer: usize,
    /// One JSON line per request; absent: no access log.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
}

/// The L7 access log: each worker hands its requests to a writer thread through a ring of
/// `ring_bytes` (about 100 bytes a request, more with long paths); a request that finds the
/// ring full is not logged but counted (`fulcrum_l7_access_log_dropped_total`), never waited
/// for.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct AccessLogConfig {
    /// A file, appended to (opened again when it is moved away or removed, as logrotate
    /// does), or `-` for standard output.
    pub path: String,
    #[serde(default = "default_access_log_ring")]
    pub ring_bytes: usize,
}

/// A ring's bounds: 64 KiB to 1 GiB.
pub const MIN_ACCESS_LOG_RING: usize = 64 << 10;
pub const MAX_ACCESS_LOG_RING: usize = 1 << 30;

/// 4 MiB: at 100,000 requests/s a worker writes about 10 MB/s, so 0.4 s of them while the
/// writer waits for a slow disk.
fn default_access_log_ring() -> usize {
    4 << 20
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct L7Limits {
    /// Request line and headers (431 beyond).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Request target (414 beyond).
    pub max_uri_bytes: usize,
    /// Request body (413 beyond).
    pub max_body_bytes: u64,
    /// Client connections open at once on each worker core, handshakes included (nginx's
    /// `worker_connections`). A SYN that would open one more is dropped and counted
    /// (`fulcrum_drops_total{reason="l7_connection_limit"}`): the client sends it again (TCP's
    /// backoff), as to a full listen backlog, and the connections open are not disturbed.
    pub max_connections: usize,
}

/// Per worker core: an idle client connection costs about 1.1 KiB (smoltcp's socket in its
/// set, 488 bytes; the proxy's slot, 296; its shard and table entries; no buffer), so 100,000
/// of them about 110 MiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

impl Default for L7Limits {
    fn default() -> Self {
        L7Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 1 << 30,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Milliseconds.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct L7Timeouts {
    /// From a connection's first byte (or the end of the previous response) to a complete
    /// request head: 408 after it, so slow clients cannot hold connections.
    pub header_ms: u64,
    /// A new upstream connection not answered (SYN-ACK) within it: the request goes to another
    /// endpoint of its route, and that endpoint is passed over for 10 s (504 when none is left).
    pub connect_ms: u64,
    /// Waiting for an upstream's response head, from the request's last byte sent upstream
    /// (504 after it): an upload that keeps moving is not cut.
    pub upstream_ms: u64,
    /// A kept-alive client connection with no request; also a response body or WebSocket
    /// tunnel with no byte moving either way (cut after it, as nginx's proxy_read_timeout).
    pub idle_ms: u64,
    /// On SIGTERM, how long `fulcrum run` lets client connections finish the request under
    /// way before it stops (idle ones are closed at once, new ones refused; ingress-nginx's
    /// graceful shutdown, Envoy's drain time); 0: stop at once. SIGINT, or a second SIGTERM,
    /// stops at once.
    pub drain_ms: u64,
}

impl Default for L7Timeouts {
    fn default() -> Self {
        // connect_ms: Envoy's connect_timeout and HAProxy's usual `timeout connect` (5 s).
        L7Timeouts { header_ms: 10_000, connect_ms: 5_000, upstream_ms: 30_000, idle_ms: 60_000, drain_ms: 10_000 }
    }
}

fn default_l7_ports() -> Vec<u16> {
    vec![80]
}

fn default_l7_tls_ports() -> Vec<u16> {
    vec![443]
}

fn default_ingress_class() -> String {
    "fulcrum".into()
}

fn default_socket_buffer() -> usize {
    16 * 1024
}

fn default_dsr_source_v4() -> Ipv4Net {
    "172.16.0.0/16".parse().unwrap()
}

fn default_dsr_source_v6() -> Ipv6Net {
    "fd00:f17c::/112".parse().unwrap()
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ConntrackConfig {
    /// Flows per worker core (both directions of a flow count once).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// IPv6 flows per worker core; IPv6 records take two cache lines, so they get their own
    /// bound. Default: a quarter of `capacity`.
    #[serde(default)]
    pub capacity_v6: Option<u32>,
    #[serde(default)]
    pub timeouts: Timeouts,
}

impl ConntrackConfig {
    pub fn v6_capacity(&self) -> u32 {
        self.capacity_v6.unwrap_or((self.capacity / 4).max(1))
    }
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig { capacity: default_capacity(), capacity_v6: None, timeouts: Timeouts::default() }
    }
}

fn default_capacity() -> u32 {
    1 << 20
}

/// Idle timeouts in seconds, per TCP state and for UDP (defaults follow Linux conntrack/IPVS).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_fin: u32,
    pub tcp_closed: u32,
    /// A FullNAT connection the backend closed first: the backend holds its tuple (SNAT
    /// address and port, backend address and port) in TIME-WAIT, 60 s on Linux. The flow is
    /// kept that long so new connections to that backend take other SNAT ports meanwhile: a SYN
    /// on a tuple in TIME-WAIT is answered with a stale ACK unless its sequence number happens
    /// to be higher, and a client that does not retransmit at once after its RST waits a second.
    pub tcp_time_wait: u32,
    pub udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { tcp_syn: 30, tcp_established: 900, tcp_fin: 30, tcp_closed: 10, tcp_time_wait: 60, udp: 30 }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct MaglevConfig {
    /// Lookup table size; must be prime and at least 100 x the largest backend count for 1% balance.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig { table_size: default_table_size() }
    }
}

fn default_table_size() -> u32 {
    65537
}

/// Each worker's neighbour table (ARP and NDP): next hops, backends and on-link clients.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct NeighborsConfig {
    /// Entries per worker core. A full table makes room by dropping the entry used least
    /// recently; one used within `reachable_ms` is never dropped to learn an unasked sender.
    pub capacity: u32,
    /// How long an answer counts as proof that a neighbour is at its MAC (Linux's
    /// `base_reachable_time_ms`; each entry draws between half and one and a half of it). Past
    /// it, a neighbour still being sent to is asked again by unicast; after `probes` unanswered
    /// questions it is asked by broadcast instead, so a MAC that changed without a gratuitous
    /// ARP is found within about 1.5 x `reachable_ms` + `probes` seconds.
    pub reachable_ms: u32,
    /// Unicast questions, one a second, before the entry is given up (Linux's `ucast_solicit`).
    pub probes: u8,
}

impl Default for NeighborsConfig {
    fn default() -> Self {
        NeighborsConfig { capacity: 4096, reachable_ms: 30_000, probes: 3 }
    }
}

/// Backends judged by the traffic itself: a TCP endpoint that leaves clients' SYNs unanswered
/// (FullNAT, where its answers come back through the appliance) is passed over by new flows for
/// a while, on each core that saw it, without an active health check.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct PassiveHealthConfig {
    /// Client SYNs sent again on flows the endpoint never answered (a client re-sends after a
    /// second or more) before new TCP flows pass over it; one answer starts the count over.
    /// 0: off.
    pub unanswered_syns: u8,
    /// How long new flows pass over such an endpoint; after that the next flow tries it, and
    /// one more unanswered SYN passes over it again.
    pub pass_over_ms: u32,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig { unanswered_syns: 3, pass_over_ms: 10_000 }
    }
}

/// Upper bound for `neighbors.capacity` (a flow keeps an entry's slot in 16 bits).
pub const MAX_NEIGHBORS: u32 = 65534;

/// A MAC address written `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("invalid MAC address {s:?}: expected six hex octets separated by ':'"));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("invalid MAC address {s:?}: {p:?} is not a hex octet"))?;
        }
        Ok(MacAddr(out))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Bootstrap {
    /// Whether `ip` lies in one of the VIP pools.
    pub fn in_vip_pools(&self, ip: &std::net::IpAddr) -> bool {
        self.vip_pools.iter().any(|p| p.cidrs.iter().any(|c| c.contains(ip)))
    }

    /// Reads and validates a bootstrap file.
    pub fn load(path: &Path) -> Result<Bootstrap, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and validates bootstrap YAML; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Bootstrap, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let boot: Bootstrap = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let err = ConfigError::new(path, strip_path_prefix(&e.into_inner().to_string(), &field));
            if field.is_empty() || field == "." {
                err
            } else {
                err.field(field)
            }
        })?;
        boot.validate().map_err(|(field, msg)| ConfigError::new(path, msg).field(field))?;
        Ok(boot)
    }

    /// Checks what the types alone cannot; returns the offending field and a message.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn fail<T>(field: impl Into<String>, msg: impl Into<String>) -> Result<T, (String, String)> {
            Err((field.into(), msg.into()))
        }
        if let Some(le) = &self.leader_election {
            if le.renew_seconds == 0 || le.renew_seconds >= le.lease_seconds {
                return fail(
                    "leader_election.renew_seconds",
                    format!(
                        "{} must be at least 1 and less than lease_seconds ({})",
                        le.renew_seconds, le.lease_seconds
                    ),
                );
            }
        }
        if self.load_balancer.class.trim().is_empty() {
            return fail("load_balancer.class", "must not be empty");
        }
        if let Some(l7) = &self.l7 {
            if l7.http_ports.contains(&0) || l7.https_ports.contains(&0) {
                return fail("l7.http_ports", "no port 0");
            }
            if l7.http_ports.is_empty() && l7.https_ports.is_empty() {
                return fail("l7.http_ports", "list at least one port (or l7.https_ports)");
            }
            if let Some(p) = l7.http_ports.iter().find(|p| l7.https_ports.contains(p)) {
                return fail("l7.https_ports", format!("port {p} is also in l7.http_ports"));
            }
            if self.ports.iter().any(|p| p.ipv4.map(|a| a.addr()) == Some(l7.address)) {
                return fail(
                    "l7.address",
                    format!("{} is the port's own address; give the L7 service an address of its own", l7.address),
                );
            }
            if l7.timeouts.connect_ms == 0 {
                return fail("l7.timeouts.connect_ms", "must be at least 1");
            }
            if !(1024..=1 << 20).contains(&l7.socket_buffer) {
                return fail("l7.socket_buffer", "must be between 1024 and 1048576 bytes");
            }
            if let Some(log) = &l7.access_log {
                if log.path.is_empty() {
                    return fail("l7.access_log.path", "name a file, or - for standard output");
                }
                if !(MIN_ACCESS_LOG_RING..=MAX_ACCESS_LOG_RING).contains(&log.ring_bytes) {
                    return fail(
                        "l7.access_log.ring_bytes",
                        format!(
                            "{} is out of range: must be {MIN_ACCESS_LOG_RING} to {MAX_ACCESS_LOG_RING}",
                            log.ring_bytes
                        ),
                    );
                }
            }
            if l7.limits.max_header_bytes < 256 || l7.limits.max_headers == 0 {
                return fail("l7.limits", "max_header_bytes must be at least 256 and max_headers at least 1");
            }
            if l7.limits.max_connections == 0 {
                return fail("l7.limits.max_connections", "must be at least 1 (connections per worker core)");
            }
        }
        if self.ports.is_empty() {
            return fail("ports", "at least one port is required");
        }
        for (i, port) in self.ports.iter().enumerate() {
            let f = |name: &str| format!("ports[{i}].{name}");
            if port.name.trim().is_empty() {
                return fail(f("name"), "must not be empty");
            }
            if let Some(j) = self.ports[..i].iter().position(|p| p.name == port.name) {
                return fail(f("name"), format!("duplicate port name {:?} (also ports[{j}])", port.name));
            }
            if port.device.trim().is_empty() {
                return fail(f("device"), "must not be empty");
            }
            if port.mac.0 == [0; 6] {
                return fail(f("mac"), "must not be 00:00:00:00:00:00");
            }
            if port.mac.0[0] & 1 != 0 {
                return fail(f("mac"), format!("{} is a multicast address; a port needs a unicast MAC", port.mac));
            }
            if port.ipv4.is_none() && port.ipv6.is_none() {
                return fail(f("ipv4"), "a port needs an ipv4 or an ipv6 address (or both)");
            }
            if let Some(net) = port.ipv4 {
                let edge = net.addr() == net.network() || net.addr() == net.broadcast();
                if net.prefix_len() == 32 || (edge && net.prefix_len() < 31) {
                    return fail(f("ipv4"), format!("{net} is not a host address with an on-link prefix"));
                }
            }
            if let Some(net) = port.ipv6 {
                if net.prefix_len() == 128 {
                    return fail(f("ipv6"), format!("{net} needs an on-link prefix shorter than /128"));
                }
            }
            let min_mtu = if port.ipv6.is_some() { 1280 } else { 576 };
            if port.mtu < min_mtu {
                let why =
                    if port.ipv6.is_some() { "IPv6 requires at least 1280" } else { "IPv4 requires at least 576" };
                return fail(f("mtu"), format!("{} is too small: {why}", port.mtu));
            }
            if let Some(gw) = port.next_hop.ipv4 {
                match port.ipv4 {
                    None => return fail(f("next_hop.ipv4"), format!("{gw} given but the port has no ipv4 address")),
                    Some(net) if !net.contains(&gw) => {
                        return fail(
                            f("next_hop.ipv4"),
                            format!("{gw} is not on-link: outside the port's prefix {}", net.trunc()),
                        )
                    }
                    Some(net) if net.addr() == gw => {
                        return fail(f("next_hop.ipv4"), format!("{gw} is the port's own address"))
                    }
                    Some(_) => {}
                }
            }
            if let Some(gw) = port.next_hop.ipv6 {
                let link_local = (gw.segments()[0] & 0xffc0) == 0xfe80;
                match port.ipv6 {
                    None => return fail(f("next_hop.ipv6"), format!("{gw} given but the port has no ipv6 address")),
                    Some(net) if !link_local && !net.contains(&gw) => {
                        return fail(
                            f("next_hop.ipv6"),
                            format!("{gw} is not on-link: outside the port's prefix {}", net.trunc()),
                        )
                    }
                    Some(net) if net.addr() == gw => {
                        return fail(f("next_hop.ipv6"), format!("{gw} is the port's own address"))
                    }
                    Some(_) => {}
                }
            }
            if let Some(mac) = port.next_hop.mac {
                if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
                    return fail(f("next_hop.mac"), format!("{mac} is not a unicast MAC address"));
                }
            }
        }
        if self.workers.cores.is_empty() {
            return fail("workers.cores", "at least one core is required");
        }
        for (i, c) in self.workers.cores.iter().enumerate() {
            if let Some(j) = self.workers.cores[..i].iter().position(|d| d == c) {
                return fail(
                    format!("workers.cores[{i}]"),
                    format!("core {c} is listed twice (also workers.cores[{j}])"),
                );
            }
        }
        if self.vip_pools.is_empty() {
            return fail("vip_pools", "at least one VIP pool is required");
        }
        for (i, pool) in self.vip_pools.iter().enumerate() {
            if pool.name.trim().is_empty() {
                return fail(format!("vip_pools[{i}].name"), "must not be empty");
            }
            if let Some(j) = self.vip_pools[..i].iter().position(|p| p.name == pool.name) {
                return fail(
                    format!("vip_pools[{i}].name"),
                    format!("duplicate pool name {:?} (also vip_pools[{j}])", pool.name),
                );
            }
            if pool.cidrs.is_empty() {
                return fail(format!("vip_pools[{i}].cidrs"), format!("pool {:?} has no CIDRs", pool.name));
            }
            for (k, cidr) in pool.cidrs.iter().enumerate() {
                for (j, other) in self.vip_pools[..=i].iter().enumerate() {
                    let upto = if j == i { k } else { other.cidrs.len() };
                    for (l, o) in other.cidrs[..upto].iter().enumerate() {
                        if overlaps(cidr, o) {
                            return fail(
                                format!("vip_pools[{i}].cidrs[{k}]"),
                                format!(
                                    "{cidr} of pool {:?} overlaps {o} of pool {:?} (vip_pools[{j}].cidrs[{l}])",
                                    pool.name, other.name
                                ),
                            );
                        }
                    }
                }
            }
        }
        for (i, port) in self.ports.iter().enumerate() {
            let mut counts = [0usize; 2];
            for (k, &a) in port.snat_addresses.iter().enumerate() {
                let f = format!("ports[{i}].snat_addresses[{k}]");
                let (own, family) = match a {
                    IpAddr::V4(v4) => {
                        if v4.is_broadcast() {
                            return fail(f, format!("{a} is not a unicast address"));
                        }
                        (port.ipv4.map(|n| IpAddr::V4(n.addr())), 0)
                    }
                    IpAddr::V6(_) => (port.ipv6.map(|n| IpAddr::V6(n.addr())), 1),
                };
                if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                    return fail(f, format!("{a} is not a unicast address"));
                }
                if own.is_none() {
                    let v = if family == 0 { "ipv4" } else { "ipv6" };
                    return fail(
                        f,
                        format!("{a} given but the port has no {v} address (return traffic is matched there)"),
                    );
                }
                counts[family] += 1;
                if counts[family] > MAX_SNAT_ADDRESSES {
                    return fail(f, format!("more than {MAX_SNAT_ADDRESSES} addresses of one family"));
                }
                if let Some(j) = port.snat_addresses[..k].iter().position(|&b| b == a) {
                    return fail(f, format!("{a} is listed twice (also snat_addresses[{j}])"));
                }
                for (j, other) in self.ports.iter().enumerate() {
                    let theirs = other.ipv4.map(|n| IpAddr::V4(n.addr())) == Some(a)
                        || other.ipv6.map(|n| IpAddr::V6(n.addr())) == Some(a);
                    if j != i && (theirs || (j < i && other.snat_addresses.contains(&a))) {
                        return fail(f, format!("{a} belongs to ports[{j}]"));
                    }
                }
                if self.l7.as_ref().is_some_and(|l7| IpAddr::V4(l7.address) == a) {
                    return fail(f, format!("{a} is the L7 address"));
                }
                for (j, pool) in self.vip_pools.iter().enumerate() {
                    if let Some(l) = pool.cidrs.iter().position(|c| c.contains(&a)) {
                        return fail(
                            f,
                            format!(
                                "{a} is in VIP pool {:?} ({}, vip_pools[{j}].cidrs[{l}])",
                                pool.name, pool.cidrs[l]
                            ),
                        );
                    }
                }
            }
        }
        let cap = self.conntrack.capacity;
        if cap == 0 {
            return fail("conntrack.capacity", "must be greater than 0");
        }
        let t = &self.conntrack.timeouts;
        for (name, v) in [
            ("tcp_syn", t.tcp_syn),
            ("tcp_established", t.tcp_established),
            ("tcp_fin", t.tcp_fin),
            ("tcp_closed", t.tcp_closed),
            ("tcp_time_wait", t.tcp_time_wait),
            ("udp", t.udp),
        ] {
            if v == 0 {
                return fail(format!("conntrack.timeouts.{name}"), "must be greater than 0 seconds");
            }
        }
        let n = &self.neighbors;
        if n.capacity == 0 || n.capacity > MAX_NEIGHBORS {
            return fail("neighbors.capacity", format!("{} is out of range: must be 1 to {MAX_NEIGHBORS}", n.capacity));
        }
        if n.reachable_ms < 1000 {
            return fail("neighbors.reachable_ms", format!("{} is too short: must be at least 1000", n.reachable_ms));
        }
        if n.probes == 0 {
            return fail("neighbors.probes", "must be greater than 0");
        }
        let h = &self.passive_health;
        if h.unanswered_syns > 0 && h.pass_over_ms < 1000 {
            return fail(
                "passive_health.pass_over_ms",
                format!(
                    "{} is too short: must be at least 1000 (or unanswered_syns 0 to turn the check off)",
                    h.pass_over_ms
                ),
            );
        }
        let size = self.maglev.table_size;
        if size >= MAX_TABLE_SIZE {
            return fail("maglev.table_size", format!("{size} is too large: must be below {MAX_TABLE_SIZE} (2^24)"));
        }
        if !is_prime(size) {
            return fail(
                "maglev.table_size",
                format!("{size} is not prime (Maglev needs a prime table size, e.g. 65537)"),
            );
        }
        Ok(())
    }
}

/// serde_yaml_ng prefixes its messages with the (partial) path it knows; the error already names
/// the full field, so drop the repetition.
pub(crate) fn strip_path_prefix(msg: &str, field: &str) -> String {
    if let Some((head, rest)) = msg.split_once(": ") {
        if !head.is_empty() && field.starts_with(head) && !head.contains(' ') {
            return rest.to_string();
        }
    }
    msg.to_string()
}

/// Upper bound (exclusive) for `maglev.table_size`.
pub const MAX_TABLE_SIZE: u32 = 1 << 24;

/// Whether two prefixes share at least one address (of the same family).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Trial division; fine for table sizes below 2^24.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the workspace says 1.85
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = include_str!("../examples/bootstrap.yaml");

    fn parse(text: &str) -> Result<Bootstrap, ConfigError> {
        Bootstrap::parse(Path::new("boot.yaml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    /// The lab file with one substitution applied (which must match).
    fn lab_with(from: &str, to: &str) -> String {
        assert!(LAB.contains(from), "test bug: {from:?} not in the lab file");
        LAB.replacen(from, to, 1)
    }

    #[test]
    fn lab_file_parses() {
        let b = parse(LAB).unwrap();
        assert_eq!(b.ports.len(), 1);
        let p = &b.ports[0];
        assert_eq!(p.device, "net_af_xdp0,iface=veth-lb");
        assert_eq!(p.mac, MacAddr([0x02, 0xf1, 0, 0, 0, 1]));
        assert_eq!(p.ipv4, Some("10.10.0.2/24".parse().unwrap()));
        assert_eq!(p.next_hop.ipv6, Some("fd00:10::1".parse().unwrap()));
        assert_eq!(b.workers.cores, vec![0]);
        assert_eq!(b.vip_pools[0].cidrs.len(), 2);
        assert_eq!(b.conntrack.capacity, 65536);
        assert_eq!(b.conntrack.timeouts.tcp_established, 600);
        assert_eq!(b.conntrack.timeouts.udp, 30, "unset timeouts keep their defaults");
        assert_eq!(b.maglev.table_size, 65537);
        assert_eq!(b.forwarding.default_mode, ForwardingMode::FullNat);
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let b = parse(
            "ports: [{name: p, device: d, mac: '02:00:00:00:00:01', ipv4: 192.0.2.1/24}]\n\
             workers: {cores: [1, 2]}\nvip_pools: [{name: a, cidrs: [198.51.100.0/24]}]\n",
        )
        .unwrap();
        assert_eq!(b.ports[0].mtu, 1500);
        assert_eq!(b.maglev.table_size, 65537);
        assert_eq!(b.conntrack.capacity, 1 << 20);
        assert_eq!(b.forwarding.dsr_source_v4, "172.16.0.0/16".parse::<Ipv4Net>().unwrap());
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let e = err(&lab_with("    mtu: 1500\n", "    mtu: 1500\n    speed: 10G\n"));
        assert!(e.starts_with("boot.yaml: "), "{e}");
        assert!(e.contains("unknown field `speed`"), "{e}");
        assert!(e.contains("field ports[0]"), "{e}");
        let e = err(&lab_with("maglev:", "magleve:"));
        assert!(e.contains("unknown field `magleve`"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field_and_line() {
        let e = err(&lab_with("02:f1:00:00:00:01", "02:f1:00:00:00"));
        assert!(e.contains("field ports[0].mac"), "{e}");
        assert!(e.contains("six hex octets"), "{e}");
        assert!(e.contains("at line 5"), "{e}");
        assert!(!e.contains(": ports[0]: "), "path not repeated: {e}");
        let e = err(&lab_with("10.20.0.0/24", "10.20.0.0/33"));
        assert!(e.contains("field vip_pools[0].cidrs[0]"), "{e}");
        let e = err(&lab_with("cores: [0]", "cores: [zero]"));
        assert!(e.contains("field workers.cores[0]"), "{e}");
    }

    #[test]
    fn missing_required_key() {
        let e = err("ports: []\nvip_pools: []\n");
        assert!(e.contains("missing field `workers`"), "{e}");
    }

    #[test]
    fn broken_yaml_has_a_location() {
        let e = err("ports: [\n  {name: a\n");
        assert!(e.starts_with("boot.yaml: "), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn validation_rules() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("ports:\n  - name: lab0", "ports: []\n_x:\n  - name: lab0", "", "unknown field `_x`"),
            ("    ipv4: 10.10.0.2/24\n    ipv6: fd00:10::2/64\n", "", "ports[0].ipv4", "ipv4 or an ipv6"),
            ("cores: [0]", "cores: []", "workers.cores", "at least one core"),
            ("cores: [0]", "cores: [0, 3, 0]", "workers.cores[2]", "listed twice"),
            (
                "vip_pools:\n  - name: lab",
                "vip_pools:\n  - name: a\n    cidrs: [10.20.0.128/25]\n  - name: lab",
                "vip_pools[1].cidrs[0]",
                "overlaps 10.20.0.128/25 of pool \"a\"",
            ),
            (
                "      - fd00:20::/120",
                "      - fd00:20::/120\n      - fd00:20::80/121",
                "vip_pools[0].cidrs[2]",
                "overlaps fd00:20::/120",
            ),
            ("table_size: 65537", "table_size: 65536", "maglev.table_size", "not prime"),
            ("table_size: 65537", "table_size: 1", "maglev.table_size", "not prime"),
            ("table_size: 65537", "table_size: 16777259", "maglev.table_size", "too large"),
            ("capacity: 65536", "capacity: 0", "conntrack.capacity", "greater than 0"),
            ("tcp_established: 600", "tcp_fin: 0", "conntrack.timeouts.tcp_fin", "greater than 0"),
            ("maglev:", "neighbors:\n  capacity: 65535\nmaglev:", "neighbors.capacity", "1 to 65534"),
            ("maglev:", "neighbors:\n  capacity: 0\nmaglev:", "neighbors.capacity", "1 to 65534"),
            ("maglev:", "neighbors:\n  reachable_ms: 999\nmaglev:", "neighbors.reachable_ms", "at least 1000"),
            ("maglev:", "neighbors:\n  probes: 0\nmaglev:", "neighbors.probes", "greater than 0"),
            (
                "maglev:",
                "passive_health:\n  pass_over_ms: 999\nmaglev:",
                "passive_health.pass_over_ms",
                "at least 1000",
            ),
            ("connect_ms: 2000", "connect_ms: 0", "l7.timeouts.connect_ms", "at least 1"),
            (
                "    upstream_ms: 15000\n",
                "    upstream_ms: 15000\n  limits:\n    max_connections: 0\n",
                "l7.limits.max_connections",
                "at least 1",
            ),
            (
                "    upstream_ms: 15000\n",
                "    upstream_ms: 15000\n  access_log:\n    path: /tmp/a.log\n    ring_bytes: 4096\n",
                "l7.access_log.ring_bytes",
                "65536 to 1073741824",
            ),
            (
                "    upstream_ms: 15000\n",
                "    upstream_ms: 15000\n  access_log:\n    path: \"\"\n",
                "l7.access_log.path",
                "standard output",
            ),
            ("mtu: 1500", "mtu: 1200", "ports[0].mtu", "1280"),
            ("      ipv4: 10.10.0.1\n", "      ipv4: 10.11.0.1\n", "ports[0].next_hop.ipv4", "not on-link"),
            ("      ipv6: fd00:10::1\n", "      ipv6: fd00:11::1\n", "ports[0].next_hop.ipv6", "not on-link"),
            ("      ipv4: 10.10.0.1\n", "      ipv4: 10.10.0.2\n", "ports[0].next_hop.ipv4", "own address"),
            ("02:f1:00:00:00:01", "03:f1:00:00:00:01", "ports[0].mac", "multicast"),
            (
                "    mtu: 1500\n",
                "    mtu: 1500\n    snat_addresses: [10.10.0.20, 10.10.0.20]\n",
                "ports[0].snat_addresses[1]",
                "listed twice",
            ),
            (
                "    mtu: 1500\n",
                "    mtu: 1500\n    snat_addresses: [\"fd00:10::20\", 10.20.0.5]\n",
                "ports[0].snat_addresses[1]",
                "in VIP pool \"lab\"",
            ),
            (
                "    mtu: 1500\n",
                "    mtu: 1500\n    snat_addresses: [0.0.0.0]\n",
                "ports[0].snat_addresses[0]",
                "not a unicast",
            ),
            (
                "    mtu: 1500\n",
                "    mtu: 1500\n    snat_addresses: [\"ff02::1\"]\n",
                "ports[0].snat_addresses[0]",
                "not a unicast",
            ),
            (
                "    mtu: 1500\n",
                "    mtu: 1500\n    snat_addresses: [10.20.0.100]\n",
                "ports[0].snat_addresses[0]",
                "L7 address",
            ),
            (
                "vip_pools:\n  - name: lab\n    cidrs:",
                "vip_pools:\n  - name: lab\n    cidrs: [10.30.0.0/24]\n  - name: lab\n    cidrs:",
                "vip_pools[1].name",
                "duplicate pool name",
            ),
        ];
        for (from, to, field, msg) in cases {
            let e = err(&lab_with(from, to));
            if !field.is_empty() {
                assert!(e.contains(&format!(": field {field}: ")), "{to:?}: {e}");
            }
            assert!(e.contains(msg), "{to:?}: {e}");
        }
    }

    #[test]
    fn snat_addresses_of_both_families_parse_and_need_the_family_on_the_port() {
        let b = parse(&lab_with(
            "    mtu: 1500\n",
            "    mtu: 1500\n    snat_addresses: [10.10.0.20, \"fd00:10::20\", 10.10.0.2]\n",
        ))
        .unwrap();
        assert_eq!(b.ports[0].snat_addresses.len(), 3, "the port's own address may be one of them");
        let v4_only = lab_with("    ipv6: fd00:10::2/64\n", "").replace("      ipv6: fd00:10::1\n", "");
        let e = err(&v4_only.replace("    mtu: 1500\n", "    mtu: 1500\n    snat_addresses: [\"fd00:10::20\"]\n"));
        assert!(e.contains("field ports[0].snat_addresses[0]: ") && e.contains("no ipv6 address"), "{e}");
        let many: Vec<String> = (20..37).map(|i| format!("10.10.0.{i}")).collect();
        let e =
            err(&lab_with("    mtu: 1500\n", &format!("    mtu: 1500\n    snat_addresses: [{}]\n", many.join(", "))));
        assert!(e.contains("field ports[0].snat_addresses[16]: ") && e.contains("more than 16"), "{e}");
    }

    #[test]
    fn v4_only_port_accepts_small_mtu_and_link_local_v6_gateway_is_on_link() {
        let text = lab_with("    ipv6: fd00:10::2/64\n", "").replace("      ipv6: fd00:10::1\n", "");
        let b = parse(&text.replace("mtu: 1500", "mtu: 576")).unwrap();
        assert_eq!(b.ports[0].mtu, 576);
        assert!(parse(&text.replace("mtu: 1500", "mtu: 575")).is_err());
        let b = parse(&lab_with("      ipv6: fd00:10::1\n", "      ipv6: fe80::1\n")).unwrap();
        assert_eq!(b.ports[0].next_hop.ipv6, Some("fe80::1".parse().unwrap()));
    }

    #[test]
    fn duplicate_port_names() {
        let two = "ports:\n  - {name: a, device: d0, mac: '02:00:00:00:00:01', ipv4: 192.0.2.1/24}\n  \
                   - {name: a, device: d1, mac: '02:00:00:00:00:02', ipv4: 192.0.3.1/24}\n\
                   workers: {cores: [0]}\nvip_pools: [{name: p, cidrs: [198.51.100.0/24]}]\n";
        let e = err(two);
        assert!(e.contains("field ports[1].name: duplicate port name \"a\""), "{e}");
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(16777213) && !is_prime(65535) && !is_prime(25));
    }

    proptest::proptest! {
        #[test]
        fn overlap_is_symmetric_and_matches_brute_force(a in 0u32..256, al in 24u8..=32, b in 0u32..256, bl in 24u8..=32) {
            let na = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | a), al).unwrap().trunc());
            let nb = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | b), bl).unwrap().trunc());
            let brute = (0u32..256).any(|x| {
                let ip = std::net::IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | x));
                na.contains(&ip) && nb.contains(&ip)
            });
            proptest::prop_assert_eq!(overlaps(&na, &nb), brute);
            proptest::prop_assert_eq!(overlaps(&nb, &na), brute);
        }
    }
}
