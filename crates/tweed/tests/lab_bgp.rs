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
            "cluster: {bgp: {holdTime: 9}}\nagent: {leaseTtl: 10, resync: 2}\n",
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
}
