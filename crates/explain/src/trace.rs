//! `tweed trace`: one packet walked through this node's real rules and
//! routes, each step citing what decided it (a map element, a route, a
//! neighbour or FDB entry), forking per Service endpoint.
//!
//! The Service step reads the kernel's own nftables elements (`nft get
//! element`, one key at a time, so it costs the same at 30k Services as at
//! ten) and decides exactly as the fixed ruleset does
//! (`tweed_plan::services::render_full`): masquerade marks first, then
//! the affinity verdict map, `lb-all` → the highest K whose `lb-PROTO-K`
//! holds the key → `be-PROTO` slots, then node ports and host ports, then
//! the reject/drop sets. That decision is pure ([`service_step`]) over a
//! [`Ruleset`] view, so it is unit-tested without a kernel.
//!
//! Routing uses the kernel's lookups (`ip route get [fibmatch] ... iif`),
//! so policy rules, forwarding and rp_filter apply as they would to the
//! packet; where the route disagrees with the agent's plan the step says so.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tweed_netlink::{Netlink, RouteLookup};
use tweed_plan::services::TABLE;
use tweed_plan::{Mode, NodeIntent};

use crate::ExplainError;

/// The packet as it is at some point of the walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: String,
    pub port: Option<u16>,
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{} → {}:{p}/{}", self.src, self.dst, self.proto),
            None => write!(f, "{} → {}", self.src, self.dst),
        }
    }
}

/// One step: what happened, and the rule, element or route behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// origin, service, masquerade, route, encap, deliver, reject, drop, return
    pub kind: String,
    pub text: String,
    /// The rule / element / route that decided it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cite: String,
    /// The kernel disagrees with the agent's plan here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn step(kind: &str, text: impl Into<String>, cite: impl Into<String>) -> Step {
    Step {
        kind: kind.into(),
        text: text.into(),
        cite: cite.into(),
        problem: None,
    }
}

/// Where the packet ends on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Exit {
    /// Handed to a pod on this node; `packet.src` is what its process sees.
    Delivered {
        dev: String,
        packet: Packet,
    },
    /// Handed to a process of the node itself.
    Local {
        packet: Packet,
    },
    /// Sent to another node (`next`: the underlay address it goes to).
    Forwarded {
        encap: String,
        next: Ipv4Addr,
        dev: String,
        peer: Option<String>,
        packet: Packet,
    },
    Rejected {
        why: String,
    },
    Dropped {
        why: String,
    },
    Unroutable {
        why: String,
    },
}

/// One way the packet can go (one per Service endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The endpoint chosen ("IP:PORT"), if a Service chose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<String>,
    pub steps: Vec<Step>,
    pub exit: Exit,
}

impl Branch {
    /// A way the packet goes that no Service chose.
    fn new(steps: Vec<Step>, exit: Exit) -> Self {
        Branch {
            endpoint: None,
            probability: None,
            steps,
            exit,
        }
    }
}

/// This node's half of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTrace {
    pub node: String,
    pub packet: Packet,
    pub steps: Vec<Step>,
    pub branches: Vec<Branch>,
}

/// A read-only view of tweed's nftables elements.
pub trait Ruleset {
    fn has(&self, set: &str, key: &str) -> bool;
    /// A map element's `ip . port` value.
    fn value(&self, map: &str, key: &str) -> Option<(Ipv4Addr, u16)>;
    /// The endpoint counts K that have `lb-PROTO-K` / `np-PROTO-K` sets.
    fn ks(&self) -> Vec<u16>;
    /// A verdict map element's verdict (`goto CHAIN`).
    fn verdict(&self, map: &str, key: &str) -> Option<String>;
    /// A chain's rules, one per line as nft lists them (empty: no such chain).
    fn chain(&self, name: &str) -> Vec<String>;
}

/// What the Service rules do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDecision {
    pub steps: Vec<Step>,
    /// Marked for masquerade, and why.
    pub masquerade: Option<String>,
    /// The DNAT choices: (IP, port, K) each with probability 1/K.
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// Rejected or dropped by the service checks.
    pub verdict: Option<Exit>,
}

fn endpoints_text(k: u16) -> String {
    if k == 1 {
        "1 endpoint".into()
    } else {
        format!("{k} endpoints, each with probability 1/{k}")
    }
}

