//! Explaining a node's network: `tweed doctor` reads the kernel, compares
//! it with the plan the agent applied (`RUN_DIR/plan.json`, see
//! [`tweed_plan::NodeIntent`]), probes where reading cannot tell, and names
//! each fault with its evidence and the exact fix.
//!
//! Split as the rest of tweed is: [`facts`] does the I/O (netlink, /proc,
//! `nft -j`, ping) and returns plain data; [`doctor::check`] is a pure
//! function of the plan and those facts, unit-tested without root. Both
//! are read-only: doctor never changes the node it examines (its probes
//! are ordinary pings and TCP connects).
#![forbid(unsafe_code)]

pub mod conntrack;
pub mod doctor;
pub mod facts;
pub mod sockets;
pub mod trace;

use serde::{Deserialize, Serialize};

pub use doctor::check;
pub use facts::{gather, Facts};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{path}: {source} (is the agent running on this node? --run-dir names another)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not decode: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Netlink(#[from] tweed_netlink::NetlinkError),
    #[error("{0}")]
    Trace(String),
}

/// What a refused route lookup's errno means, for people.
pub(crate) fn errno_text(e: i32) -> String {
    match e {
        101 => "Network is unreachable".into(),
        113 => "No route to host (is net.ipv4.ip_forward on?)".into(),
        22 => "Invalid argument (a blackhole route, or rp_filter)".into(),
        e => format!("error {e}"),
    }
}

/// One fault found on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The fault's name, the same as `tweed lab fault list` uses.
    pub fault: String,
    pub node: String,
    /// The peer it concerns, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What is wrong and what it breaks, in one sentence.
    pub summary: String,
    /// What was read or probed that shows it.
    pub evidence: Vec<String>,
    /// The exact fix.
    pub fix: String,
}

/// What `tweed doctor -o json` prints: the nodes examined and every finding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub nodes: Vec<String>,
    pub findings: Vec<Finding>,
    /// Nodes that could not be examined, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Report {
    /// Several nodes' reports as one, judged together ([`correlate`]); a
    /// node that could not be examined is an error naming it.
    pub fn merge(results: Vec<(String, Result<Report, String>)>) -> Report {
        let mut report = Report::default();
        for (node, r) in results {
            report.nodes.push(node.clone());
            match r {
                Ok(mut one) => {
                    report.findings.append(&mut one.findings);
                    report.errors.append(&mut one.errors);
                }
                Err(e) => report.errors.push(format!("{node}: {e}")),
            }
        }
        report.findings = correlate(report.findings);
        report
    }
}

/// Faults a node finds by probing a peer, and faults in a node's own
/// routes towards a peer.
const PROBE_FAULTS: &[&str] = &[
    "vxlan-blocked",
    "pod-traffic-dropped",
    "peer-unreachable",
    "mtu",
];
const ROUTE_FAULTS: &[&str] = &[
    "wrong-next-hop",
    "foreign-route",
    "route-missing",
    "not-on-link",
    "wrong-source",
];

/// Findings of several nodes, judged together: when node A's route to B is
/// wrong, B's probes of A fail too (A's answers go astray), and B alone
/// would blame the network. Such probe findings on B are folded into A's
/// route finding, which names them as its echo.
pub fn correlate(findings: Vec<Finding>) -> Vec<Finding> {
    let causes: Vec<(String, String)> = findings
        .iter()
        .filter(|f| ROUTE_FAULTS.contains(&f.fault.as_str()))
        .filter_map(|f| Some((f.node.clone(), f.peer.clone()?)))
        .collect();
    let echo = |f: &Finding| {
        PROBE_FAULTS.contains(&f.fault.as_str())
            && f.peer
                .as_ref()
                .is_some_and(|p| causes.contains(&(p.clone(), f.node.clone())))
    };
    let echoes: Vec<Finding> = findings.iter().filter(|f| echo(f)).cloned().collect();
    let mut out: Vec<Finding> = findings.into_iter().filter(|f| !echo(f)).collect();
    for e in echoes {
        if let Some(cause) = out.iter_mut().find(|f| {
            ROUTE_FAULTS.contains(&f.fault.as_str())
                && Some(&f.node) == e.peer.as_ref()
                && f.peer.as_ref() == Some(&e.node)
        }) {
            cause.evidence.push(format!(
                "{}'s probes of {} fail too (it reports {}): its answers take this route",
                e.node, cause.node, e.fault
            ));
        }
    }
    out
}

