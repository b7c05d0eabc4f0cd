//! tweed's Kubernetes side.
//!
//! [`convert`] turns API objects into tweed's model, following kube-proxy's
//! contract to the letter, because that is what users' Services were written
//! against: which objects are skipped (proxy-name and headless labels,
//! headless and ExternalName Services, non-IPv4 families), how the slices of
//! one Service merge, and what ready / serving / terminating mean. It is
//! pure: the agent's Kubernetes datastore feeds it what it lists and
//! watches, and the tests feed it recorded JSON. [`mirror`] turns watch
//! events into changes, level-triggered; [`client`] is the API calls.
#![forbid(unsafe_code)]

pub mod client;
pub mod convert;
pub mod mirror;

pub use convert::{
    merge_endpoints, node_pod_cidr, node_record, record_annotations, service, slice_endpoints,
    slices_to_endpoints, EndpointSlice, SliceKey, ANNOTATION_PREFIX, PROXY_LABEL_SELECTOR,
    SERVICE_NAME_LABEL,
};
