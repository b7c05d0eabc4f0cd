//! Pure functions from the cluster model to the desired state of one node.
//!
//! Everything interesting is decided here so it can be unit-tested without
//! root; the appliers in `tweed-netlink` only make the kernel match.
#![forbid(unsafe_code)]

mod gso;
mod intent;
pub mod services;
mod underlay;

pub use gso::pod_gso_max_size;
pub use intent::{NodeIntent, PeerIntent};

pub use underlay::{select_underlay, LinkAddrs, UnderlaySelector};

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tweed_model::{Backend, ClusterConfig, MacAddr, NodeRecord};

/// flannel names its device `flannel.<VNI>`; tweed does the same with its own prefix.
pub fn vxlan_dev_name(vni: u32) -> String {
    format!("tweed.{vni}")
}

/// The VXLAN device a node needs.
/// Equivalent: `ip link add tweed.1 type vxlan id 1 local LOCAL dev UNDERLAY dstport 8472 nolearning`,
/// `ip link set tweed.1 address MAC mtu MTU up`, `ip addr add VTEP_IP/32 dev tweed.1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLink {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// The node's own (private) underlay address the tunnel binds to.
    pub local: Ipv4Addr,
    pub underlay_dev: String,
    pub mtu: u32,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
}

/// `ip route replace DST via VIA dev DEV [onlink] [src SRC]`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: String,
    pub onlink: bool,
    /// The source address for traffic the node itself sends this way:
    /// pinned to the address peers know (seed 002: a two-NIC node whose
    /// replies left from the other address).
    pub src: Option<Ipv4Addr>,
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub dev: String,
}

/// `bridge fdb replace MAC dev DEV dst DST self permanent`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fdb {
    pub mac: MacAddr,
    pub dst: Ipv4Addr,
    pub dev: String,
}

/// A peer that the planner left out, and why (shown in logs and status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub node: String,
    pub reason: String,
}

/// Calico's IP-in-IP device: the kernel's fallback tunnel `tunl0` (it
/// exists as soon as the ipip module is loaded), with the node's VTEP
/// address. Equivalent: `ip link set tunl0 mtu MTU up && ip addr replace ADDR/32 dev tunl0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpipLink {
    pub name: String,
    pub mtu: u32,
    pub address: Ipv4Addr,
}

pub const IPIP_DEV: &str = "tunl0";

/// The agent's path probe marks its packets and routes them through a
/// table of its own (`ip rule add fwmark 0x3744 lookup 7744`), so probing
/// never changes how real traffic is routed; `doctor` knows that table as
/// tweed's. The mark leaves kube-proxy's bits alone (0x4000 masquerade,
/// 0x8000 drop): the first mark, 0x7744, had the masquerade bit, so every
/// probe was masqueraded on its way out.
pub const PROBE_MARK: u32 = 0x3744;
pub const PROBE_TABLE: u32 = 7744;
/// The routing table the node's BGP speaker writes learnt routes to: no
/// rule looks it up, so it changes no packet's path until the agent
/// copies a route from it into the main table (mode `bgp`).
pub const LEARNT_TABLE: u32 = 7745;
/// The mark agents before 2026-12 used; its rule is removed on start.
pub const OLD_PROBE_MARK: u32 = 0x7744;
const _: () = assert!(PROBE_MARK & (services::MASQ_MARK | 0x8000) == 0);

/// What the agent has found out about reaching a peer without a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerFacts {
    /// The peer's address is on a subnet the underlay device is on.
    pub connected: bool,
    /// Did a pod-addressed probe sent straight to the peer get an answer?
    /// `None`: not probed (yet).
    pub probe: Option<bool>,
    /// A route to the peer's subnet learnt by BGP (the node's speaker
    /// writes them to their own table): its next hop on the underlay.
    /// With backend auto, a peer on another segment is routed natively
    /// through it once `probe` (sent through that next hop) is answered.
    pub learnt: Option<Ipv4Addr>,
}

