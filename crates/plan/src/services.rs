//! Services → nftables, planned per node.
//!
//! The ruleset has a fixed shape; every Service is only set and map
//! elements, so a change to one Service is a handful of element updates and
//! a full sync of 10k Services is one transaction with no per-Service sets
//! (the kernel looks sets up by linear search, so per-Service anonymous
//! sets make a large transaction quadratic). The exception is ClientIP
//! affinity, which gets kube-proxy's per-endpoint dynamic sets and chains.
//!
//! Load balancing: see [`render_full`]; a service key with K backends maps
//! to chain `lb-K`, whose rule does
//! `dnat to ip daddr . meta l4proto . th dport . numgen random mod K map @be`,
//! so each backend has probability exactly 1/K. Node ports work the same
//! with (proto . port) keys, matched on any local address.
//!
//! Each node plans its own view: "Local" traffic policies just mean the
//! node's own endpoints. Masquerade marking follows kube-proxy: sources
//! outside the cluster CIDR reaching a service IP, external traffic under
//! policy Cluster, and hairpin (a pod reaching itself, caught after DNAT
//! by source == destination).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tweed_model::{Endpoints, Protocol, Service, ServiceType, TrafficPolicy};

pub const TABLE: &str = "tweed";
/// kube-proxy's masquerade mark bit.
pub const MASQ_MARK: u32 = 0x4000;
/// Endpoint counts that always have a set and a rule, so common changes
/// never need to touch the ruleset's shape.
pub const PRESET_K: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub node: String,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    /// This node's pod subnet (hairpin pairs are its addresses).
    pub node_subnet: Ipv4Net,
}

/// A flow conntrack may hold towards a backend: (protocol, service IP or
/// None for a node port, port, backend IP or None for "no backend").
pub type Flow = (Protocol, Option<Ipv4Addr>, u16, Option<Ipv4Addr>);

/// One service's share of the ruleset, as nft set and map elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contribution {
    pub sets: BTreeMap<String, BTreeSet<String>>,
    pub maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Sets of this service's own (affinity), by name → definition body.
    pub own_sets: BTreeMap<String, String>,
    /// Chains of this service's own (affinity), by name → rules.
    pub chains: BTreeMap<String, Vec<String>>,
    pub flows: BTreeSet<Flow>,
}

impl Contribution {
    fn set(&mut self, name: impl Into<String>, elem: String) {
        self.sets.entry(name.into()).or_default().insert(elem);
    }
    fn map(&mut self, name: &str, key: String, value: String) {
        self.maps
            .entry(name.to_string())
            .or_default()
            .insert(key, value);
    }
    /// The endpoint counts (K) this contribution uses.
    fn shape(&self) -> Shape {
        let mut s = Shape::default();
        for name in self.sets.keys() {
            let _ = name;
        }
        for (name, els) in &self.maps {
            if name == "lb" || name == "np" {
                s.ks.extend(
                    els.values()
                        .filter_map(|v| {
                            v.strip_prefix("goto lb-")
                                .or_else(|| v.strip_prefix("goto np-"))
                        })
                        .filter_map(|k| k.parse::<usize>().ok()),
                );
            }
        }
        s
    }
}

/// Which per-K sets and rules the ruleset has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub ks: BTreeSet<usize>,
}

impl Shape {
    fn preset() -> Self {
        Shape {
            ks: (1..=PRESET_K).collect(),
        }
    }
}

fn key(ip: Ipv4Addr, p: Protocol, port: u16) -> String {
    format!("{ip} . {} . {port}", p.nft())
}

fn npkey(p: Protocol, port: u16) -> String {
    format!("{} . {port}", p.nft())
}

