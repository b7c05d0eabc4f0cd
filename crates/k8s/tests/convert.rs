//! API objects as the API server serves them (JSON in `fixtures/`, shaped
//! as `kubectl get -o json` prints them: a Kubernetes 1.20 Node, core/v1
//! Services, EndpointSlices in discovery.k8s.io/v1 and v1beta1) → tweed's
//! model, kube-proxy's contract case by case.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Service as KService};
use tweed_k8s::{
    node_pod_cidr, node_record, record_annotations, service, slices_to_endpoints, EndpointSlice,
};
use tweed_model::{Backend, Protocol, ServiceType, TargetPort, TrafficPolicy};

fn fixture(name: &str) -> serde_json::Value {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn items<T: serde::de::DeserializeOwned>(name: &str) -> Vec<T> {
    fixture(name)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect()
}

fn cidr() -> Ipv4Net {
    "10.96.0.0/12".parse().unwrap()
}

fn services() -> BTreeMap<String, KService> {
    items::<KService>("services-v1.json")
        .into_iter()
        .map(|s| (s.metadata.name.clone().unwrap(), s))
        .collect()
}

#[test]
fn node_record_from_podcidr_and_annotations() {
    let node: Node = serde_json::from_value(fixture("node-1.20.json")).unwrap();
    let r = node_record(&node).unwrap().expect("a published peer");
    assert_eq!(r.name, "node2");
    assert_eq!(r.subnet.to_string(), "10.244.2.0/24");
    assert_eq!(r.public_ip.to_string(), "203.0.113.12");
    assert_eq!(r.backend, Backend::Vxlan);
    assert_eq!(r.vtep_mac.to_string(), "0e:5a:11:22:33:44");
    assert_eq!(r.unreachable, vec!["node3: not on our segment".to_string()]);

    // What an agent writes reads back as the same record.
    let mut again = node.clone();
    again.metadata.annotations = Some(record_annotations(&r));
    assert_eq!(node_record(&again).unwrap(), Some(r));
}

#[test]
fn node_without_agent_or_subnet_is_no_peer_yet() {
    let node: Node = serde_json::from_value(fixture("node-1.20.json")).unwrap();
    let mut bare = node.clone();
    bare.metadata.annotations = None;
    assert_eq!(node_record(&bare).unwrap(), None, "no agent has published");

    let mut waiting = node.clone();
    let spec = waiting.spec.as_mut().unwrap();
    spec.pod_cidr = None;
    spec.pod_cidrs = None;
    assert_eq!(node_pod_cidr(&waiting).unwrap(), None);
    assert_eq!(node_record(&waiting).unwrap(), None, "no podCIDR yet");
}

#[test]
fn dual_stack_node_takes_its_ipv4_subnet() {
    let mut node: Node = serde_json::from_value(fixture("node-1.20.json")).unwrap();
    let spec = node.spec.as_mut().unwrap();
    spec.pod_cidr = Some("fd00:244:2::/64".into());
    spec.pod_cidrs = Some(vec!["fd00:244:2::/64".into(), "10.244.7.0/24".into()]);
    assert_eq!(
        node_pod_cidr(&node).unwrap().unwrap().to_string(),
        "10.244.7.0/24"
    );
}

#[test]
fn bad_node_annotations_name_the_field() {
    let node: Node = serde_json::from_value(fixture("node-1.20.json")).unwrap();
    for (key, value) in [
        ("tweed.io/public-ip", "not-an-ip"),
        ("tweed.io/backend", "carrier-pigeon"),
        ("tweed.io/vtep-mac", "0e:zz"),
        ("tweed.io/unreachable", "{"),
    ] {
        let mut n = node.clone();
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(key.into(), value.into());
        let e = node_record(&n).unwrap_err();
        assert_eq!(e.field, format!("metadata.annotations[{key}]"), "{e}");
    }
    let mut n = node.clone();
    n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.300.0/24".into()]);
    assert_eq!(node_record(&n).unwrap_err().field, "spec.podCIDRs[0]");
}

#[test]
fn seed_001_nodeport_service() {
    let s = service(&services()["myapp"], cidr()).unwrap().unwrap();
    assert_eq!(s.id(), "default/myapp");
    assert_eq!(s.service_type, ServiceType::NodePort);
    assert_eq!(s.cluster_ip.unwrap().to_string(), "10.96.113.7");
    assert_eq!(s.ports.len(), 1);
    let p = &s.ports[0];
    assert_eq!(
        (p.name.as_str(), p.protocol, p.port),
        ("http", Protocol::TCP, 80)
    );
    assert_eq!(p.target_port, Some(TargetPort::Number(8080)));
    assert_eq!(p.node_port, Some(30080));
    assert_eq!(s.affinity_timeout, None);
    assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
    assert!(s.load_balancer_ips.is_empty());
}

#[test]
fn services_kube_proxy_leaves_alone() {
    let all = services();
    for name in ["db", "ext", "mesh", "v6only"] {
        assert_eq!(service(&all[name], cidr()).unwrap(), None, "{name}");
    }
}

#[test]
fn dual_stack_service_uses_its_ipv4_cluster_ip() {
    let s = service(&services()["dual"], cidr()).unwrap().unwrap();
    assert_eq!(s.cluster_ip.unwrap().to_string(), "10.96.0.13");
    assert_eq!(s.ports[0].protocol, Protocol::UDP);
    assert_eq!(s.ports[0].target_port, Some(TargetPort::Name("dns".into())));
}

#[test]
fn load_balancer_service_with_local_policies_and_affinity() {
    let s = service(&services()["web-lb"], cidr()).unwrap().unwrap();
    assert_eq!(s.service_type, ServiceType::LoadBalancer);
    assert_eq!(
        s.external_ips,
        vec!["203.0.113.50".parse::<std::net::Ipv4Addr>().unwrap()],
        "IPv6 external IPs belong to the other family"
    );
    assert_eq!(
        s.load_balancer_ips,
        vec!["203.0.113.80".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    // A numeric string target port is a number, as the API server treats it.
    assert_eq!(s.ports[0].target_port, Some(TargetPort::Number(8443)));
    assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(s.affinity_timeout, Some(10800), "kube's default timeout");
    let sticky = service(&services()["sticky"], cidr()).unwrap().unwrap();
    assert_eq!(sticky.affinity_timeout, Some(60));
}

#[test]
fn malformed_service_names_the_field() {
    let e = service(&services()["clash"], cidr()).unwrap_err();
    assert_eq!(e.field, "spec.ports[1].name", "{e}");
    assert!(e.msg.contains("\"web\""), "{e}");

    let mut s = services()["myapp"].clone();
    s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 70000;
    assert_eq!(service(&s, cidr()).unwrap_err().field, "spec.ports[0].port");
    let mut s = services()["myapp"].clone();
    s.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.200.0.1".into()]);
    assert_eq!(service(&s, cidr()).unwrap_err().field, "spec.clusterIP");
}

fn by_service(slices: &[EndpointSlice], id: &str) -> tweed_model::Endpoints {
    slices_to_endpoints(
        id,
        slices
            .iter()
            .filter(|s| s.service_id().as_deref() == Some(id)),
    )
}

#[test]
fn v1_slices_merge_with_conditions_and_nodes() {
    let slices: Vec<EndpointSlice> = items("endpointslices-v1.json");
    let eps = by_service(&slices, "default/myapp");
    assert_eq!(
        (eps.namespace.as_str(), eps.name.as_str()),
        ("default", "myapp")
    );
    // (ip, node, ready, serving, terminating, ports)
    type Row<'a> = (String, &'a str, bool, bool, bool, Vec<(String, u16)>);
    let got: Vec<Row> = eps
        .endpoints
        .iter()
        .map(|e| {
            (
                e.ip.to_string(),
                e.node.as_str(),
                e.ready,
                e.serving,
                e.terminating,
                e.ports.clone(),
            )
        })
        .collect();
    let http = || vec![("http".to_string(), 8080u16)];
    assert_eq!(
        got,
        vec![
            ("10.244.1.5".into(), "node1", true, true, false, http()),
            ("10.244.2.7".into(), "node2", false, true, true, http()),
            ("10.244.3.9".into(), "node3", false, false, false, http()),
            // Absent conditions: ready, and serving as ready is.
            ("10.244.1.6".into(), "node1", true, true, false, http()),
        ],
        "the duplicate 10.244.1.5 is kept once, the IPv6 slice and the port without a number are skipped"
    );
    assert_eq!(eps.endpoints[0].pod, "myapp-6d4b-abcde");
}

#[test]
fn v1beta1_slices_take_the_node_from_topology() {
    let slices: Vec<EndpointSlice> = items("endpointslices-v1beta1.json");
    let eps = by_service(&slices, "default/myapp");
    let got: Vec<(String, &str, bool, bool)> = eps
        .endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.node.as_str(), e.ready, e.serving))
        .collect();
    assert_eq!(
        got,
        vec![
            ("10.244.1.5".into(), "node1", true, true),
            ("10.244.2.7".into(), "node2", false, false),
            ("10.244.3.9".into(), "node3", true, true),
        ]
    );
}

