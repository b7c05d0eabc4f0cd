//! BGP end to end, with the real speaker (Debian's bird2) on every node:
//! the node-to-node mesh on one segment, what each node learns and holds,
//! the speaker surviving an agent restart, BGP turned off, and a broken
//! session named by `tweed status` and `tweed doctor`. Without bird2 the
//! tests say so and count as skipped.

mod common;
use common::*;

fn have_bird(test: &str) -> bool {
    let found = std::process::Command::new("bird")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        skip(
            test,
            "no `bird` (Debian's bird2): run scripts/install-deps.sh",
        );
    }
    found
}

fn status(lab: &LabGuard, node: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(lab.dir.join("nodes").join(node).join("run/status.json")).unwrap(),
    )
    .unwrap_or_default()
}

/// Each BGP session of `node`: (address, diagnosis).
fn sessions(lab: &LabGuard, node: &str) -> Vec<(String, String)> {
    status(lab, node)["bgp"]["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["address"].as_str().unwrap_or_default().to_string(),
                        p["diagnosis"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn bird_pid(lab: &LabGuard, node: &str) -> Option<u32> {
    let p = lab.dir.join("nodes").join(node).join("run/bird/bird.pid");
    let pid: u32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim() == "bird")
        .then_some(pid)
}

/// The kernel's learnt-routes table on `node` (BIRD writes it).
fn learnt(lab: &LabGuard, node: &str) -> String {
    lab.exec_ok(
        &lab.node_ns(node),
        &["ip", "route", "show", "table", "7745"],
    )
}

/// Wait (15 s at most) for `cond`, which must come true within 4 s of
/// `t0`: a failure BFD detects, not the 9 s hold time. Prints the time.
fn within(t0: std::time::Instant, what: &str, why: &str, cond: impl FnMut() -> bool) {
    eventually(what, 15, cond);
    let took = t0.elapsed();
    eprintln!("{what}: after {took:?}");
    assert!(
        took < std::time::Duration::from_secs(4),
        "{what} took {took:?}: {why}"
    );
}

const NODES: [&str; 3] = ["n1", "n2", "n3"];

#[test]
fn a_mesh_on_one_segment_learns_every_subnet_and_survives_an_agent_restart() {
    if !have_bird("lab_bgp::mesh") {
        return;
    }
    let lab = LabGuard::up(
        "bgpmesh",
        &topology(
            &NODES,
            &[("a", "n1"), ("b", "n2"), ("c", "n3")],
            "cluster: {bgp: {holdTime: 9, bfd: {interval: 200, multiplier: 4}}}\nagent: {leaseTtl: 10, resync: 2}\n",
        ),
    );
    eventually("every mesh session Established", 60, || {
        NODES.iter().all(|n| {
            let s = sessions(&lab, n);
            s.len() == 2 && s.iter().all(|(_, d)| d == "established")
        })
    });
    let subnets: Vec<String> = NODES.iter().map(|n| lab.node_subnet(n)).collect();
    eventually(
        "each node's table 7745 to hold every other node's subnet",
        30,
        || {
            NODES.iter().enumerate().all(|(i, n)| {
                let t = learnt(&lab, n);
                subnets
                    .iter()
                    .enumerate()
                    .all(|(j, s)| (i == j) != t.contains(&format!("{s} via ")))
            })
        },
    );
    // Each node holds a blackhole for the subnet it announces, and the
    // learnt table is BIRD's, apart from the main table's pod routes.
    for (n, s) in NODES.iter().zip(&subnets) {
        let main = lab.exec_ok(&lab.node_ns(n), &["ip", "route", "show", "table", "main"]);
        assert!(
            main.contains(&format!("blackhole {s} proto 144")),
            "{n}: no blackhole for {s}:\n{main}"
        );
        assert!(learnt(&lab, n).contains("proto bird"), "{n}");
    }
    // `tweed status` shows the sessions as calicoctl does.
    let text = lab.exec_ok(&lab.node_ns("n1"), &[TWEED, "status"]);
    assert!(text.contains("BGP: bird running (AS 64512"), "{text}");
    assert!(text.contains("node-to-node mesh n2"), "{text}");
    assert!(text.contains("Established"), "{text}");
    // Pods on one segment stay direct: BGP adds nothing between them.
    assert_eq!(status(&lab, "n1")["peers"][0]["mode"], "direct");

    // An agent restart leaves BIRD (and so the node's routes) alone.
    let before = bird_pid(&lab, "n1").expect("BIRD runs on n1");
    let hold = start_hold(
        &lab,
        &lab.pod_ns("a"),
        &format!("{}:8080", lab.pod_ip("b")),
        8,
        3,
    );
    ok(&["lab", "agent", "restart", "n1", "--name", "bgpmesh"]);
    eventually("n1's new agent to report its sessions", 30, || {
        let s = sessions(&lab, "n1");
        s.len() == 2 && s.iter().all(|(_, d)| d == "established")
    });
    assert_eq!(bird_pid(&lab, "n1"), Some(before), "BIRD was restarted");
    finish_hold(hold, "the agent restart", 20);
    let t = learnt(&lab, "n2");
    assert!(
        t.contains(&format!("{} via ", subnets[0])),
        "n2 lost n1's subnet:\n{t}"
    );

    // BFD between the nodes' BIRDs (iBGP, so multihop BFD): up on every
    // session, shown by `tweed status`.
    eventually("every mesh session's BFD up", 30, || {
        NODES.iter().all(|n| {
            let st = status(&lab, n);
            let ps = st["bgp"]["peers"].as_array().cloned().unwrap_or_default();
            ps.len() == 2 && ps.iter().all(|p| p["bfd"] == "up")
        })
    });
    let text = lab.exec_ok(&lab.node_ns("n1"), &[TWEED, "status"]);
    assert!(text.contains("BFD 200 ms x 4 = 800 ms"), "{text}");
    // n3 dies (its NIC goes down): n1 and n2 drop its subnet after BFD's
    // 0.8 s, not after the 9 s hold time, and n1 says why.
    lab.exec_ok(&lab.node_ns("n3"), &["ip", "link", "set", "eth0", "down"]);
    let t0 = std::time::Instant::now();
    let gone = |n: &str| !learnt(&lab, n).contains(&format!("{} via ", subnets[2]));
    within(
        t0,
        "n1 and n2 to drop n3's subnet",
        "BFD (0.8 s) did not take the sessions down before the hold time (9 s)",
        || gone("n1") && gone("n2"),
    );
    eventually("n1 to name BFD as why n3's session is down", 20, || {
        status(&lab, "n1")["bgp"]["peers"]
            .as_array()
            .is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["peerNode"] == "n3" && p["diagnosis"] == "bfd-down")
            })
    });

    // BGP taken out of the cluster config, as an operator does it (edit
    // the stored config, restart the agents; in Kubernetes the ConfigMap
    // and a DaemonSet rollout): n1 stops BIRD, drops its blackhole and
    // BGP status, and its pods still reach n2's (same segment: direct).
    let st = lab.state();
    let cp_ns = st["cp_ns"].as_str().unwrap().to_string();
    let etcd = format!("http://{}:2379", st["cp_ip"].as_str().unwrap());
    let etcdctl = |args: &[&str]| {
        let mut a = vec!["etcdctl", "--endpoints", &etcd];
        a.extend_from_slice(args);
        lab.exec_ok(&cp_ns, &a)
    };
    let stored = etcdctl(&["get", "/tweed/config", "--print-value-only"]);
    let mut cfg: serde_json::Value = serde_json::from_str(stored.trim()).unwrap();
    assert!(cfg["bgp"].is_object(), "{cfg}");
    cfg.as_object_mut().unwrap().remove("bgp");
    etcdctl(&["put", "/tweed/config", &cfg.to_string()]);
    let bird_n1 = bird_pid(&lab, "n1").expect("BIRD runs on n1");
    ok(&["lab", "agent", "restart", "n1", "--name", "bgpmesh"]);
    eventually("n1's agent to drop BGP from its status", 30, || {
        status(&lab, "n1")["bgp"].is_null() && status(&lab, "n1")["subnet"].is_string()
    });
    eventually("n1's BIRD to be gone", 15, || {
        !std::path::Path::new(&format!("/proc/{bird_n1}")).exists()
    });
    let main = lab.exec_ok(
        &lab.node_ns("n1"),
        &["ip", "route", "show", "table", "main"],
    );
    assert!(
        !main.contains(&format!("blackhole {}", subnets[0])),
        "n1 kept its blackhole:\n{main}"
    );
    assert_eq!(learnt(&lab, "n1").trim(), "", "n1 kept learnt routes");
    eventually("pod a on n1 to reach pod b on n2", 20, || {
        lab.get(&lab.pod_ns("a"), &lab.pod_ip("b")).is_some()
    });
}