/// Decide the Service step for a new connection as tweed's ruleset does.
/// `local_dst`: the destination is one of this node's addresses (`fib
/// daddr type local`).
pub fn service_step(
    rs: &dyn Ruleset,
    intent: &NodeIntent,
    pkt: &Packet,
    local_dst: bool,
) -> ServiceDecision {
    let mut d = ServiceDecision {
        steps: Vec::new(),
        masquerade: None,
        backends: Vec::new(),
        verdict: None,
    };
    let Some(port) = pkt.port else {
        return d;
    };
    let p = pkt.proto.as_str();
    let svc = format!("{} . {p} . {port}", pkt.dst);
    let np = format!("{p} . {port}");
    let in_sc = intent.service_cidr.contains(&pkt.dst);
    // nat prerouting/output → chain services, in its order. First the
    // load balancer firewall (loadBalancerSourceRanges), before any DNAT.
    if let Some(v) = rs.verdict("fw", &svc) {
        let chain = v.trim().trim_start_matches("jump ").trim().to_string();
        let rules = rs.chain(&chain);
        let ranges = rules.iter().find_map(|r| source_ranges(r));
        let cite = format!(
            "map fw: {{ {svc} : jump {chain} }}; chain {chain}: {}",
            rules.join("; ")
        );
        match ranges {
            Some(rs) if !rs.iter().any(|n| n.contains(&pkt.src)) => {
                d.verdict = Some(Exit::Dropped {
                    why: format!(
                        "{} is not in the Service's loadBalancerSourceRanges ({})",
                        pkt.src,
                        join_nets(&rs)
                    ),
                });
                d.steps.push(step(
                    "drop",
                    format!(
                        "dropped: Service {}:{port}/{p} admits only {} (loadBalancerSourceRanges)",
                        pkt.dst,
                        join_nets(&rs)
                    ),
                    cite,
                ));
                return d;
            }
            Some(rs) => d.steps.push(step(
                "firewall",
                format!(
                    "admitted: {} is in the Service's loadBalancerSourceRanges ({})",
                    pkt.src,
                    join_nets(&rs)
                ),
                cite,
            )),
            None => {
                let mut st = step(
                    "firewall",
                    "the Service's loadBalancerSourceRanges chain cannot be read",
                    cite,
                );
                st.problem = Some(format!("chain {chain} holds no `ip saddr != {{...}} drop`"));
                d.steps.push(st);
            }
        }
    }
    // Policy Local's exception: pods and the node itself reach every
    // endpoint of an external or load balancer address (`xlb`).
    let from_inside = intent.cluster_cidr.contains(&pkt.src)
        || pkt.src == intent.bind_ip
        || pkt.src == intent.public_ip;
    let what = if intent.cluster_cidr.contains(&pkt.src) {
        "a pod"
    } else {
        "this node"
    };
    if from_inside
        && xlb_step(
            rs,
            &mut d,
            "xlb",
            &svc,
            &format!("Service {}:{port}/{p}", pkt.dst),
            what,
        )
    {
        return d;
    }
    if from_inside
        && local_dst
        && xlb_step(
            rs,
            &mut d,
            "npxlb",
            &np,
            &format!("node port {port}/{p}"),
            what,
        )
    {
        return d;
    }
    if in_sc && !intent.cluster_cidr.contains(&pkt.src) {
        d.masquerade = Some(format!(
            "source {} is outside the cluster CIDR {} and reaches a service IP",
            pkt.src, intent.cluster_cidr
        ));
        d.steps.push(step(
            "masquerade",
            "marked for masquerade: the source is outside the cluster CIDR",
            format!(
                "chain services: ip daddr {} ip saddr != {} jump mark-for-masquerade",
                intent.service_cidr, intent.cluster_cidr
            ),
        ));
    }
    if rs.has("masq-lb", &svc) {
        d.masquerade
            .get_or_insert_with(|| "external traffic to a Service with policy Cluster".into());
        d.steps.push(step(
            "masquerade",
            "marked for masquerade: an external IP of a Service with policy Cluster",
            format!("set masq-lb: {{ {svc} }}"),
        ));
    }
    if local_dst && rs.has("masq-np", &np) {
        d.masquerade
            .get_or_insert_with(|| "a node port with policy Cluster".into());
        d.steps.push(step(
            "masquerade",
            "marked for masquerade: a node port with policy Cluster",
            format!("set masq-np: {{ {np} }}"),
        ));
    }
    if let Some(v) = rs.verdict("lb", &svc) {
        let chain = v.trim().trim_start_matches("goto ").trim().to_string();
        let eps = affinity_endpoints(rs, &chain);
        if let Some((set, b)) = eps
            .iter()
            .find(|(set, _)| rs.has(set, &pkt.src.to_string()))
        {
            d.backends = vec![*b];
            d.steps.push(step(
                "service",
                format!(
                    "Service {}:{port}/{p}: ClientIP session affinity: {} connected within the timeout, so it goes back to {}:{}",
                    pkt.dst, pkt.src, b.0, b.1
                ),
                format!("map lb: {{ {svc} : goto {chain} }}; set {set}: {{ {} }}", pkt.src),
            ));
        } else {
            d.backends = eps.iter().map(|(_, b)| *b).collect();
            d.steps.push(step(
                "service",
                format!(
                    "Service {}:{port}/{p}: ClientIP session affinity: {} has no recent connection, so one of {}; the one drawn remembers it",
                    pkt.dst,
                    pkt.src,
                    endpoints_text(d.backends.len() as u16)
                ),
                format!("map lb: {{ {svc} : goto {chain} }}; chain {chain}: numgen random mod {}", d.backends.len()),
            ));
        }
        if !d.backends.is_empty() {
            return d;
        }
        d.steps.last_mut().expect("pushed").problem =
            Some(format!("chain {chain} has no endpoint chains"));
    }
    if rs.has("lb-all", &svc) {
        let key = format!("{} . {port}", pkt.dst);
        if let Some((k, backends)) = balanced(rs, &format!("lb-{p}"), &format!("be-{p}"), &key) {
            d.backends = backends;
            d.steps.push(step(
                "service",
                format!("Service {}:{port}/{p}: {}", pkt.dst, endpoints_text(k)),
                format!("set lb-all: {{ {svc} }}; set lb-{p}-{k}: {{ {key} }}; map be-{p}-{k}: {{ {key} . 0..{} }}", k - 1),
            ));
            if d.backends.len() != usize::from(k) {
                d.steps.last_mut().expect("pushed").problem = Some(format!(
                    "be-{p}-{k} holds {} of the {k} slots",
                    d.backends.len()
                ));
            }
            return d;
        }
    }
    if local_dst && rs.has("np-all", &np) {
        if let Some((k, backends)) = balanced(
            rs,
            &format!("np-{p}"),
            &format!("npbe-{p}"),
            &port.to_string(),
        ) {
            d.backends = backends;
            d.steps.push(step(
                "service",
                format!("node port {port}/{p}: {}", endpoints_text(k)),
                format!("set np-all: {{ {np} }}; set np-{p}-{k}: {{ {port} }}; map npbe-{p}-{k}: {{ {port} . 0..{} }}", k - 1),
            ));
            return d;
        }
    }
    if local_dst {
        if let Some(b) = rs.value("hostports", &np) {
            d.backends = vec![b];
            d.steps.push(step(
                "service",
                format!("hostPort {port}/{p} → {}:{}", b.0, b.1),
                format!("map hostports: {{ {np} : {} . {} }}", b.0, b.1),
            ));
            return d;
        }
    }
    // filter forward/output → service-checks; filter input for node ports.
    if rs.has("rej-lb", &svc) {
        d.verdict = Some(Exit::Rejected {
            why: format!(
                "Service {}:{port}/{p} has no endpoints (TCP reset / ICMP unreachable)",
                pkt.dst
            ),
        });
        d.steps.push(step(
            "reject",
            "rejected: the Service has no endpoints",
            format!("set rej-lb: {{ {svc} }}"),
        ));
    } else if rs.has("drop-lb", &svc) {
        d.verdict = Some(Exit::Dropped {
            why: "policy Local and no endpoint on this node (dropped, as kube-proxy does, so a load balancer's health check moves traffic away)".into(),
        });
        d.steps.push(step(
            "drop",
            "dropped: policy Local, no local endpoint",
            format!("set drop-lb: {{ {svc} }}"),
        ));
    } else if local_dst && rs.has("rej-np", &np) {
        d.verdict = Some(Exit::Rejected {
            why: format!("node port {port}/{p} has no endpoints"),
        });
        d.steps.push(step(
            "reject",
            "rejected: the node port has no endpoints",
            format!("set rej-np: {{ {np} }}"),
        ));
    } else if local_dst && rs.has("drop-np", &np) {
        d.verdict = Some(Exit::Dropped {
            why: "node port with policy Local and no endpoint on this node".into(),
        });
        d.steps.push(step(
            "drop",
            "dropped: policy Local, no local endpoint",
            format!("set drop-np: {{ {np} }}"),
        ));
    } else if in_sc {
        d.verdict = Some(Exit::Rejected {
            why: format!("no Service has {}:{port}/{p}", pkt.dst),
        });
        d.steps.push(step(
            "reject",
            "rejected: no Service has this address and port",
            format!(
                "chain service-checks: ct state new ip daddr {} jump reject-chain",
                intent.service_cidr
            ),
        ));
    }
    d
}

/// The source ranges of a firewall chain's rule as nft prints it:
/// `ip saddr != { 198.51.100.192/26, 203.0.113.0/28 } drop`, or with one
/// range `ip saddr != 198.51.100.192/26 drop` (an address alone is a /32).
pub fn source_ranges(rule: &str) -> Option<Vec<ipnet::Ipv4Net>> {
    let set = rule
        .trim()
        .strip_prefix("ip saddr != ")?
        .strip_suffix(" drop")?
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}');
    set.split(',')
        .map(|x| {
            let x = x.trim();
            x.parse()
                .ok()
                .or_else(|| x.parse::<Ipv4Addr>().ok().map(ipnet::Ipv4Net::from))
        })
        .collect()
}

