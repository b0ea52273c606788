//! The bootstrap file: what the appliance is (NICs, cores, its own addresses, VIP pools, modes,
//! table sizes). YAML, unknown keys rejected, every error names the file and the field.

use crate::error::ConfigError;
use crate::model::ForwardingMode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};
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
}

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
    #[serde(default)]
    pub timeouts: Timeouts,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig { capacity: default_capacity(), timeouts: Timeouts::default() }
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
    pub udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { tcp_syn: 30, tcp_established: 900, tcp_fin: 30, tcp_closed: 10, udp: 30 }
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
    /// Reads and validates a bootstrap file.
    pub fn load(path: &Path) -> Result<Bootstrap, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and validates bootstrap YAML; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Bootstrap, ConfigError> {
        todo!("config helper: parse {path:?} {}", text.len())
    }
}
