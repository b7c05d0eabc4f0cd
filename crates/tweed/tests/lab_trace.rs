//! `tweed lab trace`: a packet followed across the lab's real rules and
//! routes, each prediction checked against a real request (`--verify`:
//! which endpoint answered and which client address it saw). Golden
//! `--minimal` traces for the seeds' scenarios live in `tests/golden/`
//! (regenerate with `TWEED_UPDATE_GOLDEN=1` and read the diff).

mod common;
use common::*;

use std::path::PathBuf;

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("TWEED_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TWEED_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs from the golden trace");
}

fn trace(lab: &str, args: &[&str]) -> String {
    let mut a = vec!["lab", "trace", "--name", lab, "--minimal", "--verify"];
    a.extend(args);
    let o = tweed(&a);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && out.contains("verify: agrees"),
        "tweed {a:?}:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn pod_on(lab: &LabGuard, prefix: &str, node: &str) -> (String, String) {
    let st = lab.state();
    let (name, p) = st["pods"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(n, p)| n.starts_with(prefix) && p["node"] == node)
        .unwrap_or_else(|| panic!("no {prefix} pod on {node}"));
    (name.clone(), p["ip"].as_str().unwrap().to_string())
}

#[test]
fn seed_001_every_source_address_row_is_predicted_and_verified() {
    let lab = LabGuard::up(
        "trace1",
        &topology(
            &["node1", "node2", "node3"],
            &[
                ("pod-1a", "node1"),
                ("pod-1b", "node1"),
                ("pod-2a", "node2"),
                ("pod-2b", "node2"),
                ("pod-3a", "node3"),
                ("pod-3b", "node3"),
            ],
            "cluster: {backend: vxlan}\n",
        ),
    );
    let manifest = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-001-myapp.yaml"),
    )
    .unwrap();
    lab.apply_ok(&manifest);
    let svc = lab.state()["services"]["default/myapp"]["clusterIp"]
        .as_str()
        .unwrap()
        .to_string();
    let (same, same_ip) = pod_on(&lab, "myapp", "node1");
    let (_, other_ip) = pod_on(&lab, "myapp", "node2");
    let target = format!("{svc}:80");
    // DESIGN's table, rows 1-4: pod → ClusterIP → endpoint on its node /
    // on another node (the pod's own address), hairpin (a node address),
    // a process on the node (a node address).
    let mut all = String::new();
    all += &trace("trace1", &["pod-1a", &target, "--endpoint", &same_ip]);
    all += &trace("trace1", &["pod-1a", &target, "--endpoint", &other_ip]);
    all += &trace("trace1", &[&same, &target, "--endpoint", &same_ip]);
    all += &trace("trace1", &["node1", &target, "--endpoint", &other_ip]);
    golden("seed-001-rows.txt", &all);
    assert!(all.contains("hairpin"), "{all}");

    // At least 30 distinct (source, destination) cases, each verified:
    // every pod and node to the Service and to every endpoint directly.
    let mut cases = 0;
    let myapps: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| pod_on(&lab, "myapp", n).0)
        .collect();
    for src in [
        "pod-1a", "pod-1b", "pod-2a", "pod-2b", "pod-3a", "pod-3b", "node1", "node2", "node3",
    ] {
        trace("trace1", &[src, &target]);
        cases += 1;
        for m in &myapps {
            trace("trace1", &[src, &format!("{m}:80")]);
            cases += 1;
        }
    }
    assert!(cases >= 30);

    // --ct established: a held connection's later packets follow the NAT
    // conntrack holds for it, one endpoint, whatever the odds were.
    let hold = start_hold(&lab, &lab.pod_ns("pod-2a"), &target, 6, 3);
    let o = ok(&[
        "lab",
        "trace",
        "--name",
        "trace1",
        "pod-2a",
        &target,
        "--ct",
        "established",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    let first = &v["halves"][0];
    assert_eq!(first["branches"].as_array().unwrap().len(), 1, "{v:#}");
    assert!(
        first["steps"].to_string().contains("conntrack replays"),
        "{v:#}"
    );
    let ep = first["branches"][0]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = lab.exec_ok(&lab.node_ns("node2"), &["conntrack", "-L", "-d", &svc]);
    assert!(
        ct.contains(&format!("src={} ", ep.split(':').next().unwrap())),
        "{ep} not in {ct}"
    );
    finish_hold(hold, "tracing it", 5);
    // --summary: one line per way the packet goes (3 endpoints, 2 of them remote).
    let sum = ok(&[
        "lab",
        "trace",
        "--name",
        "trace1",
        "pod-1a",
        &target,
        "--summary",
    ]);
    assert_eq!(sum.lines().count(), 5, "{sum}");
}

#[test]
fn seed_000_the_master_reaches_a_cluster_ip_on_a_natd_worker_from_its_vtep_address() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-000-nat.yaml");
    let lab = LabGuard::up("trace0", &std::fs::read_to_string(file).unwrap());
    lab.apply_ok(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec:\n  nodeName: worker1\n  containers:\n  - name: web\n    ports: [{containerPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    );
    let svc = lab.state()["services"]["default/web"]["clusterIp"]
        .as_str()
        .unwrap()
        .to_string();
    let out = trace("trace0", &["master", &format!("{svc}:80")]);
    golden("seed-000-master-clusterip.txt", &out);
    // The echo pod sees the master's VTEP address: masqueraded on the
    // master, tunnelled to the worker's public address through the NAT.
    assert!(out.contains("the pod sees master-vtep"), "{out}");
    assert!(out.contains("at worker1-public:8472"), "{out}");
}

#[test]
fn node_ports_from_outside_are_traced_from_the_node_they_reach() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/services-lab.yaml");
    let lab = LabGuard::up("trace2", &std::fs::read_to_string(file).unwrap());
    let manifest = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/services-demo.yaml"),
    )
    .unwrap();
    lab.apply_ok(&manifest);
    // Rows 5 and 6: policy Cluster masquerades to the node's address;
    // policy Local keeps the outside host's address.
    let (_, local_ip) = pod_on(&lab, "web", "node1");
    let out = trace(
        "trace2",
        &[
            "outside",
            "node1:30080",
            "--endpoint",
            &pod_on(&lab, "web", "node2").1,
        ],
    );
    assert!(
        out.contains("the pod sees node1-vtep") || out.contains("the pod sees node1"),
        "{out}"
    );
    let out = trace(
        "trace2",
        &["outside", "node1:30081", "--endpoint", &local_ip],
    );
    assert!(out.contains("the pod sees outside"), "{out}");
    // A bad target names the problem.
    let o = tweed(&[
        "lab",
        "trace",
        "--name",
        "trace2",
        "outside",
        "10.96.0.1:80",
    ]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("from outside the cluster")
    );
    let o = tweed(&["lab", "trace", "--name", "trace2", "nosuch", "node1:80"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("\"nosuch\" is no pod, node or host")
    );
}

#[test]
fn every_example_topology_pod_to_pod_and_node_to_pod_is_predicted_and_verified() {
    let mut cases = 0;
    for (name, file) in [
        ("tr-s000", "seed-000-nat.yaml"),
        ("tr-s002", "seed-002-two-nics.yaml"),
        ("tr-s003", "seed-003-vlans.yaml"),
        ("tr-routed", "routed-nat.yaml"),
    ] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(file);
        let lab = LabGuard::up(name, &std::fs::read_to_string(path).unwrap());
        let st = lab.state();
        let pods: Vec<String> = st["pods"].as_object().unwrap().keys().cloned().collect();
        let nodes: Vec<String> = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect();
        // Direct, VXLAN across routers and through 1:1 NAT, two NICs: each
        // prediction (the path, and the client the pod sees) checked
        // against a real request.
        for src in pods.iter().chain(&nodes) {
            for dst in &pods {
                if src != dst {
                    trace(name, &[src, &format!("{dst}:8080")]);
                    cases += 1;
                }
            }
        }
        drop(lab);
    }
    assert!(cases >= 30, "{cases} cases");
}

