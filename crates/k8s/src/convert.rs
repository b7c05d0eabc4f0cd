//! API objects → tweed's model.
//!
//! Nodes: a node's pod subnet is `spec.podCIDR` (the controller-manager's
//! node IPAM assigns it); everything else a peer needs (the address to
//! tunnel to, the VTEP MAC, the backend, peers it cannot reach) is what that
//! node's agent published in annotations under [`ANNOTATION_PREFIX`]. A
//! Node without them has no agent yet and is not a peer.
//!
//! Services and EndpointSlices: kube-proxy's rules, so a cluster behaves
//! the same after swapping kube-proxy for tweed:
//! - objects labelled `service.kubernetes.io/service-proxy-name` belong to
//!   another proxy, and slices labelled `service.kubernetes.io/headless`
//!   to a headless Service; both are filtered by the API server
//!   ([`PROXY_LABEL_SELECTOR`]) and checked again here;
//! - headless (`clusterIP: None`) and ExternalName Services have nothing to
//!   proxy; a Service with no IPv4 cluster IP belongs to another family;
//! - a Service's endpoints are every IPv4 slice labelled
//!   `kubernetes.io/service-name` with its name, merged; the first address
//!   of each endpoint counts; a duplicate (same address and port name) in
//!   two slices is kept once, the ready copy winning;
//! - conditions: `ready` absent means ready, `serving` absent means
//!   `ready`'s value (kube-proxy before 1.22 had no `serving`), and
//!   `terminating` absent means not terminating;
//! - the node an endpoint runs on is `nodeName` (discovery/v1) or the
//!   `kubernetes.io/hostname` topology key (discovery/v1beta1, Kubernetes
//!   1.20, which the seeds' clusters run).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, Service as KService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use tweed_model::{
    Backend, Endpoint, Endpoints, FieldError, MacAddr, NodeRecord, Protocol, Service, ServicePort,
    ServiceType, TargetPort, TrafficPolicy,
};

/// Where a node's agent publishes its record on its own Node.
pub const ANNOTATION_PREFIX: &str = "tweed.io/";
const ANN_PUBLIC_IP: &str = "tweed.io/public-ip";
const ANN_BACKEND: &str = "tweed.io/backend";
const ANN_VTEP_MAC: &str = "tweed.io/vtep-mac";
const ANN_UNREACHABLE: &str = "tweed.io/unreachable";
/// The node's BGP overrides (`NodeBgp` as JSON; `null`: none).
const ANN_BGP: &str = "tweed.io/bgp";
/// An operator's BGP settings for the node (see [`node_bgp_overrides`]).
pub const ANN_BGP_ASN: &str = "tweed.io/bgp-asn";
pub const ANN_BGP_PEERS: &str = "tweed.io/bgp-peers";

/// kube-proxy's server-side filter for Services and EndpointSlices.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

fn ferr(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

fn labels(meta: &ObjectMeta) -> impl Iterator<Item = (&String, &String)> {
    meta.labels.iter().flatten()
}

fn has_label(meta: &ObjectMeta, key: &str) -> bool {
    labels(meta).any(|(k, _)| k == key)
}

/// The node's IPv4 pod subnet: the first IPv4 entry of `spec.podCIDRs`,
/// else `spec.podCIDR`. `None` until the controller-manager assigns one.
pub fn node_pod_cidr(node: &Node) -> Result<Option<Ipv4Net>, FieldError> {
    let Some(spec) = &node.spec else {
        return Ok(None);
    };
    let mut cidrs: Vec<(String, &String)> = spec
        .pod_cidrs
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
        .collect();
    if cidrs.is_empty() {
        cidrs.extend(
            spec.pod_cidr
                .iter()
                .map(|c| ("spec.podCIDR".to_string(), c)),
        );
    }
    for (field, c) in cidrs {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => return Ok(Some(n.trunc())),
            Ok(IpNet::V6(_)) => continue,
            Err(e) => return Err(ferr(field, format!("{c:?} is not a CIDR: {e}"))),
        }
    }
    Ok(None)
}

