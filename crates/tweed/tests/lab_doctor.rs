//! `tweed doctor` against faults made the way they happen in the field
//! (`tweed lab fault inject`): a healthy lab has no finding at all; after
//! an injection doctor names exactly that fault on the right node, with
//! evidence and a fix; after `clear`, nothing again.

mod common;
use common::*;

use std::process::Output;
use std::time::Instant;

fn doctor(lab: &str) -> (Output, serde_json::Value) {
    let o = tweed(&["lab", "doctor", "--name", lab, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor's JSON does not decode ({e}):\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert!(
        v["errors"].as_array().is_none_or(|e| e.is_empty()),
        "doctor could not examine every node: {v:#}"
    );
    (o, v)
}

fn findings(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["findings"].as_array().cloned().unwrap_or_default()
}

/// Inject a fault on node1 and return doctor's findings. Only a route the
/// agent owns may be gone before doctor looks (it repairs them at its
/// resync): then the route must be tweed's again, and it is tried again.
fn inject_and_find(lab: &LabGuard, args: &[&str], fault: &str) -> Vec<serde_json::Value> {
    let name = args[args.iter().position(|a| *a == "--name").unwrap() + 1];
    for attempt in 0..3 {
        ok(args);
        let (mut o, mut v) = doctor(name);
        if fault == "lease-expiring" {
            // Named once half the lease's TTL has passed without a renewal.
            eventually("doctor to name the unrenewed lease", 30, || {
                (o, v) = doctor(name);
                !findings(&v).is_empty()
            });
        }
        let found = findings(&v);
        if !found.is_empty() {
            assert_eq!(o.status.code(), Some(1), "doctor must exit 1 with findings");
            return found;
        }
        assert!(
            fault == "wrong-next-hop" || fault == "not-on-link",
            "doctor missed {fault}: {v:#}"
        );
        let r = lab.routes("node1");
        assert!(
            r.contains("proto 144"),
            "not found and not repaired (attempt {attempt}): {r}"
        );
        ok(&["lab", "fault", "clear", "--name", name]);
    }
    panic!("doctor missed {fault} three times");
}

/// No finding now, and none a moment later (the agents keep converging).
fn assert_healthy(lab: &str, when: &str) {
    let (o, v) = doctor(lab);
    assert!(
        findings(&v).is_empty() && o.status.code() == Some(0),
        "doctor found problems in a healthy lab ({when}): {v:#}"
    );
}

fn topo(extra: &str) -> String {
    topology(
        &["node1", "node2", "node3"],
        &[("pod-1", "node1"), ("pod-2", "node2"), ("pod-3", "node3")],
        extra,
    )
}

#[test]
fn doctor_names_each_injected_fault_on_its_node_and_nothing_else() {
    // VXLAN everywhere, and a resync long enough that the agent rarely
    // repairs the hand-written route before doctor looks (it may; see below).
    let lab = LabGuard::up(
        "doc",
        &topo("cluster: {backend: vxlan}\nagent: {resync: 30}\n"),
    );
    // A Service, so a stale conntrack entry has something to point past.
    lab.apply_ok(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        ports: [{containerPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    );
    let t = Instant::now();
    assert_healthy(&lab.name, "after lab up");
    eprintln!("doctor on 3 healthy nodes: {:?}", t.elapsed());

    let list = ok(&["lab", "fault", "list"]);
    let faults: Vec<(String, bool)> = list
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next().unwrap().to_string();
            (name, w.next() == Some("+peer"))
        })
        .collect();
    assert!(faults.len() >= 11, "{list}");

    for (fault, with_peer) in &faults {
        if matches!(
            fault.as_str(),
            "not-on-link" | "default-route-other-nic" | "cni-plugin-missing"
        ) {
            // Need a peer on another segment (the seed 003 lab below), a
            // second NIC (the seed 002 lab below), or a runtime's plugin
            // directory (lab_kubelet.rs).
            continue;
        }
        let mut args = vec![
            "lab", "fault", "inject", fault, "--node", "node1", "--name", "doc",
        ];
        if *with_peer {
            args.extend(["--peer", "node2"]);
        }
        let found = inject_and_find(&lab, &args, fault);
        for f in &found {
            assert_eq!(
                f["fault"],
                fault.as_str(),
                "after injecting {fault}: {found:#?}"
            );
            assert!(
                !f["evidence"].as_array().unwrap().is_empty()
                    && !f["fix"].as_str().unwrap().is_empty(),
                "{f:#}"
            );
            // On node1, or on a node whose finding is about node1 (a
            // fault between two nodes is seen from both ends).
            let node = f["node"].as_str().unwrap();
            let peer = f["peer"].as_str();
            assert!(
                node == "node1" || peer == Some("node1"),
                "{fault} reported on the wrong node: {f:#}"
            );
            if *with_peer && node == "node1" {
                assert_eq!(peer, Some("node2"), "{f:#}");
            }
        }
        assert!(
            found.iter().any(|f| f["node"] == "node1"),
            "{fault}: nothing on node1 itself: {found:#?}"
        );
        ok(&["lab", "fault", "clear", "--name", "doc"]);
        // The agent may take a moment to notice the datastore is back.
        eventually(&format!("no findings after clearing {fault}"), 30, || {
            findings(&doctor("doc").1).is_empty()
        });
    }
    assert_healthy(&lab.name, "after every fault was cleared");
}

#[test]
fn healthy_labs_of_every_shape_have_no_findings_and_seed_000s_blocked_port_is_found() {
    for (name, file) in [
        ("dr-demo", "demo.yaml"),
        ("dr-s000", "seed-000-nat.yaml"),
        ("dr-s002", "seed-002-two-nics.yaml"),
        ("dr-s003", "seed-003-vlans.yaml"),
        ("dr-routed", "routed-nat.yaml"),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(file);
        let lab = LabGuard::up(name, &std::fs::read_to_string(&path).unwrap());
        assert_healthy(name, file);
        if file == "seed-000-nat.yaml" {
            // Seed 000: the cloud's security group drops UDP 8472 between the
            // master and a worker; the underlay (ping, SSH) still works.
            ok(&[
                "lab",
                "fault",
                "inject",
                "vxlan-blocked",
                "--node",
                "master",
                "--peer",
                "worker1",
                "--name",
                name,
            ]);
            let (_, v) = doctor(name);
            let found = findings(&v);
            assert!(!found.is_empty(), "{v:#}");
            for f in &found {
                assert_eq!(f["fault"], "vxlan-blocked", "{f:#}");
                let pair = (f["node"].as_str().unwrap(), f["peer"].as_str().unwrap());
                assert!(
                    pair == ("master", "worker1") || pair == ("worker1", "master"),
                    "{f:#}"
                );
                let ev = f["evidence"].to_string();
                assert!(ev.contains("underlay address): answered"), "{f:#}");
            }
            ok(&["lab", "fault", "clear", "--name", name]);
            assert_healthy(name, "after clearing vxlan-blocked");
        }
        if file == "seed-002-two-nics.yaml" {
            // Seed 002, case 2's trigger: the default route moved to the
            // second NIC. VXLAN and direct routes pin the source address
            // peers know, so nothing breaks: no finding, and every pod pair
            // still answers as traced.
            ok(&[
                "lab",
                "fault",
                "inject",
                "default-route-other-nic",
                "--node",
                "node2",
                "--name",
                name,
            ]);
            assert_healthy(name, "with node2's default route on its other NIC");
            for (src, dst) in [
                ("pod2", "pod3"),
                ("pod3", "pod2"),
                ("pod2", "pod1"),
                ("pod1", "pod3"),
            ] {
                let out = ok(&[
                    "lab",
                    "trace",
                    "--name",
                    name,
                    src,
                    &format!("{dst}:8080"),
                    "--verify",
                    "--summary",
                ]);
                assert!(out.contains("verify: agrees"), "{out}");
            }
            ok(&["lab", "fault", "clear", "--name", name]);
            // A node with one NIC cannot have it: refused by name.
            let o = tweed(&[
                "lab",
                "fault",
                "inject",
                "default-route-other-nic",
                "--node",
                "node1",
                "--name",
                name,
            ]);
            assert!(
                !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no second NIC")
            );
        }
        if file == "seed-003-vlans.yaml" {
            // Seed 003: host-gw-style direct routing to a node on another
            // VLAN. The agent repairs the route at its resync; doctor must
            // see it before that, or the route must be tweed's again.
            let found = inject_and_find(
                &lab,
                &[
                    "lab",
                    "fault",
                    "inject",
                    "not-on-link",
                    "--node",
                    "node1",
                    "--peer",
                    "node3",
                    "--name",
                    name,
                ],
                "not-on-link",
            );
            for f in &found {
                assert_eq!(
                    (f["fault"].as_str(), f["node"].as_str(), f["peer"].as_str()),
                    (Some("not-on-link"), Some("node1"), Some("node3")),
                    "{f:#}"
                );
            }
            ok(&["lab", "fault", "clear", "--name", name]);
            eventually("no findings after clearing not-on-link", 30, || {
                findings(&doctor(name).1).is_empty()
            });
            // On a segment it shares, the fault cannot be made: refused by name.
            let o = tweed(&[
                "lab",
                "fault",
                "inject",
                "not-on-link",
                "--node",
                "node1",
                "--peer",
                "node2",
                "--name",
                name,
            ]);
            assert!(
                !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("own segment")
            );
        }
        drop(lab);
    }
}

#[test]
fn fault_commands_refuse_bad_input_naming_it() {
    require_lab_prereqs();
    let lab = LabGuard::up("dr-bad", &topology(&["a", "b"], &[], ""));
    let o = tweed(&[
        "lab", "fault", "inject", "no-such", "--node", "a", "--name", &lab.name,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("no fault \"no-such\"")
            && err.contains("vxlan-blocked"),
        "{err}"
    );
    let o = tweed(&[
        "lab",
        "fault",
        "inject",
        "vxlan-blocked",
        "--node",
        "a",
        "--peer",
        "a",
        "--name",
        &lab.name,
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("another node"));
    let o = tweed(&[
        "lab", "fault", "inject", "mtu", "--node", "zz", "--name", &lab.name,
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no node \"zz\""));
    // Nothing was half-made: the lab is still healthy and has no fault recorded.
    assert_healthy(&lab.name, "after refused injections");
    assert!(
        !lab.dir.join("faults.json").exists()
            || std::fs::read_to_string(lab.dir.join("faults.json"))
                .unwrap()
                .trim()
                == "[]"
    );
}
