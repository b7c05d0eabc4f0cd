//! Services and their endpoints, as kube-proxy sees them, with validation
//! that names the offending field the way `kubectl` does (`spec.ports[0].port`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::TCP => 6,
            Protocol::UDP => 17,
            Protocol::SCTP => 132,
        }
    }

    /// The name nft and conntrack use.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::TCP => "tcp",
            Protocol::UDP => "udp",
            Protocol::SCTP => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
            Protocol::SCTP => "SCTP",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// A port's target on the pods: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
    /// Allocated from the service CIDR when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`: handled like external IPs, as
    /// kube-proxy does (so traffic from inside the cluster to a load
    /// balancer's address short-cuts to the endpoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges`: who may reach the load balancer
    /// IPs (empty: everyone). External IPs are not restricted, as with
    /// kube-proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<Ipv4Net>,
    /// `spec.healthCheckNodePort` (type LoadBalancer, policy Local): every
    /// node answers on it whether it has a ready endpoint (200) or not
    /// (503), so a load balancer sends traffic only where it is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// `Some(timeout seconds)` for sessionAffinity ClientIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// One endpoint: a pod address with its ports by service-port name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
    /// (service port name, "" for a single unnamed port; target port). A
    /// short list, not a map: an agent holds 100k of these at 10k services.
    pub ports: Vec<(String, u16)>,
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default = "yes")]
    pub serving: bool,
    #[serde(default)]
    pub terminating: bool,
    /// The pod behind it (for humans and tests).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
}

fn yes() -> bool {
    true
}

impl Service {
    /// Give back the spare capacity decoding leaves (serde grows a vector
    /// to four elements for one): an agent holds 30k of these.
    pub fn compact(&mut self) {
        self.ports.shrink_to_fit();
        for p in &mut self.ports {
            p.name.shrink_to_fit();
        }
        self.external_ips.shrink_to_fit();
        self.load_balancer_ips.shrink_to_fit();
        self.load_balancer_source_ranges.shrink_to_fit();
    }
}

impl Endpoints {
    /// Give back the spare capacity decoding leaves (serde grows vectors by
    /// doubling): an agent holds 100k endpoints at 10k services.
    pub fn compact(&mut self) {
        self.endpoints.shrink_to_fit();
        for e in &mut self.endpoints {
            e.ports.shrink_to_fit();
            e.node.shrink_to_fit();
            e.pod.shrink_to_fit();
        }
    }
}

impl Endpoint {
    /// The target port for the service port named `name`.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }
}

/// A service's endpoints (an EndpointSlice, flattened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub namespace: String,
    pub name: String,
    pub endpoints: Vec<Endpoint>,
}

/// A validation failure: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct FieldError {
    pub field: String,
    pub msg: String,
}

