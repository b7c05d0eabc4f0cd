//! Lab end-to-end tests of the pod network: reachability, agent restarts,
//! lease expiry, self-repair, and teardown.

mod common;
use common::*;

use std::process::Command;

#[test]
fn every_pod_reaches_every_pod_with_its_true_ip_and_nodes_reach_pods() {
    let lab = LabGuard::up(
        "mesh",
        &topology(
            &["n1", "n2", "n3"],
            &[
                ("a1", "n1"),
                ("a2", "n1"),
                ("b1", "n2"),
                ("b2", "n2"),
                ("c1", "n3"),
                ("c2", "n3"),
            ],
            "",
        ),
    );
    let st = lab.state();
    let pods: Vec<String> = st["pods"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(pods.len(), 6);
    // Subnets are distinct /24s of the cluster CIDR.
    let subnets: std::collections::BTreeSet<String> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| lab.node_subnet(n))
        .collect();
    assert_eq!(subnets.len(), 3, "{subnets:?}");
    for s in &subnets {
        assert!(s.starts_with("10.244.") && s.ends_with(".0/24"), "{s}");
    }
    for from in &pods {
        for to in &pods {
            let to_ip = lab.pod_ip(to);
            let seen = lab
                .get(&lab.pod_ns(from), &to_ip)
                .unwrap_or_else(|| panic!("{from} cannot reach {to} at {to_ip}"));
            assert_eq!(seen["pod"], to.as_str());
            assert_eq!(
                seen["client"],
                lab.pod_ip(from).as_str(),
                "{to} saw {from} as {} (NAT between pods?)",
                seen["client"]
            );
        }
    }
    // A process on a node reaches pods on other nodes (and its own).
    for (node, pod) in [("n1", "b1"), ("n1", "c2"), ("n2", "a1"), ("n3", "c1")] {
        let seen = lab
            .get(&lab.node_ns(node), &lab.pod_ip(pod))
            .unwrap_or_else(|| panic!("node {node} cannot reach {pod}"));
        assert_eq!(seen["pod"], pod);
    }
    // UDP too.
    let out = lab.exec_ok(
        &lab.pod_ns("a1"),
        &[TWEED, "probe", "udp", &format!("{}:8080", lab.pod_ip("c1"))],
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (seen["pod"].as_str(), seen["client"].as_str()),
        (Some("c1"), Some(lab.pod_ip("a1").as_str()))
    );
}

#[test]
fn restarting_an_agent_keeps_connections_and_its_subnet() {
    let lab = LabGuard::up(
        "restart",
        &topology(&["n1", "n2"], &[("a", "n1"), ("b", "n2")], ""),
    );
    let subnet = lab.node_subnet("n1");
    // The default backend (auto) settles on a direct path once its probe has
    // answered; compare routes only after that.
    eventually("n1 to settle on the direct path to n2", 20, || {
        std::fs::read_to_string(lab.dir.join("nodes/n1/run/status.json"))
            .is_ok_and(|s| s.contains("\"mode\": \"direct\""))
    });
    let routes_before = lab.routes("n1");
    // One TCP connection from a (on n1) to b (on n2), a request every 100 ms for 8 s.
    let hold = start_hold(
        &lab,
        &lab.pod_ns("a"),
        &format!("{}:8080", lab.pod_ip("b")),
        8,
        3,
    );
    ok(&["lab", "agent", "restart", "n1", "--name", "restart"]);
    finish_hold(hold, "the agent restart", 20);
    assert_eq!(
        lab.node_subnet("n1"),
        subnet,
        "the agent did not get its subnet back"
    );
    assert_eq!(
        lab.routes("n1"),
        routes_before,
        "the restart changed the routes"
    );
    assert!(lab.get(&lab.pod_ns("b"), &lab.pod_ip("a")).is_some());
}