/// Plan one service on one node.
pub fn plan_service(cfg: &ProxyConfig, svc: &Service, eps: Option<&Endpoints>) -> Contribution {
    let mut c = Contribution::default();
    let Some(cip) = svc.cluster_ip else { return c };
    let ready: Vec<_> = eps
        .map(|e| e.endpoints.iter().filter(|e| e.ready).collect())
        .unwrap_or_default();
    for p in &svc.ports {
        let mut all: Vec<(Ipv4Addr, u16)> = Vec::new();
        let mut local: Vec<(Ipv4Addr, u16)> = Vec::new();
        for e in &ready {
            if let Some(port) = e.ports.get(&p.name) {
                all.push((e.ip, *port));
                if e.node == cfg.node {
                    local.push((e.ip, *port));
                }
            }
        }
        all.sort();
        all.dedup();
        local.sort();
        local.dedup();
        let internal = match svc.internal_traffic_policy {
            TrafficPolicy::Cluster => &all,
            TrafficPolicy::Local => &local,
        };
        let external = match svc.external_traffic_policy {
            TrafficPolicy::Cluster => &all,
            TrafficPolicy::Local => &local,
        };
        let ext_masq = svc.external_traffic_policy == TrafficPolicy::Cluster;
        lb(
            &mut c,
            key(cip, p.protocol, p.port),
            internal,
            svc.affinity_timeout,
        );
        flows(&mut c, p.protocol, Some(cip), p.port, internal);
        for eip in &svc.external_ips {
            let k = key(*eip, p.protocol, p.port);
            if ext_masq {
                c.set("masq-lb", k.clone());
            }
            lb(&mut c, k, external, svc.affinity_timeout);
            flows(&mut c, p.protocol, Some(*eip), p.port, external);
        }
        if let (Some(np), ServiceType::NodePort | ServiceType::LoadBalancer) =
            (p.node_port, svc.service_type)
        {
            let k = npkey(p.protocol, np);
            if ext_masq {
                c.set("masq-np", k.clone());
            }
            if external.is_empty() {
                c.set("rej-np", k);
            } else {
                c.map("np", k.clone(), format!("goto np-{}", external.len()));
                for (i, (ip, port)) in external.iter().enumerate() {
                    c.map("npbe", format!("{k} . {i}"), format!("{ip} . {port}"));
                }
            }
            flows(&mut c, p.protocol, None, np, external);
        }
    }
    c
}

fn lb(c: &mut Contribution, k: String, backends: &[(Ipv4Addr, u16)], affinity: Option<u32>) {
    if backends.is_empty() {
        c.set("rej-lb", k);
        return;
    }
    if let Some(t) = affinity {
        // ClientIP affinity, as kube-proxy's nftables mode does it: one
        // dynamic set of recent clients per endpoint, checked first, and a
        // random pick that records the client in the chosen endpoint's set.
        // The timeout is part of the name, so a set's definition never changes in place.
        let chain = format!("aff-{}", short_hash(&format!("{k} {t}")));
        let mut rules = Vec::new();
        let mut picks = Vec::new();
        for (i, (ip, port)) in backends.iter().enumerate() {
            let ep = format!("{chain}-{}", short_hash(&format!("{ip}:{port}")));
            c.own_sets.insert(
                ep.clone(),
                format!("type ipv4_addr; flags dynamic,timeout; timeout {t}s;"),
            );
            c.chains.insert(
                ep.clone(),
                vec![
                    format!("update @{ep} {{ ip saddr }}"),
                    format!("meta l4proto {{ tcp, udp, sctp }} dnat ip to {ip}:{port}"),
                ],
            );
            rules.push(format!("ip saddr @{ep} goto {ep}"));
            picks.push(format!("{i} : goto {ep}"));
        }
        rules.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            backends.len(),
            picks.join(", ")
        ));
        c.chains.insert(chain.clone(), rules);
        c.map("lb", k, format!("goto {chain}"));
        return;
    }
    c.map("lb", k.clone(), format!("goto lb-{}", backends.len()));
    for (i, (ip, port)) in backends.iter().enumerate() {
        c.map("be", format!("{k} . {i}"), format!("{ip} . {port}"));
    }
}

/// A short stable name part (FNV-1a, 64 bits, hex).
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn flows(
    c: &mut Contribution,
    p: Protocol,
    dst: Option<Ipv4Addr>,
    port: u16,
    backends: &[(Ipv4Addr, u16)],
) {
    if backends.is_empty() {
        c.flows.insert((p, dst, port, None));
    }
    for (ip, _) in backends {
        c.flows.insert((p, dst, port, Some(*ip)));
    }
}

