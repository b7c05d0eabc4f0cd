//! Services → nftables, planned per node.
//!
//! The ruleset has a fixed shape; every Service is only set and map
//! elements, so a change to one Service is a handful of element updates and
//! a full sync of 10k Services is one transaction with no per-Service sets
//! (the kernel looks sets up by linear search, so per-Service anonymous
//! sets make a large transaction quadratic). The exception is ClientIP
//! affinity, which gets kube-proxy's per-endpoint dynamic sets and chains.
//!
//! Load balancing: a service key (ip . proto . port) with K backends is in
//! set `lb-all` and in set `lb-PROTO-K` (keyed ip . port); the rule for
//! (PROTO, K) does `dnat to ip daddr . th dport . numgen random mod K map
//! @be-PROTO-K`, so each backend has probability exactly 1/K. Each K has a
//! map of its own because the kernel walks a map every time a rule that
//! uses it is added. New connections
//! that are not for a service pay one lookup (`lb-all`). Node ports work the
//! same with port keys (`np-all`, `np-PROTO-K`, `npbe-PROTO-K`), matched on
//! any local address. Rules exist for K up to [`PRESET_K`] and any larger
//! K in use; a change that needs a new K is applied as a full (atomic)
//! resync, because nft 1.0.6 cannot add a rule that uses a `typeof` map to
//! a table that already exists.
//!
//! No element an endpoint change touches is a verdict (jump/goto): the
//! kernel re-validates the whole table on any commit that changes one,
//! which costs time in proportion to the number of services. Only
//! affinity services are reached through a verdict map (`lb`).
//!
//! Each node plans its own view: "Local" traffic policies just mean the
//! node's own endpoints. Masquerade marking follows kube-proxy: sources
//! outside the cluster CIDR reaching a service IP, external traffic under
//! policy Cluster, and hairpin (a pod reaching itself, caught after DNAT
//! by source == destination).
//!
//! Elements are small fixed-size values, not text, so the agent can hold
//! what it committed for 10k services in a few MiB; text exists only while
//! a transaction is being written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tweed_model::{Endpoints, Protocol, Service, ServiceType, TrafficPolicy};

pub const TABLE: &str = "tweed";
/// kube-proxy's masquerade mark bit.
pub const MASQ_MARK: u32 = 0x4000;
/// Endpoint counts that always have chains, so common changes never need
/// to touch the ruleset's shape.
pub const PRESET_K: u16 = 32;
const PROTOS: [Protocol; 3] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub node: String,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    /// This node's pod subnet (hairpin pairs are its addresses).
    pub node_subnet: Ipv4Net,
}

/// (service or external IP, protocol, port)
pub type SvcKey = (Ipv4Addr, Protocol, u16);
/// (protocol, node port or host port)
pub type PortKey = (Protocol, u16);
/// (pod IP, port)
pub type Backend = (Ipv4Addr, u16);

/// One element of the ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Elem {
    /// `lb-PROTO-K`: the key has K backends.
    Lb(SvcKey, u16),
    /// `lb-all`: the key is load-balanced (by some K).
    LbAll(SvcKey),
    /// `lb`: key → `goto aff-…` (ClientIP affinity with this timeout).
    LbAffinity(SvcKey, u32),
    /// `be-PROTO-K`: (ip . port . slot) → backend, for a key with K
    /// backends (fields: key, K, slot, backend). One map per K, so each
    /// is bound by one rule: the kernel walks a map each time a rule
    /// that looks up in it is added (a loop check), so one shared map
    /// bound by every K's rule cost a walk of all its buckets per rule.
    Be(SvcKey, u16, u16, Backend),
    /// A backend reached through a chain of the service's own (affinity,
    /// or `xlb`): no element of its own; kept so conntrack clean-up knows
    /// about it. `NpChainBackend` is the same for a node port.
    ChainBackend(SvcKey, Backend),
    /// `np-PROTO-K`: the node port has K backends.
    Np(PortKey, u16),
    /// `np-all`: the node port is load-balanced.
    NpAll(PortKey),
    /// `npbe-PROTO-K`: (port . slot) → backend (key, K, slot, backend).
    NpBe(PortKey, u16, u16, Backend),
    MasqLb(SvcKey),
    MasqNp(PortKey),
    RejLb(SvcKey),
    RejNp(PortKey),
    /// `drop-lb`: policy Local, endpoints only on other nodes (kube-proxy
    /// drops rather than refuses).
    DropLb(SvcKey),
    DropNp(PortKey),
    /// `fw`: a load balancer IP with source ranges → `jump fw-…`, whose
    /// rule drops every other source (the second field hashes the ranges
    /// into the chain's name, so a chain never changes in place).
    Firewall(SvcKey, u64),
    /// `xlb`: an external or load balancer IP of a policy-Local Service →
    /// `goto xlb-…`, which spreads traffic from pods and from the node
    /// itself over every endpoint in the cluster, as kube-proxy does
    /// ("redirect pods trying to reach external loadbalancer VIP to
    /// clusterIP"): Local only keeps traffic from outside on its node. The
    /// second field hashes the endpoints into the chain's name.
    Xlb(SvcKey, u64),
    /// `npxlb`: the same for a policy-Local node port (`goto npxlb-…`).
    NpXlb(PortKey, u64),
    /// A node port's backend reached through its `npxlb-…` chain.
    NpChainBackend(PortKey, Backend),
    /// `hostports`: (proto . port) → pod.
    HostPort(PortKey, Backend),
}

/// A flow conntrack may hold towards a backend: (protocol, service IP or
/// None for a node port, port, backend IP or None for "no backend").
pub type Flow = (Protocol, Option<Ipv4Addr>, u16, Option<Ipv4Addr>);

impl Elem {
    /// The name of the set or map it lives in (`None`: no element of its own).
    pub fn set_name(&self) -> Option<String> {
        self.group().map(Group::name)
    }

    /// The chain a verdict map element goes to (ClientIP affinity).
    pub fn goto_chain(&self) -> Option<String> {
        match self {
            Elem::LbAffinity(k, t) => Some(affinity_chain(k, *t)),
            Elem::Xlb(k, h) => Some(xlb_chain(k, *h)),
            Elem::NpXlb(k, h) => Some(npxlb_chain(k, *h)),
            _ => None,
        }
    }

    /// The chain a verdict map element jumps to (and returns from):
    /// a load balancer's source ranges.
    pub fn jump_chain(&self) -> Option<String> {
        match self {
            Elem::Firewall(k, h) => Some(firewall_chain(k, *h)),
            _ => None,
        }
    }

    /// The set or map it lives in (`None`: no element of its own).
    fn group(&self) -> Option<Group> {
        Some(match self {
            Elem::Lb((_, p, _), n) => Group::LbK(*p, *n),
            Elem::LbAll(_) => Group::LbAll,
            Elem::LbAffinity(..) => Group::Lb,
            Elem::Be((_, p, _), n, ..) => Group::Be(*p, *n),
            Elem::ChainBackend(..) => return None,
            Elem::Np((p, _), n) => Group::NpK(*p, *n),
            Elem::NpAll(_) => Group::NpAll,
            Elem::NpBe((p, _), n, ..) => Group::NpBe(*p, *n),
            Elem::MasqLb(_) => Group::MasqLb,
            Elem::MasqNp(_) => Group::MasqNp,
            Elem::RejLb(_) => Group::RejLb,
            Elem::RejNp(_) => Group::RejNp,
            Elem::DropLb(_) => Group::DropLb,
            Elem::DropNp(_) => Group::DropNp,
            Elem::HostPort(..) => Group::HostPorts,
            Elem::Firewall(..) => Group::Fw,
            Elem::Xlb(..) => Group::Xlb,
            Elem::NpXlb(..) => Group::NpXlb,
            Elem::NpChainBackend(..) => return None,
        })
    }

