//! The topology file: what `tweed lab up -f FILE` builds.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tweed_model::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology does not decode: {0}")]
    Decode(String),
    #[error("topology: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub underlay: Underlay,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Hosts outside the cluster, on the underlay (external clients).
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    /// Several L2 segments instead of the one `underlay` (each a bridge).
    #[serde(default)]
    pub segments: Vec<SegmentSpec>,
    /// Router namespaces joining segments; the first router on a segment is
    /// its members' default gateway.
    #[serde(default)]
    pub routers: Vec<RouterSpec>,
    #[serde(default)]
    pub agent: AgentSpec,
    /// A real Kubernetes control plane (kube-apiserver, controller-manager,
    /// scheduler) and agents on the Kubernetes datastore.
    #[serde(default)]
    pub kubernetes: bool,
    /// A real kubelet and containerd on every node (implies `kubernetes`):
    /// workloads are applied with kubectl, not listed under `pods`.
    #[serde(default)]
    pub kubelet: Option<KubeletSpec>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeletSpec {
    /// OCI archives imported into every node's containerd (there is no
    /// registry), e.g. from `scripts/build-image.sh`; relative paths are
    /// from where `tweed lab up` runs.
    #[serde(default)]
    pub images: Vec<std::path::PathBuf>,
    /// How tweed's agent runs: as a lab process (default) or as
    /// `deploy/tweed.yaml`'s DaemonSet, its image among `images`.
    #[serde(default)]
    pub agent: AgentMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    #[default]
    Process,
    DaemonSet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    /// Default: the first segment.
    #[serde(default)]
    pub segment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SegmentSpec {
    pub name: String,
    pub cidr: Ipv4Net,
    /// The segment's MTU (default: `underlay.mtu`), e.g. a smaller one in
    /// the middle of a path to exercise path-MTU discovery.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Model NICs with IPv4 BIG TCP: the bridge, its ports and every NIC
    /// on the segment get GSO/GRO IPv4 max size 196608 (default 65536).
    #[serde(default)]
    pub big_tcp: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    pub name: String,
    pub segments: Vec<String>,
    /// Run a BGP speaker (FRR) on it: a ToR or core router that the
    /// nodes on its segments, and the other BGP routers sharing a segment
    /// with it, peer with.
    #[serde(default)]
    pub bgp: Option<RouterBgp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterBgp {
    /// Its autonomous system number.
    pub asn: u32,
    /// BFD on its sessions with nodes (and with other routers that run
    /// it): FRR's bfdd, with these timers (`bfd: {}` for 300 ms x 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<tweed_model::bgp::BfdConfig>,
}

/// A node's BGP in the lab, when the cluster config has `bgp:`. By default
/// the node peers with every BGP router on its first segment (its rack's
/// ToR), in the cluster's AS.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBgpSpec {
    /// Its own AS (`--bgp-asn`).
    #[serde(default)]
    pub asn: Option<u32>,
    /// Its peers as `ADDRESS:ASN[:PASSWORD]` (`--bgp-peer`), instead of
    /// its segment's routers (e.g. one with a wrong AS, to see doctor
    /// name it).
    #[serde(default)]
    pub peers: Option<Vec<String>>,
}

pub use tweed_model::bgp::valid_asn;

/// The "public" range NAT'd nodes get their addresses from (documentation range).
pub const PUBLIC_RANGE: &str = "203.0.113.0/24";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Underlay {
    pub cidr: Ipv4Net,
    pub mtu: u32,
    /// IPv4 BIG TCP on the one underlay (as `bigTcp` on a segment).
    pub big_tcp: bool,
}

impl Default for Underlay {
    fn default() -> Self {
        Self {
            cidr: "198.51.100.0/24".parse().expect("literal"),
            mtu: 1500,
            big_tcp: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// The segments it has a NIC on, in order (eth0, eth1, ...). Default:
    /// the first segment.
    #[serde(default)]
    pub segments: Vec<String>,
    /// Reached by its peers only through this address, 1:1 NATed by the
    /// router of its first segment (seed 000's cloud nodes).
    #[serde(default)]
    pub public_ip: Option<Ipv4Addr>,
    /// How its agent chooses the underlay (`--underlay`), e.g.
    /// `cidr=198.51.100.64/26`. Default: its first NIC.
    #[serde(default)]
    pub underlay: Option<String>,
    /// Its BGP settings (see [`NodeBgpSpec`]).
    #[serde(default)]
    pub bgp: Option<NodeBgpSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentSpec {
    /// Seconds a node's subnet lease lives without renewal.
    pub lease_ttl: i64,
    /// Seconds between full resyncs.
    pub resync: u64,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            lease_ttl: 15,
            resync: 5,
        }
    }
}

/// Names that become parts of namespace and file names.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
}

impl Topology {
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let mut t: Topology =
            serde_saphyr::from_str(text).map_err(|e| TopologyError::Decode(e.to_string()))?;
        t.kubernetes |= t.kubelet.is_some();
        t.validate()?;
        Ok(t)
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(m));
        self.cluster
            .validate()
            .map_err(|e| TopologyError::Invalid(format!("cluster: {e}")))?;
        if let Some(n) = &self.name {
            if !valid_name(n) || n.len() > 12 {
                return bad(format!("name {n:?} must be 1-12 of [a-z0-9-]"));
            }
        }
        let u = self.underlay.cidr.trunc();
        let forbidden: Ipv4Net = "192.0.2.0/24".parse().expect("literal");
        if u.contains(&forbidden.network()) || forbidden.contains(&u.network()) {
            return bad(format!(
                "underlay.cidr {u} overlaps 192.0.2.0/24, the test machines' own network"
            ));
        }
        if u.prefix_len() > 26 {
            return bad(format!("underlay.cidr {u} is too small (at most /26)"));
        }
        if !(576..=9000).contains(&self.underlay.mtu) {
            return bad(format!(
                "underlay.mtu {} is out of range (576..=9000)",
                self.underlay.mtu
            ));
        }
        if self.kubelet.is_some() && !self.pods.is_empty() {
            return bad(
                "pods: a lab with kubelets runs the pods kubectl applies; list none here".into(),
            );
        }
        if self.nodes.is_empty() {
            return bad("nodes: at least one node is required".into());
        }
        if self.nodes.len() > 50 {
            return bad(format!(
                "nodes: {} nodes is more than the lab's 50",
                self.nodes.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if !valid_name(&n.name) {
                return bad(format!(
                    "nodes: name {:?} must be 1-40 of [a-z0-9-]",
                    n.name
                ));
            }
            if !seen.insert(n.name.clone()) {
                return bad(format!("nodes: {:?} appears twice", n.name));
            }
        }
        let mut pods = std::collections::BTreeSet::new();
        for p in &self.pods {
            if !valid_name(&p.name) {
                return bad(format!("pods: name {:?} must be 1-40 of [a-z0-9-]", p.name));
            }
            if !pods.insert(p.name.clone()) || seen.contains(&p.name) {
                return bad(format!(
                    "pods: {:?} appears twice or is also a node name",
                    p.name
                ));
            }
            if !seen.contains(&p.node) {
                return bad(format!(
                    "pods: {:?} names node {:?}, which is not in nodes",
                    p.name, p.node
                ));
            }
        }
        for h in &self.hosts {
            if !valid_name(&h.name) {
                return bad(format!(
                    "hosts: name {:?} must be 1-40 of [a-z0-9-]",
                    h.name
                ));
            }
            if seen.contains(&h.name) || pods.contains(&h.name) || !seen.insert(h.name.clone()) {
                return bad(format!(
                    "hosts: {:?} appears twice or is also a node or pod name",
                    h.name
                ));
            }
        }
        if self.hosts.len() > 40 {
            return bad("hosts: at most 40".into());
        }
        if self.underlay.big_tcp && !self.segments.is_empty() {
            return bad(
                "underlay.bigTcp is for the one underlay; with segments, set bigTcp on each segment"
                    .into(),
            );
        }
        let segs = self.segments();
        let mut names = std::collections::BTreeSet::new();
        for (i, sg) in segs.iter().enumerate() {
            if !valid_name(&sg.name) || sg.name.len() > 8 || !names.insert(sg.name.clone()) {
                return bad(format!(
                    "segments[{i}].name {:?} must be unique, 1-8 of [a-z0-9-]",
                    sg.name
                ));
            }
            let c = sg.cidr.trunc();
            if c.contains(&forbidden.network()) || forbidden.contains(&c.network()) {
                return bad(format!(
                    "segments[{i}].cidr {c} overlaps 192.0.2.0/24, the test machines' own network"
                ));
            }
            if c.prefix_len() > 26 {
                return bad(format!("segments[{i}].cidr {c} is too small (at most /26)"));
            }
            if let Some(m) = sg.mtu.filter(|m| !(576..=9000).contains(m)) {
                return bad(format!(
                    "segments[{i}].mtu {m} is out of range (576..=9000)"
                ));
            }
            for other in &segs[..i] {
                if other.cidr.contains(&c.network()) || c.contains(&other.cidr.network()) {
                    return bad(format!(
                        "segments[{i}].cidr {c} overlaps segment {}",
                        other.name
                    ));
                }
            }
        }
        let known = |n: &str| segs.iter().any(|s| s.name == n);
        for (i, r) in self.routers.iter().enumerate() {
            if !valid_name(&r.name) || seen.contains(&r.name) {
                return bad(format!(
                    "routers[{i}].name {:?} must be unique and not a node or host name",
                    r.name
                ));
            }
            if r.segments.is_empty() || r.segments.iter().any(|s| !known(s)) {
                return bad(format!(
                    "routers[{i}].segments {:?} must name segments",
                    r.segments
                ));
            }
            if let Some(asn) = r.bgp.as_ref().map(|b| b.asn).filter(|a| !valid_asn(*a)) {
                return bad(format!(
                    "routers[{i}].bgp.asn {asn} is reserved (0, 23456 and 4294967295 are not usable)"
                ));
            }
            if let Some(e) = r.bgp.as_ref().and_then(|b| b.bfd.as_ref()).and_then(|b| {
                b.validate(&format!("routers[{i}].bgp.bfd"))
                    .into_iter()
                    .next()
            }) {
                return bad(format!("{}: {}", e.field, e.msg));
            }
        }
        let public: Ipv4Net = PUBLIC_RANGE.parse().expect("literal");
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(s) = n.segments.iter().find(|s| !known(s)) {
                return bad(format!("nodes[{i}].segments: no segment {s:?}"));
            }
            if let Some(u) = &n.underlay {
                u.parse::<tweed_plan::UnderlaySelector>()
                    .map_err(|e| TopologyError::Invalid(format!("nodes[{i}].underlay: {e}")))?;
            }
            if let Some(b) = &n.bgp {
                if let Some(asn) = b.asn.filter(|a| !valid_asn(*a)) {
                    return bad(format!("nodes[{i}].bgp.asn {asn} is reserved (0, 23456 and 4294967295 are not usable)"));
                }
                for (j, p) in b.peers.iter().flatten().enumerate() {
                    tweed_model::parse_bgp_peer(p).map_err(|e| {
                        TopologyError::Invalid(format!("nodes[{i}].bgp.peers[{j}]: {e}"))
                    })?;
                }
            }
            if n.segments.len() > 4 {
                return bad(format!("nodes[{i}].segments: at most 4 NICs"));
            }
            if let Some(p) = n.public_ip {
                if !public.contains(&p) {
                    return bad(format!("nodes[{i}].publicIp {p} must be in {PUBLIC_RANGE}"));
                }
                let seg = self.node_segments(i)[0].clone();
                if !self.routers.iter().any(|r| r.segments.contains(&seg)) {
                    return bad(format!(
                        "nodes[{i}].publicIp needs a router on segment {seg:?} to do the NAT"
                    ));
                }
            }
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if let Some(s) = h.segment.as_ref().filter(|s| !known(s)) {
                return bad(format!("hosts[{i}].segment: no segment {s:?}"));
            }
        }
        if self.agent.lease_ttl < 2 || self.agent.resync == 0 {
            return bad("agent: leaseTtl must be at least 2 and resync at least 1".into());
        }
        Ok(())
    }

    /// The L2 segments: `segments`, or the one `underlay` (named "ul").
    pub fn segments(&self) -> Vec<SegmentSpec> {
        if self.segments.is_empty() {
            vec![SegmentSpec {
                name: "ul".into(),
                cidr: self.underlay.cidr,
                mtu: None,
                big_tcp: self.underlay.big_tcp,
            }]
        } else {
            self.segments.clone()
        }
    }

    fn segment(&self, name: &str) -> SegmentSpec {
        self.segments()
            .into_iter()
            .find(|s| s.name == name)
            .expect("validated")
    }

    /// The segments node `i` has NICs on, in NIC order.
    pub fn node_segments(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        if n.segments.is_empty() {
            vec![self.segments()[0].name.clone()]
        } else {
            n.segments.clone()
        }
    }

    /// Addresses on a segment: .2 the control plane (first segment), nodes
    /// from .10 in node order, hosts from .200 (upper quarter on segments
    /// smaller than /24), routers from the top down.
    pub fn cp_ip(&self) -> Ipv4Addr {
        nth(self.segments()[0].cidr, 2)
    }

    /// Node `i`'s address on segment `seg`.
    pub fn node_ip_on(&self, i: usize, seg: &str) -> Ipv4Addr {
        nth(self.segment(seg).cidr, 10 + i as u32)
    }

    /// Node `i`'s address on its first segment.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.node_ip_on(i, &self.node_segments(i)[0])
    }

    pub fn host_segment(&self, i: usize) -> String {
        self.hosts[i]
            .segment
            .clone()
            .unwrap_or_else(|| self.segments()[0].name.clone())
    }

    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        let cidr = self.segment(&self.host_segment(i)).cidr;
        let size = 1u32 << (32 - cidr.prefix_len());
        let base = if size >= 256 { size - 56 } else { size * 3 / 4 };
        nth(cidr, base + i as u32)
    }

    /// Router `r`'s address on segment `seg`.
    pub fn router_ip(&self, r: usize, seg: &str) -> Ipv4Addr {
        let cidr = self.segment(seg).cidr;
        let size = 1u32 << (32 - cidr.prefix_len());
        nth(cidr, size - 2 - r as u32)
    }

    /// The default gateway on a segment: its first router's address.
    pub fn gateway(&self, seg: &str) -> Option<Ipv4Addr> {
        self.routers
            .iter()
            .position(|r| r.segments.iter().any(|s| s == seg))
            .map(|r| self.router_ip(r, seg))
    }
}

fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.trunc().network()) + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = "
name: demo
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: a, node: node1}
";

    #[test]
    fn parses_the_demo_with_defaults() {
        let t = Topology::parse(DEMO).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.cluster, ClusterConfig::default());
        assert_eq!(t.cp_ip().to_string(), "198.51.100.2");
        assert_eq!(t.node_ip(1).to_string(), "198.51.100.11");
    }

    #[test]
    fn big_tcp_is_a_segment_option_and_an_underlay_one() {
        let t = Topology::parse("underlay: {bigTcp: true}\nnodes: [{name: a}]").unwrap();
        assert!(t.segments()[0].big_tcp);
        assert!(!Topology::parse(DEMO).unwrap().segments()[0].big_tcp);
        let t = Topology::parse(
            "segments:\n  - {name: a, cidr: 198.51.100.0/26, bigTcp: true}\n  - {name: b, cidr: 198.51.100.64/26}\nnodes: [{name: n}]",
        )
        .unwrap();
        let big: Vec<bool> = t.segments().iter().map(|s| s.big_tcp).collect();
        assert_eq!(big, [true, false]);
    }

    #[test]
    fn kubelets_imply_kubernetes_and_the_example_parses() {
        let t = Topology::parse(include_str!("../../../examples/kubelets.yaml")).unwrap();
        assert!(t.kubernetes);
        let k = t.kubelet.unwrap();
        assert_eq!(k.agent, AgentMode::DaemonSet);
        assert_eq!(
            k.images,
            vec![std::path::PathBuf::from("target/image/lab.oci.tar")]
        );
    }

    #[test]
    fn the_two_racks_example_parses_with_bgp_routers() {
        let t = Topology::parse(include_str!("../../../examples/two-racks.yaml")).unwrap();
        let asns: Vec<Option<u32>> = t
            .routers
            .iter()
            .map(|r| r.bgp.as_ref().map(|b| b.asn))
            .collect();
        assert_eq!(asns, [Some(65000), Some(65001), Some(65002)]);
    }

    #[test]
    fn impossible_topologies_name_the_problem() {
        let cases = [
            ("nodes: []", "at least one node"),
            ("nodes: [{name: a}, {name: a}]", "appears twice"),
            (
                "nodes: [{name: a}]\npods: [{name: p, node: zz}]",
                "not in nodes",
            ),
            ("nodes: [{name: A_B}]", "must be 1-40"),
            (
                "underlay: {cidr: 192.0.2.0/24}\nnodes: [{name: a}]",
                "192.0.2.0/24",
            ),
            ("nodes: [{name: a}]\nwat: 1", "does not decode"),
            (
                "cluster: {nodeSubnetLen: 8}\nnodes: [{name: a}]",
                "cluster:",
            ),
            (
                "kubelet: {}\nnodes: [{name: a}]\npods: [{name: p, node: a}]",
                "pods: a lab with kubelets",
            ),
            (
                "kubelet: {agent: pod}\nnodes: [{name: a}]",
                "does not decode",
            ),
            (
                "underlay: {bigTcp: true}\nsegments: [{name: a, cidr: 198.51.100.0/26}]\nnodes: [{name: a}]",
                "set bigTcp on each segment",
            ),
            (
                "segments: [{name: a, cidr: 198.51.100.0/26, bigTcp: 1}]\nnodes: [{name: a}]",
                "does not decode",
            ),
            (
                "routers: [{name: r, segments: [ul], bgp: {asn: 0}}]\nnodes: [{name: a}]",
                "routers[0].bgp.asn 0 is reserved",
            ),
            (
                "routers: [{name: r, segments: [ul], bgp: {asn: 23456}}]\nnodes: [{name: a}]",
                "routers[0].bgp.asn 23456",
            ),
            (
                "routers: [{name: r, segments: [ul]}, {name: s, segments: [ul], bgp: {asn: 4294967295}}]\nnodes: [{name: a}]",
                "routers[1].bgp.asn 4294967295",
            ),
            (
                "routers: [{name: r, segments: [ul], bgp: {asn: 65001, bfd: {interval: 1}}}]\nnodes: [{name: a}]",
                "routers[0].bgp.bfd.interval: 1 ms",
            ),
            (
                "routers: [{name: r, segments: [ul], bgp: {asn: 65001, as: 1}}]\nnodes: [{name: a}]",
                "does not decode",
            ),
        ];
        for (text, want) in cases {
            let e = Topology::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
