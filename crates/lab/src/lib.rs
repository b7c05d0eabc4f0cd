//! The lab: a whole cluster on one machine. An underlay bridge in its own
//! namespace, one namespace per node running a real `tweed agent`, an etcd
//! in a control-plane namespace, and pods wired by the real CNI plugin,
//! each running the built-in echo server.
//!
//! Nothing is ever added to the machine's own (root) network namespace:
//! links are created inside lab namespaces and every process runs in one.
#![forbid(unsafe_code)]

pub mod bigtcp;
pub mod echo;
pub mod faults;
pub mod frr;
pub mod kube;
mod kube_state;
pub mod kubelet;
pub mod lab;
pub mod manifest;
pub mod probe;
pub mod topology;
pub mod trace;
pub mod workloads;

pub use lab::{Lab, LabError};
pub use topology::Topology;