    /// Write the element's key (and, for maps, `: value`) as nft reads it.
    fn write(&self, s: &mut String, with_value: bool) {
        let _ = match self {
            Elem::Lb((ip, _, port), _) => write!(s, "{ip} . {port}"),
            Elem::LbAll((ip, p, port))
            | Elem::LbAffinity((ip, p, port), _)
            | Elem::MasqLb((ip, p, port))
            | Elem::RejLb((ip, p, port))
            | Elem::DropLb((ip, p, port))
            | Elem::Firewall((ip, p, port), _)
            | Elem::Xlb((ip, p, port), _) => write!(s, "{ip} . {} . {port}", p.nft()),
            Elem::Be((ip, _, port), _, slot, _) => write!(s, "{ip} . {port} . {slot}"),
            Elem::Np((_, port), _) => write!(s, "{port}"),
            Elem::NpAll((p, port))
            | Elem::MasqNp((p, port))
            | Elem::RejNp((p, port))
            | Elem::DropNp((p, port))
            | Elem::NpXlb((p, port), _)
            | Elem::HostPort((p, port), _) => write!(s, "{} . {port}", p.nft()),
            Elem::NpBe((_, port), _, slot, _) => write!(s, "{port} . {slot}"),
            Elem::ChainBackend(..) | Elem::NpChainBackend(..) => Ok(()),
        };
        if !with_value {
            return;
        }
        let _ = match self {
            Elem::Be(.., (ip, port))
            | Elem::NpBe(.., (ip, port))
            | Elem::HostPort(_, (ip, port)) => {
                write!(s, " : {ip} . {port}")
            }
            _ => match (self.goto_chain(), self.jump_chain()) {
                (Some(c), _) => write!(s, " : goto {c}"),
                (None, Some(c)) => write!(s, " : jump {c}"),
                (None, None) => Ok(()),
            },
        };
    }

    fn flow(&self) -> Option<Flow> {
        match *self {
            Elem::Be((ip, p, port), _, _, (b, _)) | Elem::ChainBackend((ip, p, port), (b, _)) => {
                Some((p, Some(ip), port, Some(b)))
            }
            Elem::NpBe((p, port), _, _, (b, _)) | Elem::NpChainBackend((p, port), (b, _)) => {
                Some((p, None, port, Some(b)))
            }
            Elem::RejLb((ip, p, port)) | Elem::DropLb((ip, p, port)) => {
                Some((p, Some(ip), port, None))
            }
            Elem::RejNp((p, port)) | Elem::DropNp((p, port)) => Some((p, None, port, None)),
            _ => None,
        }
    }

    fn k(&self) -> Option<u16> {
        match self {
            Elem::Lb(_, n) | Elem::Np(_, n) => Some(*n),
            _ => None,
        }
    }
}

/// The sets and maps elements live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Lb,
    LbAll,
    LbK(Protocol, u16),
    Be(Protocol, u16),
    NpAll,
    NpK(Protocol, u16),
    NpBe(Protocol, u16),
    MasqLb,
    MasqNp,
    RejLb,
    RejNp,
    DropLb,
    DropNp,
    HostPorts,
    Fw,
    Xlb,
    NpXlb,
}

impl Group {
    fn name(self) -> String {
        match self {
            Group::Lb => "lb".into(),
            Group::LbAll => "lb-all".into(),
            Group::LbK(p, k) => format!("lb-{}-{k}", p.nft()),
            Group::Be(p, k) => format!("be-{}-{k}", p.nft()),
            Group::NpAll => "np-all".into(),
            Group::NpK(p, k) => format!("np-{}-{k}", p.nft()),
            Group::NpBe(p, k) => format!("npbe-{}-{k}", p.nft()),
            Group::MasqLb => "masq-lb".into(),
            Group::MasqNp => "masq-np".into(),
            Group::RejLb => "rej-lb".into(),
            Group::RejNp => "rej-np".into(),
            Group::DropLb => "drop-lb".into(),
            Group::DropNp => "drop-np".into(),
            Group::HostPorts => "hostports".into(),
            Group::Fw => "fw".into(),
            Group::Xlb => "xlb".into(),
            Group::NpXlb => "npxlb".into(),
        }
    }
}

/// One service's share of the ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contribution {
    /// Sorted, without duplicates.
    pub elems: Vec<Elem>,
    /// Sets of this service's own (affinity), by name → definition body.
    pub own_sets: BTreeMap<String, String>,
    /// Chains of this service's own (affinity), by name → rules.
    pub chains: BTreeMap<String, Vec<String>>,
}

impl Contribution {
    fn finish(mut self) -> Self {
        self.elems.sort_unstable();
        self.elems.dedup();
        self.elems.shrink_to_fit();
        self
    }

    /// The flows this contribution sends somewhere. Leftover slots beyond a
    /// key's live endpoint count (see [`render_delta`]) send nothing.
    pub fn flows(&self) -> BTreeSet<Flow> {
        let mut live: BTreeMap<(Protocol, Option<Ipv4Addr>, u16), u16> = BTreeMap::new();
        for e in &self.elems {
            let (key, n) = match *e {
                Elem::Lb((ip, p, port), n) => ((p, Some(ip), port), n),
                Elem::Np((p, port), n) => ((p, None, port), n),
                _ => continue,
            };
            let m = live.entry(key).or_insert(n);
            *m = (*m).max(n);
        }
        self.elems
            .iter()
            .filter(|e| match **e {
                // The live K is the highest (lower ones may linger).
                Elem::Be((ip, p, port), k, _, _) => live.get(&(p, Some(ip), port)) == Some(&k),
                Elem::NpBe((p, port), k, _, _) => live.get(&(p, None, port)) == Some(&k),
                _ => true,
            })
            .filter_map(Elem::flow)
            .collect()
    }
}

/// Which endpoint counts have chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub ks: BTreeSet<u16>,
}

impl Shape {
    fn preset() -> Self {
        Shape {
            ks: (1..=PRESET_K).collect(),
        }
    }
}

/// The backends of each key in slot order, as `prev` has them.
fn slot_orders(
    prev: Option<&Contribution>,
) -> (
    BTreeMap<SvcKey, Vec<Backend>>,
    BTreeMap<PortKey, Vec<Backend>>,
) {
    let Some(prev) = prev else {
        return Default::default();
    };
    let mut lb: BTreeMap<SvcKey, Vec<(u16, Backend)>> = BTreeMap::new();
    let mut np: BTreeMap<PortKey, Vec<(u16, Backend)>> = BTreeMap::new();
    let mut lb_k = BTreeMap::new();
    let mut np_k = BTreeMap::new();
    for e in &prev.elems {
        match *e {
            // With stale lower memberships around, the highest K is the live one.
            Elem::Lb(k, n) => {
                lb_k.entry(k)
                    .and_modify(|m: &mut u16| *m = (*m).max(n))
                    .or_insert(n);
            }
            Elem::Np(k, n) => {
                np_k.entry(k)
                    .and_modify(|m: &mut u16| *m = (*m).max(n))
                    .or_insert(n);
            }
            _ => {}
        }
    }
    for e in &prev.elems {
        match *e {
            Elem::Be(k, n, slot, b) if lb_k.get(&k) == Some(&n) => {
                lb.entry(k).or_default().push((slot, b))
            }
            Elem::NpBe(k, n, slot, b) if np_k.get(&k) == Some(&n) => {
                np.entry(k).or_default().push((slot, b))
            }
            _ => {}
        }
    }
    fn order<K: Ord>(m: BTreeMap<K, Vec<(u16, Backend)>>) -> BTreeMap<K, Vec<Backend>> {
        m.into_iter()
            .map(|(k, mut v)| {
                v.sort();
                (k, v.into_iter().map(|(_, b)| b).collect())
            })
            .collect()
    }
    (order(lb), order(np))
}

