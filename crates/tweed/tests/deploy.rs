//! `deploy/tweed.yaml` holds what an operator relies on: the conventions of
//! kube-flannel.yml and calico-node, least-privilege RBAC matching the calls
//! the agent makes, and a config the agent accepts. Pure: no cluster here
//! (the Kubernetes lab applies the same file for real).

use serde_json::Value;

fn docs() -> Vec<Value> {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/tweed.yaml");
    let text = std::fs::read_to_string(p).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap()
}

fn kind<'a>(d: &'a [Value], k: &str) -> &'a Value {
    d.iter()
        .find(|v| v["kind"] == k)
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn namespace_is_privileged_for_pod_security() {
    let d = docs();
    let ns = kind(&d, "Namespace");
    assert_eq!(ns["metadata"]["name"], "tweed-system");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

#[test]
fn cluster_role_is_exactly_what_the_agent_calls() {
    let d = docs();
    let role = kind(&d, "ClusterRole");
    let mut got: Vec<String> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    got.push(format!(
                        "{}/{} {}",
                        g.as_str().unwrap(),
                        res.as_str().unwrap(),
                        v.as_str().unwrap()
                    ));
                }
            }
        }
    }
    got.sort();
    assert_eq!(
        got,
        [
            "/events create",
            "/nodes get",
            "/nodes list",
            "/nodes watch",
            "/nodes/status patch",
            "/services list",
            "/services watch",
            "/services/status patch",
            "discovery.k8s.io/endpointslices list",
            "discovery.k8s.io/endpointslices watch",
        ],
        "no secrets, no pods, no writes beyond the node's own status and LoadBalancer addresses"
    );
    let binding = kind(&d, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "tweed");
    assert_eq!(binding["subjects"][0]["namespace"], "tweed-system");
    // kubelet's node Leases, read only, in their namespace only (doctor's
    // "lease-expiring").
    let lease = kind(&d, "Role");
    assert_eq!(lease["metadata"]["namespace"], "kube-node-lease");
    assert_eq!(
        lease["rules"],
        serde_json::json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}])
    );
    let binding = kind(&d, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "kube-node-lease");
    assert_eq!(binding["roleRef"]["name"], "tweed");
    assert_eq!(binding["subjects"][0]["namespace"], "tweed-system");
}

#[test]
fn config_map_holds_a_valid_cluster_config() {
    let d = docs();
    let cm = kind(&d, "ConfigMap");
    let json = cm["data"]["cluster-config.json"].as_str().unwrap();
    let cfg = tweed_model::ClusterConfig::from_json(json.as_bytes()).unwrap();
    assert_eq!(cfg, tweed_model::ClusterConfig::default());
    assert!(cm["data"]["api-server"].is_string());
}

#[test]
fn daemonset_follows_the_node_agent_conventions() {
    let d = docs();
    let ds = kind(&d, "DaemonSet");
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "tweed");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let c = &pod["containers"][0];
    let image = c["image"].as_str().unwrap();
    assert!(
        image.contains(':') && !image.ends_with(":latest"),
        "a pinned tag, so nothing is pulled: {image}"
    );
    let env = c["env"].as_array().unwrap();
    let node = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let api = env
        .iter()
        .find(|e| e["name"] == "TWEED_API_SERVER")
        .unwrap();
    assert_eq!(api["valueFrom"]["configMapKeyRef"]["key"], "api-server");
    let cmd: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let listen = cmd
        .iter()
        .find_map(|a| a.strip_prefix("--health-listen="))
        .unwrap();
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], port);
    assert!(cmd.contains(&"--datastore=kubernetes"));
    // The CNI plugin (run by the runtime on the host) reads the paths the
    // conflist names: the agent must see them at the same paths.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let vols = pod["volumes"].as_array().unwrap();
    for dir in ["/run/tweed", "/var/lib/tweed"] {
        let m = mounts.iter().find(|m| m["mountPath"] == dir).unwrap();
        let v = vols.iter().find(|v| v["name"] == m["name"]).unwrap();
        assert_eq!(v["hostPath"]["path"], dir);
        assert!(
            cmd.iter().any(|a| a.ends_with(dir)),
            "{dir} passed to the agent"
        );
    }
    for (flag, host) in [
        ("--cni-bin-dir=", "/opt/cni/bin"),
        ("--cni-conf-dir=", "/etc/cni/net.d"),
    ] {
        let inside = cmd.iter().find_map(|a| a.strip_prefix(flag)).unwrap();
        let m = mounts.iter().find(|m| m["mountPath"] == inside).unwrap();
        let v = vols.iter().find(|v| v["name"] == m["name"]).unwrap();
        assert_eq!(v["hostPath"]["path"], host);
    }
}