/// A peer's record, from its Node: `Ok(None)` while it has no pod subnet
/// or its agent has not published yet.
pub fn node_record(node: &Node) -> Result<Option<NodeRecord>, FieldError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let Some(subnet) = node_pod_cidr(node)? else {
        return Ok(None);
    };
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k));
    let field = |k: &str| format!("metadata.annotations[{k}]");
    let Some(ip) = get(ANN_PUBLIC_IP) else {
        return Ok(None);
    };
    let public_ip: Ipv4Addr = ip.parse().map_err(|_| {
        ferr(
            field(ANN_PUBLIC_IP),
            format!("{ip:?} is not an IPv4 address"),
        )
    })?;
    let backend: Backend = match get(ANN_BACKEND) {
        None => Backend::Vxlan,
        Some(b) => serde_json::from_value(serde_json::Value::String(b.clone()))
            .map_err(|_| ferr(field(ANN_BACKEND), format!("{b:?} is not a backend")))?,
    };
    let vtep_mac: MacAddr = match get(ANN_VTEP_MAC) {
        None => tweed_model::vtep_mac_for(&name),
        Some(m) => m
            .parse()
            .map_err(|e: String| ferr(field(ANN_VTEP_MAC), e))?,
    };
    let unreachable: Vec<String> = match get(ANN_UNREACHABLE) {
        None => Vec::new(),
        Some(u) => serde_json::from_str(u).map_err(|e| {
            ferr(
                field(ANN_UNREACHABLE),
                format!("not a JSON list of strings: {e}"),
            )
        })?,
    };
    let mut bgp: Option<tweed_model::NodeBgp> = match get(ANN_BGP) {
        None => None,
        Some(b) => serde_json::from_str(b).map_err(|e| {
            ferr(
                field(ANN_BGP),
                format!("not a JSON object {{asn, peers, labels}}: {e}"),
            )
        })?,
    };
    // BGP peers' node selectors match the Node's own labels, as Calico's do.
    if let Some(labels) = node.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        let b = bgp.get_or_insert_with(Default::default);
        for (k, v) in labels {
            b.labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Ok(Some(NodeRecord {
        name,
        subnet,
        public_ip,
        backend,
        vtep_mac,
        unreachable,
        bgp,
    }))
}

