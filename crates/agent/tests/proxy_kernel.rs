//! The service proxy against a real kernel, in network namespaces of the
//! test's own (needs root; says SKIPPED otherwise): any sequence of
//! Service and endpoint changes, each applied incrementally (raw netlink
//! element batches), leaves the kernel doing what a fresh full sync of the
//! final state does. "Doing", not "holding": incremental updates keep
//! harmless leftovers (a key in a lower endpoint count's set, slots past
//! the live count) that a fresh sync does not write, so the comparison is
//! of what the rules would do: every key's live endpoints, every other
//! set and map exactly, and the affinity chains' targets.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::process::Command;

use proptest::prelude::*;
use serde_json::Value;
use tweed_agent::Proxy;
use tweed_model::{
    Endpoint, Endpoints, Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
};
use tweed_plan::services::ProxyConfig;

fn root() -> bool {
    let ok = nix::unistd::Uid::effective().is_root()
        && Command::new("nft").arg("--version").output().is_ok();
    if !ok {
        // Straight to stderr: the test harness captures eprintln!.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: proxy_kernel needs root and nft (network namespaces, nf_tables)"
        );
    }
    ok
}

/// Run `f` on a thread inside a fresh network namespace, deleted after.
fn in_netns<T: Send + 'static>(tag: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("tw-proxyk-{tag}-{}-{n}", std::process::id());
    let o = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = format!("/run/netns/{name}");
    let r = std::thread::spawn(move || {
        let fd = std::fs::File::open(path).unwrap();
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join();
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    r.unwrap()
}

fn cfg() -> ProxyConfig {
    ProxyConfig {
        node: "n1".into(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        node_subnet: "10.244.1.0/28".parse().unwrap(),
    }
}

/// Service `i` in one of a few kinds kube-proxy treats differently.
fn service(i: u8, kind: u8) -> Service {
    let (t, np) = match kind % 5 {
        1 | 3 => (ServiceType::NodePort, Some(30000 + u16::from(i))),
        _ => (ServiceType::ClusterIP, None),
    };
    Service {
        namespace: "default".into(),
        name: format!("s{i}"),
        service_type: t,
        cluster_ip: Some(format!("10.96.0.{}", 10 + i).parse().unwrap()),
        ports: vec![ServicePort {
            name: String::new(),
            protocol: if kind % 5 == 4 {
                Protocol::UDP
            } else {
                Protocol::TCP
            },
            port: 80,
            target_port: Some(TargetPort::Number(8080)),
            node_port: np,
        }],
        external_ips: if kind % 5 == 4 {
            vec![format!("203.0.113.{}", 10 + i).parse().unwrap()]
        } else {
            vec![]
        },
        load_balancer_ips: vec![],
        load_balancer_source_ranges: Vec::new(),
        health_check_node_port: None,
        affinity_timeout: (kind % 5 == 2).then_some(60),
        external_traffic_policy: if kind % 5 == 3 {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        },
        internal_traffic_policy: TrafficPolicy::Cluster,
        selector: BTreeMap::new(),
    }
}

/// `n` endpoints of service `i`, every third on another node, the first
/// `unready` of them not ready.
fn endpoints(i: u8, n: u8, unready: u8) -> Endpoints {
    Endpoints {
        namespace: "default".into(),
        name: format!("s{i}"),
        endpoints: (0..n)
            .map(|j| Endpoint {
                ip: format!("10.244.{}.{}", 1 + j % 3, 2 + j).parse().unwrap(),
                node: if j % 3 == 0 {
                    "n1".into()
                } else {
                    format!("n{}", 2 + j % 2)
                },
                ports: [(String::new(), 8080)].into(),
                ready: j >= unready,
                serving: true,
                terminating: j < unready,
                pod: String::new(),
            })
            .collect(),
    }
}

#[derive(Debug, Clone)]
enum Change {
    Service(u8, u8),
    NoService(u8),
    Endpoints(u8, u8, u8),
    NoEndpoints(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0u8..4, 0u8..5).prop_map(|(i, k)| Change::Service(i, k)),
        (0u8..4).prop_map(Change::NoService),
        (0u8..4, 0u8..40, 0u8..3).prop_map(|(i, n, u)| Change::Endpoints(i, n, u)),
        (0u8..4).prop_map(Change::NoEndpoints),
    ]
}

fn id(i: u8) -> String {
    format!("default/s{i}")
}

/// nft's JSON for one element (or key, or value) as text.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(kv) if kv.len() == 2 => format!("{} : {}", text(&kv[0]), text(&kv[1])),
        Value::Object(o) => {
            if let Some(c) = o.get("concat") {
                c.as_array()
                    .unwrap()
                    .iter()
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(" . ")
            } else if let Some(g) = o.get("goto") {
                format!("goto {}", g["target"].as_str().unwrap())
            } else if let Some(e) = o.get("elem") {
                text(&e["val"])
            } else {
                v.to_string()
            }
        }
        _ => v.to_string(),
    }
}