fn join_nets(nets: &[ipnet::Ipv4Net]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Service key's endpoints as the ruleset holds them now (empty: none);
/// `None` when the ruleset cannot tell (an affinity chain that cannot be read).
pub fn current_backends(
    rs: &dyn Ruleset,
    ip: Ipv4Addr,
    proto: &str,
    port: u16,
) -> Option<Vec<(Ipv4Addr, u16)>> {
    let svc = format!("{ip} . {proto} . {port}");
    if let Some(v) = rs.verdict("lb", &svc) {
        let chain = v.trim().trim_start_matches("goto ").trim().to_string();
        let eps = affinity_endpoints(rs, &chain);
        return (!eps.is_empty()).then(|| eps.into_iter().map(|(_, b)| b).collect());
    }
    if !rs.has("lb-all", &svc) {
        return Some(Vec::new());
    }
    let key = format!("{ip} . {port}");
    Some(
        balanced(rs, &format!("lb-{proto}"), &format!("be-{proto}"), &key)
            .map(|(_, b)| b)
            .unwrap_or_default(),
    )
}

/// A ClientIP-affinity chain's endpoints: each `ip saddr @SET goto SET`
/// rule names a per-endpoint set of recent clients and the chain that
/// DNATs to that endpoint. Returns (set, endpoint) pairs in rule order.
pub fn affinity_endpoints(rs: &dyn Ruleset, chain: &str) -> Vec<(String, (Ipv4Addr, u16))> {
    rs.chain(chain)
        .iter()
        .filter_map(|r| {
            let set = r
                .trim()
                .strip_prefix("ip saddr @")?
                .split_whitespace()
                .next()?;
            let b = rs.chain(set).iter().find_map(|l| dnat_target(l))?;
            Some((set.to_string(), b))
        })
        .collect()
}

/// Policy Local's exception through map `map` (`xlb` or `npxlb`): traffic
/// from a pod or the node itself (`who`) goes to every endpoint. True when
/// the map has the key (the step and backends are then in `d`).
fn xlb_step(
    rs: &dyn Ruleset,
    d: &mut ServiceDecision,
    map: &str,
    key: &str,
    what: &str,
    who: &str,
) -> bool {
    let Some(v) = rs.verdict(map, key) else {
        return false;
    };
    let chain = v.trim().trim_start_matches("goto ").trim().to_string();
    let rules = rs.chain(&chain);
    d.backends = rules.iter().flat_map(|r| xlb_targets(r)).collect();
    d.steps.push(step(
        "service",
        format!(
            "{what}, policy Local: from {who} (inside the cluster) every endpoint is used, as kube-proxy does: {}",
            endpoints_text(d.backends.len() as u16)
        ),
        format!("map {map}: {{ {key} : goto {chain} }}; chain {chain}: {}", rules.join("; ")),
    ));
    if d.backends.is_empty() {
        d.steps.last_mut().expect("pushed").problem =
            Some(format!("chain {chain} holds no DNAT target"));
    }
    true
}

/// The endpoints of an `xlb-…` chain's rule as nft prints it: one
/// (`dnat to 10.244.1.2:8080`) or many (`dnat ip to numgen random mod 2
/// map { 0 : 10.244.1.2 . 8080, 1 : 10.244.2.2 . 8080 }`).
pub fn xlb_targets(rule: &str) -> Vec<(Ipv4Addr, u16)> {
    if let Some(m) = rule.split(" map {").nth(1) {
        return m
            .trim_end()
            .trim_end_matches('}')
            .split(',')
            .filter_map(|e| {
                let (ip, port) = e.split(" : ").nth(1)?.trim().split_once(" . ")?;
                Some((ip.trim().parse().ok()?, port.trim().parse().ok()?))
            })
            .collect();
    }
    dnat_target(rule).into_iter().collect()
}

/// `… dnat ip to 10.244.1.2:8080` (or nft's `dnat to …`) → the address and port.
fn dnat_target(rule: &str) -> Option<(Ipv4Addr, u16)> {
    let t = rule
        .split(" dnat ip to ")
        .nth(1)
        .or_else(|| rule.split(" dnat to ").nth(1))?;
    let (ip, port) = t.split_whitespace().next()?.split_once(':')?;
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// A load-balanced key's endpoint count K and endpoints, as the ruleset's
/// rules find them: the highest K whose set `SETS-K` holds `key` (a key may
/// linger in a lower K's set after it grew), then slots `key . 0..K` of `map`.
fn balanced(
    rs: &dyn Ruleset,
    sets: &str,
    map: &str,
    key: &str,
) -> Option<(u16, Vec<(Ipv4Addr, u16)>)> {
    let mut ks = rs.ks();
    ks.sort_unstable_by(|a, b| b.cmp(a));
    let k = ks
        .into_iter()
        .find(|k| rs.has(&format!("{sets}-{k}"), key))?;
    let backends = (0..k)
        .filter_map(|slot| rs.value(&format!("{map}-{k}"), &format!("{key} . {slot}")))
        .collect();
    Some((k, backends))
}

/// The kernel's elements of tweed's table, one `nft get element` at a time.
pub struct KernelRuleset {
    ks: Vec<u16>,
}

impl KernelRuleset {
    pub fn read() -> Self {
        // `-t`: set names without their elements.
        let out = Command::new("nft")
            .args(["-t", "-j", "list", "sets", "table", "ip", TABLE])
            .stdin(Stdio::null())
            .output();
        let mut ks: Vec<u16> = out
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["nftables"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["set"]["name"].as_str().map(str::to_string))
            .filter_map(|n| n.strip_prefix("lb-tcp-").and_then(|k| k.parse().ok()))
            .collect();
        ks.sort_unstable();
        Self { ks }
    }

    /// `nft get element`: the element as nft prints it, if it exists.
    /// (nft 1.0.6 prints text here even with `-j`.)
    fn get(&self, set: &str, key: &str) -> Option<String> {
        let o = Command::new("nft")
            .args(["get", "element", "ip", TABLE, set, &format!("{{ {key} }}")])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).to_string())
    }
}

/// The `ip . port` value of the one element in `nft get element` output.
pub fn element_value(text: &str) -> Option<(Ipv4Addr, u16)> {
    let inner = text.split("elements = {").nth(1)?.split('}').next()?;
    let value = inner.split(" : ").nth(1)?.trim();
    let mut parts = value.split(" . ");
    Some((
        parts.next()?.trim().parse().ok()?,
        parts.next()?.trim().parse().ok()?,
    ))
}

impl Ruleset for KernelRuleset {
    fn has(&self, set: &str, key: &str) -> bool {
        self.get(set, key).is_some()
    }
    fn value(&self, map: &str, key: &str) -> Option<(Ipv4Addr, u16)> {
        element_value(&self.get(map, key)?)
    }
    fn ks(&self) -> Vec<u16> {
        self.ks.clone()
    }
    fn verdict(&self, map: &str, key: &str) -> Option<String> {
        let text = self.get(map, key)?;
        let inner = text.split("elements = {").nth(1)?.split('}').next()?;
        Some(inner.split(" : ").nth(1)?.trim().to_string())
    }
    fn chain(&self, name: &str) -> Vec<String> {
        let o = Command::new("nft")
            .args(["list", "chain", "ip", TABLE, name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let Ok(o) = o else { return Vec::new() };
        chain_rules(&String::from_utf8_lossy(&o.stdout))
    }
}

/// The rules of the one chain in `nft list chain` output.
pub fn chain_rules(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("chain "))
        .skip(1)
        .take_while(|l| *l != "}")
        .filter(|l| !l.is_empty() && !l.starts_with("type ") && !l.starts_with("policy "))
        .map(str::to_string)
        .collect()
}

/// Which packet of a connection is traced (`--ct new|established`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct {
    New,
    Established,
}

impl std::str::FromStr for Ct {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "new" => Ok(Ct::New),
            "established" | "est" => Ok(Ct::Established),
            _ => Err(format!("--ct {s:?}: new or established")),
        }
    }
}

/// The NAT conntrack holds for an established connection (`conntrack -L`,
/// read-only), as a Service decision: its endpoint, and whether its
/// source was rewritten.
fn established(pkt: &Packet) -> Option<ServiceDecision> {
    let mut c = Command::new("conntrack");
    c.args([
        "-L",
        "-p",
        &pkt.proto,
        "-s",
        &pkt.src.to_string(),
        "-d",
        &pkt.dst.to_string(),
    ]);
    if let Some(p) = pkt.port {
        c.args(["--dport", &p.to_string()]);
    }
    let out = c.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let e = crate::conntrack::parse_conntrack(&text)
        .into_iter()
        .next()?;
    let line = text.lines().next().unwrap_or_default().trim().to_string();
    let mut d = ServiceDecision {
        steps: vec![step(
            "conntrack",
            format!(
                "established: conntrack replays the first packet's NAT (replies come from {}:{})",
                e.reply_src, e.reply_sport
            ),
            line,
        )],
        masquerade: None,
        backends: Vec::new(),
        verdict: None,
    };
    if e.reply_src != pkt.dst {
        d.backends.push((e.reply_src, e.reply_sport));
    }
    if e.reply_dst != pkt.src {
        d.masquerade = Some(format!("conntrack's entry: replies go to {}", e.reply_dst));
    }
    Some(d)
}

/// How the packet enters this node's walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingress {
    /// Sent by a pod here or a process of this node (found from the source).
    Here,
    /// Arrived on this device (the remote half: the underlay, or the tunnel after decapsulation).
    Arrived(String),
}