fn ferr(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

/// RFC 1035 label, as Kubernetes requires for Service names.
pub fn valid_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && *b.last().expect("non-empty") != b'-'
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Check everything that does not need the datastore. `service_cidr`
    /// bounds an explicit clusterIP.
    pub fn validate(&self, service_cidr: Ipv4Net) -> Result<(), FieldError> {
        if !valid_dns_label(&self.name) {
            return Err(ferr(
                "metadata.name",
                format!(
                    "{:?} must be a lowercase RFC 1035 label (a-z, 0-9, '-', at most 63)",
                    self.name
                ),
            ));
        }
        if !valid_dns_label(&self.namespace) {
            return Err(ferr(
                "metadata.namespace",
                format!("{:?} must be a lowercase RFC 1035 label", self.namespace),
            ));
        }
        if self.ports.is_empty() {
            return Err(ferr("spec.ports", "at least one port is required"));
        }
        let mut names = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let f = |x: &str| format!("spec.ports[{i}].{x}");
            if p.port == 0 {
                return Err(ferr(f("port"), "must be between 1 and 65535"));
            }
            if self.ports.len() > 1 && p.name.is_empty() {
                return Err(ferr(
                    f("name"),
                    "is required when the service has more than one port",
                ));
            }
            if !p.name.is_empty() && !valid_dns_label(&p.name) {
                return Err(ferr(
                    f("name"),
                    format!("{:?} must be a lowercase RFC 1035 label", p.name),
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(ferr(f("name"), format!("{:?} is used twice", p.name)));
            }
            if !seen.insert((p.protocol, p.port)) {
                return Err(ferr(
                    f("port"),
                    format!("{}/{} is used twice", p.port, p.protocol),
                ));
            }
            match &p.target_port {
                Some(TargetPort::Number(0)) => {
                    return Err(ferr(f("targetPort"), "must be between 1 and 65535"))
                }
                Some(TargetPort::Name(n)) if n.is_empty() || n.len() > 15 => {
                    return Err(ferr(
                        f("targetPort"),
                        format!("{n:?} is not a valid port name"),
                    ))
                }
                _ => {}
            }
            if let Some(np) = p.node_port {
                if self.service_type == ServiceType::ClusterIP {
                    return Err(ferr(
                        f("nodePort"),
                        "may only be set for type NodePort or LoadBalancer",
                    ));
                }
                if !NODE_PORT_RANGE.contains(&np) {
                    return Err(ferr(
                        f("nodePort"),
                        format!("{np} is outside the node port range 30000-32767"),
                    ));
                }
            }
        }
        if let Some(ip) = self.cluster_ip {
            if !service_cidr.contains(&ip)
                || ip == service_cidr.network()
                || ip == service_cidr.broadcast()
            {
                return Err(ferr(
                    "spec.clusterIP",
                    format!("{ip} is not a usable address of the service CIDR {service_cidr}"),
                ));
            }
        }
        if let Some(t) = self.affinity_timeout {
            if t == 0 || t > 86400 {
                return Err(ferr(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} must be between 1 and 86400"),
                ));
            }
        }
        if let Some(hc) = self.health_check_node_port {
            if self.service_type != ServiceType::LoadBalancer
                || self.external_traffic_policy != TrafficPolicy::Local
            {
                return Err(ferr(
                    "spec.healthCheckNodePort",
                    "may only be set for type LoadBalancer with externalTrafficPolicy Local",
                ));
            }
            if !NODE_PORT_RANGE.contains(&hc) {
                return Err(ferr(
                    "spec.healthCheckNodePort",
                    format!("{hc} is outside the node port range 30000-32767"),
                ));
            }
            if self.ports.iter().any(|p| p.node_port == Some(hc)) {
                return Err(ferr(
                    "spec.healthCheckNodePort",
                    format!("{hc} is also a port's nodePort"),
                ));
            }
        }
        if !self.load_balancer_source_ranges.is_empty()
            && self.service_type != ServiceType::LoadBalancer
        {
            return Err(ferr(
                "spec.loadBalancerSourceRanges",
                "only applies to type LoadBalancer",
            ));
        }
        if self.external_traffic_policy == TrafficPolicy::Local
            && self.service_type == ServiceType::ClusterIP
            && self.external_ips.is_empty()
            && self.load_balancer_ips.is_empty()
        {
            return Err(ferr(
                "spec.externalTrafficPolicy",
                "Local only applies to NodePort or LoadBalancer services, or ones with externalIPs",
            ));
        }
        Ok(())
    }

    /// Its ports as `kubectl get svc` shows them: `80/TCP`, `80:30080/TCP`.
    pub fn ports_text(&self) -> String {
        self.ports
            .iter()
            .map(|p| match p.node_port {
                Some(np) => format!("{}:{np}/{}", p.port, p.protocol),
                None => format!("{}/{}", p.port, p.protocol),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The endpoint port for service port `p` on a pod whose named
    /// container ports are `named` (name → number).
    pub fn resolve_target(p: &ServicePort, named: &BTreeMap<String, u16>) -> Option<u16> {
        match &p.target_port {
            None => Some(p.port),
            Some(TargetPort::Number(n)) => Some(*n),
            Some(TargetPort::Name(n)) => named.get(n).copied(),
        }
    }
}

/// The first free address of the service CIDR (skipping the network and
/// broadcast addresses).
pub fn allocate_cluster_ip(cidr: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let net = u32::from(cidr.network());
    let bcast = u32::from(cidr.broadcast());
    ((net + 1)..bcast)
        .map(Ipv4Addr::from)
        .find(|ip| !taken.contains(ip))
}

/// The first free address of the load balancer pools (each pool's
/// network and broadcast addresses are skipped unless it is a /31 or /32).
pub fn allocate_lb_ip(pools: &[Ipv4Net], taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    pools.iter().find_map(|p| {
        let p = p.trunc();
        let (lo, hi) = (u32::from(p.network()), u32::from(p.broadcast()));
        let (lo, hi) = if p.prefix_len() >= 31 {
            (lo, hi)
        } else {
            (lo + 1, hi - 1)
        };
        (lo..=hi).map(Ipv4Addr::from).find(|ip| !taken.contains(ip))
    })
}

/// The first free node port.
pub fn allocate_node_port(taken: &BTreeSet<u16>) -> Option<u16> {
    NODE_PORT_RANGE.into_iter().find(|p| !taken.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        Service {
            namespace: "default".into(),
            name: "myapp".into(),
            service_type: ServiceType::ClusterIP,
            cluster_ip: None,
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::TCP,
                port: 80,
                target_port: Some(TargetPort::Number(8080)),
                node_port: None,
            }],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            selector: BTreeMap::new(),
        }
    }

    fn cidr() -> Ipv4Net {
        "10.96.0.0/12".parse().unwrap()
    }

    #[test]
    fn valid_service_passes() {
        svc().validate(cidr()).unwrap();
    }

    #[test]
    fn every_error_names_its_field() {
        type Mutation = Box<dyn Fn(&mut Service)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.name = "My_App".into()), "metadata.name"),
            (Box::new(|s| s.ports.clear()), "spec.ports"),
            (Box::new(|s| s.ports[0].port = 0), "spec.ports[0].port"),
            (
                Box::new(|s| s.ports[0].node_port = Some(31000)),
                "spec.ports[0].nodePort",
            ),
            (
                Box::new(|s| {
                    s.service_type = ServiceType::NodePort;
                    s.ports[0].node_port = Some(80)
                }),
                "spec.ports[0].nodePort",
            ),
            (
                Box::new(|s| s.cluster_ip = Some("10.244.0.5".parse().unwrap())),
                "spec.clusterIP",
            ),
            (
                Box::new(|s| s.affinity_timeout = Some(0)),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                Box::new(|s| s.external_traffic_policy = TrafficPolicy::Local),
                "spec.externalTrafficPolicy",
            ),
            (
                Box::new(|s| {
                    let p = s.ports[0].clone();
                    s.ports.push(p)
                }),
                "spec.ports[0].name",
            ),
            (
                Box::new(|s| s.ports[0].target_port = Some(TargetPort::Number(0))),
                "spec.ports[0].targetPort",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = svc();
            mutate(&mut s);
            let e = s.validate(cidr()).unwrap_err();
            assert!(e.to_string().starts_with(field), "wanted {field}, got {e}");
        }
    }

    #[test]
    fn allocation_skips_taken_and_reserved() {
        let c: Ipv4Net = "10.96.0.0/30".parse().unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(
            allocate_cluster_ip(c, &taken),
            Some("10.96.0.1".parse().unwrap())
        );
        taken.insert("10.96.0.1".parse().unwrap());
        assert_eq!(
            allocate_cluster_ip(c, &taken),
            Some("10.96.0.2".parse().unwrap())
        );
        taken.insert("10.96.0.2".parse().unwrap());
        assert_eq!(allocate_cluster_ip(c, &taken), None);
        let ports: BTreeSet<u16> = [30000, 30001].into();
        assert_eq!(allocate_node_port(&ports), Some(30002));
    }

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let p = ServicePort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: 80,
            target_port: Some(TargetPort::Name("web".into())),
            node_port: None,
        };
        let named: BTreeMap<String, u16> = [("web".to_string(), 8080)].into();
        assert_eq!(Service::resolve_target(&p, &named), Some(8080));
        assert_eq!(Service::resolve_target(&p, &BTreeMap::new()), None);
    }
}
