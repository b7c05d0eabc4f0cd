//! Which BGP sessions one node opens, and what it announces.
//!
//! - Mesh: every node peers with every other (iBGP in one AS; with a
//!   per-node AS it becomes eBGP, as Calico allows).
//! - Route reflectors: the named nodes peer with every node and with each
//!   other; every other node peers with them only.
//! - Global peers: every node whose labels match the peer's selector.
//! - Node-specific peers: from the node's own record (e.g. eBGP to its
//!   rack's ToR); one of these replaces a global peer at the same address.
//!
//! A node announces its pod subnet as one aggregate and holds a blackhole
//! route for it, as Calico does: traffic to an unused address in the subnet
//! stops on the node instead of bouncing back to the fabric.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::config::{BfdConfig, BgpConfig, BgpPeer};

/// One node as BGP planning sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpNode {
    pub name: String,
    /// The address it speaks BGP from (its underlay address).
    pub address: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// Its own AS, if it overrides the cluster's.
    pub asn: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// Its node-specific peers.
    pub peers: Vec<BgpPeer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionKind {
    /// Node-to-node mesh.
    Mesh,
    /// To a node that reflects routes.
    RouteReflector,
    /// From a reflector to a node it reflects for.
    RouteReflectorClient,
    /// A configured peer for every (selected) node.
    Global,
    /// A peer of this node only.
    NodeSpecific,
}

impl std::fmt::Display for SessionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionKind::Mesh => "node-to-node mesh",
            SessionKind::RouteReflector => "route reflector",
            SessionKind::RouteReflectorClient => "route reflector client",
            SessionKind::Global => "global",
            SessionKind::NodeSpecific => "node specific",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The speaker's name for it: letters, digits and `_` only.
    pub name: String,
    pub kind: SessionKind,
    pub address: Ipv4Addr,
    pub peer_asn: u32,
    /// The node's name, for mesh and reflector sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPlan {
    pub router_id: Ipv4Addr,
    pub local_asn: u32,
    pub hold_time: u16,
    /// Announced, each with a local blackhole route.
    pub announce: Vec<Ipv4Net>,
    /// Service addresses announced too (external and load balancer IPs,
    /// the Service CIDR): no kernel blackhole, the node's Service rules
    /// take the traffic. Set by the agent, which knows the Services.
    pub services: Vec<Ipv4Net>,
    /// What may be learnt: the cluster's node subnets (other nodes' only).
    pub accept_within: Ipv4Net,
    pub accept_len: u8,
    pub sessions: Vec<Session>,
    /// BFD on every session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdConfig>,
}

/// A name the speaker accepts: `[A-Za-z0-9_]`, starting with a letter.
fn ident(prefix: &str, s: &str) -> String {
    let body: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{body}")
}

