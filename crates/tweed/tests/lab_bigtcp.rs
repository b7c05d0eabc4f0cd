//! IPv4 BIG TCP end to end: on an underlay whose NICs allow 192 KiB
//! packets, pods get them while every peer is direct, go back to 64 KiB
//! when a peer moves to VXLAN (and grow again when it comes back), and
//! large transfers work throughout without a retransmit storm. On a plain
//! underlay nothing changes. Sizes are read over netlink (`tweed probe
//! gso`): Debian's iproute2 6.1 neither shows nor sets them (`ip -d link`
//! prints only the IPv6/generic `gso_max_size`).

mod common;
use common::*;

const BIG: u64 = 196_608;
const DEFAULT: u64 = 65_536;
const MB100: usize = 100 << 20;
/// A 100 MB transfer is ~72,000 wire segments; a storm (192 KiB packets
/// fed into a tunnel) retransmits thousands a second. Healthy runs here
/// retransmit a few dozen at most (veth backlogs under a 2-core machine).
const MAX_RETRANS: u64 = 700;

fn topo(big: bool) -> String {
    format!(
        "underlay: {{bigTcp: {big}}}\nnodes: [{{name: n1}}, {{name: n2}}]\npods: [{{name: a, node: n1}}, {{name: b, node: n2}}]\nagent: {{leaseTtl: 10, resync: 1}}\n"
    )
}

/// (gso, gro) IPv4 max sizes of `dev` in namespace `ns`.
fn sizes(lab: &LabGuard, ns: &str, dev: &str) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&lab.exec_ok(ns, &[TWEED, "probe", "gso", dev])).unwrap();
    (
        v["gsoIpv4MaxSize"].as_u64().unwrap(),
        v["groIpv4MaxSize"].as_u64().unwrap(),
    )
}

/// The host end of `pod`'s veth, from the attachment the CNI plugin recorded.
fn host_veth(lab: &LabGuard, node: &str, pod: &str) -> String {
    let pod_ns = format!("/run/netns/{}", lab.pod_ns(pod));
    let dir = lab.dir.join("nodes").join(node).join("run/pods");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        if a["netns"] == pod_ns.as_str() {
            return a["hostVeth"].as_str().unwrap().to_string();
        }
    }
    panic!("no attachment for pod {pod} in {}", dir.display());
}

fn status(lab: &LabGuard, node: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(lab.dir.join("nodes").join(node).join("run/status.json")).unwrap(),
    )
    .unwrap()
}

