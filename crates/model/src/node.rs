use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Backend;

/// An Ethernet address, written the way `ip link` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts
                .next()
                .ok_or_else(|| format!("bad MAC address {s:?}"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC address {s:?}"));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A stable, locally administered unicast MAC for a node's VTEP, derived
/// from the node name (FNV-1a), so a VTEP re-created after a crash keeps the
/// address its peers already have in their FDB and neighbour tables.
pub fn vtep_mac_for(node: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (splitmix64) so names differing in one letter differ everywhere.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let b = h.to_be_bytes();
    MacAddr([0x0e, b[1], b[2], b[3], b[4], b[5]])
}

/// What a node publishes under its subnet lease: everything a peer needs to
/// reach the node's pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    pub subnet: Ipv4Net,
    /// The address peers must send tunnel traffic to (the public address
    /// for a node behind 1:1 NAT).
    pub public_ip: Ipv4Addr,
    pub backend: Backend,
    pub vtep_mac: MacAddr,
    /// Peers this node cannot route to, each as "NAME: why".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// This node's own BGP settings (its AS, its rack's ToR), when the
    /// cluster runs BGP; absent: the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgp>,
}

/// A node's BGP overrides, published in its record by its agent
/// (`--bgp-asn`, `--bgp-peer`, `--bgp-label`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeBgp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    /// Peers of this node only (e.g. eBGP to its rack's ToR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<crate::BgpPeer>,
    /// What the cluster's peers' node selectors match.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl NodeRecord {
    /// The VTEP's own address: the first address of the subnet, as /32
    /// (flannel's `10.244.X.0/32` on `flannel.1`).
    pub fn vtep_ip(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

/// What the agent tells the CNI plugin on the same node (written to a file
/// in the agent's run directory once the node's network is ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub node: String,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    /// The IPv4 GSO/GRO max size the pod's end of a new veth gets: the
    /// largest packet the pod sends (above 65536 is IPv4 BIG TCP). Files
    /// from before it existed mean 65536, as does a missing field below.
    #[serde(default = "default_gso_size")]
    pub pod_gso_max_size: u32,
    /// The same for the host's end: the largest packet the node hands the
    /// pod, which is the underlay's own size whatever the peers' paths.
    #[serde(default = "default_gso_size")]
    pub host_gso_max_size: u32,
}

/// The kernel's default (and pre-BIG-TCP) largest IPv4 GSO/GRO packet.
pub const DEFAULT_GSO_MAX_SIZE: u32 = 65_536;

fn default_gso_size() -> u32 {
    DEFAULT_GSO_MAX_SIZE
}

/// One pod attachment, as the CNI plugin records it for the agent in
/// `RUN_DIR/pods/HOST_VETH.json`: where the pod's end of the veth lives,
/// so the agent can change it (BIG TCP sizes) after ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    pub container_id: String,
    pub ifname: String,
    /// The pod's network namespace, as the runtime named it (CNI_NETNS).
    pub netns: std::path::PathBuf,
    pub host_veth: String,
}

/// A pod's host ports, as the CNI plugin records them for the agent in
/// `RUN_DIR/hostports/` (one file per attachment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPorts {
    pub pod_ip: Ipv4Addr,
    /// (protocol, host port, container port)
    pub mappings: Vec<(crate::Protocol, u16, u16)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_rejects() {
        let m: MacAddr = "0e:01:aB:ff:00:10".parse().unwrap();
        assert_eq!(m.to_string(), "0e:01:ab:ff:00:10");
        assert!("0e:01:ab:ff:00".parse::<MacAddr>().is_err());
        assert!("0e:01:ab:ff:00:10:11".parse::<MacAddr>().is_err());
        assert!("zz:01:ab:ff:00:10".parse::<MacAddr>().is_err());
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast_and_distinct() {
        let a = vtep_mac_for("node1");
        assert_eq!(a, vtep_mac_for("node1"));
        assert_ne!(a, vtep_mac_for("node2"));
        assert_eq!(a.0[0] & 0x01, 0, "unicast");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn node_state_from_before_big_tcp_still_decodes() {
        let s: NodeState =
            serde_json::from_str(r#"{"node":"n1","subnet":"10.244.1.0/24","mtu":1450}"#).unwrap();
        assert_eq!(s.pod_gso_max_size, DEFAULT_GSO_MAX_SIZE);
        assert_eq!(s.host_gso_max_size, DEFAULT_GSO_MAX_SIZE);
        let j = serde_json::to_string(&NodeState {
            pod_gso_max_size: 196_608,
            ..s
        })
        .unwrap();
        assert!(j.contains("\"podGsoMaxSize\":196608"), "{j}");
    }

    #[test]
    fn record_json_is_camel_case() {
        let r = NodeRecord {
            name: "n1".into(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            public_ip: "198.51.100.10".parse().unwrap(),
            backend: Backend::Vxlan,
            vtep_mac: vtep_mac_for("n1"),
            unreachable: Vec::new(),
            bgp: None,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"publicIp\":\"198.51.100.10\""), "{j}");
        assert_eq!(serde_json::from_str::<NodeRecord>(&j).unwrap(), r);
        assert_eq!(r.vtep_ip().to_string(), "10.244.3.0");
    }
}
