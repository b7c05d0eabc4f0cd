//! Pure functions from the cluster model to the desired state of one node.
//!
//! Everything interesting is decided here so it can be unit-tested without
//! root; the appliers in `tweed-netlink` only make the kernel match.
#![forbid(unsafe_code)]

pub mod services;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;
use tweed_model::{Backend, ClusterConfig, MacAddr, NodeRecord};

/// flannel names its device `flannel.<VNI>`; tweed does the same with its own prefix.
pub fn vxlan_dev_name(vni: u32) -> String {
    format!("tweed.{vni}")
}

/// The VXLAN device a node needs.
/// Equivalent: `ip link add tweed.1 type vxlan id 1 local LOCAL dev UNDERLAY dstport 8472 nolearning`,
/// `ip link set tweed.1 address MAC mtu MTU up`, `ip addr add VTEP_IP/32 dev tweed.1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// `ip route replace DST via VIA dev DEV onlink`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: String,
    pub onlink: bool,
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub dev: String,
}

/// `bridge fdb replace MAC dev DEV dst DST self permanent`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fdb {
    pub mac: MacAddr,
    pub dst: Ipv4Addr,
    pub dev: String,
}

/// A peer that the planner left out, and why (shown in logs and status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub node: String,
    pub reason: String,
}

/// The desired network state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    pub vxlan: VxlanLink,
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

/// Plan the overlay for `me` given every node record in the datastore
/// (including, harmlessly, `me` itself).
pub fn plan_node(cfg: &ClusterConfig, me: &LocalNode, nodes: &[NodeRecord]) -> NodePlan {
    let dev = vxlan_dev_name(cfg.vni);
    let vxlan = VxlanLink {
        name: dev.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local: me.bind_ip,
        underlay_dev: me.underlay_dev.clone(),
        mtu: cfg.effective_mtu(me.underlay_mtu),
        mac: me.record.vtep_mac,
        address: me.record.vtep_ip(),
    };
    let mut plan = NodePlan {
        vxlan,
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
        match peer.backend {
            Backend::Vxlan => {
                plan.routes.insert(Route {
                    dst: peer.subnet,
                    via: peer.vtep_ip(),
                    dev: dev.clone(),
                    onlink: true,
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
        }
    }
    plan
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

    #[test]
    fn flannel_compatible_vxlan_plan() {
        let cfg = ClusterConfig::default();
        let nodes = vec![me().record, rec("n2", "10.244.2.0/24", "198.51.100.11")];
        let p = plan_node(&cfg, &me(), &nodes);
        assert_eq!(p.vxlan.name, "tweed.1");
        assert_eq!(p.vxlan.mtu, 1450);
        assert_eq!(p.vxlan.address.to_string(), "10.244.1.0");
        assert_eq!(p.vxlan.port, 8472);
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
        let p = plan_node(&cfg, &me(), &nodes);
        assert!(p.routes.is_empty() && p.fdb.is_empty() && p.neighs.is_empty());
        let names: Vec<_> = p.skipped.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, ["dup", "far", "odd"]);
        assert!(p.skipped[0].reason.contains("own subnet"));
    }

    #[test]
    fn peer_gone_means_its_entries_are_deleted() {
        let cfg = ClusterConfig::default();
        let two = plan_node(
            &cfg,
            &me(),
            &[
                rec("n2", "10.244.2.0/24", "198.51.100.11"),
                rec("n3", "10.244.3.0/24", "198.51.100.12"),
            ],
        );
        let one = plan_node(&cfg, &me(), &[rec("n2", "10.244.2.0/24", "198.51.100.11")]);
        let (add, del) = diff(&one.routes, &two.routes);
        assert!(add.is_empty());
        assert_eq!(del.len(), 1);
        assert_eq!(del[0].dst.to_string(), "10.244.3.0/24");
        let (add, del) = diff(&one.fdb, &two.fdb);
        assert_eq!((add.len(), del.len()), (0, 1));
    }

    #[test]
    fn fixed_mtu_wins() {
        let cfg = ClusterConfig {
            mtu: tweed_model::Mtu::Fixed(1300),
            ..Default::default()
        };
        assert_eq!(plan_node(&cfg, &me(), &[]).vxlan.mtu, 1300);
    }
}
