//! The node agent. One process per node: it claims the node's subnet,
//! publishes the node's record, watches every other node's record, and
//! keeps the kernel matching the plan, level-triggered: a datastore event
//! and the periodic resync both converge to the same state.
//!
//! It never tears down the data plane on its own: when it stops, restarts
//! or loses the datastore, pods keep talking on what is already installed.
#![forbid(unsafe_code)]

pub mod bgp;
mod dataplane;
mod datastore;
mod error;
mod files;
mod hc;
mod health;
mod kube;
pub mod mem;
mod packed;
mod pods;
mod probe;
mod proxy;
mod run;

pub use dataplane::{reconcile, Dataplane, ReconcileReport};
pub use datastore::{Datastore, Snapshot, Update};
pub use files::{conflist, write_atomic, AgentStatus, PeerStatus};
pub use packed::PackedEndpoints;
pub use proxy::{read_hostports, table_present, Proxy, SyncReport};
pub use run::{run, AgentError, AgentOpts, DatastoreOpts};
pub use tweed_k8s::client::KubeOpts;