/// An operator's BGP settings for one node, as annotations on its Node
/// (Calico's `projectcalico.org/ASNumber`, in tweed's words):
/// `tweed.io/bgp-asn: "65101"` and `tweed.io/bgp-peers:
/// "198.51.100.1:65001[:PASSWORD],..."`. The agent merges them into its
/// record; its own flags win.
pub fn node_bgp_overrides(node: &Node) -> Result<Option<tweed_model::NodeBgp>, FieldError> {
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).filter(|v| !v.trim().is_empty());
    let (asn, peers) = (get(ANN_BGP_ASN), get(ANN_BGP_PEERS));
    if asn.is_none() && peers.is_none() {
        return Ok(None);
    }
    let field = |k: &str| format!("metadata.annotations[{k}]");
    let asn = match asn {
        None => None,
        Some(a) => Some(
            a.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| tweed_model::bgp::valid_asn(*n))
                .ok_or_else(|| {
                    ferr(
                        field(ANN_BGP_ASN),
                        format!("{a:?} is not a usable AS number"),
                    )
                })?,
        ),
    };
    let peers = peers
        .map(|p| {
            p.split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| {
                    tweed_model::parse_bgp_peer(x.trim()).map_err(|e| ferr(field(ANN_BGP_PEERS), e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(Some(tweed_model::NodeBgp {
        asn,
        peers,
        labels: BTreeMap::new(),
    }))
}

/// The annotations an agent writes on its own Node for `rec` (the subnet
/// is not among them: it is the Node's `spec.podCIDR`).
pub fn record_annotations(rec: &NodeRecord) -> BTreeMap<String, String> {
    let backend = serde_json::to_value(rec.backend)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    [
        (ANN_PUBLIC_IP, rec.public_ip.to_string()),
        (ANN_BACKEND, backend),
        (ANN_VTEP_MAC, rec.vtep_mac.to_string()),
        (
            ANN_UNREACHABLE,
            serde_json::to_string(&rec.unreachable).expect("strings serialise"),
        ),
        (
            ANN_BGP,
            serde_json::to_string(&rec.bgp).expect("NodeBgp serialises"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn policy(v: Option<&String>, field: &str) -> Result<TrafficPolicy, FieldError> {
    match v.map(String::as_str) {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(o) => Err(ferr(field, format!("{o:?} is not Cluster or Local"))),
    }
}

fn protocol(v: Option<&String>, field: &str) -> Result<Protocol, FieldError> {
    match v.map(String::as_str) {
        None | Some("") | Some("TCP") => Ok(Protocol::TCP),
        Some("UDP") => Ok(Protocol::UDP),
        Some("SCTP") => Ok(Protocol::SCTP),
        Some(o) => Err(ferr(field, format!("{o:?} is not TCP, UDP or SCTP"))),
    }
}

fn port_number(v: i32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ferr(field, format!("{v} must be between 1 and 65535")))
}

/// A Service in tweed's model: `Ok(None)` for one kube-proxy leaves alone
/// (another proxy's, headless, ExternalName, or without an IPv4 cluster
/// IP); an error names the field that makes it unusable.
pub fn service(s: &KService, service_cidr: Ipv4Net) -> Result<Option<Service>, FieldError> {
    let meta = &s.metadata;
    if has_label(meta, PROXY_NAME_LABEL) || has_label(meta, HEADLESS_LABEL) {
        return Ok(None);
    }
    let Some(spec) = &s.spec else { return Ok(None) };
    let service_type = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(None),
        Some(o) => return Err(ferr("spec.type", format!("{o:?} is not a Service type"))),
    };
    // Per family: this proxy handles IPv4, so the IPv4 entry of clusterIPs
    // (clusterIP alone on clusters before dual-stack).
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    if ips.iter().any(|ip| ip.as_str() == "None") {
        return Ok(None);
    }
    let Some(cluster_ip) = ips.iter().find_map(|ip| ip.parse::<Ipv4Addr>().ok()) else {
        return Ok(None);
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_ref(), &f("protocol"))?,
            port: port_number(p.port, &f("port"))?,
            target_port: match &p.target_port {
                None => None,
                Some(IntOrString::Int(n)) => {
                    Some(TargetPort::Number(port_number(*n, &f("targetPort"))?))
                }
                Some(IntOrString::String(n)) => Some(match n.parse::<i32>() {
                    Ok(num) => TargetPort::Number(port_number(num, &f("targetPort"))?),
                    Err(_) => TargetPort::Name(n.clone()),
                }),
            },
            node_port: match p.node_port {
                None | Some(0) => None,
                Some(n) => Some(port_number(n, &f("nodePort"))?),
            },
        });
    }
    let v4 = |v: &String| v.parse::<Ipv4Addr>().ok();
    let external_ips = spec.external_ips.iter().flatten().filter_map(v4).collect();
    let load_balancer_ips = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_ref().and_then(v4))
        .collect();
    let mut load_balancer_source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match r.trim().parse::<IpNet>() {
            Ok(IpNet::V4(n)) => load_balancer_source_ranges.push(n.trunc()),
            Ok(IpNet::V6(_)) => {}
            Err(e) => {
                return Err(ferr(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{r:?} is not a CIDR: {e}"),
                ))
            }
        }
    }
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(n, "spec.healthCheckNodePort")?),
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        Some("ClientIP") => Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                // kube's default: three hours.
                .map_or(Ok(10800), |t| {
                    u32::try_from(t).map_err(|_| {
                        ferr(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} must be between 1 and 86400"),
                        )
                    })
                })?,
        ),
        None | Some("") | Some("None") => None,
        Some(o) => {
            return Err(ferr(
                "spec.sessionAffinity",
                format!("{o:?} is not None or ClientIP"),
            ))
        }
    };
    let svc = Service {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        service_type,
        cluster_ip: Some(cluster_ip),
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        health_check_node_port,
        affinity_timeout,
        external_traffic_policy: policy(
            spec.external_traffic_policy.as_ref(),
            "spec.externalTrafficPolicy",
        )?,
        internal_traffic_policy: policy(
            spec.internal_traffic_policy.as_ref(),
            "spec.internalTrafficPolicy",
        )?,
        selector: spec.selector.clone().unwrap_or_default(),
    };
    svc.validate(service_cidr)?;
    Ok(Some(svc))
}

