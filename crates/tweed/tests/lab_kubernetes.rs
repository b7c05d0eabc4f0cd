//! Lab end-to-end tests of the Kubernetes datastore, against a real
//! Kubernetes 1.20.2 control plane (kube-apiserver, controller-manager
//! allocating node CIDRs, scheduler) with the agents holding the
//! ServiceAccount and ClusterRole of deploy/tweed.yaml, not admin rights.
//! Kubelets are not part of this lab yet: pods are the lab's own, and the
//! lab writes their EndpointSlices (discovery.k8s.io/v1beta1 on 1.20).

mod common;
use common::*;

use std::time::{Duration, Instant};

const TOPO: &str = "kubernetes: true\nnodes: [{name: n1}, {name: n2}, {name: n3}]\npods: [{name: a, node: n1}, {name: b, node: n2}, {name: c, node: n3}]\n";

/// The Kubernetes binaries come from scripts/install-kubernetes.sh, which
/// scripts/test.sh runs; without them the test says so and counts as skipped.
fn have_kubernetes(test: &str) -> bool {
    let dir = std::env::var("TWEED_K8S_BIN")
        .unwrap_or_else(|_| "/var/cache/tweed/kubernetes/v1.20.2/bin".into());
    let ok = std::path::Path::new(&dir).join("kube-apiserver").exists();
    if !ok {
        skip(
            test,
            &format!("no Kubernetes binaries in {dir}: run scripts/install-kubernetes.sh"),
        );
    }
    ok
}

fn kubectl(lab: &LabGuard, args: &[&str]) -> String {
    let mut a = vec!["lab", "kubectl", "--name", &lab.name, "--"];
    a.extend_from_slice(args);
    ok(&a)
}