fn have_frr(test: &str) -> bool {
    let found = std::path::Path::new("/usr/lib/frr/bgpd").exists();
    if !found {
        skip(
            test,
            "no FRR (/usr/lib/frr/bgpd, Debian's frr): run scripts/install-deps.sh",
        );
    }
    found
}

/// tor-a's address on rack-a in examples/two-racks.yaml.
const TOR_A: &str = "198.51.100.61";
/// tor-b's address on rack-b in examples/two-racks.yaml (the lab numbers
/// routers from the top of a segment, by their place in `routers`).
const TOR_B: &str = "198.51.100.124";

/// Packets tor-a forwarded: (VXLAN, to or from `pod`).
fn tor_a_counts(lab: &LabGuard, ns: &str, pod: &str) -> (u64, u64) {
    let out = lab.exec_ok(ns, &["nft", "list", "table", "inet", "twcount"]);
    let count = |what: &str| -> u64 {
        out.lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "packets")?;
                w.get(i + 1)?.parse::<u64>().ok()
            })
            .sum()
    };
    (count("udp dport 8472"), count(pod))
}

#[test]
fn two_racks_route_pods_natively_through_frr_tors() {
    let test = "lab_bgp::two_racks";
    if !have_bird(test) || !have_frr(test) {
        return;
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/two-racks.yaml"
    ))
    .unwrap();
    // b2 is told its ToR has another AS than it has: its session must fail,
    // be named, and leave b2 on VXLAN while the others go native.
    let topo = example.replace(
        "{name: b2, segments: [rack-b]}",
        &format!("{{name: b2, segments: [rack-b], bgp: {{peers: [\"{TOR_B}:65099\"]}}}}"),
    );
    assert_ne!(topo, example, "the example's b2 line changed");
    // tor-a runs no BFD (a fabric that never enabled it): rack a's
    // sessions stay up without it, and doctor says what that costs.
    let no_bfd = topo.replace("bgp: {asn: 65001, bfd: {}}", "bgp: {asn: 65001}");
    assert_ne!(no_bfd, topo, "the example's tor-a line changed");
    let topo = no_bfd;
    let lab = LabGuard::up("bgpracks", &topo);
    let tlab = tweed_lab::Lab::new("bgpracks").unwrap();

    eventually("a1, a2 and b1 Established with their ToR", 60, || {
        ["a1", "a2", "b1"].iter().all(|n| {
            let s = sessions(&lab, n);
            s.len() == 1 && s[0].1 == "established"
        })
    });
    eventually("b2's session named as a wrong AS", 60, || {
        sessions(&lab, "b2") == [(TOR_B.to_string(), "wrong-asn".to_string())]
    });
    // BFD: up between b1 and tor-b, seen from both ends; down between a1
    // and tor-a, which runs none, and named by doctor on a1 only.
    let b1_ip: std::net::IpAddr = status(&lab, "b1")["bgp"]["routerId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    eventually("BFD between b1 and tor-b up at both ends", 30, || {
        status(&lab, "b1")["bgp"]["peers"][0]["bfd"] == "up"
            && tlab
                .router_bfd_peers("tor-b")
                .is_ok_and(|p| p.contains(&(b1_ip, "up".to_string())))
    });
    let text = lab.exec_ok(&lab.node_ns("b1"), &[TWEED, "status"]);
    assert!(text.contains("BFD 300 ms x 3 = 900 ms"), "{text}");
    let doctor_json = |node: &str| {
        let o = lab.exec(&lab.node_ns(node), &[TWEED, "doctor", "-o", "json"]);
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let doc = doctor_json("a1");
    assert!(
        doc.contains("bfd-not-up")
            && doc.contains(TOR_A)
            && doc.contains("hold time (9 s) instead of 900 ms"),
        "{doc}"
    );
    assert!(!doctor_json("b1").contains("bfd-not-up"));
    let mode = |node: &str, peer: &str| -> String {
        status(&lab, node)["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
            .and_then(|p| p["mode"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    eventually(
        "a1 and b1 to route each other through the fabric",
        60,
        || mode("a1", "b1") == "bgp" && mode("b1", "a1") == "bgp",
    );
    assert_eq!(mode("a1", "a2"), "direct", "same rack stays direct");
    assert_eq!(mode("a1", "b2"), "vxlan", "b2 announces nothing");

    // The wire between a1 and the fabric: no VXLAN for pb1, VXLAN for pb2.
    let tor_a = tlab.router_ns("tor-a");
    let (pa1, pb1) = (lab.pod_ip("pa1"), lab.pod_ip("pb1"));
    lab.exec_ok(
        &tor_a,
        &["nft", &format!("add table inet twcount; add chain inet twcount passing {{ type filter hook forward priority 0; }}; add rule inet twcount passing udp dport 8472 counter; add rule inet twcount passing ip saddr {pb1} counter; add rule inet twcount passing ip daddr {pb1} counter")],
    );
    assert_eq!(lab.transfer(&lab.pod_ns("pa1"), "pb1", 10 << 20), 10 << 20);
    let (vxlan, native) = tor_a_counts(&lab, &tor_a, &pb1);
    assert_eq!(
        vxlan, 0,
        "VXLAN packets crossed tor-a while pa1 and pb1 talked"
    );
    // Counted as the kernel forwards them: GRO'd, up to 64 KiB each.
    assert!(native > 100, "only {native} packets of pb1's crossed tor-a");
    assert_eq!(lab.transfer(&lab.pod_ns("pa1"), "pb2", 4 << 20), 4 << 20);
    let (vxlan, _) = tor_a_counts(&lab, &tor_a, &pb1);
    assert!(
        vxlan > 20,
        "pb2 is behind VXLAN, yet tor-a counted {vxlan} VXLAN packets"
    );

    // The fabric stops carrying pod addresses (tor-a drops them): a1
    // falls back to VXLAN for b1 without breaking a connection in flight,
    // and goes native again once the fabric is mended.
    let fabric = &tor_a;
    // Until a1 notices (its next probe, within a resync and two quick
    // retries) packets are lost: TCP retransmits them, and a request may
    // wait that long.
    let hold = start_hold(&lab, &lab.pod_ns("pa1"), &format!("{pb1}:8080"), 25, 20);
    lab.exec_ok(
        fabric,
        &["nft", "add table ip twdrop; add chain ip twdrop f { type filter hook forward priority 0; }; add rule ip twdrop f ip daddr 10.244.0.0/16 drop"],
    );
    eventually("a1 to move b1 to VXLAN", 30, || mode("a1", "b1") == "vxlan");
    finish_hold(hold, "the fall back from BGP to VXLAN", 50);
    lab.exec_ok(fabric, &["nft", "delete table ip twdrop"]);
    eventually("a1 to route b1 natively again", 30, || {
        mode("a1", "b1") == "bgp"
    });

    // Each end sees the true client: a pod across racks, the outside host.
    let seen = lab.get(&lab.pod_ns("pa1"), &pb1).expect("pa1 -> pb1");
    assert_eq!(seen["client"], pa1.as_str());
    let st = lab.state();
    let ext = &st["hosts"][0];
    let (ext_ns, ext_ip) = (ext["ns"].as_str().unwrap(), ext["ip"].as_str().unwrap());
    let seen = lab
        .get(ext_ns, &pb1)
        .expect("the outside host reaches pb1's own address");
    assert_eq!(
        seen["client"], ext_ip,
        "pb1 saw another address than the host's"
    );

    // A Service's external IP, policy Local, its one endpoint on b1: only
    // b1 announces it, and the outside host reaches it keeping its address.
    lab.apply_ok("apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec:\n  nodeName: b1\n  containers:\n  - name: web\n    ports: [{containerPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  externalIPs: [203.0.113.50]\n  externalTrafficPolicy: Local\n  ports: [{port: 80, targetPort: 8080}]\n");
    let node_ip = |n: &str| -> std::net::Ipv4Addr {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let vip: ipnet::Ipv4Net = "203.0.113.50/32".parse().unwrap();
    let t0 = std::time::Instant::now();
    eventually("core to route 203.0.113.50 through the fabric", 30, || {
        tlab.router_routes("core")
            .unwrap()
            .iter()
            .any(|(n, _)| *n == vip)
    });
    eprintln!(
        "Service IP at the core {:?} after its endpoint",
        t0.elapsed()
    );
    let at_tor_b: Vec<_> = tlab
        .router_routes("tor-b")
        .unwrap()
        .into_iter()
        .filter(|(n, _)| *n == vip)
        .collect();
    assert_eq!(
        at_tor_b,
        [(vip, vec![node_ip("b1")])],
        "only b1 may announce it"
    );
    assert!(
        !tlab
            .router_routes("tor-a")
            .unwrap()
            .iter()
            .any(|(n, h)| *n == vip && h.contains(&node_ip("a1"))),
        "a node without an endpoint announces the Service"
    );
    let o = lab.exec(
        ext_ns,
        &[
            TWEED,
            "probe",
            "http",
            "203.0.113.50:80",
            "--timeout",
            "2",
            "--retry-for",
            "10",
        ],
    );
    assert!(
        o.status.success(),
        "ext -> 203.0.113.50:80: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        seen["client"], ext_ip,
        "policy Local keeps the client's address"
    );
    assert_eq!(seen["pod"], "web");
    // Policy Local keeps traffic from outside on the endpoint's node, but
    // a pod anywhere reaches the address (kube-proxy sends traffic from
    // inside the cluster to every endpoint): pa1 on a1, which has none,
    // gets web, keeping its own address; trace predicts it and agrees.
    let o = lab.exec(
        &lab.pod_ns("pa1"),
        &[TWEED, "probe", "http", "203.0.113.50:80", "--timeout", "2"],
    );
    assert!(
        o.status.success(),
        "pa1 (a1, no endpoint) -> 203.0.113.50:80: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(seen["pod"], "web");
    assert_eq!(seen["client"], lab.pod_ip("pa1"));
    let out = ok(&[
        "lab",
        "trace",
        "--name",
        "bgpracks",
        "pa1",
        "203.0.113.50:80",
        "--verify",
    ]);
    assert!(out.contains("policy Local: from a pod"), "{out}");
    assert!(out.contains("verify: agrees"), "{out}");

    // A LoadBalancer Service, policy Local, on the same pod: an address
    // from the pool, announced by b1 alone, open to the outside host's
    // segment only, and a health check node port on every node.
    lab.apply_ok("apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [198.51.100.192/26]\n  ports: [{port: 80, targetPort: 8080}]\n");
    let st = lab.state();
    let svc = &st["services"]["default/lb"];
    assert_eq!(
        svc["loadBalancerIps"],
        serde_json::json!(["203.0.113.65"]),
        "{svc}"
    );
    let hc = svc["healthCheckNodePort"]
        .as_u64()
        .expect("a health check node port");
    let lbip: ipnet::Ipv4Net = "203.0.113.65/32".parse().unwrap();
    eventually(
        "tor-b to route the load balancer IP to b1 alone",
        30,
        || {
            tlab.router_routes("tor-b")
                .unwrap()
                .contains(&(lbip, vec![node_ip("b1")]))
        },
    );
    let o = lab.exec(
        ext_ns,
        &[
            TWEED,
            "probe",
            "http",
            "203.0.113.65:80",
            "--timeout",
            "2",
            "--retry-for",
            "10",
        ],
    );
    assert!(
        o.status.success(),
        "ext -> 203.0.113.65:80: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        seen["client"], ext_ip,
        "policy Local keeps the client's address"
    );
    // A pod is outside the source ranges: dropped. pb1 shares b1 with the
    // endpoint, and the external IP of the same pod (no ranges) answers it.
    let pb1_ns = lab.pod_ns("pb1");
    let o = lab.exec(
        &pb1_ns,
        &[TWEED, "probe", "http", "203.0.113.65:80", "--timeout", "2"],
    );
    assert!(
        !o.status.success(),
        "pb1 got through loadBalancerSourceRanges"
    );
    // trace predicts that drop from the kernel's `fw` map and chain, and
    // the real connection agrees.
    let out = ok(&[
        "lab",
        "trace",
        "--name",
        "bgpracks",
        "pb1",
        "203.0.113.65:80",
        "--verify",
    ]);
    assert!(
        out.contains("loadBalancerSourceRanges") && out.contains("dropped"),
        "{out}"
    );
    assert!(out.contains("verify: agrees"), "{out}");
    let o = lab.exec(
        &pb1_ns,
        &[TWEED, "probe", "http", "203.0.113.50:80", "--timeout", "2"],
    );
    assert!(
        o.status.success(),
        "pb1 -> the external IP: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The health check: 200 where the endpoint is, 503 elsewhere.
    let code = |node: &str| {
        lab.exec_ok(
            ext_ns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                &format!("http://{}:{hc}/healthz", node_ip(node)),
            ],
        )
    };
    eventually("b1's health check to say 200 and a1's 503", 15, || {
        code("b1") == "200" && code("a1") == "503"
    });

    // The broken session, named by status and doctor.
    let text = lab.exec_ok(&lab.node_ns("b2"), &[TWEED, "status"]);
    assert!(
        text.contains(TOR_B) && text.contains("the peer's AS is not the one configured"),
        "{text}"
    );
    let doc = lab.exec(&lab.node_ns("b2"), &[TWEED, "doctor", "-o", "json"]);
    let doc = String::from_utf8_lossy(&doc.stdout);
    assert!(
        doc.contains("bgp-session-down") && doc.contains(TOR_B),
        "{doc}"
    );
    assert!(doc.contains("answers with another AS than 65099"), "{doc}");

    // An agent restart on b1 while the outside host holds a connection to pb1.
    let before = bird_pid(&lab, "b1").expect("BIRD runs on b1");
    let hold = start_hold(&lab, ext_ns, &format!("{pb1}:8080"), 8, 3);
    ok(&["lab", "agent", "restart", "b1", "--name", "bgpracks"]);
    finish_hold(hold, "b1's agent restart", 20);
    assert_eq!(bird_pid(&lab, "b1"), Some(before), "BIRD was restarted");

    // b1 dies (its NIC goes down): BFD (300 ms x 3) takes its session with
    // tor-b down, and tor-b and the core withdraw its subnet in about a
    // second, not after the 9 s hold time.
    let b1_subnet: ipnet::Ipv4Net = lab.node_subnet("b1").parse().unwrap();
    let has_b1 = |router: &str| {
        tlab.router_routes(router)
            .unwrap()
            .iter()
            .any(|(n, _)| *n == b1_subnet)
    };
    assert!(has_b1("tor-b") && has_b1("core"));
    lab.exec_ok(&lab.node_ns("b1"), &["ip", "link", "set", "eth0", "down"]);
    let t0 = std::time::Instant::now();
    within(
        t0,
        "tor-b and core to withdraw b1's subnet",
        "BFD (0.9 s) did not take the session down before the hold time (9 s)",
        || !has_b1("tor-b") && !has_b1("core"),
    );
    // a1 learns the withdrawal through tor-a and drops its native route to
    // b1 at once (it watches the learnt table), not at its next resync.
    within(
        t0,
        "a1 to stop routing b1 natively",
        "a1 kept its native route to dead b1",
        || mode("a1", "b1") != "bgp",
    );
    // The rest of the fabric is untouched.
    assert!(lab.get(&lab.pod_ns("pa1"), &lab.pod_ip("pa2")).is_some());
    assert!(lab.get(ext_ns, &lab.pod_ip("pa2")).is_some());
}