fn selected(p: &BgpPeer, labels: &BTreeMap<String, String>) -> bool {
    p.node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// The sessions and announcements of node `me` among `nodes` (which may
/// include `me`). `cluster_cidr` and `node_subnet_len` bound what it
/// accepts: node subnets of the cluster, never its own.
pub fn plan_bgp(
    cfg: &BgpConfig,
    cluster_cidr: Ipv4Net,
    node_subnet_len: u8,
    me: &BgpNode,
    nodes: &[BgpNode],
) -> BgpPlan {
    let asn_of = |n: &BgpNode| n.asn.unwrap_or(cfg.asn);
    let others: Vec<&BgpNode> = nodes.iter().filter(|n| n.name != me.name).collect();
    let mut by_addr: BTreeMap<Ipv4Addr, Session> = BTreeMap::new();
    let node_session = |n: &BgpNode, kind: SessionKind| Session {
        name: ident(
            match kind {
                SessionKind::Mesh => "mesh",
                SessionKind::RouteReflector => "rr",
                _ => "rrc",
            },
            &n.name,
        ),
        kind,
        address: n.address,
        peer_asn: asn_of(n),
        peer_node: Some(n.name.clone()),
        password: None,
    };
    let reflectors: Vec<&str> = cfg.route_reflectors.iter().map(String::as_str).collect();
    if !reflectors.is_empty() {
        let i_reflect = reflectors.contains(&me.name.as_str());
        for n in &others {
            let kind = match (i_reflect, reflectors.contains(&n.name.as_str())) {
                (_, true) => SessionKind::RouteReflector,
                (true, false) => SessionKind::RouteReflectorClient,
                (false, false) => continue,
            };
            by_addr.insert(n.address, node_session(n, kind));
        }
    } else if cfg.mesh_on() {
        for n in &others {
            by_addr.insert(n.address, node_session(n, SessionKind::Mesh));
        }
    }
    let configured = |p: &BgpPeer, kind: SessionKind| Session {
        name: ident(
            if kind == SessionKind::Global {
                "global"
            } else {
                "node"
            },
            &p.address.to_string(),
        ),
        kind,
        address: p.address,
        peer_asn: p.asn,
        peer_node: None,
        password: p.password.clone(),
    };
    for p in cfg.peers.iter().filter(|p| selected(p, &me.labels)) {
        by_addr
            .entry(p.address)
            .or_insert_with(|| configured(p, SessionKind::Global));
    }
    for p in &me.peers {
        by_addr.insert(p.address, configured(p, SessionKind::NodeSpecific));
    }
    // A session to itself (its own address listed as a peer) is dropped.
    by_addr.remove(&me.address);
    let mut sessions: Vec<Session> = by_addr.into_values().collect();
    sessions.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    BgpPlan {
        router_id: me.address,
        local_asn: asn_of(me),
        hold_time: cfg.hold_time,
        announce: vec![me.subnet],
        services: Vec::new(),
        accept_within: cluster_cidr.trunc(),
        accept_len: node_subnet_len,
        sessions,
        bfd: cfg.bfd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, i: u8) -> BgpNode {
        BgpNode {
            name: name.into(),
            address: Ipv4Addr::new(198, 51, 100, 10 + i),
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            asn: None,
            labels: [(
                "rack".to_string(),
                if i < 3 { "a" } else { "b" }.to_string(),
            )]
            .into(),
            peers: Vec::new(),
        }
    }

    fn plan(cfg: &BgpConfig, me: usize, nodes: &[BgpNode]) -> BgpPlan {
        plan_bgp(cfg, "10.244.0.0/16".parse().unwrap(), 24, &nodes[me], nodes)
    }

    #[test]
    fn a_mesh_peers_with_every_other_node_and_announces_its_subnet() {
        let nodes: Vec<_> = (1..=3).map(|i| node(&format!("node-{i}"), i)).collect();
        let p = plan(&BgpConfig::default(), 0, &nodes);
        assert_eq!(p.local_asn, 64512);
        assert_eq!(p.router_id, nodes[0].address);
        assert_eq!(p.announce, vec![nodes[0].subnet]);
        let names: Vec<_> = p.sessions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["mesh_node_2", "mesh_node_3"]);
        assert!(p
            .sessions
            .iter()
            .all(|s| s.kind == SessionKind::Mesh && s.peer_asn == 64512));
    }

    #[test]
    fn tor_peers_follow_selectors_and_node_records_and_turn_the_mesh_off() {
        let mut nodes: Vec<_> = (1..=4).map(|i| node(&format!("n{i}"), i)).collect();
        let tor = |addr: &str, asn: u32, rack: &str| BgpPeer {
            address: addr.parse().unwrap(),
            asn,
            password: None,
            node_selector: [("rack".to_string(), rack.to_string())].into(),
        };
        let cfg = BgpConfig {
            peers: vec![
                tor("198.51.100.1", 65001, "a"),
                tor("203.0.113.1", 65002, "b"),
            ],
            ..Default::default()
        };
        let p = plan(&cfg, 0, &nodes);
        assert_eq!(p.sessions.len(), 1, "{:?}", p.sessions);
        assert_eq!(
            (p.sessions[0].kind, p.sessions[0].peer_asn),
            (SessionKind::Global, 65001)
        );
        let p = plan(&cfg, 3, &nodes);
        assert_eq!(
            p.sessions[0].address,
            "203.0.113.1".parse::<Ipv4Addr>().unwrap()
        );
        // The node's own record replaces the global peer at that address,
        // and its own AS makes the session eBGP from its side.
        nodes[0].asn = Some(65101);
        nodes[0].peers = vec![BgpPeer {
            password: Some("s3cret".into()),
            ..tor("198.51.100.1", 65009, "")
        }];
        let p = plan(&cfg, 0, &nodes);
        assert_eq!(p.local_asn, 65101);
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(p.sessions[0].kind, SessionKind::NodeSpecific);
        assert_eq!(p.sessions[0].peer_asn, 65009);
        assert_eq!(p.sessions[0].password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn route_reflectors_take_the_place_of_the_mesh() {
        let nodes: Vec<_> = (1..=4).map(|i| node(&format!("n{i}"), i)).collect();
        let cfg = BgpConfig {
            route_reflectors: vec!["n1".into(), "n2".into()],
            ..Default::default()
        };
        fn kinds(p: &BgpPlan) -> Vec<(&str, SessionKind)> {
            p.sessions
                .iter()
                .map(|s| (s.name.as_str(), s.kind))
                .collect()
        }
        let client = plan(&cfg, 2, &nodes);
        assert_eq!(
            kinds(&client),
            [
                ("rr_n1", SessionKind::RouteReflector),
                ("rr_n2", SessionKind::RouteReflector)
            ]
        );
        let reflector = plan(&cfg, 0, &nodes);
        assert_eq!(
            kinds(&reflector),
            [
                ("rr_n2", SessionKind::RouteReflector),
                ("rrc_n3", SessionKind::RouteReflectorClient),
                ("rrc_n4", SessionKind::RouteReflectorClient),
            ]
        );
    }
}
