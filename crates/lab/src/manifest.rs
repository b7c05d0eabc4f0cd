//! Kubernetes-style manifests for the lab: Deployment, Pod and Service
//! documents, checked field by field so an error names its field the way
//! `kubectl` does (`Service default/web: spec.ports[0].port: ...`).
//! Fields the lab has no use for (strategy, image, ...) are ignored.

use std::collections::BTreeMap;

use serde_json::Value;
use tweed_model::{
    FieldError, Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
};

/// A container port of a workload's pods.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub host_port: Option<u16>,
}

/// A Deployment or a bare Pod: what the lab needs to run its pods.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub replicas: u32,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ContainerPort>,
    pub node_name: Option<String>,
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(Service),
    Workload(Workload),
}

/// A document that could not be used: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {index} ({what}): {err}")]
pub struct DocError {
    pub index: usize,
    pub what: String,
    pub err: FieldError,
}

fn fe(field: &str, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn string(v: &Value, path: &str) -> Result<Option<String>, FieldError> {
    match get(v, path) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(fe(path, format!("must be a string, not {other}"))),
    }
}

fn port(v: &Value, path: &str) -> Result<Option<u16>, FieldError> {
    match get(v, path) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
            _ => Err(fe(path, format!("{n} must be between 1 and 65535"))),
        },
        Some(other) => Err(fe(path, format!("must be an integer, not {other}"))),
    }
}

fn labels(v: &Value, path: &str) -> Result<BTreeMap<String, String>, FieldError> {
    match get(v, path) {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                Value::Number(n) => Ok((k.clone(), n.to_string())),
                Value::Bool(b) => Ok((k.clone(), b.to_string())),
                other => Err(fe(
                    &format!("{path}.{k}"),
                    format!("must be a string, not {other}"),
                )),
            })
            .collect(),
        Some(other) => Err(fe(path, format!("must be a map, not {other}"))),
    }
}

fn protocol(v: &Value, path: &str) -> Result<Protocol, FieldError> {
    match string(v, path)?.as_deref() {
        None | Some("TCP") => Ok(Protocol::TCP),
        Some("UDP") => Ok(Protocol::UDP),
        Some("SCTP") => Ok(Protocol::SCTP),
        Some(other) => Err(fe(path, format!("{other:?} is not one of TCP, UDP, SCTP"))),
    }
}

fn list<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], FieldError> {
    match get(v, path) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(fe(path, format!("must be a list, not {other}"))),
    }
}

fn policy(v: &Value, path: &str) -> Result<TrafficPolicy, FieldError> {
    match string(v, path)?.as_deref() {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(fe(path, format!("{other:?} is not one of Cluster, Local"))),
    }
}

fn metadata(v: &Value) -> Result<(String, String), FieldError> {
    let name = string(v, "metadata.name")?.ok_or_else(|| fe("metadata.name", "is required"))?;
    let ns = string(v, "metadata.namespace")?.unwrap_or_else(|| "default".into());
    Ok((ns, name))
}

