use std::fmt;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Why a cluster configuration cannot be used. Each variant names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("clusterCIDR {0}: the node subnet length {1} must be longer than the cluster prefix and at most 30")]
    SubnetLen(Ipv4Net, u8),
    #[error("serviceCIDR {service} overlaps clusterCIDR {cluster}")]
    Overlap { cluster: Ipv4Net, service: Ipv4Net },
    #[error("vni {0} is out of range (1..=16777215)")]
    Vni(u32),
    #[error("port must not be 0")]
    Port,
    #[error("mtu {0} is out of range (576..=9000)")]
    Mtu(u32),
    #[error("unknown backend {0:?} (known: auto, vxlan, host-gw, ipip)")]
    Backend(String),
    #[error("{0}")]
    Pool(String),
    #[error("config does not decode: {0}")]
    Decode(String),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Bgp(Vec<crate::FieldError>),
}

/// How pod traffic crosses between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Per peer: direct routes where the peer shares a segment and a probe
    /// shows pod-addressed traffic gets through, VXLAN otherwise.
    #[default]
    Auto,
    /// flannel-compatible VXLAN: one device, static FDB and neighbour entries.
    Vxlan,
    /// Direct routes to every peer (flannel's host-gw); peers on other
    /// segments are reported, not routed.
    #[serde(rename = "host-gw")]
    HostGw,
    /// IP-in-IP (Calico's tunl0): routes via the peer's address onlink.
    Ipip,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Ipip => "ipip",
        })
    }
}

impl FromStr for Backend {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Backend::Auto),
            "vxlan" => Ok(Backend::Vxlan),
            "host-gw" => Ok(Backend::HostGw),
            "ipip" => Ok(Backend::Ipip),
            other => Err(ConfigError::Backend(other.to_string())),
        }
    }
}

/// The MTU of pod interfaces and the tunnel: derived from the underlay
/// unless the operator pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mtu {
    #[default]
    Auto,
    #[serde(untagged)]
    Fixed(u32),
}

/// Cluster-wide settings, shared by every node through the datastore.
/// Defaults follow the ecosystem (flannel and kubeadm).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster_cidr: Ipv4Net,
    pub node_subnet_len: u8,
    pub service_cidr: Ipv4Net,
    pub backend: Backend,
    pub vni: u32,
    pub port: u16,
    pub mtu: Mtu,
    /// BGP: the agent runs a speaker (BIRD) that announces the node's pod
    /// subnet and learns its peers' (absent: no BGP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::BgpConfig>,
    /// Where LoadBalancer Services get their addresses (announced by BGP
    /// from the nodes that serve them). Empty: they stay pending, as on
    /// bare metal without a load balancer controller.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_pools: Vec<Ipv4Net>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".parse().expect("literal"),
            node_subnet_len: 24,
            service_cidr: "10.96.0.0/12".parse().expect("literal"),
            backend: Backend::Auto,
            vni: 1,
            port: 8472,
            mtu: Mtu::Auto,
            bgp: None,
            load_balancer_pools: Vec::new(),
        }
    }
}

