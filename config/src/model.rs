//! The desired state: what the data plane must do, independent of where it came from
//! (Kubernetes API or manifest files). Produced by `translate`, compiled by the data plane.

use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The object's `namespace/name`; the namespace defaults to `default`, as kubectl's does.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
        ObjectRef {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".to_string()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn ip_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardingMode {
    /// DNAT to the endpoint and SNAT to the appliance's own address: works with any backend.
    #[default]
    #[serde(rename = "fullnat")]
    FullNat,
    /// Encapsulate in IP-in-IP to the endpoint, which decapsulates and answers the client directly.
    DsrIpip,
}

impl fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardingMode::FullNat => "fullnat",
            ForwardingMode::DsrIpip => "dsr-ipip",
        })
    }
}

/// Endpoint condition as EndpointSlice reports it (KEP-1672).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// `ready`: takes new flows.
    Ready,
    /// `serving` and `terminating`: keeps its established flows; takes new ones only when no
    /// endpoint of the service is ready (the same fallback kube-proxy applies).
    Terminating,
    /// Neither ready nor serving: established flows are kept by conntrack, nothing new.
    NotReady,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub state: EndpointState,
    /// Relative Maglev weight (1 unless configured).
    pub weight: u32,
    /// Where it came from, for humans: pod name (targetRef) or hostname if present.
    pub target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientIpAffinity {
    pub timeout_seconds: u32,
}

/// An active health check of a Service's endpoints (annotations `fulcrum.io/health-check*`),
/// sent from the data plane so that probes take the path traffic takes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HealthCheck {
    /// `None`: a TCP connect; `Some(path)`: an HTTP/1.1 GET of the path, 2xx or 3xx passes.
    pub http_path: Option<String>,
    pub interval_ms: u32,
    /// A probe without an answer after this long fails.
    pub timeout_ms: u32,
    /// Consecutive failures that take an endpoint out, and passes that bring it back.
    pub fall: u8,
    pub rise: u8,
}

/// One L4 virtual service: a VIP, a port and a protocol, and where its flows go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VipService {
    pub service: ObjectRef,
    /// `spec.ports[].name` (empty for a single unnamed port).
    pub port_name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: ForwardingMode,
    pub affinity: Option<ClientIpAffinity>,
    pub health: Option<HealthCheck>,
    /// Clients allowed to open flows (`spec.loadBalancerSourceRanges`, host bits cleared,
    /// sorted); empty: any client. A VIP's family with no range of its own admits nobody.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// Sorted by (addr, port) so that equal inputs give equal tables.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the data plane must serve, sorted by (vip, protocol, port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<VipService>,
    /// Ingress routes of our class (empty without an `l7` section in the bootstrap file).
    pub l7: crate::ingress::L7State,
}