/// How traffic to a peer's pods leaves this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    /// Unencapsulated through the fabric, by a route learnt with BGP.
    Bgp,
    Vxlan,
    Ipip,
    Unreachable,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Bgp => "bgp",
            Mode::Vxlan => "vxlan",
            Mode::Ipip => "ipip",
            Mode::Unreachable => "unreachable",
        })
    }
}

/// The mode chosen for one peer, and why (shown by `tweed status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPlan {
    pub node: String,
    pub mode: Mode,
    pub reason: String,
}

/// The desired network state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// The VXLAN device (backends vxlan and auto).
    pub vxlan: Option<VxlanLink>,
    /// The IP-in-IP device (backend ipip).
    pub ipip: Option<IpipLink>,
    pub peers: Vec<PeerPlan>,
    pub routes: BTreeSet<Route>,
    pub neighs: BTreeSet<Neigh>,
    pub fdb: BTreeSet<Fdb>,
    pub skipped: Vec<Skipped>,
}

/// Facts about the node itself that only the node can know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub record: NodeRecord,
    /// The address bound on the underlay device (differs from
    /// `record.public_ip` behind 1:1 NAT).
    pub bind_ip: Ipv4Addr,
    pub underlay_dev: String,
    pub underlay_mtu: u32,
}

/// Plan the pod network of `me` given every node record in the datastore
/// (including, harmlessly, `me` itself) and what the agent found out about
/// reaching each peer directly (`facts`, by node name; absent = nothing
/// known: not connected, not probed).
pub fn plan_node(
    cfg: &ClusterConfig,
    me: &LocalNode,
    nodes: &[NodeRecord],
    facts: &BTreeMap<String, PeerFacts>,
) -> NodePlan {
    let dev = vxlan_dev_name(cfg.vni);
    let mtu = cfg.effective_mtu(me.underlay_mtu);
    let vxlan = matches!(cfg.backend, Backend::Vxlan | Backend::Auto).then(|| VxlanLink {
        name: dev.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local: me.bind_ip,
        underlay_dev: me.underlay_dev.clone(),
        mtu,
        mac: me.record.vtep_mac,
        address: me.record.vtep_ip(),
    });
    let ipip = (cfg.backend == Backend::Ipip).then(|| IpipLink {
        name: IPIP_DEV.into(),
        mtu,
        address: me.record.vtep_ip(),
    });
    let mut plan = NodePlan {
        vxlan,
        ipip,
        peers: Vec::new(),
        routes: BTreeSet::new(),
        neighs: BTreeSet::new(),
        fdb: BTreeSet::new(),
        skipped: Vec::new(),
    };
    let cluster = cfg.cluster_cidr.trunc();
    for peer in nodes {
        if peer.name == me.record.name {
            continue;
        }
        let skip = |reason: String| Skipped {
            node: peer.name.clone(),
            reason,
        };
        if peer.subnet == me.record.subnet {
            plan.skipped
                .push(skip(format!("claims our own subnet {}", peer.subnet)));
            continue;
        }
        if !cluster.contains(&peer.subnet) || peer.subnet.prefix_len() != cfg.node_subnet_len {
            plan.skipped.push(skip(format!(
                "subnet {} is not a /{} of the cluster CIDR {}",
                peer.subnet, cfg.node_subnet_len, cluster
            )));
            continue;
        }
        let f = facts.get(&peer.name).copied().unwrap_or_default();
        let (mode, reason) = match cfg.backend {
            Backend::Vxlan => (Mode::Vxlan, "backend vxlan".to_string()),
            Backend::Ipip => (Mode::Ipip, "backend ipip".to_string()),
            Backend::HostGw if f.connected => (Mode::Direct, format!("{} is on a segment {} is on", peer.public_ip, me.underlay_dev)),
            Backend::HostGw => (
                Mode::Unreachable,
                format!(
                    "{} is not on a segment {} is on, and host-gw only routes to peers on the same L2 segment (use backend auto or vxlan)",
                    peer.public_ip, me.underlay_dev
                ),
            ),
            Backend::Auto => match (f.connected, f.probe) {
                (false, Some(true)) if f.learnt.is_some() => (Mode::Bgp, format!("not on our segment; the fabric routes its subnet (learnt by BGP via {}) and pod-addressed traffic gets through", f.learnt.unwrap_or(Ipv4Addr::UNSPECIFIED))),
                (false, Some(false)) if f.learnt.is_some() => (Mode::Vxlan, format!("not on our segment; a BGP route via {} exists, but pod-addressed traffic does not get through it (probe unanswered)", f.learnt.unwrap_or(Ipv4Addr::UNSPECIFIED))),
                (false, _) => (Mode::Vxlan, format!("{} is not on a segment {} is on", peer.public_ip, me.underlay_dev)),
                (true, Some(true)) => (Mode::Direct, "same segment, and pod-addressed traffic gets through".to_string()),
                (true, Some(false)) => (Mode::Vxlan, "same segment, but pod-addressed traffic does not get through (probe unanswered)".to_string()),
                (true, None) => (Mode::Vxlan, "same segment, not probed yet".to_string()),
            },
        };
        match mode {
            Mode::Direct => {
                plan.routes.insert(Route {
                    dst: peer.subnet,
                    via: peer.public_ip,
                    dev: me.underlay_dev.clone(),
                    onlink: false,
                    src: Some(me.bind_ip),
                });
            }
            Mode::Bgp => {
                plan.routes.insert(Route {
                    dst: peer.subnet,
                    via: f.learnt.unwrap_or(peer.public_ip),
                    dev: me.underlay_dev.clone(),
                    onlink: false,
                    src: Some(me.bind_ip),
                });
            }
            Mode::Vxlan => {
                plan.routes.insert(Route {
                    dst: peer.subnet,
                    via: peer.vtep_ip(),
                    dev: dev.clone(),
                    onlink: true,
                    src: None,
                });
                plan.neighs.insert(Neigh {
                    ip: peer.vtep_ip(),
                    mac: peer.vtep_mac,
                    dev: dev.clone(),
                });
                plan.fdb.insert(Fdb {
                    mac: peer.vtep_mac,
                    dst: peer.public_ip,
                    dev: dev.clone(),
                });
            }
            Mode::Ipip => {
                plan.routes.insert(Route {
                    dst: peer.subnet,
                    via: peer.public_ip,
                    dev: IPIP_DEV.into(),
                    onlink: true,
                    src: Some(me.bind_ip),
                });
            }
            Mode::Unreachable => plan.skipped.push(skip(reason.clone())),
        }
        plan.peers.push(PeerPlan {
            node: peer.name.clone(),
            mode,
            reason,
        });
    }
    plan
}