fn mode(lab: &LabGuard, node: &str) -> String {
    status(lab, node)["peers"][0]["mode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn retrans(lab: &LabGuard, ns: &str) -> u64 {
    let snmp = lab.exec_ok(ns, &["cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// 100 MB each way between a and b; the sender's (the echo server's)
/// retransmissions must stay below [`MAX_RETRANS`].
fn transfers_both_ways(lab: &LabGuard, when: &str) {
    for (client, server) in [("a", "b"), ("b", "a")] {
        let sender = lab.pod_ns(server);
        let before = retrans(lab, &sender);
        let n = lab.transfer(&lab.pod_ns(client), server, MB100);
        assert_eq!(n, MB100, "{server} -> {client} {when}");
        let r = retrans(lab, &sender) - before;
        assert!(
            r < MAX_RETRANS,
            "{server} -> {client} {when}: {r} segments retransmitted for 100 MB (a storm)"
        );
        eprintln!("{server} -> {client} {when}: 100 MB, {r} retransmitted");
    }
}

fn fabric_drops(lab: &LabGuard, drop: bool) {
    ok(&[
        "lab",
        "fabric",
        "--name",
        &lab.name,
        "--drop-pod-traffic",
        &drop.to_string(),
    ]);
}

#[test]
fn big_tcp_underlay_pods_get_large_packets_only_while_every_peer_is_direct() {
    let lab = LabGuard::up("bigtcp", &topo(true));
    // The lab's NICs model BIG TCP.
    assert_eq!(sizes(&lab, &lab.node_ns("n1"), "eth0"), (BIG, BIG));
    assert_eq!(sizes(&lab, "tw-bigtcp_ul", "br0"), (BIG, BIG));
    eventually("n1 and n2 to route each other directly", 15, || {
        mode(&lab, "n1") == "direct" && mode(&lab, "n2") == "direct"
    });
    let (ha, hb) = (host_veth(&lab, "n1", "a"), host_veth(&lab, "n2", "b"));
    eventually("both ends of the pods' veths at 192 KiB", 10, || {
        sizes(&lab, &lab.pod_ns("a"), "eth0") == (BIG, BIG)
            && sizes(&lab, &lab.pod_ns("b"), "eth0") == (BIG, BIG)
            && sizes(&lab, &lab.node_ns("n1"), &ha) == (BIG, BIG)
            && sizes(&lab, &lab.node_ns("n2"), &hb) == (BIG, BIG)
    });
    assert_eq!(status(&lab, "n1")["podGsoMaxSize"], BIG);
    transfers_both_ways(&lab, "direct, 192 KiB");

    // The fabric drops pod-addressed packets: auto moves the peers to VXLAN,
    // and the pods' ends go back to 64 KiB (the host ends keep the
    // underlay's size: only a direct peer sends them large packets).
    fabric_drops(&lab, true);
    eventually("n1 and n2 to move each other to VXLAN", 25, || {
        mode(&lab, "n1") == "vxlan" && mode(&lab, "n2") == "vxlan"
    });
    eventually("the pods' ends at 64 KiB", 10, || {
        sizes(&lab, &lab.pod_ns("a"), "eth0") == (DEFAULT, DEFAULT)
            && sizes(&lab, &lab.pod_ns("b"), "eth0") == (DEFAULT, DEFAULT)
    });
    assert_eq!(sizes(&lab, &lab.node_ns("n1"), &ha), (BIG, BIG));
    assert_eq!(status(&lab, "n1")["podGsoMaxSize"], DEFAULT);
    let vxlan = sizes(&lab, &lab.node_ns("n1"), "tweed.1");
    assert_eq!(
        vxlan,
        (DEFAULT, DEFAULT),
        "never BIG TCP on the VXLAN device"
    );
    transfers_both_ways(&lab, "over VXLAN, 64 KiB");
    // A pod added now gets 64 KiB from the plugin (node.json follows).
    ok(&["lab", "pod", "add", "c", "--node", "n1", "--name", "bigtcp"]);
    assert_eq!(sizes(&lab, &lab.pod_ns("c"), "eth0"), (DEFAULT, DEFAULT));

    // Direct again: every pod grows again, the one added meanwhile too.
    fabric_drops(&lab, false);
    eventually("n1 and n2 to go direct again", 25, || {
        mode(&lab, "n1") == "direct" && mode(&lab, "n2") == "direct"
    });
    eventually("the pods' ends at 192 KiB again", 10, || {
        ["a", "b", "c"]
            .iter()
            .all(|p| sizes(&lab, &lab.pod_ns(p), "eth0") == (BIG, BIG))
    });
    transfers_both_ways(&lab, "direct again");
}

#[test]
fn plain_underlay_pods_keep_64k() {
    let lab = LabGuard::up("bigplain", &topo(false));
    eventually("n1 and n2 to route each other directly", 15, || {
        mode(&lab, "n1") == "direct" && mode(&lab, "n2") == "direct"
    });
    let ha = host_veth(&lab, "n1", "a");
    for (ns, dev) in [
        (lab.node_ns("n1"), "eth0".to_string()),
        (lab.node_ns("n1"), ha),
        (lab.pod_ns("a"), "eth0".to_string()),
        (lab.pod_ns("b"), "eth0".to_string()),
    ] {
        assert_eq!(sizes(&lab, &ns, &dev), (DEFAULT, DEFAULT), "{dev} in {ns}");
    }
    assert_eq!(status(&lab, "n1")["podGsoMaxSize"], DEFAULT);
    transfers_both_ways(&lab, "direct, plain underlay");
}