#[test]
fn slices_kube_proxy_ignores() {
    let slices: Vec<EndpointSlice> = items("endpointslices-v1.json");
    let ids: Vec<Option<String>> = slices.iter().map(|s| s.service_id()).collect();
    assert_eq!(
        ids,
        vec![
            Some("default/myapp".into()),
            Some("default/myapp".into()),
            Some("default/myapp".into()),
            Some("default/empty".into()),
            None, // headless
            None, // no service-name label
        ]
    );
    assert!(by_service(&slices, "default/empty").endpoints.is_empty());
}

#[test]
fn a_ready_copy_replaces_a_not_ready_duplicate() {
    let slice = |ready: bool| EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Some(vec![tweed_k8s::convert::SliceEndpoint {
            addresses: vec!["10.244.1.9".into()],
            conditions: Some(tweed_k8s::convert::SliceConditions {
                ready: Some(ready),
                serving: None,
                terminating: None,
            }),
            ..Default::default()
        }]),
        ports: Some(vec![tweed_k8s::convert::SlicePort {
            name: None,
            protocol: None,
            port: Some(80),
        }]),
        ..Default::default()
    };
    let (a, b) = (slice(false), slice(true));
    let eps = slices_to_endpoints("default/x", [&a, &b]);
    assert_eq!(eps.endpoints.len(), 1);
    assert!(eps.endpoints[0].ready);
    let eps = slices_to_endpoints("default/x", [&b, &a]);
    assert_eq!(eps.endpoints.len(), 1);
    assert!(eps.endpoints[0].ready);
}