/// hostPort mappings of one pod: (protocol, host port) → (pod IP, container port).
pub fn plan_hostports(maps: &[(Protocol, u16, Ipv4Addr, u16)]) -> Contribution {
    let mut c = Contribution::default();
    for (p, hp, ip, cp) in maps {
        c.map("hostports", npkey(*p, *hp), format!("{ip} . {cp}"));
    }
    c
}

/// The conntrack entries to delete when a contribution changes from `old`
/// to `new`: UDP flows to backends that left (and UDP flows that went
/// nowhere, once there is somewhere to go), and TCP flows towards endpoint
/// IPs the service no longer has at all.
pub fn stale_flows(old: &Contribution, new: &Contribution) -> Vec<Flow> {
    let still: BTreeSet<Ipv4Addr> = new.flows.iter().filter_map(|f| f.3).collect();
    old.flows
        .difference(&new.flows)
        .filter(|(p, _, _, b)| match (p, b) {
            (Protocol::UDP, _) => true,
            (_, Some(ip)) => !still.contains(ip),
            (_, None) => false,
        })
        .copied()
        .collect()
}

/// The whole ruleset, as one `nft -f` transaction that atomically replaces
/// the table. `union` is every contribution's elements merged.
pub fn render_full(cfg: &ProxyConfig, union: &Contribution) -> (String, Shape) {
    let mut shape = Shape::preset();
    shape.ks.extend(union.shape().ks);
    let mut s =
        String::with_capacity(64 + union.maps.values().map(|m| m.len() * 48).sum::<usize>());
    let _ = writeln!(
        s,
        "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    let svc_key = "type ipv4_addr . inet_proto . inet_service;";
    let np_key = "type inet_proto . inet_service;";
    let set = |s: &mut String, name: &str, ty: &str| {
        let _ = write!(s, "  set {name} {{ {ty}");
        if let Some(els) = union.sets.get(name).filter(|e| !e.is_empty()) {
            s.push_str(" elements = { ");
            join(s, els.iter().map(String::as_str));
            s.push_str(" }");
        }
        s.push_str(" }\n");
    };
    for name in ["masq-lb", "rej-lb"] {
        set(&mut s, name, svc_key);
    }
    for name in ["masq-np", "rej-np"] {
        set(&mut s, name, np_key);
    }
    let map = |s: &mut String, name: &str, ty: &str| {
        let _ = write!(s, "  map {name} {{ {ty}");
        if let Some(els) = union.maps.get(name).filter(|e| !e.is_empty()) {
            s.push_str(" elements = { ");
            join(s, els.iter().map(|(k, v)| format!("{k} : {v}")));
            s.push_str(" }");
        }
        s.push_str(" }\n");
    };
    map(
        &mut s,
        "be",
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport;",
    );
    map(
        &mut s,
        "npbe",
        "typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport;",
    );
    map(
        &mut s,
        "hostports",
        "type inet_proto . inet_service : ipv4_addr . inet_service;",
    );
    for (name, def) in &union.own_sets {
        let _ = writeln!(s, "  set {name} {{ {def} }}");
    }
    for (name, rules) in &union.chains {
        let _ = writeln!(s, "  chain {name} {{");
        for r in rules {
            let _ = writeln!(s, "    {r}");
        }
        s.push_str("  }\n");
    }
    map(
        &mut s,
        "lb",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    );
    map(&mut s, "np", "type inet_proto . inet_service : verdict;");
    for k in &shape.ks {
        let _ = writeln!(s, "  chain lb-{k} {{ dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {k} map @be; }}");
        let _ = writeln!(s, "  chain np-{k} {{ dnat ip to meta l4proto . th dport . numgen random mod {k} map @npbe; }}");
    }
    // Hairpin: after DNAT a pod talking to itself has source == destination.
    let _ = write!(s, "  set hairpin {{ type ipv4_addr . ipv4_addr;");
    let usable = (u32::from(cfg.node_subnet.network()) + 1)..u32::from(cfg.node_subnet.broadcast());
    if !usable.is_empty() {
        s.push_str(" elements = { ");
        join(
            &mut s,
            usable.map(|a| {
                let ip = Ipv4Addr::from(a);
                format!("{ip} . {ip}")
            }),
        );
        s.push_str(" }");
    }
    s.push_str(" }\n");

    let (cc, sc) = (cfg.cluster_cidr.trunc(), cfg.service_cidr.trunc());
    let _ = writeln!(
        s,
        "  chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}
  chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
  chain nat-postrouting {{ type nat hook postrouting priority 100; policy accept; jump masquerading; }}
  chain mark-for-masquerade {{ meta mark set meta mark | {MASQ_MARK:#x}; }}
  chain masquerading {{
    ct status dnat ip saddr . ip daddr @hairpin masquerade
    meta mark & {MASQ_MARK:#x} == 0 return
    meta mark set meta mark xor {MASQ_MARK:#x}
    masquerade fully-random
  }}
  chain reject-chain {{ meta l4proto tcp reject with tcp reset; reject; }}
  chain filter-input {{ type filter hook input priority 0; policy accept; ct state new meta l4proto . th dport @rej-np jump reject-chain; }}
  chain filter-forward {{ type filter hook forward priority 0; policy accept; jump service-checks; }}
  chain filter-output {{ type filter hook output priority 0; policy accept; jump service-checks; }}
  chain service-checks {{
    ct state new ip daddr . meta l4proto . th dport @rej-lb jump reject-chain
    ct state new ip daddr {sc} jump reject-chain
  }}"
    );
    s.push_str("  chain services {\n");
    let _ = writeln!(
        s,
        "    ip daddr {sc} ip saddr != {cc} jump mark-for-masquerade"
    );
    s.push_str("    ip daddr . meta l4proto . th dport @masq-lb jump mark-for-masquerade\n");
    s.push_str(
        "    fib daddr type local meta l4proto . th dport @masq-np jump mark-for-masquerade\n",
    );
    s.push_str("    ip daddr . meta l4proto . th dport vmap @lb\n");
    s.push_str("    fib daddr type local meta l4proto . th dport vmap @np\n");
    s.push_str("    fib daddr type local dnat ip to meta l4proto . th dport map @hostports\n");
    s.push_str("  }\n}\n");
    (s, shape)
}

fn join<S: AsRef<str>>(s: &mut String, items: impl Iterator<Item = S>) {
    let mut first = true;
    for i in items {
        if !first {
            s.push_str(", ");
        }
        first = false;
        s.push_str(i.as_ref());
    }
}

/// The commands that turn `old` into `new` for one contribution, or `None`
/// when `new` needs an endpoint count the ruleset has no chain for (then
/// the caller does a full resync). Deletions come first so a changed map
/// value is delete-then-add.
pub fn render_delta(old: &Contribution, new: &Contribution, shape: &Shape) -> Option<String> {
    if !new.shape().ks.is_subset(&shape.ks) {
        return None;
    }
    let mut s = String::new();
    // The service's own sets and chains: create what is new, rewrite what
    // changed; what is gone is removed after the elements pointing at it.
    for (name, def) in new
        .own_sets
        .iter()
        .filter(|(n, _)| !old.own_sets.contains_key(*n))
    {
        let _ = writeln!(s, "add set ip {TABLE} {name} {{ {def} }}");
    }
    for name in new.chains.keys().filter(|n| !old.chains.contains_key(*n)) {
        let _ = writeln!(s, "add chain ip {TABLE} {name}");
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(o) if o == rules => continue,
            Some(_) => {
                let _ = writeln!(s, "flush chain ip {TABLE} {name}");
            }
            None => {}
        }
        for r in rules {
            let _ = writeln!(s, "add rule ip {TABLE} {name} {r}");
        }
    }
    let empty_set = BTreeSet::new();
    let empty_map = BTreeMap::new();
    let set_names: BTreeSet<&String> = old.sets.keys().chain(new.sets.keys()).collect();
    let map_names: BTreeSet<&String> = old.maps.keys().chain(new.maps.keys()).collect();
    let mut adds = String::new();
    for name in &set_names {
        let (o, n) = (
            old.sets.get(*name).unwrap_or(&empty_set),
            new.sets.get(*name).unwrap_or(&empty_set),
        );
        let gone: Vec<&String> = o.difference(n).collect();
        let came: Vec<&String> = n.difference(o).collect();
        if !gone.is_empty() {
            let _ = write!(s, "delete element ip {TABLE} {name} {{ ");
            join(&mut s, gone.into_iter());
            s.push_str(" }\n");
        }
        if !came.is_empty() {
            let _ = write!(adds, "add element ip {TABLE} {name} {{ ");
            join(&mut adds, came.into_iter());
            adds.push_str(" }\n");
        }
    }
    for name in &map_names {
        let (o, n) = (
            old.maps.get(*name).unwrap_or(&empty_map),
            new.maps.get(*name).unwrap_or(&empty_map),
        );
        let gone: Vec<&String> = o
            .iter()
            .filter(|(k, v)| n.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        let came: Vec<String> = n
            .iter()
            .filter(|(k, v)| o.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} : {v}"))
            .collect();
        if !gone.is_empty() {
            let _ = write!(s, "delete element ip {TABLE} {name} {{ ");
            join(&mut s, gone.into_iter());
            s.push_str(" }\n");
        }
        if !came.is_empty() {
            let _ = write!(adds, "add element ip {TABLE} {name} {{ ");
            join(&mut adds, came.iter());
            adds.push_str(" }\n");
        }
    }
    s.push_str(&adds);
    // Flush every chain that goes before deleting any: they may jump to each other.
    let gone_chains: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &gone_chains {
        let _ = writeln!(s, "flush chain ip {TABLE} {name}");
    }
    for name in &gone_chains {
        let _ = writeln!(s, "delete chain ip {TABLE} {name}");
    }
    for name in old
        .own_sets
        .keys()
        .filter(|n| !new.own_sets.contains_key(*n))
    {
        let _ = writeln!(s, "delete set ip {TABLE} {name}");
    }
    Some(s)
}

/// Merge contributions (keys never collide: each service owns its IPs and ports).
pub fn union<'a>(parts: impl Iterator<Item = &'a Contribution>) -> Contribution {
    let mut u = Contribution::default();
    for c in parts {
        for (n, els) in &c.sets {
            u.sets
                .entry(n.clone())
                .or_default()
                .extend(els.iter().cloned());
        }
        for (n, els) in &c.maps {
            u.maps
                .entry(n.clone())
                .or_default()
                .extend(els.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        u.own_sets
            .extend(c.own_sets.iter().map(|(k, v)| (k.clone(), v.clone())));
        u.chains
            .extend(c.chains.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use tweed_model::{Endpoint, ServicePort, TargetPort};

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            node: "n1".into(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            node_subnet: "10.244.1.0/30".parse().unwrap(),
        }
    }

    fn svc(t: ServiceType) -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            service_type: t,
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::TCP,
                port: 80,
                target_port: Some(TargetPort::Number(8080)),
                node_port: Some(30080).filter(|_| t != ServiceType::ClusterIP),
            }],
            external_ips: vec![],
            affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            selector: BTreeMap::new(),
        }
    }

    fn ep(ip: &str, node: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            node: node.into(),
            ports: [(String::new(), 8080)].into(),
            ready: true,
            serving: true,
            terminating: false,
            pod: String::new(),
        }
    }

    fn eps(list: &[(&str, &str)]) -> Endpoints {
        Endpoints {
            namespace: "default".into(),
            name: "web".into(),
            endpoints: list.iter().map(|(i, n)| ep(i, n)).collect(),
        }
    }

    #[test]
    fn cluster_ip_with_three_endpoints() {
        let c = plan_service(
            &cfg(),
            &svc(ServiceType::ClusterIP),
            Some(&eps(&[
                ("10.244.1.2", "n1"),
                ("10.244.2.2", "n2"),
                ("10.244.3.2", "n3"),
            ])),
        );
        assert_eq!(c.maps["lb"]["10.96.0.10 . tcp . 80"], "goto lb-3");
        let be = &c.maps["be"];
        assert_eq!(be.len(), 3);
        assert_eq!(be["10.96.0.10 . tcp . 80 . 0"], "10.244.1.2 . 8080");
        assert_eq!(be["10.96.0.10 . tcp . 80 . 2"], "10.244.3.2 . 8080");
        assert!(!c.sets.contains_key("rej-lb"));
    }

    #[test]
    fn no_ready_endpoint_rejects() {
        let mut e = eps(&[("10.244.1.2", "n1")]);
        e.endpoints[0].ready = false;
        let c = plan_service(&cfg(), &svc(ServiceType::NodePort), Some(&e));
        assert!(c.sets["rej-lb"].contains("10.96.0.10 . tcp . 80"));
        assert!(c.sets["rej-np"].contains("tcp . 30080"));
        assert!(!c.maps.contains_key("be"));
    }

    #[test]
    fn external_policy_local_keeps_only_local_endpoints_and_no_masquerade() {
        let mut s = svc(ServiceType::NodePort);
        s.external_traffic_policy = TrafficPolicy::Local;
        let all = eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")]);
        let here = plan_service(&cfg(), &s, Some(&all));
        assert_eq!(here.maps["np"]["tcp . 30080"], "goto np-1");
        assert_eq!(here.maps["npbe"]["tcp . 30080 . 0"], "10.244.1.2 . 8080");
        assert!(!here.sets.contains_key("masq-np"));
        // ClusterIP traffic still goes everywhere.
        assert_eq!(here.maps["lb"]["10.96.0.10 . tcp . 80"], "goto lb-2");
        let elsewhere = plan_service(
            &ProxyConfig {
                node: "n3".into(),
                ..cfg()
            },
            &s,
            Some(&all),
        );
        assert!(elsewhere.sets["rej-np"].contains("tcp . 30080"));
        // Policy Cluster masquerades node-port traffic.
        let cl = plan_service(&cfg(), &svc(ServiceType::NodePort), Some(&all));
        assert!(
            cl.sets["masq-np"].contains("tcp . 30080")
                && cl.maps["np"]["tcp . 30080"] == "goto np-2"
        );
    }

    #[test]
    fn internal_policy_local() {
        let mut s = svc(ServiceType::ClusterIP);
        s.internal_traffic_policy = TrafficPolicy::Local;
        let c = plan_service(
            &ProxyConfig {
                node: "n2".into(),
                ..cfg()
            },
            &s,
            Some(&eps(&[("10.244.1.2", "n1")])),
        );
        assert!(c.sets["rej-lb"].contains("10.96.0.10 . tcp . 80"));
    }

    #[test]
    fn delta_moves_a_key_between_endpoint_counts() {
        let s = svc(ServiceType::ClusterIP);
        let old = plan_service(
            &cfg(),
            &s,
            Some(&eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")])),
        );
        let new = plan_service(
            &cfg(),
            &s,
            Some(&eps(&[
                ("10.244.1.2", "n1"),
                ("10.244.2.2", "n2"),
                ("10.244.3.2", "n3"),
            ])),
        );
        let shape = Shape::preset();
        let d = render_delta(&old, &new, &shape).unwrap();
        assert!(
            d.contains("delete element ip tweed lb { 10.96.0.10 . tcp . 80 }"),
            "{d}"
        );
        assert!(
            d.contains("add element ip tweed lb { 10.96.0.10 . tcp . 80 : goto lb-3 }"),
            "{d}"
        );
        assert!(
            d.contains("add element ip tweed be { 10.96.0.10 . tcp . 80 . 2 : 10.244.3.2 . 8080 }"),
            "{d}"
        );
        assert!(!d.contains("add set"), "{d}");
        // Deletes come before adds.
        assert!(d.find("delete").unwrap() < d.find("add element").unwrap());
        assert_eq!(render_delta(&new, &new, &shape).unwrap(), "");
    }

    #[test]
    fn delta_grows_the_shape_for_many_endpoints_and_affinity() {
        let s = svc(ServiceType::ClusterIP);
        let many: Vec<(String, &str)> = (1..=40).map(|i| (format!("10.244.9.{i}"), "n9")).collect();
        let list: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let new = plan_service(&cfg(), &s, Some(&eps(&list)));
        let shape = Shape::preset();
        assert_eq!(
            render_delta(&Contribution::default(), &new, &shape),
            None,
            "40 endpoints need a full resync"
        );
        let (full, shape) = render_full(&cfg(), &new);
        assert!(full.contains("chain lb-40 { dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 40 map @be; }"), "{full}");
        assert!(render_delta(&new, &new, &shape).is_some());
        // Affinity: per-endpoint sets and chains, reached through the affinity map.
        let mut a = svc(ServiceType::ClusterIP);
        a.affinity_timeout = Some(30);
        let with = plan_service(
            &cfg(),
            &a,
            Some(&eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")])),
        );
        assert_eq!(with.own_sets.len(), 2);
        assert!(with.own_sets.values().all(|d| d.contains("timeout 30s")));
        assert_eq!(with.chains.len(), 3);
        assert!(with.maps["lb"]["10.96.0.10 . tcp . 80"].starts_with("goto aff-"));
        let d = render_delta(&Contribution::default(), &with, &shape).unwrap();
        assert!(d.find("add set").unwrap() < d.find("add chain").unwrap());
        assert!(
            d.find("add chain").unwrap() < d.find("add element ip tweed lb").unwrap(),
            "{d}"
        );
        let gone = render_delta(&with, &Contribution::default(), &shape).unwrap();
        assert!(
            gone.find("delete element ip tweed lb").unwrap() < gone.find("delete chain").unwrap(),
            "{gone}"
        );
        assert!(
            gone.rfind("delete chain").unwrap() < gone.find("delete set").unwrap(),
            "{gone}"
        );
    }

    #[test]
    fn stale_flows_for_conntrack() {
        let mut s = svc(ServiceType::ClusterIP);
        s.ports[0].protocol = Protocol::UDP;
        let old = plan_service(
            &cfg(),
            &s,
            Some(&eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")])),
        );
        let new = plan_service(&cfg(), &s, Some(&eps(&[("10.244.2.2", "n2")])));
        let gone = stale_flows(&old, &new);
        assert_eq!(
            gone,
            vec![(
                Protocol::UDP,
                Some("10.96.0.10".parse().unwrap()),
                80,
                Some("10.244.1.2".parse().unwrap())
            )]
        );
        // From nothing to something: the flows that went nowhere are stale.
        let none = plan_service(&cfg(), &s, Some(&eps(&[])));
        assert_eq!(
            stale_flows(&none, &new),
            vec![(Protocol::UDP, Some("10.96.0.10".parse().unwrap()), 80, None)]
        );
        // TCP: only endpoints that are gone altogether.
        let t = svc(ServiceType::ClusterIP);
        let old = plan_service(
            &cfg(),
            &t,
            Some(&eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")])),
        );
        let new = plan_service(&cfg(), &t, Some(&eps(&[("10.244.2.2", "n2")])));
        assert_eq!(stale_flows(&old, &new).len(), 1);
    }

    #[test]
    fn full_render_has_the_skeleton_and_the_elements() {
        let c = plan_service(
            &cfg(),
            &svc(ServiceType::NodePort),
            Some(&eps(&[("10.244.1.2", "n1")])),
        );
        let (s, shape) = render_full(&cfg(), &union([c].iter()));
        assert!(s.starts_with("add table ip tweed\ndelete table ip tweed\n"));
        assert!(s.contains("map lb { type ipv4_addr . inet_proto . inet_service : verdict; elements = { 10.96.0.10 . tcp . 80 : goto lb-1 } }"), "{s}");
        assert!(
            s.contains("10.244.1.1 . 10.244.1.1, 10.244.1.2 . 10.244.1.2"),
            "hairpin pairs: {s}"
        );
        assert!(
            s.contains("ip daddr 10.96.0.0/12 ip saddr != 10.244.0.0/16 jump mark-for-masquerade")
        );
        assert_eq!(shape.ks.len(), PRESET_K);
    }
}