/// Keep the slots backends had; new ones go at the end. Adding an endpoint
/// is then only additions to the ruleset (the kernel makes every
/// transaction that deletes an element wait ~10 ms).
fn stable(prev: Option<&Vec<Backend>>, now: &[Backend]) -> Vec<Backend> {
    let Some(prev) = prev else {
        return now.to_vec();
    };
    let mut out: Vec<Backend> = prev.iter().filter(|b| now.contains(b)).copied().collect();
    out.extend(now.iter().filter(|b| !prev.contains(b)));
    out
}

/// Plan one service on one node, from scratch.
pub fn plan_service(cfg: &ProxyConfig, svc: &Service, eps: Option<&Endpoints>) -> Contribution {
    plan_service_from(cfg, svc, eps, None)
}

/// Plan one service on one node. `prev` is what the node has for it now,
/// so endpoints keep their slots.
pub fn plan_service_from(
    cfg: &ProxyConfig,
    svc: &Service,
    eps: Option<&Endpoints>,
    prev: Option<&Contribution>,
) -> Contribution {
    let mut c = Contribution::default();
    let Some(cip) = svc.cluster_ip else { return c };
    let (prev_lb, prev_np) = slot_orders(prev);
    let eps: &[tweed_model::Endpoint] = eps.map(|e| e.endpoints.as_slice()).unwrap_or_default();
    for p in &svc.ports {
        let (all, local) = usable_endpoints(eps, &p.name, &cfg.node);
        // kube-proxy: no endpoint anywhere is refused (reset / ICMP), while
        // a Local policy on a node with endpoints only elsewhere drops, so
        // a load balancer's health check moves traffic away instead.
        let none = if all.is_empty() {
            Refuse::Reject
        } else {
            Refuse::Drop
        };
        let internal = match svc.internal_traffic_policy {
            TrafficPolicy::Cluster => &all,
            TrafficPolicy::Local => &local,
        };
        let external = match svc.external_traffic_policy {
            TrafficPolicy::Cluster => &all,
            TrafficPolicy::Local => &local,
        };
        let ext_masq = svc.external_traffic_policy == TrafficPolicy::Cluster;
        let k = (cip, p.protocol, p.port);
        lb(
            &mut c,
            k,
            &stable(prev_lb.get(&k), internal),
            svc.affinity_timeout,
            none,
        );
        if !svc.load_balancer_source_ranges.is_empty() {
            let ranges: Vec<String> = svc
                .load_balancer_source_ranges
                .iter()
                .map(|r| r.trunc().to_string())
                .collect();
            let h = u64::from_str_radix(&short_hash(&ranges.join(",")), 16).unwrap_or(0);
            for lbip in &svc.load_balancer_ips {
                let k = (*lbip, p.protocol, p.port);
                // kube-proxy's firewall check: before DNAT, so the
                // address is still the load balancer's.
                c.chains.insert(
                    firewall_chain(&k, h),
                    vec![format!("ip saddr != {{ {} }} drop", ranges.join(", "))],
                );
                c.elems.push(Elem::Firewall(k, h));
            }
        }
        // Policy Local with endpoints elsewhere too: traffic from pods and
        // from the node itself still reaches every endpoint (kube-proxy).
        let xlb =
            (svc.external_traffic_policy == TrafficPolicy::Local && !all.is_empty()).then(|| {
                let targets: Vec<String> = all
                    .iter()
                    .map(|(ip, port)| format!("{ip} . {port}"))
                    .collect();
                let h = u64::from_str_radix(&short_hash(&targets.join(",")), 16).unwrap_or(0);
                let rule = match all.as_slice() {
                    [(ip, port)] => {
                        format!("meta l4proto {} dnat ip to {ip}:{port}", p.protocol.nft())
                    }
                    _ => format!(
                        "meta l4proto {} dnat ip to numgen random mod {} map {{ {} }}",
                        p.protocol.nft(),
                        all.len(),
                        targets
                            .iter()
                            .enumerate()
                            .map(|(i, t)| format!("{i} : {t}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                (h, rule)
            });
        for eip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
            let k = (*eip, p.protocol, p.port);
            if ext_masq {
                c.elems.push(Elem::MasqLb(k));
            }
            if let Some((h, rule)) = &xlb {
                c.chains.insert(xlb_chain(&k, *h), vec![rule.clone()]);
                c.elems.push(Elem::Xlb(k, *h));
                c.elems
                    .extend(all.iter().map(|b| Elem::ChainBackend(k, *b)));
            }
            lb(
                &mut c,
                k,
                &stable(prev_lb.get(&k), external),
                svc.affinity_timeout,
                none,
            );
        }
        if let (Some(np), ServiceType::NodePort | ServiceType::LoadBalancer) =
            (p.node_port, svc.service_type)
        {
            let k = (p.protocol, np);
            if ext_masq {
                c.elems.push(Elem::MasqNp(k));
            }
            if let Some((h, rule)) = &xlb {
                c.chains.insert(npxlb_chain(&k, *h), vec![rule.clone()]);
                c.elems.push(Elem::NpXlb(k, *h));
                c.elems
                    .extend(all.iter().map(|b| Elem::NpChainBackend(k, *b)));
            }
            if external.is_empty() {
                c.elems.push(match none {
                    Refuse::Reject => Elem::RejNp(k),
                    Refuse::Drop => Elem::DropNp(k),
                });
            } else {
                let external = stable(prev_np.get(&k), external);
                let n = external.len() as u16;
                c.elems.push(Elem::Np(k, n));
                c.elems.push(Elem::NpAll(k));
                c.elems.extend(
                    external
                        .iter()
                        .enumerate()
                        .map(|(i, b)| Elem::NpBe(k, n, i as u16, *b)),
                );
            }
        }
    }
    c.finish()
}

/// The chain holding a load balancer key's source ranges.
fn firewall_chain(k: &SvcKey, ranges_hash: u64) -> String {
    format!(
        "fw-{}",
        &short_hash(&format!("{}.{}.{}.{ranges_hash:x}", k.0, k.1.nft(), k.2))[..12]
    )
}

/// The chain pods' and the node's traffic to a policy-Local external key
/// goes to (every endpoint's address in the name's hash).
fn xlb_chain(k: &SvcKey, endpoints_hash: u64) -> String {
    format!(
        "xlb-{}",
        &short_hash(&format!("{}.{}.{}.{endpoints_hash:x}", k.0, k.1.nft(), k.2))[..12]
    )
}

/// [`xlb_chain`] for a node port.
fn npxlb_chain(k: &PortKey, endpoints_hash: u64) -> String {
    format!(
        "npxlb-{}",
        &short_hash(&format!("{}.{}.{endpoints_hash:x}", k.0.nft(), k.1))[..12]
    )
}

/// The chain a ClientIP-affinity service key goes to. The timeout is part of
/// the name, so a set's definition never changes in place.
fn affinity_chain(k: &SvcKey, timeout: u32) -> String {
    format!(
        "aff-{}",
        short_hash(&format!("{} {} {} {timeout}", k.0, k.1.nft(), k.2))
    )
}

/// What a key with no usable backend on this node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuse {
    Reject,
    Drop,
}

/// The backends for service port `port` (all, and this node's), chosen as
/// kube-proxy chooses them: the ready endpoints; where there are none, the
/// ones still serving while they terminate (so connections drain during a
/// rolling update instead of being refused). Local is decided on its own:
/// a node with only terminating local endpoints uses them even if other
/// nodes have ready ones.
fn usable_endpoints(
    eps: &[tweed_model::Endpoint],
    port: &str,
    node: &str,
) -> (Vec<Backend>, Vec<Backend>) {
    let pick = |local_only: bool| {
        let with_port = || {
            eps.iter()
                .filter(move |e| !local_only || e.node == node)
                .filter_map(|e| e.port(port).map(|p| (e, p)))
        };
        let any_ready = with_port().any(|(e, _)| e.ready);
        let mut v: Vec<Backend> = with_port()
            .filter(|(e, _)| {
                if any_ready {
                    e.ready
                } else {
                    e.serving && e.terminating
                }
            })
            .map(|(e, p)| (e.ip, p))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    (pick(false), pick(true))
}

fn lb(c: &mut Contribution, k: SvcKey, backends: &[Backend], affinity: Option<u32>, none: Refuse) {
    if backends.is_empty() {
        c.elems.push(match none {
            Refuse::Reject => Elem::RejLb(k),
            Refuse::Drop => Elem::DropLb(k),
        });
        return;
    }
    if let Some(t) = affinity {
        // ClientIP affinity, as kube-proxy's nftables mode does it: one
        // dynamic set of recent clients per endpoint, checked first, and a
        // random pick that records the client in the chosen endpoint's set.
        let chain = affinity_chain(&k, t);
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
                    format!("meta l4proto {} dnat ip to {ip}:{port}", k.1.nft()),
                ],
            );
            rules.push(format!("ip saddr @{ep} goto {ep}"));
            picks.push(format!("{i} : goto {ep}"));
            c.elems.push(Elem::ChainBackend(k, (*ip, *port)));
        }
        rules.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            backends.len(),
            picks.join(", ")
        ));
        c.chains.insert(chain, rules);
        c.elems.push(Elem::LbAffinity(k, t));
        return;
    }
    let n = backends.len() as u16;
    c.elems.push(Elem::Lb(k, n));
    c.elems.push(Elem::LbAll(k));
    c.elems.extend(
        backends
            .iter()
            .enumerate()
            .map(|(i, b)| Elem::Be(k, n, i as u16, *b)),
    );
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