/// Services with no endpoints, a policy Local node port on a node without
/// one, and an external IP, beside services-demo.yaml's kinds.
const MORE_SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: nobody}\nspec:\n  selector: {app: nobody}\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: nobody-udp}\nspec:\n  selector: {app: nobody}\n  ports: [{port: 53, targetPort: 5353, protocol: UDP}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: hp-local}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  selector: {app: hostport}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30090}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-ext}\nspec:\n  selector: {app: web}\n  externalIPs: [203.0.113.50]\n  ports: [{port: 80, targetPort: 8080}]\n";

#[test]
fn every_service_kind_is_predicted_and_verified() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/services-lab.yaml");
    let text = std::fs::read_to_string(file)
        .unwrap()
        .replace("name: svc\n", "name: trace3\n");
    let lab = LabGuard::up("trace3", &text);
    let manifest = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/services-demo.yaml"),
    )
    .unwrap();
    lab.apply_ok(&manifest);
    lab.apply_ok(MORE_SERVICES);
    // `lab status` shows the external IP, in the table and in JSON.
    let text = ok(&["lab", "status", "--name", "trace3"]);
    let row = text
        .lines()
        .find(|l| l.starts_with("default/web-ext "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("203.0.113.50"), "{row}");
    let js: serde_json::Value =
        serde_json::from_str(&ok(&["lab", "status", "--name", "trace3", "-o", "json"])).unwrap();
    let ext = js["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "default/web-ext")
        .unwrap_or_else(|| panic!("{js}"));
    assert_eq!(
        ext["externalIps"],
        serde_json::json!(["203.0.113.50"]),
        "{ext}"
    );
    assert!(!ext["endpoints"].as_array().unwrap().is_empty(), "{ext}");
    assert_eq!(js["nodes"].as_array().unwrap().len(), 3, "{js}");
    let ip = |name: &str| {
        lab.state()["services"][format!("default/{name}")]["clusterIp"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let t = |args: &[&str]| trace("trace3", args);
    let (_, web2) = pod_on(&lab, "web", "node2");
    let (web1, _) = pod_on(&lab, "web", "node1");

    // ClientIP affinity: a new client forks over every endpoint; once it
    // has connected, the trace names the endpoint it sticks to (read from
    // the per-endpoint set of recent clients), and a real request agrees.
    let sticky = format!("{}:80", ip("web-sticky"));
    let first = t(&[&web1, &sticky]);
    assert!(first.contains("ClientIP session affinity"), "{first}");
    let again = t(&[&web1, &sticky]);
    assert!(again.contains("connected within the timeout"), "{again}");
    assert_eq!(again.matches("├─ endpoint").count(), 1, "{again}");

    // UDP: a Service, a pinned endpoint from a node, and pod to pod.
    let dns = format!("{}:53/udp", ip("dns"));
    t(&[&web1, &dns]);
    t(&["node2", &dns, "--endpoint", &pod_on(&lab, "web", "node3").1]);
    t(&[&web1, &format!("{web2}:5353/udp")]);

    // hostPort: from outside and from a pod on another node (the peer
    // DNATs it); on a node without the hostPort nothing listens, and the
    // kernel itself refuses.
    let out = t(&["outside", "node2:8081"]);
    assert!(out.contains("hostPort 8081/tcp"), "{out}");
    t(&[&web1, "node2:8081"]);
    let out = t(&["outside", "node1:8081"]);
    assert!(out.contains("nothing listens there"), "{out}");
    assert!(out.contains("the kernel refused it"), "{out}");

    // An external IP from a pod: DNAT and (policy Cluster) masquerade; a
    // node with no route to it cannot even send.
    let out = t(&[&web1, "203.0.113.50:80", "--endpoint", &web2]);
    assert!(out.contains("masquerade applied ✓"), "{out}");
    let out = t(&["node1", "203.0.113.50:80"]);
    assert!(out.contains("not routed"), "{out}");

    // No endpoints: refused at once by the reject chain, TCP and UDP; a
    // service IP no Service has, too.
    for target in [
        format!("{}:80", ip("nobody")),
        format!("{}:53/udp", ip("nobody-udp")),
        "10.96.0.200:80".to_string(),
    ] {
        let out = t(&[&web1, &target]);
        assert!(out.contains("sent to the reject chain ✓"), "{out}");
    }
    // Policy Local: dropped on a node without a local endpoint, delivered
    // with the client's own address on the node that has one.
    let out = t(&["outside", "node1:30090"]);
    assert!(out.contains("dropped by a rule ✓"), "{out}");
    let out = t(&["outside", "node2:30090"]);
    assert!(out.contains("the pod sees outside"), "{out}");
    // A node port from a pod.
    t(&[&web1, "node3:30080", "--endpoint", &web2]);
}