/// Every finding as a report for people: one block per finding.
pub fn render(findings: &[Finding], nodes: &[String]) -> String {
    let mut s = String::new();
    if findings.is_empty() {
        s.push_str(&format!(
            "no problems found on {} ({})\n",
            if nodes.len() == 1 { "node" } else { "nodes" },
            nodes.join(", ")
        ));
        return s;
    }
    for f in findings {
        let peer = f
            .peer
            .as_ref()
            .map(|p| format!(" (peer {p})"))
            .unwrap_or_default();
        s.push_str(&format!("{}  {}{}\n", f.node, f.fault, peer));
        s.push_str(&format!("  {}\n", f.summary));
        for e in &f.evidence {
            s.push_str(&format!("  · {e}\n"));
        }
        s.push_str(&format!("  fix: {}\n\n", f.fix));
    }
    s.push_str(&format!(
        "{} problem{} on {}\n",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" },
        nodes.join(", ")
    ));
    s
}

/// The faults doctor knows, with one line each (shared with `tweed lab
/// fault list`, so an injected fault and its finding carry one name).
pub const FAULTS: &[(&str, &str)] = &[
    ("wrong-next-hop", "a route to a peer's pod subnet with the wrong next hop (seed 002, case 1)"),
    ("foreign-route", "a route someone else made shadows part of a peer's pod subnet"),
    ("route-missing", "no route at all to a peer's pod subnet"),
    ("wrong-source", "underlay traffic to a peer leaves by another NIC or address than the one peers know (seed 002, case 2)"),
    ("not-on-link", "direct routing to a peer that is not on the node's L2 segment (seed 003)"),
    ("vxlan-blocked", "VXLAN's UDP port blocked between two nodes while the underlay works (seed 000)"),
    ("pod-traffic-dropped", "the fabric drops pod-addressed traffic to a peer routed directly"),
    ("peer-unreachable", "a peer's underlay address does not answer"),
    ("mtu", "pod and tunnel MTU larger than the path to a peer carries"),
    ("cni-config-missing", "no tweed CNI config although the node is ready (\"cni plugin not initialized\", seed 000)"),
    ("cni-config-shadowed", "another network's CNI config sorts before tweed's, so the runtime uses it"),
    ("cni-plugin-missing", "a plugin binary the CNI config names is not in the CNI bin directory"),
    ("ip-forward-off", "net.ipv4.ip_forward is 0"),
    ("forward-drop", "a firewall FORWARD chain with policy drop (Docker's) that pod traffic falls through"),
    ("rp-filter-strict", "strict reverse-path filtering on a device pod traffic crosses"),
    ("leftover-rules", "kube-proxy, flannel or Calico rules (iptables-legacy or nft) left beside tweed's"),
    ("stale-conntrack", "conntrack entries pointing at endpoints that no longer exist"),
    ("datastore-unreachable", "the agent cannot reach its datastore"),
    ("lease-expiring", "the agent has not renewed its node record's lease (etcd): peers drop the node when it lapses"),
    ("podcidr-unassigned", "the Node has no spec.podCIDR yet (Kubernetes mode)"),
    ("bgp-session-down", "a BGP session is not Established, with BIRD's reason (wrong AS, unreachable, hold timer, password, BFD)"),
    ("bfd-not-up", "the cluster runs BFD, a BGP session is up and its BFD session is not: a dead peer is noticed only after the hold time"),
    ("bgp-speaker-down", "the cluster runs BGP but the node's speaker (BIRD) is not running"),
];