/// hostPort mappings of one pod: (protocol, host port) → (pod IP, container port).
pub fn plan_hostports(maps: &[(Protocol, u16, Ipv4Addr, u16)]) -> Contribution {
    let elems = maps
        .iter()
        .map(|(p, hp, ip, cp)| Elem::HostPort((*p, *hp), (*ip, *cp)))
        .collect();
    Contribution {
        elems,
        ..Default::default()
    }
    .finish()
}

/// The conntrack entries to delete when a contribution changes from `old`
/// to `new`, as kube-proxy does:
/// - UDP towards a backend that left the service (and UDP that went
///   nowhere, once there is somewhere to go): a resolver moves at once;
/// - UDP towards a service key that no longer exists: one entry per key
///   (backend `None`), so a deleted service costs one deletion, not one per
///   endpoint;
/// - TCP towards an endpoint IP that left a service that still exists (the
///   pod is gone or not ready). Connections to a deleted service are left
///   to finish, as kube-proxy leaves them.
pub fn stale_flows(old: &Contribution, new: &Contribution) -> Vec<Flow> {
    let (old, new) = (old.flows(), new.flows());
    let still: BTreeSet<Ipv4Addr> = new.iter().filter_map(|f| f.3).collect();
    let keys: BTreeSet<(Protocol, Option<Ipv4Addr>, u16)> =
        new.iter().map(|f| (f.0, f.1, f.2)).collect();
    let mut out = BTreeSet::new();
    for &(p, dst, port, b) in old.difference(&new) {
        let live = keys.contains(&(p, dst, port));
        match (p, live, b) {
            (Protocol::UDP, true, _) => out.insert((p, dst, port, b)),
            (Protocol::UDP, false, _) => out.insert((p, dst, port, None)),
            (_, true, Some(ip)) if !still.contains(&ip) => out.insert((p, dst, port, b)),
            _ => false,
        };
    }
    out.into_iter().collect()
}

/// The whole ruleset, as one `nft -f` transaction that atomically replaces
/// the table.
pub fn render_full<'a>(
    cfg: &ProxyConfig,
    parts: impl Iterator<Item = &'a Contribution> + Clone,
) -> (String, Shape) {
    let t = render_table(cfg, parts, true);
    (
        format!("add table ip {TABLE}\ndelete table ip {TABLE}\n{}", t.block),
        t.shape,
    )
}

/// The kernel's view of tweed's table: the names of its sets and chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub sets: BTreeSet<String>,
    pub chains: BTreeSet<String>,
}

/// A change to the ruleset in three transactions, each atomic: `pre`
/// (an `nft -f` script that only adds: sets, chains, rewritten rules),
/// then the elements (`flush` these sets, delete `dels`, add `adds`: one
/// netlink batch), then `post` (an `nft -f` script that removes what
/// nothing points at any more). Every state between them is consistent:
/// new objects are unreferenced until the elements point at them, and
/// objects go only after nothing does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn<'a> {
    pub pre: String,
    pub flush: Vec<String>,
    pub dels: Vec<Elem>,
    pub adds: Vec<Elem>,
    /// More additions, borrowed from the plans: a full sync adds every
    /// element (360k at 30k Services), and a copy of them all would be
    /// 7 MiB more at the agent's peak.
    pub adds_borrowed: Vec<&'a Elem>,
    pub post: String,
}

impl<'a> Txn<'a> {
    /// Another change after this one, in the same three transactions.
    pub fn extend(&mut self, o: Txn<'a>) {
        self.pre.push_str(&o.pre);
        self.flush.extend(o.flush);
        self.dels.extend(o.dels);
        self.adds.extend(o.adds);
        self.adds_borrowed.extend(o.adds_borrowed);
        self.post.push_str(&o.post);
    }

    /// How many element additions.
    pub fn additions(&self) -> usize {
        self.adds.len() + self.adds_borrowed.len()
    }
}

/// A full sync that keeps the table: the shape is declared over what
/// `existing` holds (chains flushed and rewritten, sets declared again,
/// which the kernel takes as a no-op when they are the same), every
/// element set flushed and refilled in one batch, and whatever the new
/// shape no longer has removed last. Unlike [`render_full`] it never
/// empties the table, so no connection is refused while it runs, and the
/// per-client affinity sets keep their clients. If the kernel refuses
/// the shape (a map's size or a set's type changed), [`render_full`]
/// replaces the table instead.
pub fn render_full_txn<'a>(
    cfg: &ProxyConfig,
    parts: impl Iterator<Item = &'a Contribution> + Clone,
    existing: &Existing,
) -> (Txn<'a>, Shape) {
    let t = render_table(cfg, parts.clone(), false);
    let mut pre = format!("add table ip {TABLE}\n");
    for c in t.chains.iter().filter(|c| existing.chains.contains(*c)) {
        let _ = writeln!(pre, "flush chain ip {TABLE} {c}");
    }
    if existing.sets.contains("hairpin") {
        let _ = writeln!(pre, "flush set ip {TABLE} hairpin");
    }
    pre.push_str(&t.block);
    let mut post = String::new();
    let gone_chains: Vec<&String> = existing
        .chains
        .iter()
        .filter(|c| !t.chains.contains(*c))
        .collect();
    for c in &gone_chains {
        let _ = writeln!(post, "flush chain ip {TABLE} {c}");
    }
    for c in &gone_chains {
        let _ = writeln!(post, "delete chain ip {TABLE} {c}");
    }
    for set in existing.sets.iter().filter(|n| !t.sets.contains(*n)) {
        let _ = writeln!(post, "delete set ip {TABLE} {set}");
    }
    let mut adds: Vec<&Elem> = parts
        .flat_map(|c| c.elems.iter())
        .filter(|e| e.group().is_some())
        .collect();
    // Grouped by set: each run of one set's elements packs into as few
    // netlink messages as fit, where service order would switch sets at
    // almost every element (30k messages at 10k Services instead of ~100,
    // and the kernel finds each message's set by name, one by one).
    adds.sort_unstable_by_key(|e| e.group());
    (
        Txn {
            pre,
            // Sets the kernel had before this sync (new ones are empty).
            flush: t
                .element_sets
                .into_iter()
                .filter(|n| existing.sets.contains(n))
                .collect(),
            dels: Vec::new(),
            adds: Vec::new(),
            adds_borrowed: adds,
            post,
        },
        t.shape,
    )
}