/// An EndpointSlice as served by `discovery.k8s.io/v1` and `v1beta1` alike
/// (k8s-openapi models only v1; 1.20 serves only v1beta1). Only what
/// kube-proxy reads is decoded.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<SliceConditions>,
    /// discovery/v1 (and v1beta1 from 1.20 behind a gate).
    #[serde(default)]
    pub node_name: Option<String>,
    /// discovery/v1beta1: `kubernetes.io/hostname` names the node.
    #[serde(default)]
    pub topology: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SliceConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct TargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<i32>,
}

/// Which Service a slice belongs to ("NS/NAME"), or `None` for a slice
/// kube-proxy ignores (no service-name label, another proxy's, headless).
pub type SliceKey = Option<String>;

impl EndpointSlice {
    pub fn service_id(&self) -> SliceKey {
        let m = &self.metadata;
        if has_label(m, PROXY_NAME_LABEL) || has_label(m, HEADLESS_LABEL) {
            return None;
        }
        let svc = labels(m).find(|(k, _)| *k == SERVICE_NAME_LABEL)?.1;
        Some(format!(
            "{}/{svc}",
            m.namespace.as_deref().unwrap_or("default")
        ))
    }
}

/// One slice's endpoints, each with the slice's ports. Slices of other
/// address types, ports without a number and endpoints without an address
/// are skipped, as kube-proxy skips them; only the first address counts.
pub fn slice_endpoints(s: &EndpointSlice) -> Vec<Endpoint> {
    let mut out = Vec::new();
    if s.address_type != "IPv4" {
        return out;
    }
    let ports: Vec<(String, u16)> = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let n = u16::try_from(p.port?).ok().filter(|n| *n > 0)?;
            Some((p.name.clone().unwrap_or_default(), n))
        })
        .collect();
    for e in s.endpoints.iter().flatten() {
        let Some(ip) = e.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let c = e.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        let ep = Endpoint {
            ip,
            node: e
                .node_name
                .clone()
                .or_else(|| e.topology.as_ref()?.get(HOSTNAME_TOPOLOGY).cloned())
                .unwrap_or_default(),
            ports: Vec::new(),
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
                .and_then(|r| r.name.clone())
                .unwrap_or_default(),
        };
        for (pname, port) in &ports {
            add_port(&mut out, &ep, pname, *port);
        }
    }
    for e in &mut out {
        e.ports.shrink_to_fit();
    }
    out.shrink_to_fit();
    out
}

/// Add (`e`'s address, port `pname` = `port`) to `out`. A duplicate
/// (address, port name) is kept once; a ready copy replaces one that is not.
fn add_port(out: &mut Vec<Endpoint>, e: &Endpoint, pname: &str, port: u16) {
    if let Some(i) = out
        .iter()
        .position(|o| o.ip == e.ip && o.port(pname).is_some())
    {
        if out[i].ready || !e.ready {
            return;
        }
        out[i].ports.retain(|(n, _)| n != pname);
        if out[i].ports.is_empty() {
            out.remove(i);
        }
    }
    match out.iter_mut().find(|o| {
        o.ip == e.ip
            && o.ready == e.ready
            && o.serving == e.serving
            && o.terminating == e.terminating
    }) {
        Some(o) => o.ports.push((pname.to_string(), port)),
        None => out.push(Endpoint {
            ports: vec![(pname.to_string(), port)],
            ..e.clone()
        }),
    }
}

/// A Service's endpoints (`id` is "NS/NAME") from its slices' endpoints
/// ([`slice_endpoints`] of each), merged.
pub fn merge_endpoints<'a>(id: &str, parts: impl IntoIterator<Item = &'a [Endpoint]>) -> Endpoints {
    let (namespace, name) = id.split_once('/').unwrap_or(("default", id));
    let mut out: Vec<Endpoint> = Vec::new();
    for part in parts {
        for e in part {
            for (pname, port) in &e.ports {
                add_port(&mut out, e, pname, *port);
            }
        }
    }
    let mut eps = Endpoints {
        namespace: namespace.to_string(),
        name: name.to_string(),
        endpoints: out,
    };
    eps.compact();
    eps
}

/// Merge the slices of one Service into its endpoints. `id` is "NS/NAME".
pub fn slices_to_endpoints<'a>(
    id: &str,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Endpoints {
    let parts: Vec<Vec<Endpoint>> = slices.into_iter().map(slice_endpoints).collect();
    merge_endpoints(id, parts.iter().map(Vec::as_slice))
}
