//! Lab end-to-end tests on real-network shapes (seeds 000, 002, 003): L2
//! segments joined by a router, a node reachable only through 1:1 NAT, a
//! node with two NICs. The VXLAN backend must work across all of them.

mod common;
use common::*;

const ROUTED: &str = "
segments:
  - {name: a, cidr: 198.51.100.0/26}
  - {name: b, cidr: 198.51.100.64/26}
  - {name: vpc, cidr: 198.51.100.128/26}
routers:
  - {name: r1, segments: [a, b, vpc]}
nodes:
  - {name: n1, segments: [a]}
  - {name: n2, segments: [b]}
  - {name: n3, segments: [vpc], publicIp: 203.0.113.10}
  - {name: n4, segments: [a, b]}
pods:
  - {name: p1, node: n1}
  - {name: p2, node: n2}
  - {name: p3, node: n3}
  - {name: p4, node: n4}
";

#[test]
fn vxlan_across_a_router_a_nat_and_two_nics() {
    let lab = LabGuard::up("routed", ROUTED);
    let pods = ["p1", "p2", "p3", "p4"];
    for from in pods {
        for to in pods {
            let seen = lab
                .get(&lab.pod_ns(from), &lab.pod_ip(to))
                .unwrap_or_else(|| panic!("{from} cannot reach {to}"));
            assert_eq!(
                (seen["pod"].as_str(), seen["client"].as_str()),
                (Some(to), Some(lab.pod_ip(from).as_str()))
            );
        }
    }
    // Seed 000: n3 knows only its private address; peers send to its public one.
    let fdb = lab.exec_ok(
        &lab.node_ns("n1"),
        &["bridge", "fdb", "show", "dev", "tweed.1"],
    );
    assert!(fdb.contains("dst 203.0.113.10 "), "{fdb}");
    assert!(!fdb.contains("dst 198.51.100.140 "), "{fdb}");
    let local = lab.exec_ok(&lab.node_ns("n3"), &["ip", "-d", "link", "show", "tweed.1"]);
    assert!(local.contains("local 198.51.100.140 "), "{local}");
    // ... and its private address is no way in (so the public one is what works).
    assert!(!lab
        .exec(
            &lab.node_ns("n1"),
            &["ping", "-c1", "-W1", "198.51.100.140"]
        )
        .status
        .success());
    // Seed 002, case 2: the two-NIC node is known by one address and sends from it.
    assert!(fdb.contains("dst 198.51.100.13 "), "{fdb}");
    let local = lab.exec_ok(&lab.node_ns("n4"), &["ip", "-d", "link", "show", "tweed.1"]);
    assert!(local.contains("local 198.51.100.13 "), "{local}");
    // Large transfers work across the router and through the NAT.
    for (from, to) in [("p1", "p3"), ("p3", "p2"), ("p2", "p4")] {
        let n = lab.exec_ok(
            &lab.pod_ns(from),
            &[
                TWEED,
                "probe",
                "http",
                &format!("{}:8080", lab.pod_ip(to)),
                "--path",
                "/bytes/10485760",
                "--count",
                "--timeout",
                "10",
            ],
        );
        assert_eq!(n.trim(), "10485760", "{from} -> {to}");
    }
}

#[test]
fn impossible_network_topologies_are_refused_naming_the_problem() {
    require_lab_prereqs();
    let cases = [
        ("segments: [{name: a, cidr: 198.51.100.0/26}]\nnodes: [{name: n1, segments: [zz]}]\n", "no segment \"zz\""),
        ("segments: [{name: a, cidr: 198.51.100.0/26}]\nnodes: [{name: n1, publicIp: 203.0.113.5}]\n", "needs a router"),
        ("segments: [{name: a, cidr: 198.51.100.0/26}]\nrouters: [{name: r, segments: [a]}]\nnodes: [{name: n1, publicIp: 10.1.1.1}]\n", "publicIp 10.1.1.1 must be in 203.0.113.0/24"),
        ("segments: [{name: a, cidr: 198.51.100.0/25}, {name: b, cidr: 198.51.100.64/26}]\nnodes: [{name: n1}]\n", "overlaps segment a"),
        ("segments: [{name: a, cidr: 198.51.100.0/26}]\nrouters: [{name: r, segments: [a, q]}]\nnodes: [{name: n1}]\n", "must name segments"),
    ];
    for (text, want) in cases {
        let file = std::env::temp_dir().join("tweed-topo-bad-net.yaml");
        std::fs::write(&file, text).unwrap();
        let o = tweed(&[
            "lab",
            "up",
            "-f",
            file.to_str().unwrap(),
            "--name",
            "badnet",
        ]);
        assert!(!o.status.success(), "accepted: {text}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "wanted {want:?} in {err}");
        assert!(!std::path::Path::new("/run/netns/tw-badnet_ul").exists());
    }
}