/// The table block and what it declares.
struct Table {
    /// `table ip tweed { ... }`
    block: String,
    shape: Shape,
    /// Every set and map it declares, and those that hold planned elements.
    sets: BTreeSet<String>,
    element_sets: Vec<String>,
    chains: BTreeSet<String>,
}

fn render_table<'a>(
    cfg: &ProxyConfig,
    parts: impl Iterator<Item = &'a Contribution> + Clone,
    with_elements: bool,
) -> Table {
    let mut shape = Shape::preset();
    let mut counts: BTreeMap<Group, usize> = BTreeMap::new();
    let mut own_sets = BTreeMap::new();
    let mut chains = BTreeMap::new();
    let mut bytes = 0;
    for c in parts.clone() {
        shape.ks.extend(c.elems.iter().filter_map(Elem::k));
        for g in c.elems.iter().filter_map(Elem::group) {
            *counts.entry(g).or_default() += 1;
        }
        bytes += c.elems.len() * 48;
        own_sets.extend(c.own_sets.iter());
        chains.extend(c.chains.iter());
    }
    let mut s = String::with_capacity(16384 + if with_elements { bytes } else { 0 });
    let _ = writeln!(s, "table ip {TABLE} {{");
    let mut element_sets = Vec::new();
    // One pass over the elements per set, written straight into the script.
    let mut decl = |s: &mut String, kind: &str, g: Group, ty: &str| {
        element_sets.push(g.name());
        let n = counts.get(&g).copied().unwrap_or(0);
        let _ = write!(s, "  {kind} {} {{ {ty}", g.name());
        // A size hint lets the kernel use a fixed hash table instead of
        // growing one while 100k elements go in (about a third faster).
        // Outgrowing it makes an update fail, and the full sync that
        // follows sizes it again. But the kernel walks every bucket of a
        // map when a rule that uses it is added, so the many small
        // per-K backend maps get no hint (they grow as needed) and the
        // big ones get room for twice what they hold, not more.
        let hint = match g {
            Group::Be(..) | Group::NpBe(..) => (n >= 1024).then(|| (n * 2).next_power_of_two()),
            _ if kind == "map" => Some((n * 2).next_power_of_two().max(65536)),
            _ => None,
        };
        if let Some(size) = hint {
            let _ = write!(s, " size {size};");
        }
        if n > 0 && with_elements {
            s.push_str(" elements = { ");
            let mut first = true;
            for e in parts
                .clone()
                .flat_map(|c| c.elems.iter())
                .filter(|e| e.group() == Some(g))
            {
                if !first {
                    s.push_str(", ");
                }
                first = false;
                e.write(s, true);
            }
            s.push_str(" }");
        }
        s.push_str(" }\n");
    };
    let svc_key = "type ipv4_addr . inet_proto . inet_service;";
    let port_key = "type inet_proto . inet_service;";
    decl(&mut s, "set", Group::LbAll, svc_key);
    decl(&mut s, "set", Group::NpAll, port_key);
    for p in PROTOS {
        for k in &shape.ks {
            decl(
                &mut s,
                "set",
                Group::LbK(p, *k),
                "type ipv4_addr . inet_service;",
            );
            decl(&mut s, "set", Group::NpK(p, *k), "type inet_service;");
        }
    }
    decl(&mut s, "set", Group::MasqLb, svc_key);
    decl(&mut s, "set", Group::RejLb, svc_key);
    decl(&mut s, "set", Group::MasqNp, port_key);
    decl(&mut s, "set", Group::RejNp, port_key);
    decl(&mut s, "set", Group::DropLb, svc_key);
    decl(&mut s, "set", Group::DropNp, port_key);
    for p in PROTOS {
        let n = p.nft();
        for k in &shape.ks {
            decl(
                &mut s,
                "map",
                Group::Be(p, *k),
                &format!(
                    "typeof ip daddr . {n} dport . numgen random mod 2 : ip daddr . {n} dport;"
                ),
            );
            decl(
                &mut s,
                "map",
                Group::NpBe(p, *k),
                &format!("typeof {n} dport . numgen random mod 2 : ip daddr . {n} dport;"),
            );
        }
    }
    decl(
        &mut s,
        "map",
        Group::HostPorts,
        "type inet_proto . inet_service : ipv4_addr . inet_service;",
    );
    for (name, def) in &own_sets {
        let _ = writeln!(s, "  set {name} {{ {def} }}");
    }
    for (name, rules) in &chains {
        let _ = writeln!(s, "  chain {name} {{");
        for r in rules.iter() {
            let _ = writeln!(s, "    {r}");
        }
        s.push_str("  }\n");
    }
    // One rule per (protocol, K); new connections get here only after a
    // hit in lb-all / np-all.
    // Highest K first: a key may linger in a lower K's set after it grew
    // (see render_delta), and the live K must win.
    // The maps' keys name the protocol's own `dport` (not `th dport`):
    // nft 1.0.6 cannot add a rule that looks up a `typeof … th dport` map
    // it read back from the kernel ("conflicting protocols specified: tcp
    // vs. th"), and a full sync over the existing table re-adds these.
    s.push_str("  chain lb-rules {\n");
    for p in PROTOS {
        let p = p.nft();
        for k in shape.ks.iter().rev() {
            let _ = writeln!(s, "    meta l4proto {p} ip daddr . th dport @lb-{p}-{k} dnat ip to ip daddr . {p} dport . numgen random mod {k} map @be-{p}-{k}");
        }
    }
    s.push_str("  }\n  chain np-rules {\n");
    for p in PROTOS {
        let p = p.nft();
        for k in shape.ks.iter().rev() {
            let _ = writeln!(s, "    meta l4proto {p} th dport @np-{p}-{k} dnat ip to {p} dport . numgen random mod {k} map @npbe-{p}-{k}");
        }
    }
    s.push_str("  }\n");
    // The verdict maps (affinity, source ranges) after the chains they point to.
    decl(
        &mut s,
        "map",
        Group::Lb,
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    );
    decl(
        &mut s,
        "map",
        Group::Fw,
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    );
    decl(
        &mut s,
        "map",
        Group::Xlb,
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    );
    decl(
        &mut s,
        "map",
        Group::NpXlb,
        "type inet_proto . inet_service : verdict;",
    );
    // Hairpin: after DNAT a pod talking to itself has source == destination.
    let _ = write!(s, "  set hairpin {{ type ipv4_addr . ipv4_addr;");
    let usable = (u32::from(cfg.node_subnet.network()) + 1)..u32::from(cfg.node_subnet.broadcast());
    if !usable.is_empty() {
        s.push_str(" elements = { ");
        for (i, a) in usable.enumerate() {
            let ip = Ipv4Addr::from(a);
            let _ = write!(s, "{}{ip} . {ip}", if i == 0 { "" } else { ", " });
        }
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
  chain filter-input {{
    type filter hook input priority 0; policy accept;
    ct state new meta l4proto . th dport @rej-np jump reject-chain
    ct state new meta l4proto . th dport @drop-np drop
  }}
  chain filter-forward {{ type filter hook forward priority 0; policy accept; jump service-checks; }}
  chain filter-output {{ type filter hook output priority 0; policy accept; jump service-checks; }}
  chain service-checks {{
    ct state new ip daddr . meta l4proto . th dport @rej-lb jump reject-chain
    ct state new ip daddr . meta l4proto . th dport @drop-lb drop
    ct state new ip daddr {sc} jump reject-chain
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @fw
    ip saddr {cc} ip daddr . meta l4proto . th dport vmap @xlb
    fib saddr type local ip daddr . meta l4proto . th dport vmap @xlb
    ip saddr {cc} fib daddr type local meta l4proto . th dport vmap @npxlb
    fib saddr type local fib daddr type local meta l4proto . th dport vmap @npxlb
    ip daddr {sc} ip saddr != {cc} jump mark-for-masquerade
    ip daddr . meta l4proto . th dport @masq-lb jump mark-for-masquerade
    fib daddr type local meta l4proto . th dport @masq-np jump mark-for-masquerade
    ip daddr . meta l4proto . th dport vmap @lb
    ip daddr . meta l4proto . th dport @lb-all jump lb-rules
    fib daddr type local meta l4proto . th dport @np-all jump np-rules
    fib daddr type local dnat ip to meta l4proto . th dport map @hostports
  }}
}}"
    );
    // What the block declares, as the kernel will name it.
    let (mut sets, mut chains) = (BTreeSet::new(), BTreeSet::new());
    for l in s
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
    {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some("set" | "map"), Some(n)) => {
                sets.insert(n.to_string());
            }
            (Some("chain"), Some(n)) => {
                chains.insert(n.to_string());
            }
            _ => {}
        }
    }
    Table {
        block: s,
        shape,
        sets,
        element_sets,
        chains,
    }
}