fn status(lab: &LabGuard, node: &str) -> serde_json::Value {
    std::fs::read(lab.dir.join("nodes").join(node).join("run/status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn svc_ip(lab: &LabGuard, name: &str) -> String {
    kubectl(
        lab,
        &["get", "svc", name, "-o", "jsonpath={.spec.clusterIP}"],
    )
}

/// Which pod answered a GET of ADDR from NS (None: no answer).
fn who(lab: &LabGuard, ns: &str, addr: &str) -> Option<String> {
    let o = lab.exec(ns, &[TWEED, "probe", "http", addr, "--timeout", "2"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["pod"].as_str().map(str::to_string)
}

fn restart_no_wait(lab: &LabGuard, node: &str) {
    ok(&["lab", "agent", "stop", node, "--name", &lab.name]);
    ok(&[
        "lab",
        "agent",
        "start",
        node,
        "--name",
        &lab.name,
        "--no-wait",
    ]);
}

#[test]
fn agents_follow_the_api_nodes_services_slices_outages_and_deletions() {
    if !have_kubernetes("agents_follow_the_api_nodes_services_slices_outages_and_deletions") {
        return;
    }
    let lab = LabGuard::up("k8sapi", TOPO);

    // Each node's subnet is the one the controller-manager assigned, and
    // each agent published its record and NetworkUnavailable=False.
    for n in ["n1", "n2", "n3"] {
        let cidr = kubectl(&lab, &["get", "node", n, "-o", "jsonpath={.spec.podCIDR}"]);
        assert_eq!(lab.node_subnet(n), cidr, "{n}'s subnet is spec.podCIDR");
        let ann = kubectl(
            &lab,
            &[
                "get",
                "node",
                n,
                "-o",
                "jsonpath={.metadata.annotations.tweed\\.io/public-ip}",
            ],
        );
        assert!(ann.starts_with("198.51.100."), "{n} published {ann:?}");
        let cond = kubectl(
            &lab,
            &[
                "get",
                "node",
                n,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"NetworkUnavailable\")].status}",
            ],
        );
        assert_eq!(cond, "False", "{n}: NetworkUnavailable");
        let st = status(&lab, n);
        assert!(
            st["datastoreAt"]
                .as_str()
                .unwrap_or_default()
                .starts_with("kubernetes"),
            "{st}"
        );
    }
    // Every pod reaches every pod.
    ok(&["lab", "matrix", "--name", "k8sapi"]);

    // Seed 001's Deployment and Service, through the API server (it
    // allocates the cluster IP); the Service spreads over all three pods.
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/seed-001-myapp.yaml"
    ))
    .unwrap();
    lab.apply_ok(&seed);
    let addr = format!("{}:80", svc_ip(&lab, "myapp"));
    let client = lab.pod_ns("a");
    let mut seen = std::collections::BTreeSet::new();
    eventually("the Service reaches all three pods", 20, || {
        if let Some(p) = who(&lab, &client, &addr) {
            seen.insert(p);
        }
        seen.len() == 3
    });

    // An EndpointSlice change reaches the data plane within a second.
    ok(&[
        "lab",
        "scale",
        "deployment/myapp",
        "--replicas",
        "1",
        "--name",
        "k8sapi",
    ]);
    let t = Instant::now();
    eventually("only one endpoint left", 5, || {
        (0..6)
            .filter_map(|_| who(&lab, &client, &addr))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 1
    });
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );

    // The API server away for 30 s: an established connection through the
    // Service keeps flowing, the agents say they are retrying, and once it
    // is back a Service created then works.
    let hold = start_hold(&lab, &client, &addr, 36, 3);
    ok(&["lab", "apiserver", "stop", "--name", "k8sapi"]);
    let down = Instant::now();
    eventually("agents report the outage", 25, || {
        status(&lab, "n1")["datastore"] == "retrying"
    });
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    ok(&["lab", "apiserver", "start", "--name", "k8sapi"]);
    finish_hold(hold, "the API server outage", 100);
    lab.apply_ok(
        "kind: Service\nmetadata: {name: later}\nspec:\n  selector: {app: myapp}\n  ports: [{port: 81, targetPort: 80}]\n",
    );
    let later = format!("{}:81", svc_ip(&lab, "later"));
    eventually("a Service made after the outage works", 30, || {
        who(&lab, &client, &later).is_some()
    });
    eventually("agents report the API back", 30, || {
        status(&lab, "n1")["datastore"] == "connected"
    });

    // A Node deleted from the API: the others drop its routes.
    let gone = lab.node_subnet("n3");
    assert!(lab.routes("n1").contains(&gone));
    kubectl(&lab, &["delete", "node", "n3"]);
    eventually("n1 and n2 drop n3's routes", 15, || {
        !lab.routes("n1").contains(&gone) && !lab.routes("n2").contains(&gone)
    });
}

#[test]
fn least_privilege_is_enough_and_a_missing_verb_is_named() {
    if !have_kubernetes("least_privilege_is_enough_and_a_missing_verb_is_named") {
        return;
    }
    let lab = LabGuard::up("k8srbac", "kubernetes: true\nnodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\n");
    // The agents run on the tweed ServiceAccount's token, not as admin.
    let kc = std::fs::read_to_string(lab.dir.join("nodes/n1/kubeconfig")).unwrap();
    assert!(kc.contains("\"token\"") && !kc.contains("admin"), "{kc}");
    let sa = "--as=system:serviceaccount:tweed-system:tweed";
    let can = |verb: &str, what: &str| {
        let (what, sub) = what.split_once('/').unwrap_or((what, ""));
        let sub = format!("--subresource={sub}");
        let mut args = vec![
            "lab", "kubectl", "--name", "k8srbac", "--", "auth", "can-i", verb, what, sa,
        ];
        if !sub.ends_with('=') {
            args.push(&sub);
        }
        let o = tweed(&args);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(can("list", "secrets"), "no");
    assert_eq!(can("patch", "nodes"), "no", "only nodes/status");
    assert_eq!(can("patch", "nodes/status"), "yes");
    assert_eq!(can("patch", "services"), "no", "only services/status");
    assert_eq!(can("patch", "services/status"), "yes");
    ok(&["lab", "matrix", "--name", "k8srbac"]);
    // `tweed status` inside a node finds that node's agent by itself.
    let table = lab.exec_ok(&lab.node_ns("n1"), &[TWEED, "status"]);
    assert!(table.contains("NODE         n1"), "{table}");
    assert!(
        table.contains("DATASTORE    connected kubernetes https://"),
        "{table}"
    );
    assert!(table.contains("n2 "), "the peer is listed: {table}");
    let json = lab.exec_ok(&lab.node_ns("n2"), &[TWEED, "status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["node"], "n2");
    assert_eq!(v["subnet"].as_str(), Some(lab.node_subnet("n2").as_str()));

    // Take `list` on Services away: a restarted agent says which call was
    // refused, keeps running and keeps retrying.
    let role = kubectl(&lab, &["get", "clusterrole", "tweed", "-o", "json"]);
    let mut v: serde_json::Value = serde_json::from_str(&role).unwrap();
    // Replace by content, not by version: both edits below start from it.
    v["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    for r in v["rules"].as_array_mut().unwrap() {
        if r["resources"][0] == "services" {
            r["verbs"] = serde_json::json!(["watch"]);
        }
    }
    let file = std::env::temp_dir().join("tweed-k8srbac-role.json");
    std::fs::write(&file, v.to_string()).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let o = lab.kubectl_stdin(&["replace", "-f", "-"], &text);
    assert!(o.status.success());
    restart_no_wait(&lab, "n1");
    eventually("the agent names the refused call", 30, || {
        let e = status(&lab, "n1")["lastError"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        e.contains("services") && e.contains("forbidden")
    });
    let pid = lab.state()["nodes"][0]["agent_pid"].as_u64().unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent keeps running"
    );
    // Meanwhile the node's data plane stays: pods still reach each other.
    ok(&["lab", "matrix", "--name", "k8srbac"]);
    // Given the verb back, it recovers by itself.
    let restored = text.replace("[\"watch\"]", "[\"list\",\"watch\"]");
    let o = lab.kubectl_stdin(&["replace", "-f", "-"], &restored);
    assert!(o.status.success());
    eventually("the agent recovers", 40, || {
        status(&lab, "n1")["datastore"] == "connected"
    });
}

#[test]
fn a_node_without_a_pod_cidr_waits_and_says_why() {
    if !have_kubernetes("a_node_without_a_pod_cidr_waits_and_says_why") {
        return;
    }
    // Room for two node subnets only.
    let lab = LabGuard::up(
        "k8scidr",
        "kubernetes: true\ncluster: {clusterCidr: 10.244.0.0/23}\nnodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}]\n",
    );
    // n2 leaves the API, a node of no agent takes its subnet, n2 comes back
    // without one: its restarted agent waits and says why.
    kubectl(&lab, &["delete", "node", "n2"]);
    let node = |name: &str| {
        format!("{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"{name}\"}}}}")
    };
    let create = |name: &str| {
        let o = lab.kubectl_stdin(&["create", "-f", "-"], &node(name));
        assert!(o.status.success(), "create node {name}");
    };
    create("squatter");
    eventually("the squatter gets the free subnet", 30, || {
        !kubectl(
            &lab,
            &["get", "node", "squatter", "-o", "jsonpath={.spec.podCIDR}"],
        )
        .is_empty()
    });
    create("n2");
    restart_no_wait(&lab, "n2");
    eventually(
        "n2's agent reports it is waiting for spec.podCIDR",
        30,
        || {
            let s = status(&lab, "n2");
            s["datastore"] == "waiting"
                && s["lastError"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("spec.podCIDR")
        },
    );
    let events = kubectl(&lab, &["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("NoPodCIDR"), "an Event on the Node says so");
    // tweed doctor says so too, and nothing else about that node.
    let o = tweed(&[
        "lab", "doctor", "--name", "k8scidr", "--node", "n2", "-o", "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let found = v["findings"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v:#}");
    assert_eq!(found[0]["fault"], "podcidr-unassigned", "{v:#}");
    // The subnet frees up; n2 proceeds at once and its pods work. (The
    // controller-manager retries a node's CIDR when the Node changes, which
    // a kubelet's status updates do every 10 s; this lab has no kubelet, so
    // the test touches the Node itself.)
    kubectl(&lab, &["delete", "node", "squatter"]);
    kubectl(&lab, &["annotate", "node", "n2", "lab.tweed.io/touched=1"]);
    eventually("n2 gets a subnet and is ready", 40, || {
        status(&lab, "n2")["datastore"] == "connected"
    });
    ok(&[
        "lab", "pod", "add", "late", "--node", "n2", "--name", "k8scidr",
    ]);
    let late = lab.pod_ip("late");
    assert!(lab.get(&lab.pod_ns("a"), &late).is_some());
    // Doctor on the Kubernetes lab: clean; a CNI config left by another
    // network is found on its node; clean again once removed.
    let clean = || {
        let o = tweed(&["lab", "doctor", "--name", "k8scidr", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["findings"].as_array().unwrap().is_empty()
            && v["errors"].as_array().is_none_or(|e| e.is_empty())
    };
    eventually("doctor finds nothing on the Kubernetes lab", 30, clean);
    ok(&[
        "lab",
        "fault",
        "inject",
        "cni-config-shadowed",
        "--node",
        "n1",
        "--name",
        "k8scidr",
    ]);
    let o = tweed(&["lab", "doctor", "--name", "k8scidr", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let found = v["findings"].as_array().unwrap();
    assert!(
        found.len() == 1 && found[0]["fault"] == "cni-config-shadowed" && found[0]["node"] == "n1",
        "{v:#}"
    );
    ok(&["lab", "fault", "clear", "--name", "k8scidr"]);
    assert!(clean());
}

/// A Service the API server would refuse (a port name used twice), planted
/// in its etcd as old versions or bugs could leave one: the agent names the
/// object and the field, keeps the Service's last good version, and every
/// other Service keeps working.
#[test]
fn a_malformed_service_in_the_api_is_named_and_loses_nothing() {
    if !have_kubernetes("a_malformed_service_in_the_api_is_named_and_loses_nothing") {
        return;
    }
    let lab = LabGuard::up(
        "k8sbad",
        "kubernetes: true\nnodes: [{name: n1}]\npods: [{name: a, node: n1}]\n",
    );
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/seed-001-myapp.yaml"
    ))
    .unwrap();
    let victim = "apiVersion: v1\nkind: Service\nmetadata: {name: victim, namespace: default}\nspec:\n  selector: {app: myapp, release: canary}\n  ports:\n  - {name: http, port: 80, targetPort: 80}\n  - {name: alt, port: 81, targetPort: 80}\n";
    lab.apply_ok(&format!("{seed}\n---\n{victim}"));
    let client = lab.pod_ns("a");
    let good = format!("{}:80", svc_ip(&lab, "myapp"));
    let bad = format!("{}:81", svc_ip(&lab, "victim"));
    eventually("both Services answer", 20, || {
        who(&lab, &client, &good).is_some() && who(&lab, &client, &bad).is_some()
    });

    // Rewrite the stored object: its second port takes the first one's name.
    let etcdctl = |args: &[&str]| {
        let mut a = vec!["etcdctl", "--endpoints", "http://198.51.100.2:2379"];
        a.extend_from_slice(args);
        lab.exec_ok("tw-k8sbad_cp", &a)
    };
    let key = "/registry/services/specs/default/victim";
    let stored = etcdctl(&["get", key, "--print-value-only"]);
    let mut v: serde_json::Value = serde_json::from_str(stored.trim()).unwrap();
    v["spec"]["ports"][1]["name"] = "http".into();
    etcdctl(&["put", key, &v.to_string()]);
    eventually("the API server to serve the planted object", 10, || {
        !kubectl(&lab, &["get", "svc", "victim", "-o", "json"]).contains("\"alt\"")
    });

    let log = lab.dir.join("nodes/n1/agent.log");
    eventually("the agent to name the Service and the field", 20, || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.contains("default/victim") && l.contains("spec.ports[1].name")
    });
    // Nothing is lost: the last good version stays, and the others work.
    assert!(
        who(&lab, &client, &bad).is_some(),
        "the bad edit took the Service's last good version away"
    );
    ok(&[
        "lab",
        "scale",
        "deployment/myapp",
        "--replicas",
        "2",
        "--name",
        "k8sbad",
    ]);
    let mut seen = std::collections::BTreeSet::new();
    eventually("the good Service follows its endpoints", 20, || {
        seen.extend(who(&lab, &client, &good));
        seen.len() == 2
    });
    let st = ok(&[
        "lab", "exec", "--name", "k8sbad", "n1", "--", TWEED, "status", "-o", "json",
    ]);
    assert!(st.contains("\"connected\""), "{st}");
}

#[test]
fn load_balancers_get_addresses_from_the_pools_in_their_status() {
    let test = "load_balancers_get_addresses_from_the_pools_in_their_status";
    if !have_kubernetes(test) {
        return;
    }
    let lab = LabGuard::up(
        "k8slb",
        "kubernetes: true\ncluster: {loadBalancerPools: [203.0.113.64/30]}\nnodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\n",
    );
    let lb = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-pod, labels: {{app: {name}}}}}\nspec:\n  nodeName: n2\n  containers:\n  - name: web\n    ports: [{{containerPort: 8080}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {{app: {name}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n")
    };
    lab.apply_ok(&lb("web"));
    let ingress = |name: &str| {
        kubectl(
            &lab,
            &[
                "get",
                "svc",
                name,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[*].ip}",
            ],
        )
    };
    eventually("web's status to hold the pool's first address", 30, || {
        ingress("web") == "203.0.113.65"
    });
    lab.apply_ok(&lb("api"));
    eventually("api's status to hold the next one", 30, || {
        ingress("api") == "203.0.113.66"
    });
    // The /30 has two usable addresses: a third waits, pending.
    lab.apply_ok(&lb("more"));
    eventually(
        "n1's agent (the first name) to find the pool full",
        30,
        || {
            std::fs::read_to_string(lab.dir.join("nodes/n1/agent.log"))
                .is_ok_and(|l| l.contains("no free load balancer address service=default/more"))
        },
    );
    assert_eq!(ingress("more"), "", "an address outside the pool");
    // `tweed lab status` shows what the API server holds now, not what it
    // answered at apply: web's and api's addresses, more still pending.
    let text = ok(&["lab", "status", "--name", "k8slb"]);
    let line = |svc: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("default/{svc} ")))
            .unwrap_or_else(|| panic!("no default/{svc} in lab status:\n{text}"))
            .to_string()
    };
    assert!(line("web").contains("203.0.113.65"), "{text}");
    assert!(line("api").contains("203.0.113.66"), "{text}");
    assert!(line("more").contains("<pending>"), "{text}");
    // The address works like kube-proxy's LoadBalancer ingress: from a pod
    // on the node that has the endpoint (policy Local). (These nodes have
    // no default route, so not from the node itself.)
    eventually("b on n2 to reach web-pod at 203.0.113.65:80", 20, || {
        who(&lab, &lab.pod_ns("b"), "203.0.113.65:80").as_deref() == Some("web-pod")
    });
    // The API server allocated the health check node port; every agent
    // serves it: 200 on n2 (the endpoint), 503 on n1.
    let hc = kubectl(
        &lab,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.healthCheckNodePort}",
        ],
    );
    let code = |node: &str| {
        lab.exec_ok(
            &lab.node_ns(node),
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                &format!("http://127.0.0.1:{hc}/healthz"),
            ],
        )
    };
    eventually(
        "the health checks to say 200 on n2 and 503 on n1",
        20,
        || code("n2") == "200" && code("n1") == "503",
    );
}
