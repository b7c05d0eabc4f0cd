//! The agent's one error type, shared by its loop and its datastores.

use std::path::PathBuf;

use tweed_k8s::client::KubeError;
use tweed_netlink::NetlinkError;
use tweed_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("{0}")]
    Invalid(String),
    #[error("no underlay interface: {0}")]
    Underlay(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("our subnet record was removed from the datastore")]
    RecordGone,
    #[error("service proxy: {0}")]
    Proxy(#[from] tweed_nft::NftError),
}