/// Can `e` (in the kernel, not in `new`) stay? A key that grew from K to
/// K' > K may stay in `lb-K` (rules try the highest K first), and its
/// entries in any `be-PROTO-K` but the live K's are never drawn: leaving
/// them makes growing and shrinking add-only but for the one `lb-K`
/// element above the live K (deletions make the kernel wait).
fn harmless(e: &Elem, live_lb: &BTreeMap<SvcKey, u16>, live_np: &BTreeMap<PortKey, u16>) -> bool {
    match *e {
        Elem::Lb(k, n) => live_lb.get(&k).is_some_and(|live| n < *live),
        Elem::Be(k, n, ..) => live_lb.get(&k).is_some_and(|live| n != *live),
        Elem::Np(k, n) => live_np.get(&k).is_some_and(|live| n < *live),
        Elem::NpBe(k, n, ..) => live_np.get(&k).is_some_and(|live| n != *live),
        _ => false,
    }
}

/// The commands that turn the kernel's `old` into `new` for one
/// contribution, as one `nft -f` script, and what the kernel holds
/// afterwards; see [`render_delta_txn`].
pub fn render_delta(
    old: &Contribution,
    new: &Contribution,
    shape: &Shape,
) -> Option<(String, Contribution)> {
    let (t, kept) = render_delta_txn(old, new, shape)?;
    let mut s = t.pre;
    for (verb, elems, with_value) in [("delete", &t.dels, false), ("add", &t.adds, true)] {
        let mut by: BTreeMap<Group, String> = BTreeMap::new();
        for e in elems {
            if let Some(g) = e.group() {
                let buf = by.entry(g).or_default();
                if !buf.is_empty() {
                    buf.push_str(", ");
                }
                e.write(buf, with_value);
            }
        }
        for (g, els) in &by {
            let _ = writeln!(s, "{verb} element ip {TABLE} {} {{ {els} }}", g.name());
        }
    }
    s.push_str(&t.post);
    Some((s, kept))
}

