//! Lab end-to-end tests of the service proxy: kube-proxy's semantics
//! (DESIGN.md's source-address table row by row), load balancing,
//! affinity, rejection, UDP conntrack clean-up, NodePort, traffic
//! policies, hostPort, and manifest validation.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Instant;

const TOPO: &str = "nodes: [{name: n1}, {name: n2}, {name: n3}]\nhosts: [{name: ext}]\n";
const EXT_IP: &str = "198.51.100.200";
const NODE_IPS: [&str; 3] = ["198.51.100.10", "198.51.100.11", "198.51.100.12"];

fn pod(name: &str, node: &str, app: &str, extra_port: &str) -> String {
    format!(
        "---\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n{extra_port}"
    )
}

fn service(name: &str, app: &str, extra: &str) -> String {
    format!("---\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {app}}}\n  ports: [{{port: 80, targetPort: http}}]\n{extra}")
}

fn apply(lab: &LabGuard, text: &str) -> std::process::Output {
    lab.apply(text)
}

fn apply_ok(lab: &LabGuard, text: &str) {
    lab.apply_ok(text)
}

fn svc_ip(lab: &LabGuard, name: &str) -> String {
    lab.state()["services"][format!("default/{name}")]["clusterIp"]
        .as_str()
        .unwrap()
        .to_string()
}

fn node_port(lab: &LabGuard, name: &str) -> u16 {
    lab.state()["services"][format!("default/{name}")]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap() as u16
}

fn host_ns(lab: &LabGuard, host: &str) -> String {
    format!("tw-{}_h-{host}", lab.name)
}

