use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Write a file so readers see the old or the new content, never half:
/// write a sibling temporary file, then rename it over the target.
pub fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// The CNI network config list the agent publishes once the node is ready.
/// `cniVersion` stays 1.0.0 because runtimes built on libcni before 1.2
/// (podman 4, containerd 1.7) cannot parse a 1.1.0 result; runtimes that
/// know CNI 1.1 read `cniVersions` and pick 1.1.0 (and with it STATUS and GC).
pub fn conflist(run_dir: &Path, ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "tweed",
        "plugins": [{
            "type": "tweed",
            "runDir": run_dir,
            "dataDir": ipam_dir,
            "capabilities": { "portMappings": true },
        }]
    })
}

/// One peer as the agent sees it, for `tweed status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    pub subnet: String,
    pub address: String,
    /// direct, vxlan, ipip or unreachable, and why.
    pub mode: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub problem: String,
}

/// What the agent writes to `RUN_DIR/status.json` after each reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    pub subnet: String,
    pub underlay_dev: String,
    pub bind_ip: String,
    pub public_ip: String,
    /// connected, disconnected, retrying (watches failing, data plane
    /// kept) or waiting (e.g. for the Node's spec.podCIDR).
    pub datastore: String,
    /// Which datastore, and where.
    #[serde(default)]
    pub datastore_at: String,
    pub peers: Vec<PeerStatus>,
    pub last_error: Option<String>,
    /// Services in the proxy's last sync, and when it was (RFC 3339, UTC).
    #[serde(default)]
    pub services: u64,
    #[serde(default)]
    pub last_sync: String,
    /// etcd: the lease the node's record lives by, and when it was last
    /// renewed (RFC 3339, UTC).
    /// Whose lease: "agent" (etcd) or "kubelet" (kube-node-lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_renewed: Option<String>,
    /// The same, in seconds since the epoch (what doctor computes with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_renewed_unix: Option<u64>,
    /// A peer has just missed a path probe and is probed again within
    /// seconds: its mode may still change (the lab waits for this to
    /// clear before calling the network up).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probing: bool,
    /// The IPv4 GSO/GRO max size pod veths get (above 65536: BIG TCP,
    /// while every peer is direct and the underlay allows it).
    #[serde(default)]
    pub pod_gso_max_size: u32,
    /// The BGP speaker and its sessions (absent: the cluster runs no BGP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::BgpStatus>,
}