#[test]
fn an_operators_bgp_annotations_are_read_and_a_bad_one_named() {
    use tweed_k8s::convert::{node_bgp_overrides, ANN_BGP_ASN, ANN_BGP_PEERS};
    let mut n = Node::default();
    assert_eq!(node_bgp_overrides(&n), Ok(None));
    n.metadata.annotations = Some(
        [
            (ANN_BGP_ASN.to_string(), "65101".to_string()),
            (
                ANN_BGP_PEERS.to_string(),
                "198.51.100.1:65001, 198.51.100.2:65001:pw".to_string(),
            ),
        ]
        .into(),
    );
    let b = node_bgp_overrides(&n).unwrap().unwrap();
    assert_eq!(b.asn, Some(65101));
    assert_eq!(b.peers.len(), 2);
    assert_eq!(b.peers[1].password.as_deref(), Some("pw"));
    n.metadata.annotations = Some([(ANN_BGP_ASN.to_string(), "0".to_string())].into());
    let e = node_bgp_overrides(&n).unwrap_err();
    assert_eq!(e.field, "metadata.annotations[tweed.io/bgp-asn]");
    n.metadata.annotations = Some([(ANN_BGP_PEERS.to_string(), "tor:65001".to_string())].into());
    let e = node_bgp_overrides(&n).unwrap_err();
    assert_eq!(e.field, "metadata.annotations[tweed.io/bgp-peers]");
}