/// GET http://ADDR/ from `ns`, retrying briefly (rules follow the datastore within moments).
fn get_from(lab: &LabGuard, ns: &str, addr: &str) -> serde_json::Value {
    let o = lab.exec(
        ns,
        &[
            TWEED,
            "probe",
            "http",
            addr,
            "--timeout",
            "2",
            "--retry-for",
            "5",
        ],
    );
    assert!(
        o.status.success(),
        "GET {addr} from {ns} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A node's own addresses: its underlay IP and its VTEP address.
fn node_addrs(lab: &LabGuard, i: usize, node: &str) -> Vec<String> {
    let vtep = lab.node_subnet(node).split('/').next().unwrap().to_string();
    vec![NODE_IPS[i].to_string(), vtep]
}

#[test]
fn source_addresses_match_kube_proxy_row_by_row() {
    source_address_rows(LabGuard::up("srcaddr", TOPO));
}

/// The same table with Services and EndpointSlices through a real
/// Kubernetes API server (the agents on the Kubernetes datastore).
#[test]
fn source_addresses_match_kube_proxy_through_the_kubernetes_api() {
    let bin = std::env::var("TWEED_K8S_BIN")
        .unwrap_or_else(|_| "/var/cache/tweed/kubernetes/v1.20.2/bin".into());
    if !std::path::Path::new(&bin).join("kube-apiserver").exists() {
        skip(
            "source_addresses_match_kube_proxy_through_the_kubernetes_api",
            &format!("no Kubernetes binaries in {bin}: run scripts/install-kubernetes.sh"),
        );
        return;
    }
    source_address_rows(LabGuard::up("srck8s", &format!("kubernetes: true\n{TOPO}")));
}

fn source_address_rows(lab: LabGuard) {
    let m = [
        pod("a", "n1", "a", ""),
        pod("b", "n1", "b", ""),
        pod("c", "n2", "c", ""),
        service("to-a", "a", ""),
        service("to-b", "b", ""),
        service("to-c", "c", ""),
        service("np-b", "b", "  type: NodePort\n"),
        service(
            "np-b-local",
            "b",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        ),
    ]
    .concat();
    apply_ok(&lab, &m);
    let (a, b, c) = (lab.pod_ip("a"), lab.pod_ip("b"), lab.pod_ip("c"));
    let pa = lab.pod_ns("a");

    // pod A on node 1 → ClusterIP → pod B on node 1: A's IP.
    let s = get_from(&lab, &pa, &format!("{}:80", svc_ip(&lab, "to-b")));
    assert_eq!(
        (s["pod"].as_str(), s["client"].as_str()),
        (Some("b"), Some(a.as_str()))
    );
    // pod A on node 1 → ClusterIP → pod C on node 2: A's IP.
    let s = get_from(&lab, &pa, &format!("{}:80", svc_ip(&lab, "to-c")));
    assert_eq!(
        (s["pod"].as_str(), s["client"].as_str()),
        (Some("c"), Some(a.as_str()))
    );
    // pod A → ClusterIP → pod A itself (hairpin): works, and A sees a node address.
    let s = get_from(&lab, &pa, &format!("{}:80", svc_ip(&lab, "to-a")));
    assert_eq!(s["pod"], "a");
    assert!(
        node_addrs(&lab, 0, "n1").contains(&s["client"].as_str().unwrap().to_string()),
        "hairpin seen as {}",
        s["client"]
    );
    assert_ne!(s["client"].as_str(), Some(a.as_str()));
    // a process on node 1 → ClusterIP → any pod: a node address.
    for svc in ["to-b", "to-c"] {
        let s = get_from(
            &lab,
            &lab.node_ns("n1"),
            &format!("{}:80", svc_ip(&lab, svc)),
        );
        assert!(
            node_addrs(&lab, 0, "n1").contains(&s["client"].as_str().unwrap().to_string()),
            "{svc}: node 1 seen as {}",
            s["client"]
        );
    }
    // ... also from a node that hosts no endpoint at all.
    let s = get_from(
        &lab,
        &lab.node_ns("n3"),
        &format!("{}:80", svc_ip(&lab, "to-c")),
    );
    assert_eq!(s["pod"], "c");
    assert!(
        node_addrs(&lab, 2, "n3").contains(&s["client"].as_str().unwrap().to_string()),
        "node 3 seen as {}",
        s["client"]
    );
    // outside host → NodePort on node 2, policy Cluster → pod on node 1: node 2's address.
    let ext = host_ns(&lab, "ext");
    let s = get_from(
        &lab,
        &ext,
        &format!("{}:{}", NODE_IPS[1], node_port(&lab, "np-b")),
    );
    assert_eq!(s["pod"], "b");
    assert!(
        node_addrs(&lab, 1, "n2").contains(&s["client"].as_str().unwrap().to_string()),
        "NodePort via n2 seen as {}",
        s["client"]
    );
    // outside host → NodePort on node 1, policy Local → pod on node 1: the outside host's IP.
    let s = get_from(
        &lab,
        &ext,
        &format!("{}:{}", NODE_IPS[0], node_port(&lab, "np-b-local")),
    );
    assert_eq!(
        (s["pod"].as_str(), s["client"].as_str()),
        (Some("b"), Some(EXT_IP))
    );
    // outside host → NodePort on node 2, policy Local, no local pod: no
    // connection. kube-proxy drops (not refuses) here, so a load balancer's
    // health check, not a reset, moves the client away: the SYN times out.
    let t = Instant::now();
    let o = lab.exec(
        &ext,
        &[
            TWEED,
            "probe",
            "http",
            &format!("{}:{}", NODE_IPS[1], node_port(&lab, "np-b-local")),
            "--timeout",
            "2",
        ],
    );
    assert!(
        !o.status.success(),
        "policy Local answered on a node without a local pod: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("refused") && t.elapsed().as_secs_f64() >= 1.9,
        "dropped packets time out, after {:?}: {err}",
        t.elapsed()
    );
    // ... but pod C, from inside the cluster, gets through node 2's node
    // port to pod B on node 1 (kube-proxy sends traffic from pods to every
    // endpoint of a policy-Local Service), keeping its own address.
    let s = get_from(
        &lab,
        &lab.pod_ns("c"),
        &format!("{}:{}", NODE_IPS[1], node_port(&lab, "np-b-local")),
    );
    assert_eq!(
        (s["pod"].as_str(), s["client"].as_str()),
        (Some("b"), Some(c.as_str()))
    );
    let _ = b;
}

#[test]
fn three_endpoints_share_3000_connections_evenly() {
    let lab = LabGuard::up("spread", TOPO);
    apply_ok(
        &lab,
        &format!(
            "kind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}\n{}",
            service("web", "web", "")
        ),
    );
    let ip = svc_ip(&lab, "web");
    get_from(&lab, &lab.node_ns("n1"), &format!("{ip}:80"));
    let out = lab.exec_ok(
        &lab.node_ns("n1"),
        &[
            TWEED,
            "probe",
            "http-many",
            &format!("{ip}:80"),
            "--count",
            "3000",
        ],
    );
    let counts: BTreeMap<String, f64> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(!counts.contains_key("error"), "{counts:?}");
    let chi2: f64 = counts.values().map(|o| (o - 1000.0).powi(2) / 1000.0).sum();
    // 2 degrees of freedom: 13.82 is the p = 0.001 critical value.
    assert!(
        chi2 < 13.82,
        "uneven split {counts:?} (chi-square {chi2:.2})"
    );
}

#[test]
fn client_ip_affinity_sticks_and_expires() {
    let lab = LabGuard::up("affinity", TOPO);
    apply_ok(
        &lab,
        &format!(
            "kind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}\n{}",
            service("web", "web", "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n")
        ),
    );
    let addr = format!("{}:80", svc_ip(&lab, "web"));
    let first = get_from(&lab, &lab.node_ns("n1"), &addr)["pod"]
        .as_str()
        .unwrap()
        .to_string();
    let out = lab.exec_ok(
        &lab.node_ns("n1"),
        &[TWEED, "probe", "http-many", &addr, "--count", "60"],
    );
    let counts: BTreeMap<String, usize> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([(first.clone(), 60)]),
        "affinity did not stick"
    );
    // Idle longer than the timeout, then ask again: sooner or later another pod answers.
    let mut others = 0;
    eventually("affinity to expire and another pod to answer", 60, || {
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let s = get_from(&lab, &lab.node_ns("n1"), &addr);
        others += (s["pod"].as_str() != Some(first.as_str())) as usize;
        others > 0
    });
}

#[test]
fn no_endpoints_refuse_at_once_and_a_udp_client_follows_a_replaced_pod() {
    let lab = LabGuard::up("refuse", TOPO);
    apply_ok(&lab, &service("nobody", "nothing-matches", ""));
    let addr = format!("{}:80", svc_ip(&lab, "nobody"));
    for ns in [lab.node_ns("n1"), lab.node_ns("n2")] {
        let t = Instant::now();
        let o = lab.exec(&ns, &[TWEED, "probe", "http", &addr, "--timeout", "3"]);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("refused"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            t.elapsed().as_secs_f64() < 1.0,
            "refusal took {:?}",
            t.elapsed()
        );
    }
    // A UDP "resolver" client on one socket keeps asking while its server pod is replaced.
    let dns = |version: &str| {
        format!(
            "kind: Deployment\nmetadata: {{name: dns}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: dns}}}}\n  template:\n    metadata: {{labels: {{app: dns, version: {version}}}}}\n    spec: {{containers: [{{name: dns, ports: [{{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}\n---\nkind: Service\nmetadata: {{name: dns}}\nspec:\n  selector: {{app: dns}}\n  ports: [{{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]\n"
        )
    };
    apply_ok(&lab, &dns("v1"));
    let old: Vec<String> = lab.state()["pods"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("dns-"))
        .cloned()
        .collect();
    let addr = format!("{}:53", svc_ip(&lab, "dns"));
    // Pick a client pod's node namespace: node 3 (the client is a node process).
    let watch = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_ns("n3"),
            TWEED,
            "probe",
            "udp-watch",
            &addr,
            "--interval-ms",
            "100",
            "--duration",
            "12",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    apply_ok(&lab, &dns("v2"));
    let replaced_at = Instant::now();
    let new: Vec<String> = lab.state()["pods"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("dns-"))
        .cloned()
        .collect();
    assert_ne!(old, new);
    let out = watch.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert!(
        lines.iter().take(10).any(|l| *l == old[0]),
        "the old pod never answered: {lines:?}"
    );
    // The tail of the run (after the replacement settled) is all the new pod.
    let tail: Vec<&String> = lines.iter().rev().take(20).collect();
    assert!(
        tail.iter().all(|l| **l == new[0]),
        "the client did not move to {}: {lines:?}",
        new[0]
    );
    assert!(
        replaced_at.elapsed().as_secs() >= 2,
        "the watch ended too early to tell"
    );
}

#[test]
fn node_ports_on_every_node_and_host_ports() {
    let lab = LabGuard::up("nodeport", TOPO);
    let m = [
        pod("web", "n1", "web", ""),
        service("web", "web", "  type: NodePort\n"),
        pod(
            "hp",
            "n2",
            "hp",
            "    - {name: alt, containerPort: 9090, hostPort: 8081}\n",
        ),
    ]
    .concat();
    apply_ok(&lab, &m);
    let np = node_port(&lab, "web");
    assert!((30000..=32767).contains(&np));
    let ext = host_ns(&lab, "ext");
    for ip in NODE_IPS {
        let s = get_from(&lab, &ext, &format!("{ip}:{np}"));
        assert_eq!(s["pod"], "web", "NodePort via {ip}");
    }
    // hostPort: the node forwards HOST_PORT to the pod, keeping the client's address.
    let s = get_from(&lab, &ext, &format!("{}:8081", NODE_IPS[1]));
    assert_eq!(
        (s["pod"].as_str(), s["ip"].as_str(), s["client"].as_str()),
        (Some("hp"), Some(lab.pod_ip("hp").as_str()), Some(EXT_IP))
    );
    // Deleting the pod takes its host port away.
    let file = std::env::temp_dir().join("tweed-hp-del.yaml");
    std::fs::write(
        &file,
        pod(
            "hp",
            "n2",
            "hp",
            "    - {name: alt, containerPort: 9090, hostPort: 8081}\n",
        ),
    )
    .unwrap();
    ok(&[
        "lab",
        "delete",
        "-f",
        file.to_str().unwrap(),
        "--name",
        "nodeport",
    ]);
    let o = lab.exec(
        &ext,
        &[
            TWEED,
            "probe",
            "http",
            &format!("{}:8081", NODE_IPS[1]),
            "--timeout",
            "2",
        ],
    );
    assert!(!o.status.success());
}

#[test]
fn bad_manifests_are_rejected_naming_the_field_and_the_rest_keeps_working() {
    let lab = LabGuard::up("badman", TOPO);
    apply_ok(
        &lab,
        &[pod("a", "n1", "a", ""), service("good", "a", "")].concat(),
    );
    let good = format!("{}:80", svc_ip(&lab, "good"));
    let cases = [
        ("kind: Service\nmetadata: {name: bad}\nspec:\n  ports: [{port: 70000}]\n", "spec.ports[0].port"),
        ("kind: Service\nmetadata: {name: bad}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 80}]\n", "spec.ports[0].nodePort"),
        ("kind: Service\nmetadata: {name: Bad_Name}\nspec:\n  ports: [{port: 80}]\n", "metadata.name"),
        (&format!("kind: Service\nmetadata: {{name: clash}}\nspec:\n  clusterIP: {}\n  ports: [{{port: 80}}]\n", svc_ip(&lab, "good")), "spec.clusterIP"),
        ("kind: Deployment\nmetadata: {name: d}\nspec:\n  replicas: many\n  selector: {matchLabels: {app: d}}\n  template: {metadata: {labels: {app: d}}, spec: {containers: [{name: c}]}}\n", "spec.replicas"),
        ("kind: Service\nmetadata: {name: x}\nspec: [\n", "does not parse"),
    ];
    for (text, field) in cases {
        let o = apply(
            &lab,
            &format!("{}---\n{text}", service("also-good", "a", "")),
        );
        assert!(!o.status.success(), "accepted: {text}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(field), "wanted {field} in: {err}");
        let s = get_from(&lab, &lab.pod_ns("a"), &good);
        assert_eq!(s["pod"], "a");
    }
    // In a file with a bad document, the good ones were still applied.
    assert!(lab.state()["services"]["default/also-good"].is_object());
}

#[test]
fn connections_through_a_service_survive_an_agent_restart() {
    let lab = LabGuard::up("svcrestart", TOPO);
    apply_ok(
        &lab,
        &[
            pod("client", "n1", "client", ""),
            pod("server", "n2", "server", ""),
            service("server", "server", ""),
        ]
        .concat(),
    );
    let addr = format!("{}:80", svc_ip(&lab, "server"));
    get_from(&lab, &lab.pod_ns("client"), &addr);
    let hold = start_hold(&lab, &lab.pod_ns("client"), &addr, 8, 3);
    // The client's node replaces its whole service table on restart.
    ok(&["lab", "agent", "restart", "n1", "--name", "svcrestart"]);
    finish_hold(hold, "the agent restart", 20);
    // And new connections work after the restart.
    assert_eq!(
        get_from(&lab, &lab.pod_ns("client"), &addr)["pod"],
        "server"
    );
}