fn service(v: &Value) -> Result<Service, FieldError> {
    let (namespace, name) = metadata(v)?;
    let service_type = match string(v, "spec.type")?.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some(other) => {
            return Err(fe(
                "spec.type",
                format!("{other:?} is not one of ClusterIP, NodePort, LoadBalancer"),
            ))
        }
    };
    let cluster_ip = match string(v, "spec.clusterIP")?.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse()
                .map_err(|_| fe("spec.clusterIP", format!("{s:?} is not an IPv4 address")))?,
        ),
    };
    let mut ports = Vec::new();
    for (i, p) in list(v, "spec.ports")?.iter().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        let number = port(p, "port")
            .map_err(|e| fe(&f("port"), e.msg))?
            .ok_or_else(|| fe(&f("port"), "is required"))?;
        let target_port = match get(p, "targetPort") {
            None => None,
            Some(Value::String(s)) => Some(
                s.parse::<u16>()
                    .map(TargetPort::Number)
                    .unwrap_or_else(|_| TargetPort::Name(s.clone())),
            ),
            Some(_) => Some(TargetPort::Number(
                port(p, "targetPort")
                    .map_err(|e| fe(&f("targetPort"), e.msg))?
                    .expect("present"),
            )),
        };
        ports.push(ServicePort {
            name: string(p, "name")
                .map_err(|e| fe(&f("name"), e.msg))?
                .unwrap_or_default(),
            protocol: protocol(p, "protocol").map_err(|e| fe(&f("protocol"), e.msg))?,
            port: number,
            target_port,
            node_port: port(p, "nodePort").map_err(|e| fe(&f("nodePort"), e.msg))?,
        });
    }
    let affinity_timeout = match string(v, "spec.sessionAffinity")?.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => Some(
            match get(v, "spec.sessionAffinityConfig.clientIP.timeoutSeconds") {
                None => 10800,
                Some(t) => t.as_u64().map(|t| t as u32).ok_or_else(|| {
                    fe(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("must be an integer, not {t}"),
                    )
                })?,
            },
        ),
        Some(other) => {
            return Err(fe(
                "spec.sessionAffinity",
                format!("{other:?} is not one of None, ClientIP"),
            ))
        }
    };
    let mut external_ips = Vec::new();
    for (i, e) in list(v, "spec.externalIPs")?.iter().enumerate() {
        let f = format!("spec.externalIPs[{i}]");
        let s = e.as_str().ok_or_else(|| fe(&f, "must be a string"))?;
        external_ips.push(
            s.parse()
                .map_err(|_| fe(&f, format!("{s:?} is not an IPv4 address")))?,
        );
    }
    let mut load_balancer_source_ranges = Vec::new();
    for (i, e) in list(v, "spec.loadBalancerSourceRanges")?.iter().enumerate() {
        let f = format!("spec.loadBalancerSourceRanges[{i}]");
        let s = e.as_str().ok_or_else(|| fe(&f, "must be a string"))?;
        load_balancer_source_ranges.push(
            s.parse::<ipnet::Ipv4Net>()
                .map_err(|_| fe(&f, format!("{s:?} is not an IPv4 CIDR")))?
                .trunc(),
        );
    }
    let health_check_node_port = match v.pointer("/spec/healthCheckNodePort") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| fe("spec.healthCheckNodePort", "must be a port number"))?,
        ),
    };
    Ok(Service {
        namespace,
        name,
        service_type,
        cluster_ip,
        ports,
        external_ips,
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges,
        health_check_node_port,
        affinity_timeout,
        external_traffic_policy: policy(v, "spec.externalTrafficPolicy")?,
        internal_traffic_policy: policy(v, "spec.internalTrafficPolicy")?,
        selector: labels(v, "spec.selector")?,
    })
}

/// A pod template's labels, container ports and nodeName.
type PodParts = (BTreeMap<String, String>, Vec<ContainerPort>, Option<String>);

/// The pod template's labels, ports and nodeName (`prefix` is where the pod spec lives).
fn pod_parts(v: &Value, prefix: &str) -> Result<PodParts, FieldError> {
    let meta = if prefix.is_empty() {
        "metadata.labels".to_string()
    } else {
        format!("{prefix}.metadata.labels")
    };
    let spec = if prefix.is_empty() {
        "spec".to_string()
    } else {
        format!("{prefix}.spec")
    };
    let lbls = labels(v, &meta)?;
    let mut ports = Vec::new();
    let containers = list(v, &format!("{spec}.containers"))?;
    if containers.is_empty() {
        return Err(fe(
            &format!("{spec}.containers"),
            "at least one container is required",
        ));
    }
    for (ci, c) in containers.iter().enumerate() {
        for (pi, p) in list(c, "ports")
            .map_err(|e| fe(&format!("{spec}.containers[{ci}].ports"), e.msg))?
            .iter()
            .enumerate()
        {
            let f = |x: &str| format!("{spec}.containers[{ci}].ports[{pi}].{x}");
            ports.push(ContainerPort {
                name: string(p, "name")
                    .map_err(|e| fe(&f("name"), e.msg))?
                    .unwrap_or_default(),
                port: port(p, "containerPort")
                    .map_err(|e| fe(&f("containerPort"), e.msg))?
                    .ok_or_else(|| fe(&f("containerPort"), "is required"))?,
                protocol: protocol(p, "protocol").map_err(|e| fe(&f("protocol"), e.msg))?,
                host_port: port(p, "hostPort").map_err(|e| fe(&f("hostPort"), e.msg))?,
            });
        }
    }
    let node = string(v, &format!("{spec}.nodeName"))?;
    Ok((lbls, ports, node))
}

fn deployment(v: &Value) -> Result<Workload, FieldError> {
    let (namespace, name) = metadata(v)?;
    let replicas = match get(v, "spec.replicas") {
        None => 1,
        Some(r) => r.as_u64().filter(|r| *r <= 100).ok_or_else(|| {
            fe(
                "spec.replicas",
                format!("{r} must be an integer from 0 to 100"),
            )
        })? as u32,
    };
    let (labels, ports, node_name) = pod_parts(v, "spec.template")?;
    let selector = labels_of(v, "spec.selector.matchLabels")?;
    if selector.is_empty() {
        return Err(fe("spec.selector.matchLabels", "is required"));
    }
    if !selector.iter().all(|(k, val)| labels.get(k) == Some(val)) {
        return Err(fe(
            "spec.template.metadata.labels",
            "must match spec.selector.matchLabels",
        ));
    }
    Ok(Workload {
        kind: "Deployment".into(),
        namespace,
        name,
        replicas,
        labels,
        ports,
        node_name,
    })
}

