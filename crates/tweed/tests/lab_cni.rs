//! Lab end-to-end tests of the CNI plugin, invoked exactly as a runtime
//! invokes it (CNI_* environment, config on stdin) inside a node's
//! namespace, and of the agent's readiness signal to runtimes.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The plugin config a runtime derives from the node's conflist.
fn plugin_conf(lab: &LabGuard, node: &str) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            lab.dir
                .join("nodes")
                .join(node)
                .join("net.d/10-tweed.conflist"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    // Act as a CNI 1.1 runtime: the highest version the conflist offers.
    conf["cniVersion"] = list["cniVersions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    conf
}

/// Invoke the plugin in `node`'s namespace; `env` holds CNI_* overrides
/// (an empty value removes the variable). Returns (success, stdout JSON or Null).
fn cni(lab: &LabGuard, node: &str, env: &[(&str, &str)], stdin: &str) -> (bool, serde_json::Value) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.node_ns(node), TWEED])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in env {
        if !v.is_empty() {
            c.env(k, v);
        }
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
    };
    (out.status.success(), v)
}

fn add_env<'a>(cid: &'a str, netns: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ]
}

fn ipam_files(lab: &LabGuard, node: &str) -> BTreeSet<String> {
    std::fs::read_dir(lab.dir.join("nodes").join(node).join("data/ipam"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything a failed ADD could leave behind on the node.
fn node_snapshot(lab: &LabGuard, node: &str) -> (BTreeSet<String>, String, String) {
    let ns = lab.node_ns(node);
    let links = lab
        .exec_ok(&ns, &["ip", "-o", "link", "show"])
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect::<Vec<_>>()
        .join(",");
    (
        ipam_files(lab, node),
        links,
        lab.exec_ok(&ns, &["ip", "route"]),
    )
}

fn add_netns(name: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip netns add {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    format!("/run/netns/{name}")
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_del_frees_them_all() {
    let lab = LabGuard::up("cni50", &topology(&["n1"], &[], ""));
    let conf = plugin_conf(&lab, "n1").to_string();
    let subnet: ipnet::Ipv4Net = lab.node_subnet("n1").parse().unwrap();
    let netns: Vec<String> = (0..50)
        .map(|i| add_netns(&format!("tw-cni50_c-{i}")))
        .collect();
    let results: Vec<(bool, serde_json::Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = netns
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (lab, conf) = (&lab, &conf);
                s.spawn(move || cni(lab, "n1", &add_env(&format!("c{i}"), ns), conf))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = BTreeSet::new();
    for (i, (ok, v)) in results.iter().enumerate() {
        assert!(ok, "ADD c{i} failed: {v}");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][1]["sandbox"], netns[i].as_str());
        let ip: Ipv4Addr = v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .parse()
            .unwrap();
        assert!(
            subnet.contains(&ip) && ip != subnet.network() && ip != subnet.broadcast(),
            "{ip} outside {subnet}"
        );
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 50, "addresses were handed out twice");
    assert_eq!(ipam_files(&lab, "n1").len(), 50);
    // Each pod really has its address, and the node reaches it.
    let ip7 = results[7].1["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    let addr = lab.exec_ok("tw-cni50_c-7", &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip7}/32")), "{addr}");
    lab.exec_ok(&lab.node_ns("n1"), &["ping", "-c1", "-W2", &ip7]);

    std::thread::scope(|s| {
        for (i, ns) in netns.iter().enumerate() {
            let (lab, conf) = (&lab, &conf);
            s.spawn(move || {
                let (ok, v) = cni(
                    lab,
                    "n1",
                    &[
                        ("CNI_COMMAND", "DEL"),
                        ("CNI_CONTAINERID", &format!("c{i}")),
                        ("CNI_NETNS", ns),
                        ("CNI_IFNAME", "eth0"),
                    ],
                    conf,
                );
                assert!(ok, "DEL c{i} failed: {v}");
            });
        }
    });
    assert!(
        ipam_files(&lab, "n1").is_empty(),
        "DEL left reservations: {:?}",
        ipam_files(&lab, "n1")
    );
    let links = lab.exec_ok(
        &lab.node_ns("n1"),
        &["ip", "-o", "link", "show", "type", "veth"],
    );
    assert!(!links.contains(": tw"), "DEL left host veths: {links}");
    assert!(
        !lab.exec_ok(&lab.node_ns("n1"), &["ip", "route"])
            .contains("dev tw"),
        "DEL left host routes"
    );
    // DEL again, and DEL of something never added, both succeed.
    let (ok, _) = cni(
        &lab,
        "n1",
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c3"),
            ("CNI_NETNS", &netns[3]),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    );
    assert!(ok);
    let (ok, _) = cni(
        &lab,
        "n1",
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "never"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    );
    assert!(ok);
}

#[test]
fn malformed_inputs_get_their_error_codes_and_leave_nothing_behind() {
    let lab = LabGuard::up("cnibad", &topology(&["n1"], &[], ""));
    let good = plugin_conf(&lab, "n1");
    let ns = add_netns("tw-cnibad_c-x");
    let before = node_snapshot(&lab, "n1");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let mut no_version = good.clone();
    no_version.as_object_mut().unwrap().remove("cniVersion");
    // (what, CNI_* environment, stdin, expected code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64);
    let cases: Vec<Case> = vec![
        (
            "config is not JSON",
            add_env("x1", &ns),
            "{\"cniVersion\": ".into(),
            6,
        ),
        (
            "config is not an object",
            add_env("x1", &ns),
            "[1,2]".into(),
            6,
        ),
        (
            "no cniVersion",
            add_env("x1", &ns),
            no_version.to_string(),
            7,
        ),
        (
            "unknown cniVersion",
            add_env("x1", &ns),
            with("cniVersion", "0.1.0".into()),
            1,
        ),
        (
            "mtu of the wrong type",
            add_env("x1", &ns),
            with("mtu", "big".into()),
            7,
        ),
        (
            "no CNI_CONTAINERID",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", &ns),
                ("CNI_IFNAME", "eth0"),
            ],
            good.to_string(),
            4,
        ),
        (
            "bad CNI_CONTAINERID",
            add_env("x/1", &ns),
            good.to_string(),
            4,
        ),
        (
            "no CNI_NETNS on ADD",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x1"),
                ("CNI_IFNAME", "eth0"),
            ],
            good.to_string(),
            4,
        ),
        (
            "bad CNI_IFNAME",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x1"),
                ("CNI_NETNS", &ns),
                ("CNI_IFNAME", "a-very-long-ifname"),
            ],
            good.to_string(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            vec![
                ("CNI_COMMAND", "FROB"),
                ("CNI_CONTAINERID", "x1"),
                ("CNI_NETNS", &ns),
                ("CNI_IFNAME", "eth0"),
            ],
            good.to_string(),
            4,
        ),
        (
            "netns that does not exist",
            add_env("x1", "/run/netns/tw-cnibad_nope"),
            good.to_string(),
            3,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let (ok, v) = cni(&lab, "n1", &env, &stdin);
        assert!(!ok, "{what}: expected failure, got {v}");
        assert_eq!(v["code"].as_u64(), Some(code), "{what}: {v}");
        assert!(
            !v["msg"].as_str().unwrap_or("").is_empty(),
            "{what}: no message: {v}"
        );
        assert_eq!(
            node_snapshot(&lab, "n1"),
            before,
            "{what} left something behind"
        );
    }
    let pod_links = lab.exec_ok("tw-cnibad_c-x", &["ip", "-o", "link"]);
    assert!(!pod_links.contains("eth0"), "{pod_links}");
}

#[test]
fn exhaustion_check_gc_status_and_version() {
    // A /30 per node: two usable pod addresses.
    let lab = LabGuard::up(
        "cniex",
        &topology(&["n1"], &[], "cluster: {nodeSubnetLen: 30}\n"),
    );
    let conf = plugin_conf(&lab, "n1").to_string();
    let (a, b, c) = (
        add_netns("tw-cniex_c-a"),
        add_netns("tw-cniex_c-b"),
        add_netns("tw-cniex_c-c"),
    );
    assert!(cni(&lab, "n1", &add_env("a", &a), &conf).0);
    assert!(cni(&lab, "n1", &add_env("b", &b), &conf).0);
    let before = node_snapshot(&lab, "n1");
    let (ok, v) = cni(&lab, "n1", &add_env("c", &c), &conf);
    assert!(!ok);
    assert!(v["code"].as_u64().unwrap() >= 100, "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains(&lab.node_subnet("n1")),
        "{v}"
    );
    assert_eq!(
        node_snapshot(&lab, "n1"),
        before,
        "a failed ADD left something behind"
    );
    assert!(!lab
        .exec_ok("tw-cniex_c-c", &["ip", "-o", "link"])
        .contains("eth0"));

    // CHECK passes on a healthy attachment and names what is broken otherwise.
    let check = |cid: &str, ns: &str| {
        cni(
            &lab,
            "n1",
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", ns),
                ("CNI_IFNAME", "eth0"),
            ],
            &conf,
        )
    };
    assert!(check("a", &a).0);
    let ip_a = std::fs::read_dir(lab.dir.join("nodes/n1/data/ipam"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| {
            n.parse::<Ipv4Addr>().is_ok()
                && std::fs::read_to_string(lab.dir.join("nodes/n1/data/ipam").join(n))
                    .unwrap()
                    .starts_with("a\n")
        })
        .unwrap();
    lab.exec_ok(&lab.node_ns("n1"), &["ip", "route", "del", &ip_a]);
    let (ok, v) = check("a", &a);
    assert!(
        !ok && v["msg"].as_str().unwrap().contains("host route"),
        "{v}"
    );
    let (ok, v) = check("zz", &a);
    assert!(!ok && v["code"] == 3, "{v}");

    // GC keeps what is listed as valid and frees the rest.
    let mut gc = plugin_conf(&lab, "n1");
    gc["cni.dev/valid-attachments"] = serde_json::json!([{"containerID": "b", "ifname": "eth0"}]);
    let (ok, v) = cni(&lab, "n1", &[("CNI_COMMAND", "GC")], &gc.to_string());
    assert!(ok, "{v}");
    assert_eq!(ipam_files(&lab, "n1").len(), 1);
    assert!(check("b", &b).0, "GC broke a valid attachment");
    assert!(!check("a", &a).0);
    // The freed address is usable again.
    assert!(cni(&lab, "n1", &add_env("c", &c), &conf).0);

    // STATUS: ready here; 50 where the agent has written nothing.
    assert!(cni(&lab, "n1", &[("CNI_COMMAND", "STATUS")], &conf).0);
    let mut elsewhere = plugin_conf(&lab, "n1");
    elsewhere["runDir"] = "/run/tweed/lab/cniex/nowhere".into();
    let (ok, v) = cni(
        &lab,
        "n1",
        &[("CNI_COMMAND", "STATUS")],
        &elsewhere.to_string(),
    );
    assert!(!ok && v["code"] == 50, "{v}");
    let (ok, v) = cni(&lab, "n1", &[("CNI_COMMAND", "VERSION")], "");
    assert!(
        ok && v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.4.0".into()),
        "{v}"
    );
    // An older config version gets an older result shape.
    let mut old = plugin_conf(&lab, "n1");
    old["cniVersion"] = "0.4.0".into();
    lab.exec_ok(&lab.node_ns("n1"), &["true"]);
    let (ok, v) = cni(
        &lab,
        "n1",
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    );
    assert!(ok, "{v}");
    let (ok, v) = cni(&lab, "n1", &add_env("c", &c), &old.to_string());
    assert!(
        ok && v["cniVersion"] == "0.4.0" && v["ips"][0]["version"] == "4",
        "{v}"
    );
}

#[test]
fn datastore_outage_keeps_pods_talking_and_conflist_waits_for_readiness() {
    let lab = LabGuard::up(
        "outage",
        &topology(
            &["n1", "n2"],
            &[("a", "n1"), ("b", "n2")],
            "agent: {leaseTtl: 5, resync: 1}\n",
        ),
    );
    let status = |node: &str| {
        std::fs::read_to_string(lab.dir.join("nodes").join(node).join("run/status.json"))
            .unwrap_or_default()
    };
    ok(&["lab", "etcd", "stop", "--name", "outage"]);
    eventually("the agents to notice the datastore is gone", 30, || {
        status("n1").contains("disconnected") && status("n2").contains("disconnected")
    });
    // The data plane stays: pods on both nodes still talk, routes stay.
    assert!(lab.get(&lab.pod_ns("a"), &lab.pod_ip("b")).is_some());
    assert!(lab.routes("n1").contains(&lab.node_subnet("n2")));

    // A node starting from scratch while the datastore is gone: no conflist,
    // and STATUS says the plugin is not ready (50).
    ok(&["lab", "agent", "stop", "n2", "--name", "outage"]);
    let net_d = lab.dir.join("nodes/n2/net.d/10-tweed.conflist");
    let conf = plugin_conf(&lab, "n2");
    std::fs::remove_file(&net_d).unwrap();
    std::fs::remove_file(lab.dir.join("nodes/n2/run/node.json")).unwrap();
    ok(&[
        "lab",
        "agent",
        "start",
        "n2",
        "--name",
        "outage",
        "--no-wait",
    ]);
    let (ok_status, v) = cni(&lab, "n2", &[("CNI_COMMAND", "STATUS")], &conf.to_string());
    assert!(!ok_status && v["code"] == 50, "{v}");
    assert!(
        !net_d.exists(),
        "the conflist appeared before the node could be ready"
    );

    // The datastore returns: everyone reconnects, n2 becomes ready again.
    ok(&["lab", "etcd", "start", "--name", "outage"]);
    eventually("n2's conflist to reappear", 30, || net_d.exists());
    eventually("both agents to reconnect", 30, || {
        status("n1").contains("\"connected\"") && status("n2").contains("\"connected\"")
    });
    assert!(cni(&lab, "n2", &[("CNI_COMMAND", "STATUS")], &conf.to_string()).0);
    assert!(lab.get(&lab.pod_ns("b"), &lab.pod_ip("a")).is_some());
}
