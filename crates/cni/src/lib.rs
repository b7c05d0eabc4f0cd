//! The CNI plugin: what a container runtime runs, per the CNI spec 1.1.0
//! (also accepting 0.4.0 and 1.0.0 configs).
//!
//! - [`spec`]: the protocol: environment, config, results, error codes.
//! - [`ipam`]: node-local address allocation inside the node's lease, under
//!   a file lock so concurrent ADDs never collide.
//! - [`plugin`]: the commands, wiring pods with a veth pair and routes.
#![forbid(unsafe_code)]

pub mod ipam;
pub mod plugin;
pub mod spec;

pub use plugin::{main_with, run};
pub use spec::{CniError, Command};
