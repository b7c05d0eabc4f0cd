//! Lab end-to-end tests with real kubelets: every node runs containerd 1.6
//! and kubelet 1.20.2 against the lab's real control plane, pods are
//! created by kubectl and wired by tweed's CNI plugin through the runtime,
//! and the real EndpointSlice controller publishes them. The images come
//! from scripts/build-image.sh (there is no registry).

mod common;
use common::*;

use std::collections::BTreeSet;
use std::io::BufReader;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SEED_001: &str = include_str!("../../../examples/seed-001-myapp.yaml");
const SEED_IMAGE: &str = "registry-jinan-lab.inspurcloud.cn/testljz/myapp:v1";

/// Kubernetes (scripts/install-kubernetes.sh) and containerd
/// (scripts/install-containerd.sh), which scripts/test.sh installs; without
/// them the test says so and counts as skipped.
fn have_kubelets(test: &str) -> bool {
    let k8s = std::env::var("TWEED_K8S_BIN")
        .unwrap_or_else(|_| "/var/cache/tweed/kubernetes/v1.20.2/bin".into());
    let ctrd = std::env::var("TWEED_CONTAINERD_DIR")
        .unwrap_or_else(|_| "/var/cache/tweed/containerd".into());
    for (p, script) in [
        (format!("{k8s}/kubelet"), "install-kubernetes.sh"),
        (format!("{ctrd}/containerd"), "install-containerd.sh"),
        (format!("{ctrd}/pause.oci.tar"), "install-containerd.sh"),
    ] {
        if !std::path::Path::new(&p).exists() {
            skip(test, &format!("no {p}: run scripts/{script}"));
            return false;
        }
    }
    true
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// tweed's image as users build it (`scripts/build-image.sh`: a static
/// release build of this tree) as `tweed:0.1.0`, the DaemonSet's, with
/// seed 001's image name as an alias serving on :80; built once per run.
fn lab_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lab-kubelet.oci.tar");
        build_image(&["--tag", "tweed:0.1.0"], &out);
        out.display().to_string()
    })
}