fn labels_of(v: &Value, path: &str) -> Result<BTreeMap<String, String>, FieldError> {
    labels(v, path)
}

fn pod(v: &Value) -> Result<Workload, FieldError> {
    let (namespace, name) = metadata(v)?;
    let (labels, ports, node_name) = pod_parts(v, "")?;
    Ok(Workload {
        kind: "Pod".into(),
        namespace,
        name,
        replicas: 1,
        labels,
        ports,
        node_name,
    })
}

/// Parse every document; good ones come back as resources, bad ones as
/// errors naming the document and the field.
pub fn parse(text: &str) -> (Vec<Resource>, Vec<DocError>) {
    let docs: Vec<Value> = match serde_saphyr::from_multiple::<Value>(text) {
        Ok(d) => d,
        Err(e) => {
            return (
                Vec::new(),
                vec![DocError {
                    index: 0,
                    what: "YAML".into(),
                    err: fe("(document)", format!("does not parse: {e}")),
                }],
            );
        }
    };
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for (i, d) in docs.iter().enumerate().filter(|(_, d)| !d.is_null()) {
        let kind = d.get("kind").and_then(Value::as_str).unwrap_or("");
        let what = format!(
            "{kind} {}",
            get(d, "metadata.name")
                .and_then(Value::as_str)
                .unwrap_or("?")
        );
        let r = match kind {
            "Service" => service(d).map(Resource::Service),
            "Deployment" => deployment(d).map(Resource::Workload),
            "Pod" => pod(d).map(Resource::Workload),
            "" => Err(fe("kind", "is required")),
            other => Err(fe(
                "kind",
                format!("{other:?} is not one the lab runs (Deployment, Pod, Service)"),
            )),
        };
        match r {
            Ok(r) => out.push(r),
            Err(err) => errs.push(DocError {
                index: i,
                what,
                err,
            }),
        }
    }
    (out, errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 001's Deployment and Service, indented as kubectl expects.
    pub const SEED_001: &str = "
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels:
      app: myapp
      release: canary
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 1
  template:
    metadata:
      name: myapp
      labels:
        app: myapp
        release: canary
    spec:
      containers:
      - name: myapp
        image: registry-jinan-lab.inspurcloud.cn/testljz/myapp:v1
        ports:
        - name: http
          containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: myapp
  namespace: default
spec:
  ports:
  - port: 80
    protocol: TCP
    targetPort: 80
  selector:
    app: myapp
    release: canary
  sessionAffinity: None
  type: ClusterIP
";

    #[test]
    fn seed_001_parses() {
        let (rs, errs) = parse(SEED_001);
        assert!(errs.is_empty(), "{errs:?}");
        let Resource::Workload(d) = &rs[0] else {
            panic!()
        };
        assert_eq!(
            (d.replicas, d.ports[0].port, d.labels["release"].as_str()),
            (3, 80, "canary")
        );
        let Resource::Service(s) = &rs[1] else {
            panic!()
        };
        assert_eq!(
            (s.ports[0].port, s.ports[0].target_port.clone()),
            (80, Some(TargetPort::Number(80)))
        );
        assert_eq!(s.selector.len(), 2);
    }

    #[test]
    fn bad_documents_name_their_field_and_do_not_stop_the_others() {
        let text = format!(
            "{SEED_001}---\nkind: Service\nmetadata: {{name: bad}}\nspec:\n  ports:\n  - port: 99999\n---\nkind: Service\nmetadata: {{name: bad2}}\nspec: {{ports: [{{port: 80, protocol: ICMP}}]}}\n---\nkind: Widget\nmetadata: {{name: w}}\n"
        );
        let (rs, errs) = parse(&text);
        assert_eq!(rs.len(), 2);
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs[0].contains("Service bad") && msgs[0].contains("spec.ports[0].port: 99999"),
            "{msgs:?}"
        );
        assert!(msgs[1].contains("spec.ports[0].protocol"), "{msgs:?}");
        assert!(
            msgs[2].contains("kind") && msgs[2].contains("Widget"),
            "{msgs:?}"
        );
    }

    #[test]
    fn affinity_ports_and_policies() {
        let (rs, errs) = parse(
            "kind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n  ports: [{name: http, port: 80, targetPort: web, nodePort: 30080}]\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        let Resource::Service(s) = &rs[0] else {
            panic!()
        };
        assert_eq!(s.affinity_timeout, Some(5));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.ports[0].target_port, Some(TargetPort::Name("web".into())));
        assert_eq!(s.ports[0].node_port, Some(30080));
    }
}