/// Walk `pkt` through this node. Must run in the node's network namespace,
/// inside a tokio runtime.
pub async fn walk(
    intent: &NodeIntent,
    pkt: Packet,
    ingress: Ingress,
    pin: Option<Ipv4Addr>,
    ct: Ct,
    rs: &dyn Ruleset,
) -> Result<NodeTrace, ExplainError> {
    let nl = Netlink::open()?;
    let links = nl.links().await?;
    let name_of = |i: Option<u32>| {
        i.and_then(|i| links.iter().find(|l| l.index == i))
            .map(|l| l.name.clone())
            .unwrap_or_else(|| "?".into())
    };
    let index_of = |n: &str| links.iter().find(|l| l.name == n).map(|l| l.index);
    let mut local_addrs = Vec::new();
    for l in &links {
        for a in nl.ipv4_addrs(l.index).await.unwrap_or_default() {
            local_addrs.push(a.addr());
        }
    }
    let mut steps = Vec::new();
    let mut pkt = pkt;
    // 0.0.0.0: a process of this node that did not bind; the kernel picks
    // the source by the route to the destination.
    if pkt.src.is_unspecified() && ingress == Ingress::Here {
        if let Ok(r) = nl.route_lookup(pkt.dst, None, None, None).await? {
            if let Some(src) = r.src {
                pkt.src = src;
            }
        }
        if pkt.src.is_unspecified() {
            // Not an error of the trace: the kernel refuses to send, and
            // that is the answer (no rule ever sees the packet).
            return Ok(NodeTrace {
                node: intent.node.clone(),
                packet: pkt.clone(),
                steps: vec![step(
                    "origin",
                    format!("a process on {} sends to {}", intent.node, pkt.dst),
                    format!("ip route get {}", pkt.dst),
                )],
                branches: vec![Branch::new(
                    Vec::new(),
                    Exit::Unroutable {
                        why: format!(
                            "{} has no route to {}: the kernel refuses to send it (Network is unreachable) before any rule sees it",
                            intent.node, pkt.dst
                        ),
                    },
                )],
            });
        }
    }
    // Where it comes from: a pod (input on its veth), this node (output),
    // or a device it arrived on.
    let iif = match &ingress {
        Ingress::Arrived(dev) => {
            let cite = if Some(dev.as_str()) == intent.plan.vxlan.as_ref().map(|v| v.name.as_str()) {
                format!("VXLAN VNI {} on UDP {}, decapsulated by {dev}", intent.plan.vxlan.as_ref().map(|v| v.vni).unwrap_or(1), intent.vxlan_port)
            } else {
                String::new()
            };
            steps.push(step("origin", format!("arrives on {dev}: {pkt}"), cite));
            Some(index_of(dev).ok_or_else(|| ExplainError::Trace(format!("no device {dev} on {}", intent.node)))?)
        }
        Ingress::Here if local_addrs.contains(&pkt.src) => {
            steps.push(step("origin", format!("a process on {} sends {pkt}", intent.node), "nat output hook"));
            None
        }
        Ingress::Here if intent.subnet.contains(&pkt.src) => {
            let r = nl.route_lookup(pkt.src, None, None, None).await?;
            let dev = match &r {
                Ok(r) if r.prefix.prefix_len() == 32 => name_of(r.oif),
                _ => {
                    return Err(ExplainError::Trace(format!(
                        "no pod {} on {} (no host route to it)",
                        pkt.src, intent.node
                    )))
                }
            };
            steps.push(step(
                "origin",
                format!("pod {} sends {pkt}; it enters {} by {dev}", pkt.src, intent.node),
                format!("route {}/32 dev {dev} proto 144 (the pod's host route)", pkt.src),
            ));
            index_of(&dev)
        }
        Ingress::Here => {
            return Err(ExplainError::Trace(format!(
                "{} is neither a pod on {} nor one of its addresses: trace from its own node, or say which device it arrives on",
                pkt.src, intent.node
            )))
        }
    };
    let local_dst = local_addrs.contains(&pkt.dst);
    // An established connection skips the rules for new ones: conntrack
    // applies the NAT its first packet got. Show the real entry.
    let svc = match ct {
        Ct::Established => match established(&pkt) {
            Some(d) => d,
            None => {
                steps.push(step(
                    "conntrack",
                    "no conntrack entry for this connection: its next packet is treated as new",
                    format!(
                        "conntrack -L -p {} -s {} -d {}",
                        pkt.proto, pkt.src, pkt.dst
                    ),
                ));
                service_step(rs, intent, &pkt, local_dst)
            }
        },
        Ct::New => service_step(rs, intent, &pkt, local_dst),
    };
    steps.extend(svc.steps.clone());
    let mut branches = Vec::new();
    if let Some(v) = svc.verdict.clone() {
        branches.push(Branch::new(Vec::new(), v));
    } else if svc.backends.is_empty() {
        branches.push(
            route_branch(
                &nl,
                intent,
                &pkt,
                None,
                iif,
                svc.masquerade.clone(),
                &name_of,
                local_dst,
            )
            .await?,
        );
    } else {
        let k = svc.backends.len();
        for (ip, port) in &svc.backends {
            if pin.is_some_and(|p| p != *ip) {
                continue;
            }
            let mut after = pkt.clone();
            after.dst = *ip;
            after.port = Some(*port);
            let mut b = route_branch(
                &nl,
                intent,
                &after,
                Some(&pkt),
                iif,
                svc.masquerade.clone(),
                &name_of,
                false,
            )
            .await?;
            b.endpoint = Some(format!("{ip}:{port}"));
            b.probability = Some(format!("1/{k}"));
            branches.push(b);
        }
        if branches.is_empty() {
            return Err(ExplainError::Trace(format!(
                "--endpoint {} is not one of the Service's endpoints ({})",
                pin.map(|p| p.to_string()).unwrap_or_default(),
                svc.backends
                    .iter()
                    .map(|(i, p)| format!("{i}:{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(NodeTrace {
        node: intent.node.clone(),
        packet: pkt,
        steps,
        branches,
    })
}

/// Route one (possibly DNAT'd) packet on from this node.
#[allow(clippy::too_many_arguments)]
async fn route_branch(
    nl: &Netlink,
    intent: &NodeIntent,
    pkt: &Packet,
    before_nat: Option<&Packet>,
    iif: Option<u32>,
    mut masquerade: Option<String>,
    name_of: &dyn Fn(Option<u32>) -> String,
    local_dst: bool,
) -> Result<Branch, ExplainError> {
    let mut steps = Vec::new();
    if let Some(orig) = before_nat {
        steps.push(step(
            "service",
            format!(
                "DNAT {}:{} → {}:{}",
                orig.dst,
                orig.port.unwrap_or(0),
                pkt.dst,
                pkt.port.unwrap_or(0)
            ),
            "chain lb-rules / np-rules: dnat ip to … map",
        ));
    }
    let lookup = match iif {
        Some(i) => {
            nl.route_lookup(pkt.dst, Some(pkt.src), Some(i), None)
                .await?
        }
        None => nl.route_lookup(pkt.dst, None, None, None).await?,
    };
    let r: RouteLookup = match lookup {
        Ok(r) => r,
        Err(e) => {
            let why = format!(
                "route lookup for {}{}: {}",
                pkt.dst,
                iif.map(|i| format!(" from {} iif {}", pkt.src, name_of(Some(i))))
                    .unwrap_or_default(),
                crate::errno_text(e)
            );
            steps.push(step("drop", why.clone(), "ip route get"));
            return Ok(Branch::new(steps, Exit::Unroutable { why }));
        }
    };
    let dev = name_of(r.oif);
    let table = if r.table == 254 {
        String::new()
    } else {
        format!(" table {}", r.table)
    };
    let route_text = format!(
        "{}{}{} dev {dev}{} proto {}{table}",
        if r.kind == "unicast" {
            String::new()
        } else {
            format!("{} ", r.kind)
        },
        r.prefix,
        r.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
        if r.onlink { " onlink" } else { "" },
        r.protocol
    );
    let mut route_step = step(
        "route",
        format!("route lookup for {}: {route_text}", pkt.dst),
        format!(
            "ip route get fibmatch {}{}",
            pkt.dst,
            iif.map(|i| format!(" from {} iif {}", pkt.src, name_of(Some(i))))
                .unwrap_or_default()
        ),
    );
    // The plan's view of this destination's peer, if it is one.
    let peer = intent.peers.iter().find(|p| p.subnet.contains(&pkt.dst));
    if let Some(p) = peer {
        if let Some(planned) = intent.route_to(p.subnet) {
            let right = r.prefix == planned.dst
                && r.gateway == Some(planned.via)
                && dev == planned.dev
                && r.protocol == tweed_netlink::TWEED_RTPROTO;
            if !right {
                route_step.problem = Some(format!(
                    "tweed's plan is {} via {} dev {}{} proto 144 (run tweed doctor)",
                    planned.dst,
                    planned.via,
                    planned.dev,
                    if planned.onlink { " onlink" } else { "" }
                ));
            }
        }
    }
    steps.push(route_step);
    if r.kind == "local" || (local_dst && before_nat.is_none()) {
        if let (Some(port), Some(false)) = (
            pkt.port,
            pkt.port
                .and_then(|port| crate::sockets::listening(&pkt.proto, pkt.dst, port)),
        ) {
            let answer = if pkt.proto == "tcp" {
                "a TCP reset"
            } else {
                "ICMP port unreachable"
            };
            steps.push(step(
                "deliver",
                format!(
                    "for {} itself, but no process listens on {}:{port}/{}",
                    intent.node, pkt.dst, pkt.proto
                ),
                format!("local route; /proc/net/{}", pkt.proto),
            ));
            return Ok(Branch::new(
                steps,
                Exit::Rejected {
                    why: format!("nothing listens there: the kernel answers with {answer} (connection refused)"),
                },
            ));
        }
        steps.push(step(
            "deliver",
            format!("delivered to a process on {}", intent.node),
            "local route",
        ));
        return Ok(Branch::new(
            steps,
            Exit::Local {
                packet: pkt.clone(),
            },
        ));
    }
    if r.kind != "unicast" {
        let why = format!("a {} route", r.kind);
        return Ok(Branch::new(steps, Exit::Dropped { why }));
    }
    // Hairpin: a pod reaching itself through a Service.
    if before_nat.is_some() && pkt.src == pkt.dst {
        masquerade
            .get_or_insert_with(|| "hairpin: the pod reached itself through a Service".into());
    }
    let mut out = pkt.clone();
    if let Some(why) = &masquerade {
        // masquerade takes the address the node would send from.
        let src = match nl.route_lookup(pkt.dst, None, None, None).await? {
            Ok(o) => o.src,
            Err(_) => None,
        };
        if let Some(s) = src {
            out.src = s;
        }
        steps.push(step(
            "masquerade",
            format!("source {} → {} (masquerade: {why})", pkt.src, out.src),
            "chain masquerading: masquerade fully-random",
        ));
    } else {
        steps.push(step(
            "masquerade",
            "no masquerade: the source is kept",
            "chain masquerading: meta mark & 0x4000 == 0 return",
        ));
    }
    let vxlan = intent.plan.vxlan.as_ref().map(|v| v.name.clone());
    if r.prefix.prefix_len() == 32
        && r.gateway.is_none()
        && peer.is_none()
        && intent.subnet.contains(&pkt.dst)
    {
        steps.push(step(
            "deliver",
            format!(
                "delivered to pod {} by {dev}; it sees the client {}",
                pkt.dst, out.src
            ),
            format!("route {}/32 dev {dev} proto 144", pkt.dst),
        ));
        steps.extend(return_step(before_nat.unwrap_or(pkt), &out));
        return Ok(Branch::new(steps, Exit::Delivered { dev, packet: out }));
    }
    let gw = r.gateway.unwrap_or(pkt.dst);
    let why_mode = |p: Option<&tweed_plan::PeerIntent>| {
        p.map(|p| {
            format!(
                " ({} mode {}: {})",
                p.name,
                p.mode
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "none".into()),
                p.reason
            )
        })
        .unwrap_or_default()
    };
    if Some(&dev) == vxlan.as_ref() {
        let index = r.oif.unwrap_or(0);
        let neigh = nl.neigh_mac(index, gw).await?;
        let fdb = match neigh {
            Some(mac) => nl.fdb_dst(&dev, mac).await?,
            None => None,
        };
        let Some(mac) = neigh else {
            let why = format!("no neighbour entry for {gw} on {dev}: the packet waits for ARP, which VXLAN without learning never answers");
            steps.push(step(
                "drop",
                why.clone(),
                format!("ip neigh show {gw} dev {dev}"),
            ));
            return Ok(Branch::new(steps, Exit::Dropped { why }));
        };
        let Some(under) = fdb else {
            let why = format!("no FDB entry for {mac} on {dev}: the tunnel has nowhere to send it");
            steps.push(step(
                "drop",
                why.clone(),
                format!("bridge fdb show dev {dev}"),
            ));
            return Ok(Branch::new(steps, Exit::Dropped { why }));
        };
        let ul = match nl.route_lookup(under, None, None, None).await? {
            Ok(u) => u,
            Err(e) => {
                let why = format!("no underlay route to {under}: {}", crate::errno_text(e));
                steps.push(step("drop", why.clone(), format!("ip route get {under}")));
                return Ok(Branch::new(steps, Exit::Unroutable { why }));
            }
        };
        let p = intent.peers.iter().find(|p| p.public_ip == under).or(peer);
        steps.push(step(
            "encap",
            format!(
                "VXLAN to VTEP {gw} ({mac}) at {under}:{}, from {}, out {}{}",
                intent.vxlan_port,
                intent.plan.vxlan.as_ref().map(|v| v.local.to_string()).unwrap_or_default(),
                name_of(ul.oif),
                why_mode(p)
            ),
            format!("ip neigh {gw} lladdr {mac} dev {dev}; bridge fdb {mac} dev {dev} dst {under}; underlay route {}{}", ul.prefix, ul.gateway.map(|g| format!(" via {g}")).unwrap_or_default()),
        ));
        steps.extend(return_step(before_nat.unwrap_or(pkt), &out));
        return Ok(Branch::new(
            steps,
            Exit::Forwarded {
                encap: "vxlan".into(),
                next: under,
                dev: name_of(ul.oif),
                peer: p.map(|p| p.name.clone()),
                packet: out,
            },
        ));
    }
    let encap = if dev == tweed_plan::IPIP_DEV {
        "ipip"
    } else {
        "direct"
    };
    let p = intent.peers.iter().find(|p| p.public_ip == gw).or(peer);
    if encap == "direct"
        && p.is_some_and(|p| !matches!(p.mode, Some(Mode::Direct | Mode::Bgp)))
        && peer.is_some()
    {
        steps
            .last_mut()
            .expect("pushed")
            .problem
            .get_or_insert_with(|| "tweed's plan does not route this peer directly".into());
    }
    steps.push(step(
        "encap",
        format!(
            "{} to {gw} out {dev}{}",
            if encap == "ipip" {
                "IP-in-IP"
            } else {
                "sent unencapsulated"
            },
            why_mode(p)
        ),
        route_text,
    ));
    steps.extend(return_step(before_nat.unwrap_or(pkt), &out));
    Ok(Branch::new(
        steps,
        Exit::Forwarded {
            encap: encap.into(),
            next: gw,
            dev,
            peer: p.map(|p| p.name.clone()),
            packet: out,
        },
    ))
}

/// The return path where it differs: conntrack undoes the NAT for replies.
pub fn return_step(first: &Packet, last: &Packet) -> Option<Step> {
    (first.dst != last.dst || first.src != last.src).then(|| {
        step(
            "return",
            format!(
                "replies {} → {} are rewritten by conntrack back to {} → {}",
                last.dst, last.src, first.dst, first.src
            ),
            "conntrack reverse NAT (conntrack -L -d …)",
        )
    })
}

/// The tree for people. `minimal`: only the decisions (no citations), for
/// golden tests that must survive rule and route reshuffles.
pub fn render(traces: &[NodeTrace], minimal: bool) -> String {
    let mut s = String::new();
    for t in traces {
        s.push_str(&format!("{}: {}\n", t.node, t.packet));
        let line = |s: &mut String, indent: &str, st: &Step| {
            s.push_str(&format!("{indent}{}: {}\n", st.kind, st.text));
            if !minimal && !st.cite.is_empty() {
                s.push_str(&format!("{indent}    ({})\n", st.cite));
            }
            if let Some(p) = &st.problem {
                let red = if minimal { "" } else { "\x1b[31m" };
                let end = if minimal { "" } else { "\x1b[0m" };
                s.push_str(&format!("{indent}    {red}DISAGREES: {p}{end}\n"));
            }
        };
        for st in &t.steps {
            line(&mut s, "  ", st);
        }
        for b in &t.branches {
            let indent = if b.endpoint.is_some() {
                s.push_str(&format!(
                    "  ├─ endpoint {} (probability {})\n",
                    b.endpoint.as_deref().unwrap_or(""),
                    b.probability.as_deref().unwrap_or("")
                ));
                "  │  "
            } else {
                "  "
            };
            for st in &b.steps {
                line(&mut s, indent, st);
            }
            s.push_str(&format!("{indent}=> {}\n", exit_text(&b.exit)));
        }
    }
    s
}

/// One line per way the packet goes (`--summary`).
pub fn render_summary(traces: &[NodeTrace]) -> String {
    let mut s = String::new();
    for t in traces {
        for b in &t.branches {
            let via = b
                .endpoint
                .as_ref()
                .map(|e| format!(" ⇒ {e} ({})", b.probability.as_deref().unwrap_or("")))
                .unwrap_or_default();
            let problems = t
                .steps
                .iter()
                .chain(&b.steps)
                .filter(|x| x.problem.is_some())
                .count();
            s.push_str(&format!(
                "{}: {}{via} ⇒ {}{}\n",
                t.node,
                t.packet,
                exit_text(&b.exit),
                if problems > 0 {
                    format!("  [{problems} step(s) DISAGREE with the plan]")
                } else {
                    String::new()
                }
            ));
        }
    }
    s
}

pub fn exit_text(e: &Exit) -> String {
    match e {
        Exit::Delivered { dev, packet } => {
            format!("delivered by {dev}; the pod sees {}", packet.src)
        }
        Exit::Local { packet } => format!("delivered to a local process, from {}", packet.src),
        Exit::Forwarded {
            encap,
            next,
            peer,
            packet,
            ..
        } => format!(
            "{encap} to {}{next}: {packet}",
            peer.as_ref()
                .map(|p| format!("{p} at "))
                .unwrap_or_default()
        ),
        Exit::Rejected { why } => format!("rejected: {why}"),
        Exit::Dropped { why } => format!("dropped: {why}"),
        Exit::Unroutable { why } => format!("not routed: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// tweed's elements as a set of (set, key) and map values.
    #[derive(Default)]
    struct Fake {
        has: BTreeSet<(String, String)>,
        values: BTreeMap<(String, String), (Ipv4Addr, u16)>,
        ks: Vec<u16>,
        verdicts: BTreeMap<(String, String), String>,
        chains: BTreeMap<String, Vec<String>>,
    }
    impl Ruleset for Fake {
        fn has(&self, set: &str, key: &str) -> bool {
            self.has.contains(&(set.into(), key.into()))
                || self.values.contains_key(&(set.into(), key.into()))
        }
        fn value(&self, map: &str, key: &str) -> Option<(Ipv4Addr, u16)> {
            self.values.get(&(map.into(), key.into())).copied()
        }
        fn ks(&self) -> Vec<u16> {
            self.ks.clone()
        }
        fn verdict(&self, map: &str, key: &str) -> Option<String> {
            self.verdicts.get(&(map.into(), key.into())).cloned()
        }
        fn chain(&self, name: &str) -> Vec<String> {
            self.chains.get(name).cloned().unwrap_or_default()
        }
    }

    fn intent() -> NodeIntent {
        let body = serde_json::json!({
            "node": "n1", "subnet": "10.244.0.0/24", "clusterCidr": "10.244.0.0/16",
            "serviceCidr": "10.96.0.0/12", "backend": "vxlan", "vxlanPort": 8472,
            "underlayDev": "eth0", "bindIp": "198.51.100.10", "publicIp": "198.51.100.10",
            "underlayMtu": 1500, "podMtu": 1450, "cniConfDir": "/etc/cni/net.d", "cniBinDir": null,
            "resyncSecs": 30, "peers": [],
            "plan": {"vxlan": null, "ipip": null, "peers": [], "routes": [], "neighs": [], "fdb": [], "skipped": []}
        });
        serde_json::from_value(body).unwrap()
    }

    fn pkt(src: &str, dst: &str, port: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: "tcp".into(),
            port: Some(port),
        }
    }

    fn fake_service(k: u16) -> Fake {
        let mut f = Fake {
            ks: (1..=32).collect(),
            ..Default::default()
        };
        f.has
            .insert(("lb-all".into(), "10.96.0.10 . tcp . 80".into()));
        // A leftover in a lower K's set: the highest K must win.
        f.has.insert(("lb-tcp-1".into(), "10.96.0.10 . 80".into()));
        f.has
            .insert((format!("lb-tcp-{k}"), "10.96.0.10 . 80".into()));
        for slot in 0..k {
            f.values.insert(
                (format!("be-tcp-{k}"), format!("10.96.0.10 . 80 . {slot}")),
                (Ipv4Addr::new(10, 244, 1, 2 + slot as u8), 8080),
            );
        }
        f
    }

    #[test]
    fn a_cluster_ip_forks_per_endpoint_with_the_highest_k() {
        let d = service_step(
            &fake_service(3),
            &intent(),
            &pkt("10.244.0.5", "10.96.0.10", 80),
            false,
        );
        assert_eq!(d.backends.len(), 3);
        assert!(d.masquerade.is_none());
        assert!(
            d.steps[0]
                .text
                .contains("3 endpoints, each with probability 1/3"),
            "{:?}",
            d.steps
        );
        assert!(d.steps[0].cite.contains("set lb-tcp-3"), "{:?}", d.steps);
    }

    #[test]
    fn a_node_process_is_masqueraded_and_a_missing_port_rejected() {
        let d = service_step(
            &fake_service(1),
            &intent(),
            &pkt("198.51.100.10", "10.96.0.10", 80),
            false,
        );
        assert!(d
            .masquerade
            .as_deref()
            .unwrap()
            .contains("outside the cluster CIDR"));
        let d = service_step(
            &fake_service(1),
            &intent(),
            &pkt("10.244.0.5", "10.96.0.10", 81),
            false,
        );
        assert!(matches!(d.verdict, Some(Exit::Rejected { .. })), "{d:?}");
        let mut f = fake_service(1);
        f.has
            .insert(("rej-lb".into(), "10.96.0.11 . tcp . 80".into()));
        let d = service_step(&f, &intent(), &pkt("10.244.0.5", "10.96.0.11", 80), false);
        assert!(
            matches!(&d.verdict, Some(Exit::Rejected { why }) if why.contains("no endpoints")),
            "{d:?}"
        );
        f.has.insert(("drop-np".into(), "tcp . 30080".into()));
        let d = service_step(
            &f,
            &intent(),
            &pkt("203.0.113.9", "198.51.100.10", 30080),
            true,
        );
        assert!(matches!(d.verdict, Some(Exit::Dropped { .. })), "{d:?}");
    }

    #[test]
    fn client_ip_affinity_forks_for_a_new_client_and_sticks_for_a_known_one() {
        let mut f = Fake::default();
        let svc = "10.96.0.3 . tcp . 80";
        f.verdicts
            .insert(("lb".into(), svc.into()), "goto aff-1".into());
        f.chains.insert(
            "aff-1".into(),
            vec![
                "ip saddr @aff-1-a goto aff-1-a".into(),
                "ip saddr @aff-1-b goto aff-1-b".into(),
                "numgen random mod 2 vmap { 0 : goto aff-1-a, 1 : goto aff-1-b }".into(),
            ],
        );
        for (c, ip) in [("aff-1-a", "10.244.1.2"), ("aff-1-b", "10.244.2.2")] {
            f.chains.insert(
                c.into(),
                vec![
                    format!("update @{c} {{ ip saddr }}"),
                    format!("meta l4proto tcp dnat to {ip}:8080"),
                ],
            );
        }
        let d = service_step(&f, &intent(), &pkt("10.244.0.5", "10.96.0.3", 80), false);
        assert_eq!(d.backends.len(), 2, "{d:?}");
        assert!(d.steps[0].text.contains("no recent connection"), "{d:?}");
        f.has.insert(("aff-1-b".into(), "10.244.0.5".into()));
        let d = service_step(&f, &intent(), &pkt("10.244.0.5", "10.96.0.3", 80), false);
        assert_eq!(d.backends, vec![("10.244.2.2".parse().unwrap(), 8080)]);
        assert!(d.steps[0].cite.contains("set aff-1-b"), "{d:?}");
        assert_eq!(
            current_backends(&f, "10.96.0.3".parse().unwrap(), "tcp", 80).map(|b| b.len()),
            Some(2)
        );
        let listed = "table ip tweed {\n\tchain aff-1-a {\n\t\tupdate @aff-1-a { ip saddr }\n\t\tmeta l4proto tcp dnat to 10.244.1.2:8080\n\t}\n}\n";
        assert_eq!(chain_rules(listed).len(), 2);
        assert_eq!(
            dnat_target(&chain_rules(listed)[1]),
            Some(("10.244.1.2".parse().unwrap(), 8080))
        );
    }

    #[test]
    fn node_ports_only_match_local_addresses() {
        let mut f = Fake {
            ks: vec![1, 2],
            ..Default::default()
        };
        f.has.insert(("np-all".into(), "tcp . 30080".into()));
        f.has.insert(("np-tcp-2".into(), "30080".into()));
        f.has.insert(("masq-np".into(), "tcp . 30080".into()));
        f.values.insert(
            ("npbe-tcp-2".into(), "30080 . 0".into()),
            (Ipv4Addr::new(10, 244, 1, 2), 8080),
        );
        f.values.insert(
            ("npbe-tcp-2".into(), "30080 . 1".into()),
            (Ipv4Addr::new(10, 244, 2, 2), 8080),
        );
        let p = pkt("203.0.113.9", "198.51.100.10", 30080);
        let d = service_step(&f, &intent(), &p, true);
        assert_eq!(d.backends.len(), 2);
        assert!(d.masquerade.unwrap().contains("node port"));
        let d = service_step(&f, &intent(), &p, false);
        assert!(d.backends.is_empty() && d.verdict.is_none());
    }

    #[test]
    fn load_balancer_source_ranges_drop_before_dnat() {
        let mut f = fake_service(2);
        let key = "10.96.0.10 . tcp . 80";
        f.verdicts
            .insert(("fw".into(), key.into()), "jump fw-0123456789ab".into());
        f.chains.insert(
            "fw-0123456789ab".into(),
            vec!["ip saddr != { 198.51.100.192/26, 203.0.113.7 } drop".into()],
        );
        let d = service_step(&f, &intent(), &pkt("10.244.1.5", "10.96.0.10", 80), false);
        assert!(
            matches!(&d.verdict, Some(Exit::Dropped { why }) if why.contains("198.51.100.192/26, 203.0.113.7/32")),
            "{d:?}"
        );
        assert!(d.backends.is_empty(), "dropped before DNAT: {d:?}");
        assert!(d.steps[0].cite.contains("map fw:"), "{d:?}");
        let d = service_step(
            &f,
            &intent(),
            &pkt("198.51.100.200", "10.96.0.10", 80),
            false,
        );
        assert!(d.verdict.is_none(), "{d:?}");
        assert_eq!(d.steps[0].kind, "firewall");
        assert_eq!(d.backends.len(), 2, "admitted, then balanced: {d:?}");
        // One range prints without braces.
        assert_eq!(
            source_ranges("ip saddr != 198.51.100.192/26 drop").unwrap(),
            ["198.51.100.192/26".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        assert_eq!(source_ranges("ip saddr 1.2.3.4 accept"), None);
    }

    #[test]
    fn a_pod_reaches_every_endpoint_of_a_policy_local_external_ip() {
        let mut f = Fake::default();
        let key = "203.0.113.50 . tcp . 80";
        f.has.insert(("drop-lb".into(), key.into()));
        f.verdicts
            .insert(("xlb".into(), key.into()), "goto xlb-0123456789ab".into());
        f.chains.insert(
            "xlb-0123456789ab".into(),
            vec!["meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.244.1.2 . 8080, 1 : 10.244.2.2 . 8080 }".into()],
        );
        // From a pod: both endpoints, although this node has none.
        let d = service_step(&f, &intent(), &pkt("10.244.0.5", "203.0.113.50", 80), false);
        assert_eq!(d.backends.len(), 2, "{d:?}");
        assert!(d.verdict.is_none(), "{d:?}");
        assert!(d.steps[0].text.contains("from a pod"), "{d:?}");
        // From outside: policy Local drops it here.
        let d = service_step(
            &f,
            &intent(),
            &pkt("198.51.100.200", "203.0.113.50", 80),
            false,
        );
        assert!(matches!(d.verdict, Some(Exit::Dropped { .. })), "{d:?}");
        // The node's own address counts as inside; one endpoint prints plainly.
        f.chains.insert(
            "xlb-0123456789ab".into(),
            vec!["meta l4proto tcp dnat to 10.244.2.2:8080".into()],
        );
        let d = service_step(
            &f,
            &intent(),
            &pkt("198.51.100.10", "203.0.113.50", 80),
            true,
        );
        assert_eq!(d.backends, [("10.244.2.2".parse().unwrap(), 8080)]);
    }

    #[test]
    fn element_values_parse_from_nft_text() {
        let t = "table ip tweed {\n\tmap be-tcp {\n\t\ttype ipv4_addr . inet_service . integer : ipv4_addr . inet_service\n\t\tsize 65536\n\t\telements = { 10.96.0.1 . 80 . 0 : 10.244.0.3 . 80 }\n\t}\n}\n";
        assert_eq!(element_value(t), Some((Ipv4Addr::new(10, 244, 0, 3), 80)));
        assert_eq!(
            element_value("table ip tweed { set lb-all { elements = { 10.96.0.1 . tcp . 80 } } }"),
            None
        );
    }

    #[test]
    fn minimal_output_has_no_citations() {
        let t = NodeTrace {
            node: "n1".into(),
            packet: pkt("10.244.0.5", "10.96.0.10", 80),
            steps: vec![step(
                "service",
                "Service 10.96.0.10:80/tcp: 1 endpoint",
                "set lb-all",
            )],
            branches: vec![Branch {
                endpoint: Some("10.244.0.6:8080".into()),
                probability: Some("1/1".into()),
                steps: vec![],
                exit: Exit::Delivered {
                    dev: "veth1".into(),
                    packet: pkt("10.244.0.5", "10.244.0.6", 8080),
                },
            }],
        };
        let m = render(std::slice::from_ref(&t), true);
        assert!(!m.contains("set lb-all"), "{m}");
        assert!(
            m.contains("=> delivered by veth1; the pod sees 10.244.0.5"),
            "{m}"
        );
        assert!(render(&[t], false).contains("(set lb-all)"));
    }
}

/// What `nft monitor trace` showed for one connection's first packet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The rule that DNATed it (chain and rule text), if one did.
    pub dnat: Option<String>,
    /// The destination after the Service step (the endpoint, or unchanged).
    pub daddr: Option<Ipv4Addr>,
    /// Did the masquerading chain masquerade it (`Some(false)`: it returned)?
    pub masquerade: Option<bool>,
    /// The device it left by.
    pub oif: Option<String>,
    /// It was sent to the reject chain.
    pub rejected: bool,
    /// A rule dropped it.
    pub dropped: bool,
}

/// Does this `nft monitor trace` packet line start a connection of
/// `proto` (a TCP SYN; any UDP datagram: its first is the one traced)?
pub fn first_packet(line: &str, proto: &str) -> bool {
    line.contains(" packet: ")
        && match proto {
            "tcp" => line.contains("tcp flags == syn"),
            p => line.contains(&format!(" {p} sport ")),
        }
}

/// The first packet of the `proto` connection from source port `sport`
/// (the first one seen when `None`) in `nft monitor trace` text (nft 1.0.6
/// prints text even with -j): every line of its trace id, in order. The
/// monitor may still be writing an earlier connection's events.
pub fn observe_first(text: &str, proto: &str, sport: Option<u16>) -> Option<Observed> {
    let lines: Vec<&str> = text.lines().collect();
    let want = sport.map(|p| format!("{proto} sport {p} "));
    let start = lines.iter().position(|l| {
        first_packet(l, proto) && want.as_ref().is_none_or(|w| l.contains(w.as_str()))
    })?;
    let id = lines[start].split_whitespace().nth(2)?.to_string();
    let mut o = Observed::default();
    let mut seen_syn = false;
    for l in lines[start..]
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some(id.as_str()))
    {
        // A trace id can be reused by a later packet: stop at its next start.
        if l.contains(" packet: ") && l.contains("trace-") {
            if seen_syn {
                break;
            }
            seen_syn = true;
        }
        let chain = l.split_whitespace().nth(5).unwrap_or_default();
        if l.contains(" packet: ") {
            let words: Vec<&str> = l.split_whitespace().collect();
            if chain != "trace-pre"
                && chain != "trace-out"
                && chain != "nat-prerouting"
                && chain != "nat-output"
            {
                // `ip daddr`, not `ether daddr`.
                if let Some(w) = words.windows(3).find(|w| w[0] == "ip" && w[1] == "daddr") {
                    o.daddr = w[2].parse().ok();
                }
            }
            if let Some(i) = words.iter().position(|w| *w == "oif") {
                o.oif = words.get(i + 1).map(|d| d.trim_matches('"').to_string());
            }
        } else if chain == "masquerading" && l.contains(" rule ") {
            if l.contains("(verdict return)") {
                o.masquerade.get_or_insert(false);
            } else if l.contains(" masquerade") {
                o.masquerade = Some(true);
            }
        } else if l.contains(" rule ") && (l.contains(" dnat ip to ") || l.contains(" dnat to ")) {
            o.dnat = Some(format!(
                "{chain}: {}",
                l.split(" rule ").nth(1).unwrap_or_default()
            ));
        } else if l.contains("jump reject-chain") {
            o.rejected = true;
        } else if l.contains(" rule ") && l.trim_end().ends_with("(verdict drop)") {
            o.dropped = true;
        }
    }
    Some(o)
}

#[cfg(test)]
mod nftrace_tests {
    use super::*;

    #[test]
    fn a_syn_through_a_service() {
        let t = r#"trace id bca0db5c ip tweed trace-pre packet: iif "tw3731b46a0e7" ip saddr 10.244.1.1 ip daddr 10.96.0.1 tcp sport 54502 tcp dport 80 tcp flags == syn tcp window 64860
trace id bca0db5c ip tweed trace-pre rule ip saddr 10.244.1.1 ip daddr 10.96.0.1 meta nftrace set 1 (verdict continue)
trace id bca0db5c ip tweed nat-prerouting packet: iif "tw3731b46a0e7" ip saddr 10.244.1.1 ip daddr 10.96.0.1 tcp flags == syn
trace id bca0db5c ip tweed services rule ip daddr . meta l4proto . th dport @lb-all jump lb-rules (verdict jump lb-rules)
trace id bca0db5c ip tweed lb-rules rule ip daddr . tcp dport @lb-tcp-3 dnat ip to ip daddr . tcp dport . numgen random mod 3 map @be-tcp (verdict accept)
trace id bca0db5c ip tweed filter-forward packet: iif "tw3731b46a0e7" oif "tw6039ca005e4" ether saddr 0a:39:46:cb:a3:3d ether daddr da:fb:e3:a5:cd:3b ip saddr 10.244.1.1 ip daddr 10.244.1.3 tcp flags == syn
trace id bca0db5c ip tweed masquerading rule meta mark & 0x00004000 == 0x00000000 return (verdict return)
trace id bca0db5c ip tweed trace-pre packet: iif "tw3731b46a0e7" ip saddr 10.244.1.1 ip daddr 10.96.0.1 tcp flags == ack
"#;
        let o = observe_first(t, "tcp", None).unwrap();
        assert_eq!(o.daddr, Some(Ipv4Addr::new(10, 244, 1, 3)));
        assert_eq!(o.oif.as_deref(), Some("tw6039ca005e4"));
        assert_eq!(o.masquerade, Some(false));
        assert!(o
            .dnat
            .unwrap()
            .starts_with("lb-rules: ip daddr . tcp dport @lb-tcp-3 dnat"));
        assert!(!o.rejected);
    }

    #[test]
    fn the_syn_of_the_given_source_port_is_the_one_observed() {
        let t = r#"trace id 7 ip tweed trace-pre packet: iif "a" ip saddr 10.244.1.1 ip daddr 10.96.0.1 tcp sport 1111 tcp dport 80 tcp flags == syn
trace id 7 ip tweed filter-forward packet: iif "a" oif "tweed.1" ip saddr 10.244.1.1 ip daddr 10.244.2.3 tcp sport 1111 tcp flags == syn
trace id 7 ip tweed lb-rules rule ip daddr . tcp dport @lb-tcp-3 dnat ip to ip daddr . tcp dport . numgen random mod 3 map @be-tcp (verdict accept)
trace id 8 ip tweed trace-pre packet: iif "a" ip saddr 10.244.1.1 ip daddr 10.96.0.1 tcp sport 2222 tcp dport 80 tcp flags == syn
trace id 8 ip tweed lb-rules rule ip daddr . tcp dport @lb-tcp-3 dnat ip to ip daddr . tcp dport . numgen random mod 3 map @be-tcp (verdict accept)
trace id 8 ip tweed filter-forward packet: iif "a" oif "b" ip saddr 10.244.1.1 ip daddr 10.244.1.3 tcp sport 2222 tcp flags == syn
"#;
        assert_eq!(
            observe_first(t, "tcp", Some(2222)).unwrap().daddr,
            Some(Ipv4Addr::new(10, 244, 1, 3))
        );
        assert_eq!(
            observe_first(t, "tcp", None).unwrap().daddr,
            Some(Ipv4Addr::new(10, 244, 2, 3))
        );
        assert!(observe_first(t, "tcp", Some(3333)).is_none());
    }

    #[test]
    fn a_hairpin_is_masqueraded_not_dnatted_twice() {
        let t = r#"trace id 1 ip tweed trace-pre packet: iif "a" ip saddr 10.244.1.3 ip daddr 10.96.0.1 tcp flags == syn
trace id 1 ip tweed lb-rules rule ip daddr . tcp dport @lb-tcp-3 dnat ip to ip daddr . tcp dport . numgen random mod 3 map @be-tcp (verdict accept)
trace id 1 ip tweed nat-postrouting packet: iif "a" oif "a" ip saddr 10.244.1.3 ip daddr 10.244.1.3 tcp flags == syn
trace id 1 ip tweed masquerading rule ct status dnat ip saddr . ip daddr @hairpin masquerade (verdict accept)
"#;
        let o = observe_first(t, "tcp", None).unwrap();
        assert_eq!(o.masquerade, Some(true));
        assert!(o.dnat.unwrap().starts_with("lb-rules"));
    }
}