#[test]
fn a_stopped_agent_past_its_lease_frees_its_subnet_and_peers_drop_its_routes() {
    let lab = LabGuard::up(
        "expire",
        &topology(
            &["n1", "n2", "n3"],
            &[],
            "agent: {leaseTtl: 3, resync: 2}\ncluster: {backend: vxlan}\n",
        ),
    );
    let gone = lab.node_subnet("n3");
    eventually("n1 to have a route to n3's subnet", 10, || {
        lab.routes("n1").contains(&gone)
    });
    ok(&["lab", "agent", "stop", "n3", "--name", "expire"]);
    eventually(
        "n1 and n2 to drop n3's route after its lease expired",
        20,
        || !lab.routes("n1").contains(&gone) && !lab.routes("n2").contains(&gone),
    );
    // Its FDB and neighbour entries go too, not only the route.
    let vtep = gone.split('/').next().unwrap().to_string();
    eventually("n1 to drop n3's FDB and neighbour entries", 10, || {
        let fdb = lab.exec_ok(
            &lab.node_ns("n1"),
            &["bridge", "fdb", "show", "dev", "tweed.1"],
        );
        let neigh = lab.exec_ok(
            &lab.node_ns("n1"),
            &["ip", "neigh", "show", "dev", "tweed.1"],
        );
        !fdb.contains("dst 198.51.100.12 ") && !neigh.contains(&format!("{vtep} "))
    });
    let fdb = lab.exec_ok(
        &lab.node_ns("n1"),
        &["bridge", "fdb", "show", "dev", "tweed.1"],
    );
    assert!(
        fdb.contains("dst 198.51.100.11 "),
        "n2's FDB entry went too: {fdb}"
    );
    // The subnet is free in the datastore.
    let keys = lab.exec_ok(
        "tw-expire_cp",
        &[
            "etcdctl",
            "--endpoints",
            "http://198.51.100.2:2379",
            "get",
            "--prefix",
            "--keys-only",
            "/tweed/subnets/",
        ],
    );
    assert!(
        !keys.contains(&gone.replace('/', "-")),
        "{gone} still held: {keys}"
    );
    // n1 and n2 keep each other.
    assert!(lab.routes("n1").contains(&lab.node_subnet("n2")));
    // Coming back, n3 gets a subnet again and peers learn it.
    ok(&["lab", "agent", "start", "n3", "--name", "expire"]);
    let again = lab.node_subnet("n3");
    eventually("n1 to learn n3's subnet again", 10, || {
        lab.routes("n1").contains(&again)
    });
}

#[test]
fn a_route_deleted_by_hand_comes_back_and_foreign_routes_are_left_alone() {
    let lab = LabGuard::up(
        "repair",
        &topology(
            &["n1", "n2"],
            &[("a", "n1"), ("b", "n2")],
            "agent: {leaseTtl: 10, resync: 2}\n",
        ),
    );
    let peer = lab.node_subnet("n2");
    let ns = lab.node_ns("n1");
    // Someone else's route in the node: tweed must not touch it.
    lab.exec_ok(
        &ns,
        &[
            "ip",
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "198.51.100.11",
        ],
    );
    lab.exec_ok(&ns, &["ip", "route", "del", &peer]);
    assert!(!lab.routes("n1").contains(&peer));
    eventually("the deleted route to come back", 15, || {
        lab.routes("n1").contains(&peer)
    });
    assert!(lab.get(&lab.pod_ns("a"), &lab.pod_ip("b")).is_some());
    let all = lab.exec_ok(&ns, &["ip", "route"]);
    assert!(all.contains("203.0.113.0/24 via 198.51.100.11"), "{all}");
}

#[test]
fn lab_down_after_a_crash_leaves_nothing() {
    let lab = LabGuard::up("crash", &topology(&["n1", "n2"], &[("a", "n1")], ""));
    // Simulate a crash: kill every lab process hard, then lose the state file.
    for pid in lab.processes() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    std::fs::remove_file(lab.dir.join("state.json")).unwrap();
    // The guard's drop runs `lab down` and asserts nothing is left.
}

#[test]
fn two_labs_run_side_by_side_and_bad_topologies_are_refused() {
    let a = LabGuard::up("side-a", &topology(&["n1"], &[("p", "n1")], ""));
    let b = LabGuard::up("side-b", &topology(&["n1"], &[("p", "n1")], ""));
    assert!(a.get(&a.pod_ns("p"), &a.pod_ip("p")).is_some());
    assert!(b.get(&b.pod_ns("p"), &b.pod_ip("p")).is_some());
    // Same name twice: refused, and the running lab is untouched.
    let file = std::env::temp_dir().join("tweed-topo-dup.yaml");
    std::fs::write(&file, topology(&["n1"], &[], "")).unwrap();
    let o = tweed(&[
        "lab",
        "up",
        "-f",
        file.to_str().unwrap(),
        "--name",
        "side-a",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already up"));
    assert!(a.get(&a.pod_ns("p"), &a.pod_ip("p")).is_some());
    // An impossible topology: refused before anything is built.
    std::fs::write(
        &file,
        "nodes: [{name: n1}]\npods: [{name: p, node: nowhere}]\n",
    )
    .unwrap();
    let o = tweed(&["lab", "up", "-f", file.to_str().unwrap(), "--name", "bad"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("\"nowhere\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!std::path::Path::new("/run/netns/tw-bad_ul").exists());
}