/// VXLAN over IPv4 adds outer IP (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14) = 50 bytes.
pub const VXLAN_OVERHEAD: u32 = 50;
/// IP-in-IP adds one IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self.cluster_cidr.trunc();
        if self.node_subnet_len <= c.prefix_len() || self.node_subnet_len > 30 {
            return Err(ConfigError::SubnetLen(c, self.node_subnet_len));
        }
        let s = self.service_cidr.trunc();
        if c.contains(&s.network()) || s.contains(&c.network()) {
            return Err(ConfigError::Overlap {
                cluster: c,
                service: s,
            });
        }
        if self.vni == 0 || self.vni > 0x00ff_ffff {
            return Err(ConfigError::Vni(self.vni));
        }
        if self.port == 0 {
            return Err(ConfigError::Port);
        }
        if let Mtu::Fixed(m) = self.mtu {
            if !(576..=9000).contains(&m) {
                return Err(ConfigError::Mtu(m));
            }
        }
        if let Some(b) = &self.bgp {
            b.validate().map_err(ConfigError::Bgp)?;
        }
        for (i, p) in self.load_balancer_pools.iter().enumerate() {
            let p = p.trunc();
            let overlaps = |n: Ipv4Net| n.contains(&p.network()) || p.contains(&n.network());
            if overlaps(c) || overlaps(s) {
                return Err(ConfigError::Pool(format!(
                    "loadBalancerPools[{i}] {p} overlaps clusterCIDR {c} or serviceCIDR {s}"
                )));
            }
            if let Some(j) = self.load_balancer_pools[..i]
                .iter()
                .position(|q| overlaps(q.trunc()))
            {
                return Err(ConfigError::Pool(format!(
                    "loadBalancerPools[{i}] {p} overlaps loadBalancerPools[{j}]"
                )));
            }
        }
        Ok(())
    }

    /// Parse and validate the JSON form stored in the datastore.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: ClusterConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Decode(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The MTU for the tunnel and pod interfaces given the underlay's MTU:
    /// less the encapsulation the backend may use. Under `auto` any peer
    /// may fall back to VXLAN, so every pod gets the VXLAN MTU: one MTU
    /// across the cluster, whatever each peer's path.
    pub fn effective_mtu(&self, underlay_mtu: u32) -> u32 {
        let overhead = match self.backend {
            Backend::Auto | Backend::Vxlan => VXLAN_OVERHEAD,
            Backend::Ipip => IPIP_OVERHEAD,
            Backend::HostGw => 0,
        };
        match self.mtu {
            Mtu::Fixed(m) => m,
            Mtu::Auto => underlay_mtu.saturating_sub(overhead).max(576),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_ecosystem() {
        let c = ClusterConfig::default();
        c.validate().unwrap();
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(c.service_cidr.to_string(), "10.96.0.0/12");
        assert_eq!((c.vni, c.port, c.node_subnet_len), (1, 8472, 24));
        assert_eq!(c.effective_mtu(1500), 1450);
    }

    #[test]
    fn json_round_trip_and_partial_documents() {
        let c = ClusterConfig::from_json(br#"{"clusterCIDR":"10.10.0.0/16"}"#);
        // serde's camelCase of cluster_cidr is clusterCidr: the wrong spelling is refused.
        assert!(matches!(c, Err(ConfigError::Decode(_))));
        let c = ClusterConfig::from_json(br#"{"clusterCidr":"10.10.0.0/16","mtu":1400}"#).unwrap();
        assert_eq!(c.cluster_cidr.to_string(), "10.10.0.0/16");
        assert_eq!(c.effective_mtu(9000), 1400);
        let back = ClusterConfig::from_json(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let auto = ClusterConfig::from_json(br#"{"mtu":"auto"}"#).unwrap();
        assert_eq!(auto.mtu, Mtu::Auto);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = ClusterConfig {
            node_subnet_len: 16,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("subnet length 16"));
        c = ClusterConfig {
            service_cidr: "10.244.128.0/20".parse().unwrap(),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("serviceCIDR"));
        c = ClusterConfig {
            vni: 0,
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Vni(0)));
        c = ClusterConfig {
            mtu: Mtu::Fixed(100),
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Mtu(100)));
        let bad = ClusterConfig::from_json(br#"{"bgp": {"asn": 0, "holdTime": 1}}"#).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "bgp.asn: 0 is reserved (0, 23456 and 4294967295 cannot be used); bgp.holdTime: 1 s: must be 0 (no keepalives) or at least 3"
        );
        let typo = ClusterConfig::from_json(br#"{"bgp": {"meshh": false}}"#).unwrap_err();
        assert!(typo.to_string().contains("unknown field `meshh`"), "{typo}");
        let ok = ClusterConfig::from_json(br#"{"bgp": {"mesh": false}}"#).unwrap();
        assert_eq!(ok.bgp.map(|b| b.mesh_on()), Some(false));
        assert!(ClusterConfig::from_json(br#"{"backend":"carrier-pigeon"}"#).is_err());
        let hg = ClusterConfig::from_json(br#"{"backend":"host-gw"}"#).unwrap();
        assert_eq!(
            (hg.backend, hg.effective_mtu(1500)),
            (Backend::HostGw, 1500)
        );
        let ipip = ClusterConfig::from_json(br#"{"backend":"ipip"}"#).unwrap();
        assert_eq!(ipip.effective_mtu(1500), 1480);
        assert_eq!(ClusterConfig::default().backend, Backend::Auto);
    }
}
