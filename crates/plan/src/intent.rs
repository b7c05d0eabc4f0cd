//! What the agent intends its node to be, written to `RUN_DIR/plan.json`
//! after every reconcile. `tweed doctor` and `tweed trace` compare it with
//! the kernel: they must judge the node by the same plan the agent applied,
//! not re-derive one from a datastore they may not be able to reach (a node
//! whose datastore is down is exactly the node someone is debugging).
//! Reading it needs only local root on the node: no new port, no new
//! credential.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tweed_model::{Backend, MacAddr};

use crate::{Mode, NodePlan};

/// One peer as the plan saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerIntent {
    pub name: String,
    pub subnet: Ipv4Net,
    /// Where its tunnel and direct traffic goes (its public address behind NAT).
    pub public_ip: Ipv4Addr,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    /// `None`: left out of the plan (see `NodePlan::skipped`).
    pub mode: Option<Mode>,
    pub reason: String,
}

/// The node's desired state and the facts it was planned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeIntent {
    pub node: String,
    pub subnet: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub backend: Backend,
    pub vxlan_port: u16,
    pub underlay_dev: String,
    /// The address bound on the underlay device.
    pub bind_ip: Ipv4Addr,
    /// The address peers know this node by (differs behind 1:1 NAT).
    pub public_ip: Ipv4Addr,
    pub underlay_mtu: u32,
    /// Pod interfaces' and the tunnel's MTU.
    pub pod_mtu: u32,
    pub cni_conf_dir: PathBuf,
    /// Where the runtime looks for plugin binaries, when the agent knows.
    pub cni_bin_dir: Option<PathBuf>,
    /// Seconds between the agent's resyncs (how soon it repairs what it owns).
    pub resync_secs: u64,
    pub peers: Vec<PeerIntent>,
    pub plan: NodePlan,
}

impl NodeIntent {
    /// The planned route to a peer's pod subnet, if any.
    pub fn route_to(&self, subnet: Ipv4Net) -> Option<&crate::Route> {
        self.plan.routes.iter().find(|r| r.dst == subnet)
    }

    pub fn vtep_ip(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    /// Is this peer's traffic tunnelled (VXLAN or IP-in-IP)?
    pub fn tunnelled(&self, p: &PeerIntent) -> bool {
        matches!(p.mode, Some(Mode::Vxlan | Mode::Ipip))
    }

    /// Every device pod traffic leaves or arrives by.
    pub fn devices(&self) -> Vec<String> {
        crate::route_devices(&self.plan, &self.underlay_dev)
    }

    /// Is the backend one that uses this device kind?
    pub fn uses_vxlan(&self) -> bool {
        matches!(self.backend, Backend::Vxlan | Backend::Auto)
    }
}
