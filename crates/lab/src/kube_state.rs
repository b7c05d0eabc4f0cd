//! What the lab records of its Kubernetes control plane (in its state
//! file), apart from the code that runs it, so the state depends on nothing.

use serde::{Deserialize, Serialize};

/// The control plane's processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KubeState {
    pub apiserver_pid: Option<u32>,
    pub controller_manager_pid: Option<u32>,
    pub scheduler_pid: Option<u32>,
    /// The discovery.k8s.io version the API server serves slices in.
    #[serde(default)]
    pub slices_api: String,
    /// Each node's containerd and kubelet (`kubelet:` labs).
    #[serde(default)]
    pub kubelets: std::collections::BTreeMap<String, NodeRuntime>,
}

/// A node's container runtime and kubelet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeRuntime {
    pub containerd_pid: Option<u32>,
    pub kubelet_pid: Option<u32>,
}

impl KubeState {
    pub fn pids(&self) -> impl Iterator<Item = u32> {
        [
            self.apiserver_pid,
            self.controller_manager_pid,
            self.scheduler_pid,
        ]
        .into_iter()
        .flatten()
    }
}
