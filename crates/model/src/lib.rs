//! Plain cluster data for tweed and its validation.
//!
//! Everything here is pure: the datastore, the planner, the CNI plugin and
//! the lab all share these types, and nothing here touches the kernel or the
//! network.
#![forbid(unsafe_code)]

pub mod bgp;
mod config;
mod node;
mod service;
mod subnet;

pub use bgp::{parse_peer as parse_bgp_peer, BgpConfig, BgpPeer};
pub use config::{Backend, ClusterConfig, ConfigError, Mtu, IPIP_OVERHEAD, VXLAN_OVERHEAD};
pub use node::{
    vtep_mac_for, HostPorts, MacAddr, NodeBgp, NodeRecord, NodeState, PodAttachment,
    DEFAULT_GSO_MAX_SIZE,
};
pub use service::{
    allocate_cluster_ip, allocate_lb_ip, allocate_node_port, valid_dns_label, Endpoint, Endpoints,
    FieldError, Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
    NODE_PORT_RANGE,
};
pub use subnet::{first_free_subnet, subnet_count, subnet_from_key, subnet_key, SubnetError};