/// What tweed's table does, from `nft -j list table ip tweed`.
fn behaviour() -> BTreeMap<String, BTreeSet<String>> {
    let o = Command::new("nft")
        .args(["-j", "list", "table", "ip", "tweed"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        for kind in ["set", "map"] {
            if let Some(s) = item.get(kind) {
                let elems = s["elem"].as_array().cloned().unwrap_or_default();
                sets.insert(
                    s["name"].as_str().unwrap().to_string(),
                    elems.iter().map(text).collect(),
                );
            }
        }
        if let Some(r) = item.get("rule") {
            chains
                .entry(r["chain"].as_str().unwrap().to_string())
                .or_default()
                .push(r["expr"].to_string());
        }
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Load-balanced keys: the highest K whose set holds the key, then the
    // endpoints in slots 0..K (order aside: a fresh sync numbers afresh).
    for (all, per_k, slots, key_of) in [
        ("lb-all", "lb", "be", 0usize),
        ("np-all", "np", "npbe", 1usize),
    ] {
        for key in sets.get(all).cloned().unwrap_or_default() {
            let parts: Vec<&str> = key.split(" . ").collect();
            let (proto, k_key) = if key_of == 0 {
                (parts[1], format!("{} . {}", parts[0], parts[2]))
            } else {
                (parts[0], parts[1].to_string())
            };
            let k = sets
                .iter()
                .filter_map(|(n, els)| {
                    let k: u32 = n.strip_prefix(&format!("{per_k}-{proto}-"))?.parse().ok()?;
                    els.contains(&k_key).then_some(k)
                })
                .max()
                .unwrap_or(0);
            let map = sets
                .get(&format!("{slots}-{proto}"))
                .cloned()
                .unwrap_or_default();
            let backends: Vec<String> = (0..k)
                .map(|slot| {
                    let prefix = format!("{k_key} . {slot} : ");
                    map.iter()
                        .find_map(|e| e.strip_prefix(&prefix).map(str::to_string))
                        .unwrap_or_else(|| format!("slot {slot} EMPTY"))
                })
                .collect();
            out.insert(
                format!("{all} {key}"),
                backends.into_iter().collect::<BTreeSet<_>>(),
            );
        }
    }
    // Every other set and map exactly (the affinity map points at chains
    // named by key and timeout, the same in both).
    for (n, els) in &sets {
        let lb_k = ["lb-", "np-", "be-", "npbe-"].iter().any(|p| {
            n.strip_prefix(p)
                .is_some_and(|r| ["tcp", "udp", "sctp"].iter().any(|pr| r.starts_with(pr)))
        });
        if !lb_k && !n.starts_with("aff-") && n != "lb-all" && n != "np-all" {
            out.insert(format!("set {n}"), els.clone());
        }
    }
    // Affinity chains: where they send (their DNAT targets).
    for (c, rules) in chains.iter().filter(|(c, _)| c.starts_with("aff-")) {
        let targets: BTreeSet<String> = rules
            .iter()
            .filter(|r| r.contains("\"dnat\""))
            .cloned()
            .collect();
        if !targets.is_empty() {
            out.insert(format!("chain {c}"), targets);
        }
    }
    out
}

/// What the rules do, by key; the final Services and endpoints.
type Outcome = (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, Service>,
    BTreeMap<String, Endpoints>,
);

/// Apply `changes` one by one, flushing after each; the final model.
fn incremental(changes: Vec<Change>) -> Outcome {
    let dir = std::env::temp_dir().join(format!("tw-proxyk-{}", std::process::id()));
    let mut p = Proxy::new(cfg(), dir);
    p.full_sync().unwrap();
    let (mut svcs, mut eps) = (BTreeMap::new(), BTreeMap::new());
    for c in changes {
        match c {
            Change::Service(i, k) => {
                svcs.insert(id(i), service(i, k));
                p.set_service(id(i), Some(service(i, k)));
            }
            Change::NoService(i) => {
                svcs.remove(&id(i));
                p.set_service(id(i), None);
            }
            Change::Endpoints(i, n, u) => {
                eps.insert(id(i), endpoints(i, n, u));
                p.set_endpoints(id(i), Some(endpoints(i, n, u)));
            }
            Change::NoEndpoints(i) => {
                eps.remove(&id(i));
                p.set_endpoints(id(i), None);
            }
        }
        p.flush().unwrap();
    }
    (behaviour(), svcs, eps)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn incremental_netlink_updates_do_what_a_fresh_full_sync_does(
        changes in proptest::collection::vec(change(), 1..14)
    ) {
        if !root() {
            return Ok(());
        }
        let (got, svcs, eps) = in_netns("inc", move || incremental(changes));
        let want = in_netns("full", move || {
            let dir = std::env::temp_dir().join(format!("tw-proxyk-{}", std::process::id()));
            let mut p = Proxy::new(cfg(), dir);
            p.load(svcs, eps);
            p.full_sync().unwrap();
            behaviour()
        });
        prop_assert_eq!(got, want);
    }
}

/// A full sync over a table that already holds a ruleset keeps the table
/// (no moment without it: nothing is refused while it runs), refills it,
/// and removes what the new state no longer has.
#[test]
fn a_full_sync_refills_the_table_it_finds() {
    if !root() {
        return;
    }
    in_netns("refill", || {
        let dir = std::env::temp_dir().join(format!("tw-proxyk-{}", std::process::id()));
        let mut p = Proxy::new(cfg(), dir.clone());
        let mut svcs = BTreeMap::new();
        let mut eps = BTreeMap::new();
        for i in 0..3 {
            svcs.insert(id(i), service(i, 2));
            eps.insert(id(i), endpoints(i, 40, 0));
        }
        p.load(svcs.clone(), eps.clone());
        p.full_sync().unwrap();
        let handle = |what: &str| -> Option<u64> {
            let o = Command::new("nft")
                .args(["-a", "-j", "list", "table", "ip", "tweed"])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            v["nftables"].as_array()?.iter().find_map(|i| {
                (i["table"]["name"] == what)
                    .then(|| i["table"]["handle"].as_u64())
                    .flatten()
            })
        };
        let before = handle("tweed").unwrap();
        // Fewer services, no affinity, fewer endpoints: a fresh agent's sync.
        svcs.remove(&id(2));
        svcs.insert(id(1), service(1, 0));
        eps.insert(id(0), endpoints(0, 3, 0));
        let mut q = Proxy::new(cfg(), dir);
        q.load(svcs.clone(), eps.clone());
        q.full_sync().unwrap();
        assert_eq!(
            handle("tweed"),
            Some(before),
            "the table was replaced, not refilled"
        );
        let got = (behaviour(), objects());
        // The same as a sync into an empty kernel, down to the objects: the
        // affinity chains and sets of the services that lost it are gone.
        let want = in_netns("refill-fresh", move || {
            let dir = std::env::temp_dir().join(format!("tw-proxyk-{}", std::process::id()));
            let mut p = Proxy::new(cfg(), dir);
            p.load(svcs, eps);
            p.full_sync().unwrap();
            (behaviour(), objects())
        });
        assert_eq!(got, want);
    });
}

/// The names of tweed's sets, maps and chains.
fn objects() -> BTreeSet<String> {
    let o = Command::new("nft")
        .args(["-t", "-j", "list", "table", "ip", "tweed"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| {
            ["set", "map", "chain"]
                .iter()
                .find_map(|k| Some(format!("{k} {}", i.get(*k)?["name"].as_str()?)))
        })
        .collect()
}