fn build_image(tags: &[&str], out: &std::path::Path) {
    let o = Command::new("bash")
        .arg(repo().join("scripts/build-image.sh"))
        .args(tags)
        .args(["--alias", SEED_IMAGE, r#"["echo","--listen","0.0.0.0:80"]"#])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build-image.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A fresh empty directory of this test run's own.
fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kubectl(lab: &LabGuard, args: &[&str]) -> String {
    let mut a = vec!["lab", "kubectl", "--name", &lab.name, "--"];
    a.extend_from_slice(args);
    ok(&a)
}

fn jsonpath(lab: &LabGuard, what: &[&str], path: &str) -> String {
    let mut a = what.to_vec();
    let p = format!("jsonpath={path}");
    a.extend(["-o", &p]);
    kubectl(lab, &a)
}

/// The backends node `node`'s data plane draws from for Service `ip:port`
/// (TCP): its slots in map `be-tcp-K`, where K is the Service's endpoint
/// count (the highest `lb-tcp-K` set it is in).
fn backends(lab: &LabGuard, node: &str, ip: &str, port: u16) -> BTreeSet<String> {
    let o = lab.exec_ok(
        &lab.node_ns(node),
        &["nft", "-j", "list", "table", "ip", "tweed"],
    );
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    let objs = v["nftables"].as_array().cloned().unwrap_or_default();
    let key = serde_json::json!([ip, port]);
    let mut k = 0;
    for o in &objs {
        let s = &o["set"];
        if let Some(n) = s["name"]
            .as_str()
            .and_then(|n| n.strip_prefix("lb-tcp-"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            if s["elem"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["concat"] == key))
            {
                k = n;
            }
        }
    }
    let mut out = BTreeSet::new();
    for o in &objs {
        if o["map"]["name"] != format!("be-tcp-{k}").as_str() {
            continue;
        }
        for e in o["map"]["elem"].as_array().into_iter().flatten() {
            let c = &e[0]["concat"];
            if c[0] == ip && c[1] == port && c[2].as_u64().is_some_and(|s| s < k) {
                out.insert(e[1]["concat"][0].as_str().unwrap_or_default().to_string());
            }
        }
    }
    out
}

/// Watches a Service's EndpointSlices (as the API server sends them, the
/// moment they change): each event is (when, the ready addresses).
struct SliceWatch {
    child: std::process::Child,
    rx: mpsc::Receiver<(Instant, BTreeSet<String>)>,
}

impl SliceWatch {
    fn start(lab: &LabGuard, service: &str) -> Self {
        let mut child = Command::new(TWEED)
            .args(["lab", "kubectl", "--name", &lab.name, "--"])
            .args(["get", "endpointslices", "-w", "-o", "json", "-l"])
            .arg(format!("kubernetes.io/service-name={service}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let de = serde_json::Deserializer::from_reader(BufReader::new(out));
            for v in de.into_iter::<serde_json::Value>().map_while(Result::ok) {
                let ready: BTreeSet<String> = v["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| e["conditions"]["ready"] != false)
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                if tx.send((Instant::now(), ready)).is_err() {
                    return;
                }
            }
        });
        SliceWatch { child, rx }
    }

    /// Wait (up to `secs`) until the slice's ready set satisfies `want` and
    /// every node's data plane draws from exactly that set; returns how
    /// long after the slice changed the last node caught up.
    fn follow(
        &self,
        lab: &LabGuard,
        nodes: &[&str],
        svc: (&str, u16),
        secs: u64,
        want: impl Fn(&BTreeSet<String>) -> bool,
    ) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut slice: Option<(Instant, BTreeSet<String>)> = None;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                if slice.as_ref().is_none_or(|s| s.1 != ev.1) {
                    slice = Some(ev);
                }
            }
            if let Some((at, set)) = &slice {
                if want(set) && nodes.iter().all(|n| backends(lab, n, svc.0, svc.1) == *set) {
                    return at.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "within {secs} s: the slice's ready set {:?} did not reach the wanted state, or the data plane ({:?}) did not follow",
                slice.as_ref().map(|s| &s.1),
                nodes
                    .iter()
                    .map(|n| backends(lab, n, svc.0, svc.1))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SliceWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pods(lab: &LabGuard, selector: &str) -> Vec<(String, String, String)> {
    let o = kubectl(lab, &["get", "pods", "-l", selector, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["status"]["podIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let net: ipnet::Ipv4Net = cidr.parse().unwrap();
    net.contains(&ip)
}

/// Who answered a GET of ADDR from NS (None: nobody).
fn who(lab: &LabGuard, ns: &str, addr: &str) -> Option<String> {
    let o = lab.exec(ns, &[TWEED, "probe", "http", addr, "--timeout", "2"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["pod"].as_str().map(str::to_string)
}

/// The machine-wide sysctls kubelet 1.20 would write.
fn sysctls() -> Vec<String> {
    [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
    ]
    .iter()
    .map(|s| std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default())
    .collect()
}

/// GET ADDR through a pod's own network (`kubectl exec`), a node's or an
/// outside host's namespace; the echo answer, or None when nothing answers.
fn get(lab: &LabGuard, from: &From, addr: &str) -> Option<serde_json::Value> {
    let probe = [TWEED, "probe", "http", addr, "--timeout", "2"];
    let o = match from {
        From::Pod(p) => {
            let mut a = vec![
                "lab", "kubectl", "--name", &lab.name, "--", "exec", p, "--", "tweed",
            ];
            a.extend_from_slice(&probe[1..]);
            tweed(&a)
        }
        From::Ns(ns) => lab.exec(ns, &probe),
    };
    serde_json::from_slice(&o.stdout).ok()
}

enum From {
    Pod(String),
    Ns(String),
}

/// DESIGN.md's source-address table, row by row, on real pods.
fn source_address_rows(lab: &LabGuard) {
    let pod = |name: &str, node: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: echo\n    image: tweed:0.1.0\n    imagePullPolicy: Never\n    ports: [{{name: http, containerPort: 8080}}]\n")
    };
    let svc = |name: &str, app: &str, extra: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {app}}}\n  ports: [{{port: 80, targetPort: http}}]\n{extra}")
    };
    let m = [
        pod("a", "n1"),
        pod("b", "n1"),
        pod("c", "n2"),
        svc("to-a", "a", ""),
        svc("to-b", "b", ""),
        svc("to-c", "c", ""),
        svc("np-b", "b", "  type: NodePort\n"),
        svc(
            "np-b-local",
            "b",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        ),
    ]
    .concat();
    let o = lab.kubectl_stdin(&["apply", "-f", "-"], &m);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    kubectl(
        lab,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/a",
            "pod/b",
            "pod/c",
            "--timeout=60s",
        ],
    );
    let ip = |what: &str| jsonpath(lab, &["get", "pod", what], "{.status.podIP}");
    let node_ip = |n: &str| {
        jsonpath(
            lab,
            &["get", "node", n],
            "{.status.addresses[?(@.type==\"InternalIP\")].address}",
        )
    };
    let vtep = |n: &str| {
        let cidr = jsonpath(lab, &["get", "node", n], "{.spec.podCIDR}");
        cidr.split('/').next().unwrap().to_string()
    };
    let node_addrs = |n: &str| [node_ip(n), vtep(n)];
    let cluster = |s: &str| {
        format!(
            "{}:80",
            jsonpath(lab, &["get", "svc", s], "{.spec.clusterIP}")
        )
    };
    let node_port = |s: &str| jsonpath(lab, &["get", "svc", s], "{.spec.ports[0].nodePort}");
    let a = From::Pod("a".into());
    let answer = |from: &From, addr: &str| {
        let mut got = None;
        eventually(&format!("an answer from {addr}"), 10, || {
            got = get(lab, from, addr);
            got.is_some()
        });
        got.unwrap()
    };
    let row = |s: serde_json::Value| {
        (
            s["pod"].as_str().unwrap_or_default().to_string(),
            s["client"].as_str().unwrap_or_default().to_string(),
        )
    };

    // pod A on node 1 → ClusterIP → pod B on node 1 / pod C on node 2: A's IP.
    assert_eq!(row(answer(&a, &cluster("to-b"))), ("b".into(), ip("a")));
    assert_eq!(row(answer(&a, &cluster("to-c"))), ("c".into(), ip("a")));
    // pod A → its own Service (hairpin): works, seen as a node-1 address.
    let (p, c) = row(answer(&a, &cluster("to-a")));
    assert!(
        p == "a" && node_addrs("n1").contains(&c),
        "hairpin seen as {c}"
    );
    // a process on node 1 (and on node 3, with no endpoint) → ClusterIP: a node address.
    let n1 = From::Ns(lab.node_ns("n1"));
    for s in ["to-b", "to-c"] {
        let (_, c) = row(answer(&n1, &cluster(s)));
        assert!(node_addrs("n1").contains(&c), "{s}: node 1 seen as {c}");
    }
    let (_, c) = row(answer(&From::Ns(lab.node_ns("n3")), &cluster("to-c")));
    assert!(node_addrs("n3").contains(&c), "node 3 seen as {c}");
    // outside host → NodePort on node 2, Cluster → pod on node 1: node 2's address.
    let ext = From::Ns(format!("tw-{}_h-outside", lab.name));
    let (p, c) = row(answer(
        &ext,
        &format!("{}:{}", node_ip("n2"), node_port("np-b")),
    ));
    assert!(
        p == "b" && node_addrs("n2").contains(&c),
        "NodePort via n2 seen as {c}"
    );
    // outside host → NodePort on node 1, Local → pod on node 1: the host's own IP.
    let (p, c) = row(answer(
        &ext,
        &format!("{}:{}", node_ip("n1"), node_port("np-b-local")),
    ));
    assert_eq!((p.as_str(), c.as_str()), ("b", "198.51.100.200"));
    // ... on node 2, Local, no local pod: no connection (dropped, not refused).
    let t = Instant::now();
    let none = get(
        lab,
        &ext,
        &format!("{}:{}", node_ip("n2"), node_port("np-b-local")),
    );
    assert!(
        none.is_none() && t.elapsed() >= Duration::from_millis(1900),
        "Local without a local pod: {none:?} after {:?}",
        t.elapsed()
    );
}

#[test]
fn seed_001_runs_on_real_kubelets_and_the_data_plane_follows_kubectl() {
    if !have_kubelets("seed_001_runs_on_real_kubelets_and_the_data_plane_follows_kubectl") {
        return;
    }
    let topo = format!(
        "kubelet:\n  images: [{}]\nnodes: [{{name: n1}}, {{name: n2}}, {{name: n3}}]\nhosts: [{{name: outside}}]\n",
        lab_image()
    );
    let before = sysctls();
    let lab = LabGuard::up("kubelets", &topo);
    let nodes = ["n1", "n2", "n3"];
    for n in nodes {
        assert_eq!(
            jsonpath(
                &lab,
                &["get", "node", n],
                "{.status.conditions[?(@.type==\"Ready\")].status}"
            ),
            "True",
            "{n} is not Ready"
        );
        assert!(jsonpath(
            &lab,
            &["get", "node", n],
            "{.status.nodeInfo.containerRuntimeVersion}"
        )
        .starts_with("containerd://"),);
    }
    // The kubelets changed no machine-wide sysctl.
    assert_eq!(sysctls(), before, "a kubelet changed machine-wide sysctls");

    // Seed 001's manifest as it stands, with real kubectl.
    let o = lab.kubectl_stdin(&["apply", "-f", "-"], SEED_001);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    kubectl(
        &lab,
        &["rollout", "status", "deploy/myapp", "--timeout=120s"],
    );
    let running = pods(&lab, "app=myapp");
    assert_eq!(running.len(), 3, "{running:?}");
    for (pod, node, ip) in &running {
        let cidr = jsonpath(&lab, &["get", "node", node], "{.spec.podCIDR}");
        assert!(
            in_cidr(ip, &cidr),
            "{pod} on {node} has {ip}, outside {cidr}"
        );
    }
    let svc = jsonpath(&lab, &["get", "svc", "myapp"], "{.spec.clusterIP}");
    let addr = format!("{svc}:80");

    // The Service spreads over all three pods, from a node and from a pod.
    let names: BTreeSet<String> = running.iter().map(|p| p.0.clone()).collect();
    let mut seen = BTreeSet::new();
    eventually("every pod answering through the Service", 30, || {
        seen.extend(who(&lab, &lab.node_ns("n1"), &addr));
        seen == names
    });
    // From a pod (DESIGN's source-address table): to another pod it keeps
    // its address; to itself (hairpin) it is masqueraded to a node address.
    let (client, client_node, client_ip) = running[0].clone();
    let node_ip = jsonpath(
        &lab,
        &["get", "node", &client_node],
        "{.status.addresses[?(@.type==\"InternalIP\")].address}",
    );
    let (mut other, mut hairpin) = (false, false);
    eventually(
        "answers from another pod and from the client itself",
        60,
        || {
            let o = kubectl(
                &lab,
                &[
                    "exec",
                    &client,
                    "--",
                    "tweed",
                    "probe",
                    "http",
                    &addr,
                    "--timeout",
                    "2",
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&o).unwrap();
            if v["pod"] == client.as_str() {
                assert_eq!(
                    v["client"],
                    node_ip.as_str(),
                    "hairpin is masqueraded to the node: {o}"
                );
                hairpin = true;
            } else {
                assert_eq!(
                    v["client"],
                    client_ip.as_str(),
                    "pod -> ClusterIP keeps the pod's address: {o}"
                );
                other = true;
            }
            other && hairpin
        },
    );
    let watch = SliceWatch::start(&lab, "myapp");

    // kubectl scale, delete pod and rollout restart each reach every node's
    // data plane within a second of the EndpointSlice change.
    kubectl(&lab, &["scale", "deploy/myapp", "--replicas=5"]);
    let lag = watch.follow(&lab, &nodes, (&svc, 80), 120, |s| s.len() == 5);
    eprintln!("scale to 5: data plane {lag:?} after the slice");
    assert!(lag < Duration::from_secs(1), "scale: {lag:?}");

    let victim = pods(&lab, "app=myapp")[0].clone();
    kubectl(&lab, &["delete", "pod", &victim.0, "--wait=false"]);
    let lag = watch.follow(&lab, &nodes, (&svc, 80), 120, |s| {
        !s.contains(&victim.2) && s.len() == 5
    });
    eprintln!("delete pod: data plane {lag:?} after the slice");
    assert!(lag < Duration::from_secs(1), "delete pod: {lag:?}");

    let before: BTreeSet<String> = pods(&lab, "app=myapp").into_iter().map(|p| p.2).collect();
    kubectl(&lab, &["rollout", "restart", "deploy/myapp"]);
    let lag = watch.follow(&lab, &nodes, (&svc, 80), 180, |s| {
        s.len() == 5 && s.is_disjoint(&before)
    });
    eprintln!("rollout restart: data plane {lag:?} after the slice");
    assert!(lag < Duration::from_secs(1), "rollout restart: {lag:?}");
    kubectl(
        &lab,
        &["rollout", "status", "deploy/myapp", "--timeout=120s"],
    );
    let names: BTreeSet<String> = pods(&lab, "app=myapp").into_iter().map(|p| p.0).collect();
    let mut seen = BTreeSet::new();
    eventually("every new pod answering through the Service", 30, || {
        seen.extend(who(&lab, &lab.node_ns("n2"), &addr));
        seen == names
    });

    source_address_rows(&lab);

    // kubelet frozen on n3: its node Lease goes unrenewed, and doctor on
    // n3 (run on the node itself: `kubectl exec` would need that very
    // kubelet) names it before the node controller marks n3 NotReady.
    let doctor = || {
        let o = tweed(&["lab", "doctor", "--name", &lab.name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["findings"].as_array().cloned().unwrap_or_default()
    };
    assert_eq!(doctor(), Vec::<serde_json::Value>::new());
    ok(&[
        "lab",
        "fault",
        "inject",
        "lease-expiring",
        "--node",
        "n3",
        "--name",
        &lab.name,
    ]);
    let mut found = Vec::new();
    eventually("doctor to name n3's unrenewed Lease", 40, || {
        found = doctor();
        !found.is_empty()
    });
    ok(&["lab", "fault", "clear", "--name", &lab.name]);
    for f in &found {
        assert_eq!(
            (f["fault"].as_str(), f["node"].as_str()),
            (Some("lease-expiring"), Some("n3")),
            "{found:#?}"
        );
        assert!(
            f["summary"]
                .as_str()
                .unwrap()
                .starts_with("kubelet has not renewed"),
            "{f:#}"
        );
    }
    eventually("no findings once kubelet runs again", 40, || {
        doctor().is_empty()
    });
}

/// Wait for the DaemonSet's rollout to finish.
fn rolled(lab: &LabGuard) {
    kubectl(
        lab,
        &[
            "-n",
            "tweed-system",
            "rollout",
            "status",
            "ds/tweed",
            "--timeout=90s",
        ],
    );
}

#[test]
fn the_daemonset_installs_tweed_and_rolls_without_breaking_connections() {
    if !have_kubelets("the_daemonset_installs_tweed_and_rolls_without_breaking_connections") {
        return;
    }
    let topo = format!(
        "kubelet:\n  images: [{}]\n  agent: daemonset\nnodes: [{{name: n1}}, {{name: n2}}]\n",
        lab_image()
    );
    let lab = LabGuard::up("kubeletds", &topo);
    let ds = ["-n", "tweed-system", "get", "ds", "tweed"];
    assert_eq!(jsonpath(&lab, &ds, "{.status.numberReady}"), "2");
    for n in ["n1", "n2"] {
        // The agent pod wrote the conflist (atomically, once ready) and
        // installed its plugin where the runtime looks.
        assert!(lab
            .dir
            .join(format!("nodes/{n}/net.d/10-tweed.conflist"))
            .exists());
        // ... and it needs nothing of the host's (a static build: hosts
        // may have an older libc than the image).
        let plugin = lab.dir.join(format!("nodes/{n}/k/opt/cni/bin/tweed"));
        let empty = tempdir(&format!("static-{n}"));
        std::fs::copy(&plugin, empty.join("tweed")).unwrap();
        let o = Command::new("chroot")
            .arg(&empty)
            .args(["/tweed", "--version"])
            .output()
            .unwrap();
        std::fs::remove_dir_all(&empty).unwrap();
        assert!(
            o.status.success(),
            "the installed plugin does not run in an empty root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            jsonpath(
                &lab,
                &["get", "node", n],
                "{.status.conditions[?(@.type==\"NetworkUnavailable\")].status}"
            ),
            "False"
        );
    }
    // `tweed status` inside a node finds the agent pod's status.
    let o = ok(&[
        "lab", "exec", "--name", &lab.name, "n1", "--", TWEED, "status", "-o", "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(
        v["subnet"],
        jsonpath(&lab, &["get", "node", "n1"], "{.spec.podCIDR}"),
        "{o}"
    );
    assert!(ok(&["lab", "status", "--name", &lab.name]).contains(" pod "));

    let o = lab.kubectl_stdin(&["apply", "-f", "-"], SEED_001);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    kubectl(
        &lab,
        &["rollout", "status", "deploy/myapp", "--timeout=120s"],
    );
    let svc = jsonpath(&lab, &["get", "svc", "myapp"], "{.spec.clusterIP}");
    let addr = format!("{svc}:80");
    let client = pods(&lab, "app=myapp")[0].0.clone();

    // doctor and trace judge each node by the plan its agent pod wrote
    // (`/run/tweed` in the node's mount namespace, as `kubectl exec` into
    // the agent pod sees it): nothing wrong on a healthy cluster ...
    let lab_doctor = || {
        let o = tweed(&["lab", "doctor", "--name", &lab.name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("lab doctor: {e}: {}", String::from_utf8_lossy(&o.stderr)));
        assert!(v["errors"].as_array().is_none_or(|e| e.is_empty()), "{v:#}");
        v["findings"].as_array().cloned().unwrap_or_default()
    };
    assert_eq!(lab_doctor(), Vec::<serde_json::Value>::new());
    let out = ok(&[
        "lab",
        "trace",
        "--name",
        &lab.name,
        "n1",
        &addr,
        "--verify",
        "--summary",
    ]);
    assert!(out.contains("verify: agrees"), "{out}");
    // ... and the plugin binary missing from the runtime's directory (a
    // new pod on n1 would fail with "failed to find plugin") is named.
    ok(&[
        "lab",
        "fault",
        "inject",
        "cni-plugin-missing",
        "--node",
        "n1",
        "--name",
        &lab.name,
    ]);
    let found = lab_doctor();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        (found[0]["fault"].as_str(), found[0]["node"].as_str()),
        (Some("cni-plugin-missing"), Some("n1")),
        "{found:#?}"
    );
    // The same as an operator runs it on a real cluster: every node's
    // agent pod through kubectl exec, from wherever kubectl works.
    let k8s = std::env::var("TWEED_K8S_BIN")
        .unwrap_or_else(|_| "/var/cache/tweed/kubernetes/v1.20.2/bin".into());
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.state()["cp_ns"].as_str().unwrap(),
            TWEED,
        ])
        .args(["doctor", "--all-nodes", "-o", "json", "--kubectl"])
        .arg(format!("{k8s}/kubectl"))
        .arg("--kubeconfig")
        .arg(lab.dir.join("kube/admin.kubeconfig"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["nodes"].as_array().map(|n| n.len()), Some(2), "{v:#}");
    assert_eq!(v["findings"], serde_json::json!(found), "{v:#}");
    ok(&["lab", "fault", "clear", "--name", &lab.name]);
    assert_eq!(lab_doctor(), Vec::<serde_json::Value>::new());

    // A long-lived connection pod -> Service, across an image change and a
    // rollout restart of the DaemonSet.
    let hold = Command::new(TWEED)
        .args(["lab", "kubectl", "--name", &lab.name, "--"])
        .args(["exec", &client, "--", "tweed", "probe", "hold", &addr])
        .args([
            "--interval-ms",
            "100",
            "--duration",
            "600",
            "--timeout",
            "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the held connection to be established", 15, || {
        kubectl(
            &lab,
            &["exec", &client, "--", "ss", "-Htn", "state", "established"],
        )
        .contains(&addr)
    });
    let t = Instant::now();
    let retagged =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lab-kubelet-0.1.1.oci.tar");
    build_image(&["--tag", "tweed:0.1.1"], &retagged);
    ok(&[
        "lab",
        "image-import",
        retagged.to_str().unwrap(),
        "--name",
        &lab.name,
    ]);
    kubectl(
        &lab,
        &[
            "-n",
            "tweed-system",
            "set",
            "image",
            "ds/tweed",
            "agent=tweed:0.1.1",
        ],
    );
    rolled(&lab);
    kubectl(
        &lab,
        &["-n", "tweed-system", "rollout", "restart", "ds/tweed"],
    );
    rolled(&lab);
    eprintln!("both rolls took {:?}", t.elapsed());
    let images = jsonpath(
        &lab,
        &[
            "-n",
            "tweed-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=tweed",
        ],
        "{.items[*].spec.containers[0].image}",
    );
    assert_eq!(images, "tweed:0.1.1 tweed:0.1.1");
    // The hold ends (non-zero) at its first request that takes over 3 s:
    // still running means every request went through during both rolls.
    let mut hold = hold;
    if let Some(status) = hold.try_wait().unwrap() {
        let out = hold.wait_with_output().unwrap();
        panic!(
            "the held connection broke while the DaemonSet rolled ({status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = hold.kill();
    let _ = hold.wait();
}

#[test]
fn the_daemonsets_agents_run_bird_and_a_rollout_keeps_the_routes() {
    let test = "the_daemonsets_agents_run_bird_and_a_rollout_keeps_the_routes";
    if !have_kubelets(test) {
        return;
    }
    // BGP in the ConfigMap's cluster config: the node-to-node mesh, run
    // by the BIRD in each agent pod (the image carries bird2).
    let topo = format!(
        "kubelet:\n  images: [{}]\n  agent: daemonset\ncluster: {{bgp: {{holdTime: 9}}}}\nnodes: [{{name: n1}}, {{name: n2}}]\n",
        lab_image()
    );
    let lab = LabGuard::up("kubeletbgp", &topo);
    let status = |n: &str| -> serde_json::Value {
        let o = tweed(&[
            "lab", "exec", "--name", &lab.name, n, "--", TWEED, "status", "-o", "json",
        ]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    let established = |n: &str| {
        let v = status(n);
        let ps = v["bgp"]["peers"].as_array().cloned().unwrap_or_default();
        ps.len() == 1 && ps[0]["diagnosis"] == "established"
    };
    eventually(
        "each agent pod's BIRD Established with the other node",
        90,
        || established("n1") && established("n2"),
    );
    let sub1 = jsonpath(&lab, &["get", "node", "n1"], "{.spec.podCIDR}");
    let learnt = |n: &str| lab.exec_ok(&lab.node_ns(n), &["ip", "route", "show", "table", "7745"]);
    eventually("n2 to learn n1's subnet", 30, || {
        learnt("n2").contains(&format!("{sub1} via "))
    });
    // BIRD's pid file, as n's agent pod sees it (`/run/tweed` is a
    // hostPath in the node's own mount namespace).
    let tlab = tweed_lab::Lab::new(&lab.name).unwrap();
    let bird_pid = |n: &str| -> String {
        let Ok(pod) = tlab.state().and_then(|st| tlab.agent_pod(&st, n)) else {
            return String::new();
        };
        let o = tweed(&[
            "lab",
            "kubectl",
            "--name",
            &lab.name,
            "--",
            "-n",
            "tweed-system",
            "exec",
            &pod,
            "--",
            "cat",
            "/run/tweed/bird/bird.pid",
        ]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = bird_pid("n1");
    assert!(!before.is_empty(), "no BIRD pid file on n1");

    // A rollout restarts the agent pods, and BIRD dies with its container.
    // Graceful restart keeps n1's subnet at n2 throughout: n1's new BIRD
    // starts in recovery (its pid file is stale) and takes over.
    kubectl(
        &lab,
        &["-n", "tweed-system", "rollout", "restart", "ds/tweed"],
    );
    let mut rollout = Command::new(TWEED)
        .args(["lab", "kubectl", "--name", &lab.name, "--"])
        .args(["-n", "tweed-system", "rollout", "status", "ds/tweed"])
        .arg("--timeout=120s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut checks = 0;
    let done = loop {
        assert!(
            learnt("n2").contains(&format!("{sub1} via ")),
            "n2 lost n1's subnet during the rollout (check {checks}):\n{}",
            learnt("n2")
        );
        checks += 1;
        if let Some(s) = rollout.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(done.success(), "the rollout did not finish");
    eventually("both sessions Established again", 60, || {
        established("n1") && established("n2")
    });
    let after = bird_pid("n1");
    assert!(
        !after.is_empty() && after != before,
        "n1's BIRD was not restarted with its pod ({before} -> {after})"
    );
    assert!(learnt("n2").contains(&format!("{sub1} via ")));
    eprintln!("n2 held n1's subnet through the rollout ({checks} checks)");
}