/// Does this kernel need VXLAN TX checksum offload off? Kernels before
/// 5.7 (upstream commit ea64d8d6c675) compute a wrong UDP checksum for
/// VXLAN packets that netfilter NATs, and the receiver drops them: the
/// "63-second" delays behind flannel's `ethtool -K flannel.1
/// tx-checksum-ip-generic off` and Calico's same workaround. `release` is
/// `uname -r`; one that does not parse is assumed new.
pub fn vxlan_checksum_workaround(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 7),
        _ => false,
    }
}

/// The devices whose routes tweed manages for this plan.
pub fn route_devices(plan: &NodePlan, underlay_dev: &str) -> Vec<String> {
    let mut devs = vec![underlay_dev.to_string()];
    devs.extend(plan.vxlan.as_ref().map(|v| v.name.clone()));
    devs.extend(plan.ipip.as_ref().map(|i| i.name.clone()));
    devs
}

/// What must be added and removed to turn `actual` into `desired`.
pub fn diff<T: Ord + Clone>(desired: &BTreeSet<T>, actual: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    let add = desired.difference(actual).cloned().collect();
    let del = actual.difference(desired).cloned().collect();
    (add, del)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tweed_model::vtep_mac_for;

    fn rec(name: &str, subnet: &str, ip: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            backend: Backend::Vxlan,
            vtep_mac: vtep_mac_for(name),
            unreachable: Vec::new(),
            bgp: None,
        }
    }

    fn me() -> LocalNode {
        LocalNode {
            record: rec("n1", "10.244.1.0/24", "198.51.100.10"),
            bind_ip: "198.51.100.10".parse().unwrap(),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        }
    }

    /// Plan with the backend pinned to VXLAN and no facts.
    fn plan_node_vx(cfg: &ClusterConfig, nodes: &[NodeRecord]) -> NodePlan {
        plan_node(
            &ClusterConfig {
                backend: Backend::Vxlan,
                ..cfg.clone()
            },
            &me(),
            nodes,
            &BTreeMap::new(),
        )
    }

    #[test]
    fn flannel_compatible_vxlan_plan() {
        let cfg = ClusterConfig {
            backend: Backend::Vxlan,
            ..Default::default()
        };
        let nodes = vec![me().record, rec("n2", "10.244.2.0/24", "198.51.100.11")];
        let p = plan_node(&cfg, &me(), &nodes, &BTreeMap::new());
        assert_eq!(p.vxlan.as_ref().unwrap().name, "tweed.1");
        assert_eq!(p.vxlan.as_ref().unwrap().mtu, 1450);
        assert_eq!(p.vxlan.as_ref().unwrap().address.to_string(), "10.244.1.0");
        assert_eq!(p.vxlan.as_ref().unwrap().port, 8472);
        let r: Vec<_> = p.routes.iter().collect();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].dst.to_string(), r[0].via.to_string(), r[0].onlink),
            ("10.244.2.0/24".into(), "10.244.2.0".into(), true)
        );
        let n = p.neighs.iter().next().unwrap();
        assert_eq!(
            (n.ip.to_string(), n.mac),
            ("10.244.2.0".into(), vtep_mac_for("n2"))
        );
        let f = p.fdb.iter().next().unwrap();
        assert_eq!(
            (f.mac, f.dst.to_string()),
            (vtep_mac_for("n2"), "198.51.100.11".into())
        );
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn bad_peers_are_skipped_with_a_reason() {
        let cfg = ClusterConfig::default();
        let nodes = vec![
            rec("dup", "10.244.1.0/24", "198.51.100.12"),
            rec("far", "10.9.0.0/24", "198.51.100.13"),
            rec("odd", "10.244.4.0/25", "198.51.100.14"),
        ];
        let p = plan_node(&cfg, &me(), &nodes, &BTreeMap::new());
        assert!(p.routes.is_empty() && p.fdb.is_empty() && p.neighs.is_empty());
        let names: Vec<_> = p.skipped.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, ["dup", "far", "odd"]);
        assert!(p.skipped[0].reason.contains("own subnet"));
    }

    #[test]
    fn peer_gone_means_its_entries_are_deleted() {
        let cfg = ClusterConfig::default();
        let two = plan_node_vx(
            &cfg,
            &[
                rec("n2", "10.244.2.0/24", "198.51.100.11"),
                rec("n3", "10.244.3.0/24", "198.51.100.12"),
            ],
        );
        let one = plan_node_vx(&cfg, &[rec("n2", "10.244.2.0/24", "198.51.100.11")]);
        let (add, del) = diff(&one.routes, &two.routes);
        assert!(add.is_empty());
        assert_eq!(del.len(), 1);
        assert_eq!(del[0].dst.to_string(), "10.244.3.0/24");
        let (add, del) = diff(&one.fdb, &two.fdb);
        assert_eq!((add.len(), del.len()), (0, 1));
    }

    #[test]
    fn auto_goes_direct_only_where_the_probe_answers() {
        let cfg = ClusterConfig::default();
        let nodes = vec![
            rec("same", "10.244.2.0/24", "198.51.100.11"),
            rec("blocked", "10.244.3.0/24", "198.51.100.12"),
            rec("far", "10.244.4.0/24", "198.51.100.77"),
            rec("new", "10.244.5.0/24", "198.51.100.13"),
        ];
        let facts: BTreeMap<String, PeerFacts> = [
            (
                "same".to_string(),
                PeerFacts {
                    connected: true,
                    probe: Some(true),
                    learnt: None,
                },
            ),
            (
                "blocked".to_string(),
                PeerFacts {
                    connected: true,
                    probe: Some(false),
                    learnt: None,
                },
            ),
            (
                "far".to_string(),
                PeerFacts {
                    connected: false,
                    probe: None,
                    learnt: None,
                },
            ),
            (
                "new".to_string(),
                PeerFacts {
                    connected: true,
                    probe: None,
                    learnt: None,
                },
            ),
        ]
        .into();
        let p = plan_node(&cfg, &me(), &nodes, &facts);
        let mode = |n: &str| p.peers.iter().find(|x| x.node == n).unwrap().mode;
        assert_eq!(
            [mode("same"), mode("blocked"), mode("far"), mode("new")],
            [Mode::Direct, Mode::Vxlan, Mode::Vxlan, Mode::Vxlan]
        );
        assert!(p.routes.contains(&Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "198.51.100.11".parse().unwrap(),
            dev: "eth0".into(),
            onlink: false,
            src: Some("198.51.100.10".parse().unwrap()),
        }));
        assert!(p
            .routes
            .iter()
            .any(|r| r.dst.to_string() == "10.244.3.0/24" && r.dev == "tweed.1"));
        assert!(p
            .peers
            .iter()
            .find(|x| x.node == "blocked")
            .unwrap()
            .reason
            .contains("does not get through"));
        // The direct peer needs no VXLAN entries; the others do.
        assert_eq!(p.fdb.len(), 3);
        assert!(p.vxlan.is_some() && p.ipip.is_none());
        assert_eq!(route_devices(&p, "eth0"), ["eth0", "tweed.1"]);
    }

    #[test]
    fn host_gw_reports_peers_off_the_segment_by_name() {
        let cfg = ClusterConfig {
            backend: Backend::HostGw,
            ..Default::default()
        };
        let nodes = vec![
            rec("near", "10.244.2.0/24", "198.51.100.11"),
            rec("far", "10.244.3.0/24", "198.51.100.77"),
        ];
        let facts: BTreeMap<String, PeerFacts> = [(
            "near".to_string(),
            PeerFacts {
                connected: true,
                probe: None,
                learnt: None,
            },
        )]
        .into();
        let p = plan_node(&cfg, &me(), &nodes, &facts);
        assert_eq!(p.routes.len(), 1);
        assert!(p.vxlan.is_none());
        let far = p.peers.iter().find(|x| x.node == "far").unwrap();
        assert_eq!(far.mode, Mode::Unreachable);
        assert!(
            far.reason.contains("198.51.100.77") && far.reason.contains("host-gw"),
            "{}",
            far.reason
        );
        assert_eq!(p.skipped[0].node, "far");
    }

    #[test]
    fn ipip_routes_via_the_peer_onlink_on_tunl0() {
        let cfg = ClusterConfig {
            backend: Backend::Ipip,
            ..Default::default()
        };
        let p = plan_node(
            &cfg,
            &me(),
            &[rec("n2", "10.244.2.0/24", "198.51.100.11")],
            &BTreeMap::new(),
        );
        let r = p.routes.iter().next().unwrap();
        assert_eq!(
            (r.via.to_string(), r.dev.as_str(), r.onlink),
            ("198.51.100.11".into(), "tunl0", true)
        );
        let l = p.ipip.as_ref().unwrap();
        assert_eq!((l.mtu, l.address.to_string()), (1480, "10.244.1.0".into()));
        assert!(p.vxlan.is_none() && p.fdb.is_empty());
    }

    #[test]
    fn checksum_workaround_only_on_kernels_before_5_7() {
        assert!(vxlan_checksum_workaround("4.18.0-305.el8.x86_64"));
        assert!(vxlan_checksum_workaround("5.4.0-42-generic"));
        assert!(!vxlan_checksum_workaround("5.7.0"));
        assert!(!vxlan_checksum_workaround("6.18.44-fc-v669"));
        assert!(!vxlan_checksum_workaround("weird"));
    }

    #[test]
    fn fixed_mtu_wins() {
        let cfg = ClusterConfig {
            mtu: tweed_model::Mtu::Fixed(1300),
            ..Default::default()
        };
        assert_eq!(plan_node_vx(&cfg, &[]).vxlan.unwrap().mtu, 1300);
    }
}