/// The change that turns the kernel's `old` into `new` for one
/// contribution, and what the kernel holds afterwards (`new` plus the
/// harmless leftovers it keeps); `None` when `new` needs an endpoint count
/// the ruleset has no rule for (then the caller does a full resync).
/// Deletions come before additions, so a changed map value is
/// delete-then-add.
pub fn render_delta_txn(
    old: &Contribution,
    new: &Contribution,
    shape: &Shape,
) -> Option<(Txn<'static>, Contribution)> {
    if !new
        .elems
        .iter()
        .filter_map(Elem::k)
        .all(|k| shape.ks.contains(&k))
    {
        return None;
    }
    let live_lb: BTreeMap<SvcKey, u16> = new
        .elems
        .iter()
        .filter_map(|e| {
            if let Elem::Lb(k, n) = e {
                Some((*k, *n))
            } else {
                None
            }
        })
        .collect();
    let live_np: BTreeMap<PortKey, u16> = new
        .elems
        .iter()
        .filter_map(|e| {
            if let Elem::Np(k, n) = e {
                Some((*k, *n))
            } else {
                None
            }
        })
        .collect();
    let mut kept = new.clone();
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
    let pre = std::mem::take(&mut s);
    let (o, n): (BTreeSet<&Elem>, BTreeSet<&Elem>) =
        (old.elems.iter().collect(), new.elems.iter().collect());
    let mut dels = Vec::new();
    for e in o.difference(&n) {
        if harmless(e, &live_lb, &live_np) {
            kept.elems.push(**e);
        } else if e.group().is_some() {
            dels.push(**e);
        }
    }
    let adds: Vec<Elem> = n
        .difference(&o)
        .filter(|e| e.group().is_some())
        .map(|e| **e)
        .collect();
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
    Some((
        Txn {
            pre,
            flush: Vec::new(),
            dels,
            adds,
            adds_borrowed: Vec::new(),
            post: s,
        },
        kept.finish(),
    ))
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
            load_balancer_ips: vec![],
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
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

    fn key() -> SvcKey {
        ("10.96.0.10".parse().unwrap(), Protocol::TCP, 80)
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
        let k = ("10.96.0.10".parse().unwrap(), Protocol::TCP, 80);
        assert!(c.elems.contains(&Elem::Lb(k, 3)));
        let be: Vec<_> = c
            .elems
            .iter()
            .filter(|e| matches!(e, Elem::Be(..)))
            .collect();
        assert_eq!(be.len(), 3);
        assert!(c
            .elems
            .contains(&Elem::Be(k, 3, 0, ("10.244.1.2".parse().unwrap(), 8080))));
        assert!(c
            .elems
            .contains(&Elem::Be(k, 3, 2, ("10.244.3.2".parse().unwrap(), 8080))));
        assert!(!c.elems.iter().any(|e| matches!(e, Elem::RejLb(_))));
        let d = render_delta(&Contribution::default(), &c, &Shape::preset())
            .unwrap()
            .0;
        assert!(
            d.contains("add element ip tweed be-tcp-3 { 10.96.0.10 . 80 . 0 : 10.244.1.2 . 8080, "),
            "{d}"
        );
        assert!(
            d.contains("add element ip tweed lb-tcp-3 { 10.96.0.10 . 80 }"),
            "{d}"
        );
        assert!(
            d.contains("add element ip tweed lb-all { 10.96.0.10 . tcp . 80 }"),
            "{d}"
        );
    }

    #[test]
    fn load_balancer_source_ranges_jump_to_a_chain_that_drops_the_rest() {
        let mut s = svc(ServiceType::LoadBalancer);
        s.load_balancer_ips = vec!["203.0.113.60".parse().unwrap()];
        s.external_ips = vec!["203.0.113.61".parse().unwrap()];
        s.load_balancer_source_ranges = vec![
            "198.51.100.192/26".parse().unwrap(),
            "203.0.113.0/28".parse().unwrap(),
        ];
        let c = plan_service(&cfg(), &s, Some(&eps(&[("10.244.1.2", "n1")])));
        let fw: Vec<&Elem> = c
            .elems
            .iter()
            .filter(|e| matches!(e, Elem::Firewall(..)))
            .collect();
        // The load balancer's address only: external IPs are not restricted.
        assert_eq!(fw.len(), 1, "{fw:?}");
        let Elem::Firewall(k, _) = fw[0] else {
            unreachable!()
        };
        assert_eq!(k.0.to_string(), "203.0.113.60");
        let chain = fw[0].jump_chain().unwrap();
        assert_eq!(
            c.chains[&chain],
            ["ip saddr != { 198.51.100.192/26, 203.0.113.0/28 } drop"]
        );
        let d = render_delta(&Contribution::default(), &c, &Shape::preset())
            .unwrap()
            .0;
        assert!(
            d.contains(&format!(
                "add element ip tweed fw {{ 203.0.113.60 . tcp . 80 : jump {chain} }}"
            )),
            "{d}"
        );
        // Other ranges, another chain: a chain never changes in place.
        s.load_balancer_source_ranges.pop();
        let c2 = plan_service(&cfg(), &s, Some(&eps(&[("10.244.1.2", "n1")])));
        assert!(!c2.chains.contains_key(&chain));
    }

    #[test]
    fn no_ready_endpoint_rejects() {
        let mut e = eps(&[("10.244.1.2", "n1")]);
        e.endpoints[0].ready = false;
        let c = plan_service(&cfg(), &svc(ServiceType::NodePort), Some(&e));
        assert!(c.elems.contains(&Elem::RejLb(key())));
        assert!(c.elems.contains(&Elem::RejNp((Protocol::TCP, 30080))));
        assert!(!c.elems.iter().any(|e| matches!(e, Elem::Be(..))));
    }

    #[test]
    fn external_policy_local_keeps_only_local_endpoints_and_no_masquerade() {
        let mut s = svc(ServiceType::NodePort);
        s.external_traffic_policy = TrafficPolicy::Local;
        let all = eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")]);
        let here = plan_service(&cfg(), &s, Some(&all));
        let np = (Protocol::TCP, 30080);
        assert!(here.elems.contains(&Elem::Np(np, 1)));
        assert!(here
            .elems
            .contains(&Elem::NpBe(np, 1, 0, ("10.244.1.2".parse().unwrap(), 8080))));
        assert!(!here.elems.contains(&Elem::MasqNp(np)));
        // ClusterIP traffic still goes everywhere.
        assert!(here.elems.contains(&Elem::Lb(key(), 2)));
        let elsewhere = plan_service(
            &ProxyConfig {
                node: "n3".into(),
                ..cfg()
            },
            &s,
            Some(&all),
        );
        // Endpoints only elsewhere: dropped, as kube-proxy does.
        assert!(elsewhere.elems.contains(&Elem::DropNp(np)));
        assert!(!elsewhere.elems.contains(&Elem::RejNp(np)));
        // Policy Cluster masquerades node-port traffic.
        let cl = plan_service(&cfg(), &svc(ServiceType::NodePort), Some(&all));
        assert!(cl.elems.contains(&Elem::MasqNp(np)) && cl.elems.contains(&Elem::Np(np, 2)));
    }

    #[test]
    fn pods_and_the_node_reach_every_endpoint_of_a_policy_local_external_ip() {
        let mut s = svc(ServiceType::ClusterIP);
        s.external_traffic_policy = TrafficPolicy::Local;
        let eip: Ipv4Addr = "203.0.113.50".parse().unwrap();
        s.external_ips = vec![eip];
        let all = eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")]);
        let on = |node: &str, s: &Service| {
            plan_service(
                &ProxyConfig {
                    node: node.into(),
                    ..cfg()
                },
                s,
                Some(&all),
            )
        };
        let k = (eip, Protocol::TCP, 80);
        let xlb = |c: &Contribution| {
            let e = c
                .elems
                .iter()
                .find(|e| matches!(e, Elem::Xlb(..)))
                .copied()
                .expect("an xlb element");
            let chain = e.goto_chain().unwrap();
            (e, c.chains[&chain].clone())
        };
        // n3 has no endpoint: traffic from outside is dropped there ...
        let n3 = on("n3", &s);
        assert!(n3.elems.contains(&Elem::DropLb(k)));
        // ... and from pods and the node goes to both, as kube-proxy does.
        let (e3, rules) = xlb(&n3);
        assert!(matches!(e3, Elem::Xlb(x, _) if x == k));
        assert_eq!(
            rules,
            ["meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.244.1.2 . 8080, 1 : 10.244.2.2 . 8080 }"]
        );
        // n1 keeps outside traffic on its own endpoint, the same chain for
        // pods: the chain depends on the endpoints, not on the node.
        let n1 = on("n1", &s);
        assert!(n1.elems.contains(&Elem::Lb(k, 1)));
        assert_eq!(xlb(&n1), (e3, rules.clone()));
        // Conntrack clean-up knows both backends of the key.
        assert!(n3.flows().contains(&(
            Protocol::TCP,
            Some(eip),
            80,
            Some("10.244.2.2".parse().unwrap())
        )));
        // A node port of the same Service: the same, keyed by the port.
        s.service_type = ServiceType::NodePort;
        s.ports[0].node_port = Some(30080);
        let n3 = on("n3", &s);
        let np = n3
            .elems
            .iter()
            .find(|e| matches!(e, Elem::NpXlb(..)))
            .copied()
            .expect("an npxlb element");
        assert!(matches!(np, Elem::NpXlb((Protocol::TCP, 30080), _)));
        assert_eq!(n3.chains[&np.goto_chain().unwrap()], rules);
        assert!(n3.elems.contains(&Elem::DropNp((Protocol::TCP, 30080))));
        assert!(n3.flows().contains(&(
            Protocol::TCP,
            None,
            30080,
            Some("10.244.1.2".parse().unwrap())
        )));
        s.service_type = ServiceType::ClusterIP;
        s.ports[0].node_port = None;
        // One endpoint: a plain DNAT. Policy Cluster: no xlb at all.
        let one = eps(&[("10.244.2.2", "n2")]);
        let c = plan_service(&cfg(), &s, Some(&one));
        assert_eq!(xlb(&c).1, ["meta l4proto tcp dnat ip to 10.244.2.2:8080"]);
        s.external_traffic_policy = TrafficPolicy::Cluster;
        let c = plan_service(&cfg(), &s, Some(&all));
        assert!(!c.elems.iter().any(|e| matches!(e, Elem::Xlb(..))));
        // The element and its chain as nft reads them.
        let d = render_delta(&Contribution::default(), &n3, &Shape::preset())
            .unwrap()
            .0;
        assert!(
            d.contains(&format!(
                "add element ip tweed xlb {{ 203.0.113.50 . tcp . 80 : goto {} }}",
                e3.goto_chain().unwrap()
            )),
            "{d}"
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
        assert!(c.elems.contains(&Elem::DropLb(key())));
        assert!(!c.elems.contains(&Elem::RejLb(key())));
        // With no endpoint anywhere it is refused.
        let c = plan_service(&cfg(), &s, Some(&eps(&[])));
        assert!(c.elems.contains(&Elem::RejLb(key())));
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let s = svc(ServiceType::ClusterIP);
        let mut e = eps(&[
            ("10.244.1.2", "n1"),
            ("10.244.2.2", "n2"),
            ("10.244.3.2", "n3"),
        ]);
        // n1: ready; n2: terminating but serving; n3: terminating, not serving.
        e.endpoints[1].ready = false;
        e.endpoints[1].terminating = true;
        e.endpoints[2].ready = false;
        e.endpoints[2].serving = false;
        e.endpoints[2].terminating = true;
        let c = plan_service(&cfg(), &s, Some(&e));
        assert!(c.elems.contains(&Elem::Lb(key(), 1)), "only the ready one");
        // The ready one goes: the serving, terminating one drains traffic.
        e.endpoints[0].ready = false;
        e.endpoints[0].serving = false;
        let c = plan_service(&cfg(), &s, Some(&e));
        assert!(c.elems.contains(&Elem::Lb(key(), 1)));
        assert!(c.elems.contains(&Elem::Be(
            key(),
            1,
            0,
            ("10.244.2.2".parse().unwrap(), 8080)
        )));
        // Not ready and not terminating (e.g. failing its probe): nothing.
        e.endpoints[1].terminating = false;
        let c = plan_service(&cfg(), &s, Some(&e));
        assert!(c.elems.contains(&Elem::RejLb(key())));
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
        let d = render_delta(&old, &new, &shape).unwrap().0;
        // Growing leaves the key in lb-tcp-2 and be-tcp-2 (the higher K
        // wins), so nothing is deleted; be-tcp-3 gets every slot.
        assert!(!d.contains("delete"), "{d}");
        assert!(
            d.contains("add element ip tweed lb-tcp-3 { 10.96.0.10 . 80 }")
                && !d.contains("lb-all"),
            "{d}"
        );
        assert!(
            d.contains("add element ip tweed be-tcp-3 { 10.96.0.10 . 80 . 0 : 10.244.1.2 . 8080, 10.96.0.10 . 80 . 1 : 10.244.2.2 . 8080, 10.96.0.10 . 80 . 2 : 10.244.3.2 . 8080 }"),
            "{d}"
        );
        assert!(!d.contains("add set"), "{d}");
        assert_eq!(render_delta(&new, &new, &shape).unwrap().0, "");
        // A changed endpoint in place is delete-then-add.
        let moved = plan_service(
            &cfg(),
            &s,
            Some(&eps(&[
                ("10.244.1.2", "n1"),
                ("10.244.2.2", "n2"),
                ("10.244.3.9", "n3"),
            ])),
        );
        let d = render_delta(&new, &moved, &shape).unwrap().0;
        assert!(
            d.find("delete element ip tweed be-tcp-3").unwrap()
                < d.find("add element ip tweed be-tcp-3").unwrap(),
            "{d}"
        );
    }

    #[test]
    fn adding_an_endpoint_only_adds_and_removing_cleans_up() {
        let s = svc(ServiceType::ClusterIP);
        let shape = Shape::preset();
        // The new endpoint sorts first by address, but it still gets the last slot.
        let two = plan_service(
            &cfg(),
            &s,
            Some(&eps(&[("10.244.2.2", "n2"), ("10.244.3.2", "n3")])),
        );
        let three = plan_service_from(
            &cfg(),
            &s,
            Some(&eps(&[
                ("10.244.1.2", "n1"),
                ("10.244.2.2", "n2"),
                ("10.244.3.2", "n3"),
            ])),
            Some(&two),
        );
        assert!(
            three.elems.contains(&Elem::Be(
                key(),
                3,
                2,
                ("10.244.1.2".parse().unwrap(), 8080)
            )),
            "{three:?}"
        );
        let (d, kept) = render_delta(&two, &three, &shape).unwrap();
        assert!(!d.contains("delete"), "growing must be add-only: {d}");
        assert!(
            kept.elems.contains(&Elem::Lb(key(), 2)) && kept.elems.contains(&Elem::Lb(key(), 3))
        );
        // The leftover lb-tcp-2 membership is not a live flow.
        assert_eq!(kept.flows(), three.flows());
        // Shrinking back: the live K's set must go (a higher K would win), slots beyond may stay.
        let back = plan_service_from(
            &cfg(),
            &s,
            Some(&eps(&[("10.244.2.2", "n2"), ("10.244.3.2", "n3")])),
            Some(&kept),
        );
        let (d, kept2) = render_delta(&kept, &back, &shape).unwrap();
        assert!(
            d.contains("delete element ip tweed lb-tcp-3 { 10.96.0.10 . 80 }"),
            "{d}"
        );
        assert!(
            !d.contains("add element ip tweed lb-tcp-2"),
            "the leftover is reused: {d}"
        );
        assert!(
            kept2.elems.contains(&Elem::Lb(key(), 2)) && !kept2.elems.contains(&Elem::Lb(key(), 3))
        );
        // Deleting the service removes leftovers too.
        let (d, kept3) = render_delta(&kept2, &Contribution::default(), &shape).unwrap();
        assert!(kept3.elems.is_empty());
        assert!(
            d.contains("delete element ip tweed lb-tcp-2")
                && d.contains("delete element ip tweed be-tcp"),
            "{d}"
        );
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
        let (full, shape) = render_full(&cfg(), [&new].into_iter());
        assert!(full.contains("meta l4proto tcp ip daddr . th dport @lb-tcp-40 dnat ip to ip daddr . tcp dport . numgen random mod 40 map @be-tcp-40"), "{full}");
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
        assert!(with.elems.contains(&Elem::LbAffinity(key(), 30)));
        let d = render_delta(&Contribution::default(), &with, &shape)
            .unwrap()
            .0;
        assert!(d.find("add set").unwrap() < d.find("add chain").unwrap());
        assert!(
            d.find("add chain").unwrap() < d.find("add element ip tweed lb").unwrap(),
            "{d}"
        );
        let gone = render_delta(&with, &Contribution::default(), &shape)
            .unwrap()
            .0;
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
        // A deleted UDP service: one entry for the whole key.
        assert_eq!(
            stale_flows(&old, &Contribution::default()),
            vec![(Protocol::UDP, Some("10.96.0.10".parse().unwrap()), 80, None)]
        );
        // TCP: only endpoints that are gone altogether, and not when the service goes.
        let t = svc(ServiceType::ClusterIP);
        let old = plan_service(
            &cfg(),
            &t,
            Some(&eps(&[("10.244.1.2", "n1"), ("10.244.2.2", "n2")])),
        );
        let new = plan_service(&cfg(), &t, Some(&eps(&[("10.244.2.2", "n2")])));
        assert_eq!(stale_flows(&old, &new).len(), 1);
        assert!(stale_flows(&old, &Contribution::default()).is_empty());
    }

    #[test]
    fn full_render_has_the_skeleton_and_the_elements() {
        let c = plan_service(
            &cfg(),
            &svc(ServiceType::NodePort),
            Some(&eps(&[("10.244.1.2", "n1")])),
        );
        let (s, shape) = render_full(&cfg(), [&c].into_iter());
        assert!(s.starts_with("add table ip tweed\ndelete table ip tweed\n"));
        assert!(
            s.contains(
                "set lb-tcp-1 { type ipv4_addr . inet_service; elements = { 10.96.0.10 . 80 } }"
            ),
            "{s}"
        );
        assert!(
            s.contains("10.244.1.1 . 10.244.1.1, 10.244.1.2 . 10.244.1.2"),
            "hairpin pairs: {s}"
        );
        assert!(
            s.contains("ip daddr 10.96.0.0/12 ip saddr != 10.244.0.0/16 jump mark-for-masquerade")
        );
        assert_eq!(shape.ks.len(), PRESET_K as usize);
    }
}
