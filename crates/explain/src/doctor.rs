//! Judging a node: the plan the agent applied against what the kernel says.
//!
//! Pure: [`check`] takes the plan and the gathered [`Facts`] and returns the
//! findings, so every rule here is unit-tested without root. Each finding
//! says what is wrong, shows what was read, and gives the exact command
//! that fixes it. A finding must never fire on a healthy node: every rule
//! names the specific state that breaks traffic, not merely an unusual one.
//!
//! Read first, probe second: route, sysctl, firewall and CNI faults come
//! from reading; the probes (underlay ping, VTEP ping, DF ping) only
//! decide what reading cannot (a port blocked or a smaller MTU somewhere
//! on the path), and a peer whose route is already wrong gets no probe
//! finding of its own: the route finding explains the failed probes.

use std::collections::BTreeSet;

use tweed_netlink::RouteLookup;
use tweed_plan::{Mode, NodeIntent, PeerIntent, Route, LEARNT_TABLE, PROBE_TABLE};

use crate::facts::{sample_addr, Facts, StatusView};
use crate::Finding;

const MAIN_TABLE: u32 = 254;
const LOCAL_TABLE: u32 = 255;
const TWEED_PROTO: u8 = tweed_netlink::TWEED_RTPROTO;

/// Chain and table names other stacks use for Service and pod traffic.
const FOREIGN_CHAINS: &[&str] = &["KUBE-", "FLANNEL", "cali-", "CILIUM_", "WEAVE"];
const FOREIGN_TABLES: &[&str] = &["kube-proxy", "calico", "cilium", "flannel"];

/// A node whose agent waits for its Node's `spec.podCIDR` has no subnet
/// and no plan yet: that is its one finding (whatever plan.json an earlier
/// run left behind describes a node that no longer is).
pub fn waiting(node: &str, st: &StatusView) -> Option<Finding> {
    let why = st.last_error.clone().unwrap_or_default();
    (st.datastore == "waiting" && why.contains("podCIDR")).then(|| Finding {
        fault: "podcidr-unassigned".into(),
        node: node.into(),
        peer: None,
        summary: "the Node has no spec.podCIDR yet, so this node has no pod subnet and no pod can start".into(),
        evidence: vec![format!("agent: {why}")],
        fix: "start kube-controller-manager with --allocate-node-cidrs --cluster-cidr (kubeadm: --pod-network-cidr), or set spec.podCIDR on the Node; the agent proceeds the moment it is set".into(),
    })
}

/// BGP: the speaker not running, and each session that is not Established,
/// with the reason BIRD gives (where Calico says "BIRD is not ready").
fn bgp_findings(node: &str, b: &crate::facts::BgpView) -> Vec<Finding> {
    let mut out = Vec::new();
    if b.state != "running" {
        out.push(Finding {
            fault: "bgp-speaker-down".into(),
            node: node.into(),
            peer: None,
            summary: format!("the cluster runs BGP but this node's speaker is not running ({}): the fabric does not learn this node's pod subnet, and peers routed by BGP fall back to VXLAN", b.state),
            evidence: vec![format!("agent: BGP speaker (BIRD): {}", b.state)],
            fix: "install Debian's bird2 on the node (the agent starts it; see RUN_DIR/bird/bird.log for why it stopped)".into(),
        });
        return out;
    }
    for p in b.peers.iter().filter(|p| p.diagnosis != "established") {
        let who = match &p.peer_node {
            Some(n) => format!("{} ({}, {n})", p.address, p.kind),
            None => format!("{} ({})", p.address, p.kind),
        };
        let fix = match p.diagnosis.as_str() {
            "wrong-asn" => format!("the peer at {} answers with another AS than {}: set the AS it really has (bgp.peers[].asn, --bgp-peer ADDRESS:ASN, or the node's --bgp-asn), or fix the peer's neighbor statement for {}", p.address, p.asn, b.router_id),
            "peer-unreachable" => format!("check that {} is the peer's address, that it runs BGP, and that TCP 179 from {} reaches it (a firewall, a route)", p.address, b.router_id),
            "hold-timer-expired" => format!("the peer stopped sending keepalives: check that {} is up and the path to it is not dropping packets", p.address),
            "authentication" => "set the same TCP MD5 password on both sides (bgp.peers[].password)".into(),
            "bfd-down" => format!("the peer stopped answering BFD: check that {} is up and that the path to it carries UDP 3784 (single hop) and 4784 (multihop); if it is up, its BFD timers may be too tight for its load (bgp.bfd.interval, bgp.bfd.multiplier)", p.address),
            "disabled" => "the session is administratively down: enable it on this node's speaker".into(),
            _ => format!("if it stays like this, nothing completes a BGP session at {}: check the address, the peer's neighbor statement for {} (AS {}), and a firewall in between", p.address, b.router_id, b.local_asn),
        };
        out.push(Finding {
            fault: "bgp-session-down".into(),
            node: node.into(),
            peer: Some(p.peer_node.clone().unwrap_or_else(|| p.address.clone())),
            summary: format!(
                "BGP session to {who}, peer AS {}, is not Established: {}",
                p.asn, p.explain
            ),
            evidence: vec![format!(
                "BIRD: {} {} since {}{}",
                p.state,
                p.info,
                p.since,
                if p.info.is_empty() {
                    " (no error yet)"
                } else {
                    ""
                }
            )],
            fix,
        });
    }
    // BFD configured, the session up, BFD not: the peer runs no BFD (or
    // UDP 3784/4784 is filtered), so a dead peer is noticed only after
    // the hold time. RFC 5882 keeps the session up; nothing else says so.
    if let Some(bfd) = &b.bfd {
        for p in b
            .peers
            .iter()
            .filter(|p| p.diagnosis == "established" && p.bfd.as_deref().unwrap_or("none") != "up")
        {
            let state = p.bfd.as_deref().unwrap_or("no session");
            out.push(Finding {
                fault: "bfd-not-up".into(),
                node: node.into(),
                peer: Some(p.peer_node.clone().unwrap_or_else(|| p.address.clone())),
                summary: format!(
                    "BGP to {} is Established but its BFD session is {state}: if the peer dies, its routes stay until the hold time ({} s) instead of {} ms",
                    p.address, b.hold_time, bfd.detection_ms()
                ),
                evidence: vec![format!("BIRD: show bfd sessions: {} {state}", p.address)],
                fix: format!(
                    "enable BFD for {} on the peer (FRR: `neighbor {} bfd`; for a listen range, on its peer group), and let UDP 3784 and 4784 through between the two",
                    b.router_id, b.router_id
                ),
            });
        }
    }
    out
}

/// Every finding on this node.
pub fn check(intent: &NodeIntent, f: &Facts) -> Vec<Finding> {
    if let Some(w) = f.status.as_ref().and_then(|s| waiting(&intent.node, s)) {
        return vec![w];
    }
    let mut out = Vec::new();
    let node = intent.node.clone();
    let finding =
        |fault: &str, peer: Option<&str>, summary: String, evidence: Vec<String>, fix: String| {
            Finding {
                fault: fault.into(),
                node: node.clone(),
                peer: peer.map(str::to_string),
                summary,
                evidence,
                fix,
            }
        };
    let mut route_trouble: BTreeSet<String> = BTreeSet::new();

    // Routes someone else made inside peers' subnets (more specific ones,
    // other tables, local addresses, a Calico blackhole) shadow part of
    // them even when the lookup of one sample address looks right. A route
    // for the whole subnet in the main table is the next check's business.
    for p in &intent.peers {
        if intent.route_to(p.subnet).is_none() {
            continue;
        }
        let foreign: Vec<&RouteLookup> = f
            .routes
            .iter()
            .filter(|r| {
                r.prefix.prefix_len() >= p.subnet.prefix_len()
                    && p.subnet.contains(&r.prefix.network())
                    && r.table != PROBE_TABLE
                    && r.table != LEARNT_TABLE
                    && !(r.prefix == p.subnet && r.table == MAIN_TABLE)
                    && !(r.kind == "broadcast" && r.table == LOCAL_TABLE)
            })
            .collect();
        if !foreign.is_empty() {
            route_trouble.insert(p.name.clone());
            let mut evidence: Vec<String> = foreign.iter().map(|r| describe(f, r)).collect();
            if let Some(planned) = intent.route_to(p.subnet) {
                evidence.push(format!("tweed's route: {}", planned_text(planned)));
            }
            out.push(finding(
                "foreign-route",
                Some(&p.name),
                format!(
                    "{} route{} that tweed did not make cover{} part of {}'s pod subnet {}: traffic to those pods goes there instead",
                    foreign.len(),
                    if foreign.len() == 1 { "" } else { "s" },
                    if foreign.len() == 1 { "s" } else { "" },
                    p.name,
                    p.subnet
                ),
                evidence,
                foreign
                    .iter()
                    .map(|r| del_command(f, r))
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " (and remove what re-creates it: a leftover CNI or BGP daemon, a bridge such as cni0 or docker0)",
            ));
        }
    }
    // The route each peer's pod traffic actually takes.
    for p in &intent.peers {
        let Some(planned) = intent.route_to(p.subnet) else {
            continue;
        };
        if route_trouble.contains(&p.name) {
            continue;
        }
        if let Some(x) = route_finding(intent, f, p, planned) {
            route_trouble.insert(p.name.clone());
            out.push(finding(x.0, Some(&p.name), x.1, x.2, x.3));
        }
    }

    // Underlay: the source address peers must see. VXLAN (its `local`)
    // and direct routes (`src`) pin it to the address peers know, so a
    // second NIC is harmless there; IP-in-IP through tunl0 takes whatever
    // source the route to the peer picks: seed 002's two-NIC outage.
    for p in &intent.peers {
        if p.mode != Some(Mode::Ipip) {
            continue;
        }
        let Some(Ok(u)) = f.underlay_lookups.get(&p.name) else {
            continue;
        };
        let dev = f.dev_name(u.oif);
        if u.src.is_some_and(|s| s != intent.bind_ip) {
            route_trouble.insert(p.name.clone());
            out.push(finding(
                "wrong-source",
                Some(&p.name),
                format!(
                    "traffic to {} ({}) leaves by {dev} from {}, but this node is known as {} on {}: its replies come from an address {} does not expect",
                    p.name,
                    p.public_ip,
                    u.src.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                    intent.public_ip,
                    intent.underlay_dev,
                    p.name
                ),
                vec![format!("ip route get {}: {}", p.public_ip, describe(f, u))],
                format!(
                    "route the underlay by the known NIC: ip route replace {} dev {} src {} (or move the default route back to {})",
                    u.prefix, intent.underlay_dev, intent.bind_ip, intent.underlay_dev
                ),
            ));
        }
    }

    // Probes: only for peers whose routes look right.
    for pr in &f.probes {
        let Some(p) = intent.peers.iter().find(|p| p.name == pr.peer) else {
            continue;
        };
        if route_trouble.contains(&p.name) {
            continue;
        }
        let tunnel = intent.tunnelled(p);
        let ev =
            |what: &str, ok: bool| format!("{what}: {}", if ok { "answered" } else { "no answer" });
        let evidence = vec![
            ev(
                &format!("ping {} (its underlay address)", p.public_ip),
                pr.underlay,
            ),
            ev(
                &format!(
                    "ping {} (its VTEP, in its pod subnet, {})",
                    p.vtep_ip,
                    p.mode.map(|m| m.to_string()).unwrap_or_default()
                ),
                pr.pod,
            ),
            ev(
                &format!(
                    "ping -M do -s {} {} (a full pod-MTU packet)",
                    pr.size, p.vtep_ip
                ),
                pr.full_size,
            ),
        ];
        if !pr.underlay && !pr.pod {
            out.push(finding(
                "peer-unreachable",
                Some(&p.name),
                format!("{} does not answer at its underlay address {} nor in its pod subnet: it is down or cut off", p.name, p.public_ip),
                evidence,
                format!("check that {} is up and that the network between the nodes carries ICMP", p.name),
            ));
        } else if !pr.pod && tunnel && p.mode == Some(Mode::Vxlan) {
            out.push(finding(
                "vxlan-blocked",
                Some(&p.name),
                format!(
                    "{} answers on the underlay but not through the VXLAN tunnel: something between the nodes drops UDP port {} (a security group, a firewall), unless {} routes its answers wrongly (see its own doctor report)",
                    p.name, intent.vxlan_port, p.name
                ),
                evidence,
                format!(
                    "allow UDP {} between {} and {} in both directions (cloud security group / firewall)",
                    intent.vxlan_port, intent.public_ip, p.public_ip
                ),
            ));
        } else if !pr.pod && !tunnel {
            out.push(finding(
                "pod-traffic-dropped",
                Some(&p.name),
                format!(
                    "{} answers on the underlay but not to pod-addressed traffic routed straight to it: the fabric drops it (source/destination checks)",
                    p.name
                ),
                evidence,
                "use backend auto (it falls back to VXLAN for such peers) or vxlan, or turn off the fabric's destination checks".into(),
            ));
        } else if !pr.pod {
            out.push(finding(
                "peer-unreachable",
                Some(&p.name),
                format!(
                    "{} answers on the underlay but not through the tunnel",
                    p.name
                ),
                evidence,
                "check that IP-in-IP (protocol 4) passes between the nodes".into(),
            ));
        } else if !pr.full_size {
            out.push(finding(
                "mtu",
                Some(&p.name),
                format!(
                    "small packets reach {} but a full {}-byte pod packet with DF set does not: the path carries less than the pods' MTU, so large transfers stall",
                    p.name, intent.pod_mtu
                ),
                evidence,
                format!(
                    "set the cluster config's mtu to what the path carries (less {} for VXLAN), or raise the path's MTU; pods pick up a new MTU when re-created",
                    tweed_model::VXLAN_OVERHEAD
                ),
            ));
        }
    }

    // The runtime's CNI config.
    let cni = &f.cni;
    let first = cni.files.iter().find(|x| x.parsed.is_ok());
    let ours = |x: &crate::facts::CniFile| {
        x.parsed
            .as_ref()
            .is_ok_and(|(_, t)| t.first().is_some_and(|t| t == "tweed"))
    };
    let listing: Vec<String> = cni
        .files
        .iter()
        .map(|x| match &x.parsed {
            Ok((n, t)) => format!(
                "{}/{}: network {n}, plugins {}",
                cni.dir.display(),
                x.name,
                t.join(", ")
            ),
            Err(e) => format!("{}/{}: does not parse ({e})", cni.dir.display(), x.name),
        })
        .collect();
    if cni.node_ready && !cni.files.iter().any(ours) {
        out.push(finding(
            "cni-config-missing",
            None,
            format!(
                "the node is ready but {} holds no tweed config: the runtime reports \"cni plugin not initialized\" and no pod starts",
                cni.dir.display()
            ),
            if listing.is_empty() {
                vec![format!("{}: no .conf, .conflist or .json file", cni.dir.display())]
            } else {
                listing.clone()
            },
            "restart the tweed agent on this node: it writes 10-tweed.conflist once the node is ready".into(),
        ));
    } else if let Some(x) = first.filter(|x| !ours(x)) {
        out.push(finding(
            "cni-config-shadowed",
            None,
            format!(
                "the runtime uses the first config in {} by name, {}, not tweed's: pods are wired by another network",
                cni.dir.display(),
                x.name
            ),
            listing.clone(),
            format!(
                "remove {} (left by an earlier network add-on), then re-create the pods it wired",
                cni.dir.join(&x.name).display()
            ),
        ));
    }
    if !cni.missing_bins.is_empty() {
        out.push(finding(
            "cni-plugin-missing",
            None,
            format!(
                "the CNI config names plugin{} {} that the bin directory does not have: every pod ADD fails",
                if cni.missing_bins.len() == 1 { "" } else { "s" },
                cni.missing_bins.join(", ")
            ),
            listing,
            "restart the tweed agent on this node (it installs its plugin before writing the config), or install the missing plugin".into(),
        ));
    }

    // Forwarding.
    if f.ip_forward == Some(false) {
        out.push(finding(
            "ip-forward-off",
            None,
            "IPv4 forwarding is off: traffic between this node's pods and anything outside the node is dropped".into(),
            vec!["net.ipv4.ip_forward = 0".into()],
            "sysctl -w net.ipv4.ip_forward=1, and find what turned it off (a file in /etc/sysctl.d, a hardening baseline)".into(),
        ));
    }
    let cluster = intent.cluster_cidr.network().to_string();
    for c in &f.nft {
        if c.hook.as_deref() == Some("forward")
            && c.policy.as_deref() == Some("drop")
            && !(c.family == "ip" && c.table == tweed_plan::services::TABLE)
            && !c
                .rules
                .iter()
                .any(|r| r.contains(&cluster) && r.contains("accept"))
        {
            out.push(finding(
                "forward-drop",
                None,
                format!(
                    "the {} {} chain {} drops forwarded packets by default and accepts nothing for the cluster CIDR {}: pod traffic through this node is dropped",
                    c.family, c.table, c.name, intent.cluster_cidr
                ),
                vec![format!(
                    "table {} {}, chain {}: hook forward, policy drop, {} rule{}",
                    c.family,
                    c.table,
                    c.name,
                    c.rules.len(),
                    if c.rules.len() == 1 { "" } else { "s" }
                )],
                format!(
                    "nft insert rule {} {} {} ip saddr {} accept; nft insert rule {} {} {} ip daddr {} accept (Docker: iptables -I DOCKER-USER ...)",
                    c.family, c.table, c.name, intent.cluster_cidr, c.family, c.table, c.name, intent.cluster_cidr
                ),
            ));
        }
    }
    for c in f
        .legacy
        .iter()
        .filter(|c| c.name == "FORWARD" && c.policy == "DROP")
    {
        out.push(finding(
            "forward-drop",
            None,
            "the iptables-legacy FORWARD chain drops forwarded packets by default: pod traffic through this node is dropped".into(),
            vec![format!("iptables-legacy -t {} -S FORWARD: -P FORWARD DROP", c.table)],
            format!(
                "iptables-legacy -I FORWARD -s {0} -j ACCEPT; iptables-legacy -I FORWARD -d {0} -j ACCEPT",
                intent.cluster_cidr
            ),
        ));
    }
    let strict: Vec<String> = f
        .rp_filter
        .iter()
        .filter(|(_, v)| *v == 1)
        .map(|(d, _)| d.clone())
        .collect();
    if !strict.is_empty() {
        out.push(finding(
            "rp-filter-strict",
            None,
            format!(
                "strict reverse-path filtering on {}: a packet from a peer's pod is dropped whenever it arrives by another device than the one this node routes back by (e.g. a peer sends direct while this node tunnels)",
                strict.join(", ")
            ),
            f.rp_filter
                .iter()
                .filter(|(_, v)| *v == 1)
                .map(|(d, v)| format!("effective net.ipv4.conf.{d}.rp_filter = {v} (max of all and {d})"))
                .collect(),
            format!(
                "sysctl -w net.ipv4.conf.all.rp_filter=2{} (loose mode; 2 keeps spoofing protection for unroutable sources)",
                strict
                    .iter()
                    .map(|d| format!(" net.ipv4.conf.{d}.rp_filter=2"))
                    .collect::<String>()
            ),
        ));
    }

    // Leftovers of other stacks.
    let mut leftovers: Vec<String> = f
        .nft
        .iter()
        .filter(|c| {
            FOREIGN_CHAINS.iter().any(|p| c.name.starts_with(p))
                || FOREIGN_TABLES.iter().any(|t| c.table == *t)
        })
        .map(|c| {
            format!(
                "nft: table {} {}, chain {} ({} rules)",
                c.family,
                c.table,
                c.name,
                c.rules.len()
            )
        })
        .collect();
    leftovers.extend(
        f.legacy
            .iter()
            .filter(|c| FOREIGN_CHAINS.iter().any(|p| c.name.starts_with(p)))
            .map(|c| format!("iptables-legacy: table {}, chain {}", c.table, c.name)),
    );
    if !leftovers.is_empty() {
        out.push(finding(
            "leftover-rules",
            None,
            "rules of another Service proxy or pod network are still loaded: they can rewrite or drop Service and pod traffic before tweed's rules see it".into(),
            leftovers,
            "remove them once that stack is gone: kube-proxy --cleanup (both iptables-legacy and nft), or delete the tables/chains named above; never run kube-proxy beside tweed".into(),
        ));
    }

    // Connections conntrack still sends to endpoints that are gone.
    let stale: Vec<String> = f
        .service_ct
        .iter()
        .filter(|(e, backends)| !backends.contains(&(e.reply_src, e.reply_sport)))
        .map(|(e, backends)| {
            format!(
                "{} {}:{} → {}:{} goes to {}:{}, which is {}",
                e.proto,
                e.src,
                e.sport,
                e.dst,
                e.dport,
                e.reply_src,
                e.reply_sport,
                if backends.is_empty() {
                    "not an endpoint: the Service has none now".to_string()
                } else {
                    format!(
                        "not one of its endpoints now ({})",
                        backends
                            .iter()
                            .map(|(i, p)| format!("{i}:{p}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        })
        .collect();
    if !stale.is_empty() {
        let fixes: Vec<String> = f
            .service_ct
            .iter()
            .filter(|(e, backends)| !backends.contains(&(e.reply_src, e.reply_sport)))
            .map(|(e, _)| {
                format!(
                    "conntrack -D -p {} --orig-dst {} --dport {} --reply-src {}",
                    e.proto, e.dst, e.dport, e.reply_src
                )
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push(finding(
            "stale-conntrack",
            None,
            format!(
                "{} connection{} to Services still go{} to endpoints that are gone: their packets reach no pod (UDP flows such as DNS keep doing so until they idle out)",
                stale.len(),
                if stale.len() == 1 { "" } else { "s" },
                if stale.len() == 1 { "es" } else { "" }
            ),
            stale,
            fixes.join("; "),
        ));
    }

    // The datastore.
    if let Some(b) = f.status.as_ref().and_then(|s| s.bgp.as_ref()) {
        out.extend(bgp_findings(&node, b));
    }
    if let Some(st) = &f.status {
        let why = st.last_error.clone().unwrap_or_default();
        // The lease the node lives by. etcd: the agent's, on its node
        // record, renewed every third of its TTL; when it lapses, peers
        // drop this node's routes and its subnet can go to another node.
        // Kubernetes: kubelet's (kube-node-lease), renewed every quarter;
        // when it lapses, the node goes NotReady and its pods leave every
        // Service.
        let kubelet = st.lease_holder.as_deref() == Some("kubelet");
        let (whose, then) = if kubelet {
            (
                "this node's Lease in kube-node-lease",
                "the node controller marks the node NotReady and its pods leave every Service's endpoints",
            )
        } else {
            (
                "the lease on this node's record",
                "peers drop this node's routes and its subnet may go to another node",
            )
        };
        let lease = st.lease_ttl.zip(st.lease_renewed_unix).map(|(ttl, renewed)| {
            let age = f.now_unix.saturating_sub(renewed) as i64;
            let left = ttl - age;
            let text = if left > 0 {
                format!("{whose}: renewed {age} s ago, lasts {ttl} s: it expires in {left} s; then {then}")
            } else {
                format!("{whose}: renewed {age} s ago, lasts {ttl} s: it expired {} s ago, so {then}", -left)
            };
            (ttl, age, left, text)
        });
        let unreachable = st.datastore != "connected" && st.datastore != "waiting"
            || matches!(f.datastore_reach, Some(Err(_)));
        // Half the TTL without a renewal is never normal: renewals come
        // every third (agent) or quarter (kubelet) of it.
        if let Some((ttl, age, left, text)) = lease
            .clone()
            .filter(|(ttl, age, ..)| (kubelet || !unreachable) && 2 * age > *ttl)
        {
            let who = if kubelet { "kubelet" } else { "the agent" };
            out.push(finding(
                "lease-expiring",
                None,
                format!(
                    "{who} has not renewed {whose} for {age} s (it renews every {} s): it is stopped, stuck{}; {}",
                    if kubelet { (ttl / 4).max(1) } else { (ttl / 3).max(1) },
                    if kubelet { ", or cannot reach the API server" } else { "" },
                    if left > 0 { format!("in {left} s {then}") } else { then.to_string() }
                ),
                vec![text, format!("agent: datastore {} {}", st.datastore, st.datastore_at)],
                if kubelet {
                    "look at kubelet on this node (systemctl status kubelet; journalctl -u kubelet): is it running, and can it reach the API server?".into()
                } else {
                    "look at the agent (tweed status; its log) and restart it if it hangs: its routes and Services stay as they are meanwhile".into()
                },
            ));
        }
        if unreachable {
            let mut ev = vec![format!(
                "agent: datastore {} {}",
                st.datastore, st.datastore_at
            )];
            if !why.is_empty() {
                ev.push(format!("agent's last error: {why}"));
            }
            if let Some(r) = &f.datastore_reach {
                ev.push(match r {
                    Ok(()) => "TCP connect from this node: works".into(),
                    Err(e) => e.clone(),
                });
            }
            if let Some((.., text)) = lease.as_ref().filter(|_| !kubelet) {
                ev.push(text.clone());
            }
            out.push(finding(
                "datastore-unreachable",
                None,
                "the agent cannot reach its datastore: the data plane stays as it is, but no change (new pods elsewhere, Services, nodes) reaches this node".into(),
                ev,
                format!("restore the path from this node to {} (firewall, routes, the datastore itself)", st.datastore_at),
            ));
        }
    }
    out
}

/// The finding for a peer whose route lookup disagrees with the plan:
/// (fault, summary, evidence, fix).
fn route_finding(
    intent: &NodeIntent,
    f: &Facts,
    p: &PeerIntent,
    planned: &Route,
) -> Option<(&'static str, String, Vec<String>, String)> {
    let want = format!(
        "{} via {} dev {}{} proto 144 (tweed's plan: {})",
        planned.dst,
        planned.via,
        planned.dev,
        if planned.onlink { " onlink" } else { "" },
        p.mode.map(|m| m.to_string()).unwrap_or_default()
    );
    let fix = format!(
        "ip route replace {} via {} dev {}{} proto 144 (the agent does this itself at its next resync, every {} s; if the wrong route comes back, something else writes it: stop that)",
        planned.dst,
        planned.via,
        planned.dev,
        if planned.onlink { " onlink" } else { "" },
        intent.resync_secs
    );
    let probe_ev: Vec<String> = f
        .probes
        .iter()
        .filter(|x| x.peer == p.name)
        .map(|x| {
            format!(
                "ping {}: {}",
                p.vtep_ip,
                if x.pod { "answered" } else { "no answer" }
            )
        })
        .collect();
    let sample = sample_addr(p.subnet);
    match f.pod_lookups.get(&p.name)? {
        Err(errno) => Some((
            "route-missing",
            format!(
                "this node has no route to {}'s pod subnet {}",
                p.name, p.subnet
            ),
            vec![
                format!("ip route get {sample}: {}", crate::errno_text(*errno)),
                format!("planned: {want}"),
            ],
            fix,
        )),
        Ok(r) => {
            let dev = f.dev_name(r.oif);
            let right = r.prefix == planned.dst
                && r.table == MAIN_TABLE
                && r.protocol == TWEED_PROTO
                && r.gateway == Some(planned.via)
                && dev == planned.dev;
            if right {
                return None;
            }
            let mut ev = vec![
                format!("ip route get fibmatch {sample}: {}", describe(f, r)),
                format!("planned: {want}"),
            ];
            ev.extend(probe_ev);
            if r.prefix != planned.dst || r.table != MAIN_TABLE {
                return Some((
                    "foreign-route",
                    format!(
                        "a route tweed did not make ({} in table {}) decides traffic to {}'s pods instead of tweed's route",
                        r.prefix,
                        table_name(r.table),
                        p.name
                    ),
                    ev,
                    format!("{} (and remove what re-creates it)", del_command(f, r)),
                ));
            }
            // Direct routing towards a gateway no connected subnet holds
            // (flannel host-gw across VLANs, seed 003): the neighbour stays
            // INCOMPLETE and every packet is lost.
            if let Some(gw) = r.gateway {
                let on_link = f
                    .link(r.oif.unwrap_or(0))
                    .is_some_and(|l| l.addrs.iter().any(|a| a.contains(&gw)));
                if gw == p.public_ip && dev == intent.underlay_dev && !on_link {
                    if let Some(Some(state)) = f.neigh_state(&p.name) {
                        ev.push(format!("ip neigh show {gw} dev {dev}: {state}"));
                    }
                    return Some((
                        "not-on-link",
                        format!(
                            "pod traffic to {} is sent straight to {gw} on {dev}, but {gw} is not on any subnet of {dev}: the peer is on another segment and the packets never arrive",
                            p.name
                        ),
                        ev,
                        fix,
                    ));
                }
            }
            Some((
                "wrong-next-hop",
                format!(
                    "traffic to {}'s pods ({}) goes via {} on {dev}, not where tweed planned ({} on {})",
                    p.name,
                    p.subnet,
                    r.gateway.map(|g| g.to_string()).unwrap_or_else(|| "no gateway".into()),
                    planned.via,
                    planned.dev
                ),
                ev,
                fix,
            ))
        }
    }
}

impl Facts {
    fn neigh_state(&self, peer: &str) -> Option<Option<String>> {
        self.gateway_neigh.get(peer).cloned()
    }
}

fn planned_text(r: &Route) -> String {
    format!(
        "{} via {} dev {}{} proto 144",
        r.dst,
        r.via,
        r.dev,
        if r.onlink { " onlink" } else { "" }
    )
}

fn table_name(t: u32) -> String {
    match t {
        MAIN_TABLE => "main".into(),
        LOCAL_TABLE => "local".into(),
        t => t.to_string(),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        2 => "kernel".into(),
        3 => "boot".into(),
        4 => "static".into(),
        12 => "bird".into(),
        TWEED_PROTO => "144 (tweed)".into(),
        p => p.to_string(),
    }
}

/// A route as `ip route` would print it.
fn describe(f: &Facts, r: &RouteLookup) -> String {
    let mut s = String::new();
    if r.kind != "unicast" {
        s.push_str(&format!("{} ", r.kind));
    }
    s.push_str(&r.prefix.to_string());
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if r.oif.is_some() {
        s.push_str(&format!(" dev {}", f.dev_name(r.oif)));
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    s.push_str(&format!(" proto {}", proto_name(r.protocol)));
    if r.table != MAIN_TABLE {
        s.push_str(&format!(" table {}", table_name(r.table)));
    }
    if let Some(src) = r.src {
        s.push_str(&format!(" src {src}"));
    }
    s
}

fn del_command(f: &Facts, r: &RouteLookup) -> String {
    let mut s = format!(
        "ip route del {}",
        if r.kind == "unicast" {
            String::new()
        } else {
            format!("{} ", r.kind)
        }
    );
    s.push_str(&r.prefix.to_string());
    if r.oif.is_some() && r.kind == "unicast" {
        s.push_str(&format!(" dev {}", f.dev_name(r.oif)));
    }
    if r.table != MAIN_TABLE {
        s.push_str(&format!(" table {}", table_name(r.table)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{CniFacts, CniFile, LinkFact, NftChain, PeerProbe, StatusView};
    use std::collections::BTreeMap;
    use tweed_model::{Backend, ClusterConfig, MacAddr, NodeRecord};
    use tweed_plan::{plan_node, LocalNode, PeerFacts, PeerIntent};

    fn rec(name: &str, subnet: &str, ip: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            backend: Backend::Vxlan,
            vtep_mac: MacAddr([0x0e, 0, 0, 0, 0, subnet.as_bytes()[7]]),
            unreachable: vec![],
            bgp: None,
        }
    }

    /// node1 with one VXLAN peer node2, as the agent would plan it.
    fn intent() -> NodeIntent {
        let cfg = ClusterConfig {
            backend: Backend::Vxlan,
            ..Default::default()
        };
        let me = LocalNode {
            record: rec("node1", "10.244.0.0/24", "198.51.100.10"),
            bind_ip: "198.51.100.10".parse().unwrap(),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        };
        let peer = rec("node2", "10.244.2.0/24", "198.51.100.11");
        let plan = plan_node(
            &cfg,
            &me,
            &[me.record.clone(), peer.clone()],
            &BTreeMap::<String, PeerFacts>::new(),
        );
        NodeIntent {
            node: "node1".into(),
            subnet: me.record.subnet,
            cluster_cidr: cfg.cluster_cidr,
            service_cidr: cfg.service_cidr,
            backend: cfg.backend,
            vxlan_port: 8472,
            underlay_dev: "eth0".into(),
            bind_ip: me.bind_ip,
            public_ip: me.bind_ip,
            underlay_mtu: 1500,
            pod_mtu: 1450,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: None,
            resync_secs: 30,
            peers: vec![PeerIntent {
                name: "node2".into(),
                subnet: peer.subnet,
                public_ip: peer.public_ip,
                vtep_ip: peer.vtep_ip(),
                vtep_mac: peer.vtep_mac,
                mode: Some(Mode::Vxlan),
                reason: "backend vxlan".into(),
            }],
            plan,
        }
    }

    fn tweed_route() -> RouteLookup {
        RouteLookup {
            prefix: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("10.244.2.0".parse().unwrap()),
            oif: Some(3),
            table: MAIN_TABLE,
            protocol: TWEED_PROTO,
            kind: "unicast".into(),
            onlink: true,
            src: Some("10.244.0.0".parse().unwrap()),
            metric: 0,
        }
    }

    fn healthy() -> Facts {
        Facts {
            links: vec![
                LinkFact {
                    index: 2,
                    name: "eth0".into(),
                    mtu: 1500,
                    addrs: vec!["198.51.100.10/24".parse().unwrap()],
                },
                LinkFact {
                    index: 3,
                    name: "tweed.1".into(),
                    mtu: 1450,
                    addrs: vec!["10.244.0.0/32".parse().unwrap()],
                },
            ],
            routes: vec![tweed_route()],
            pod_lookups: [("node2".to_string(), Ok(tweed_route()))].into(),
            underlay_lookups: BTreeMap::new(),
            gateway_neigh: BTreeMap::new(),
            ip_forward: Some(true),
            rp_filter: vec![("eth0".into(), 2), ("tweed.1".into(), 0)],
            nft: vec![],
            legacy: vec![],
            cni: CniFacts {
                dir: "/etc/cni/net.d".into(),
                files: vec![CniFile {
                    name: "10-tweed.conflist".into(),
                    parsed: Ok(("tweed".into(), vec!["tweed".into()])),
                }],
                missing_bins: vec![],
                node_ready: true,
            },
            status: Some(StatusView {
                datastore: "connected".into(),
                datastore_at: "etcd http://198.51.100.2:2379".into(),
                last_error: None,
                ..Default::default()
            }),
            datastore_reach: Some(Ok(())),
            probes: vec![PeerProbe {
                peer: "node2".into(),
                underlay: true,
                pod: true,
                full_size: true,
                size: 1422,
            }],
            service_ct: vec![],
            now_unix: 1_000_000,
        }
    }

    fn faults(f: &Facts) -> Vec<String> {
        check(&intent(), f).into_iter().map(|x| x.fault).collect()
    }

    #[test]
    fn a_bgp_session_that_is_not_up_is_named_with_its_reason() {
        use crate::facts::{BgpPeerView, BgpView};
        let mut f = healthy();
        let peer = |addr: &str, diagnosis: &str, info: &str| BgpPeerView {
            address: addr.into(),
            asn: 65001,
            kind: "node specific".into(),
            state: "start".into(),
            info: info.into(),
            diagnosis: diagnosis.into(),
            explain: "the peer's AS is not the one configured for it (BGP error: bad peer AS)"
                .into(),
            ..Default::default()
        };
        f.status.as_mut().unwrap().bgp = Some(BgpView {
            state: "running".into(),
            local_asn: 64512,
            router_id: "198.51.100.10".into(),
            peers: vec![
                BgpPeerView {
                    state: "up".into(),
                    ..peer("198.51.100.2", "established", "Established")
                },
                peer("198.51.100.1", "wrong-asn", "Idle Received: Bad peer AS"),
            ],
            ..Default::default()
        });
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].fault, "bgp-session-down");
        assert_eq!(found[0].peer.as_deref(), Some("198.51.100.1"));
        assert!(found[0].summary.contains("bad peer AS"), "{found:#?}");
        assert!(found[0].evidence[0].contains("Bad peer AS"), "{found:#?}");
        assert!(
            found[0].fix.contains("--bgp-peer ADDRESS:ASN"),
            "{found:#?}"
        );
        f.status.as_mut().unwrap().bgp.as_mut().unwrap().state = "not running".into();
        assert_eq!(faults(&f), ["bgp-speaker-down"]);
    }

    #[test]
    fn bfd_down_and_bfd_missing_are_told_apart() {
        use crate::facts::{BgpPeerView, BgpView};
        let mut f = healthy();
        let peer = |addr: &str, diagnosis: &str, bfd: Option<&str>| BgpPeerView {
            address: addr.into(),
            asn: 65001,
            kind: "global".into(),
            state: if diagnosis == "established" {
                "up"
            } else {
                "start"
            }
            .into(),
            diagnosis: diagnosis.into(),
            bfd: bfd.map(Into::into),
            ..Default::default()
        };
        let view = |peers| BgpView {
            state: "running".into(),
            local_asn: 64512,
            router_id: "198.51.100.10".into(),
            hold_time: 90,
            bfd: Some(Default::default()),
            peers,
        };
        f.status.as_mut().unwrap().bgp = Some(view(vec![
            peer("198.51.100.1", "established", Some("up")),
            peer("198.51.100.2", "bfd-down", Some("down")),
            peer("198.51.100.3", "established", Some("down")),
            peer("198.51.100.4", "established", None),
        ]));
        let found = check(&intent(), &f);
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|x| (x.fault.as_str(), x.peer.as_deref().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("bgp-session-down", "198.51.100.2"),
                ("bfd-not-up", "198.51.100.3"),
                ("bfd-not-up", "198.51.100.4"),
            ]
        );
        assert!(found[0].fix.contains("UDP 3784"), "{found:#?}");
        assert!(
            found[1]
                .summary
                .contains("hold time (90 s) instead of 900 ms"),
            "{found:#?}"
        );
        assert!(found[2].summary.contains("no session"), "{found:#?}");
        // Without BFD in the cluster, a missing BFD session is no fault.
        f.status.as_mut().unwrap().bgp.as_mut().unwrap().bfd = None;
        assert_eq!(faults(&f), ["bgp-session-down"]);
    }

    #[test]
    fn a_healthy_node_has_no_findings() {
        assert_eq!(faults(&healthy()), Vec::<String>::new());
        // Loose rp_filter, a Docker-style FORWARD drop that accepts the
        // cluster CIDR, and tweed's own table are all fine.
        let mut f = healthy();
        f.rp_filter = vec![("eth0".into(), 2)];
        f.nft.push(NftChain {
            family: "ip".into(),
            table: "filter".into(),
            name: "FORWARD".into(),
            hook: Some("forward".into()),
            policy: Some("drop".into()),
            rules: vec![r#"[{"match":{"right":{"prefix":{"addr":"10.244.0.0","len":16}}}},{"accept":null}]"#.into()],
        });
        assert_eq!(faults(&f), Vec::<String>::new());
    }

    #[test]
    fn a_hand_written_next_hop_is_named_and_explains_the_failed_probe() {
        let mut f = healthy();
        let mut r = tweed_route();
        r.gateway = Some("198.51.100.11".parse().unwrap());
        r.protocol = 3;
        f.routes = vec![r.clone()];
        f.pod_lookups.insert("node2".into(), Ok(r));
        f.probes[0].pod = false;
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].fault, "wrong-next-hop");
        assert!(
            found[0]
                .fix
                .contains("ip route replace 10.244.2.0/24 via 10.244.2.0 dev tweed.1 onlink"),
            "{}",
            found[0].fix
        );
    }

    #[test]
    fn a_more_specific_foreign_route_is_found_even_when_the_sample_looks_right() {
        let mut f = healthy();
        f.routes.push(RouteLookup {
            prefix: "10.244.2.128/26".parse().unwrap(),
            gateway: None,
            oif: None,
            table: MAIN_TABLE,
            protocol: 12,
            kind: "blackhole".into(),
            onlink: false,
            src: None,
            metric: 0,
        });
        let found = check(&intent(), &f);
        assert_eq!(
            found.iter().map(|x| x.fault.as_str()).collect::<Vec<_>>(),
            ["foreign-route"]
        );
        assert!(
            found[0].evidence[0].contains("blackhole 10.244.2.128/26 proto bird"),
            "{:?}",
            found[0].evidence
        );
        assert_eq!(
            found[0].fix.split(" (").next().unwrap(),
            "ip route del blackhole 10.244.2.128/26"
        );
    }

    #[test]
    fn probes_tell_a_blocked_port_from_a_small_mtu_from_a_dead_peer() {
        for ((underlay, pod, full), want) in [
            ((true, false, false), "vxlan-blocked"),
            ((true, true, false), "mtu"),
            ((false, false, false), "peer-unreachable"),
        ] {
            let mut f = healthy();
            f.probes[0] = PeerProbe {
                peer: "node2".into(),
                underlay,
                pod,
                full_size: full,
                size: 1422,
            };
            assert_eq!(faults(&f), [want]);
        }
    }

    #[test]
    fn host_faults_each_name_themselves() {
        let mut f = healthy();
        f.ip_forward = Some(false);
        assert_eq!(faults(&f), ["ip-forward-off"]);
        let mut f = healthy();
        f.rp_filter = vec![("eth0".into(), 1)];
        assert_eq!(faults(&f), ["rp-filter-strict"]);
        let mut f = healthy();
        f.cni.files.insert(
            0,
            CniFile {
                name: "00-flannel.conflist".into(),
                parsed: Ok(("cbr0".into(), vec!["flannel".into()])),
            },
        );
        assert_eq!(faults(&f), ["cni-config-shadowed"]);
        // An unparseable file before ours is skipped by runtimes: not shadowing.
        let mut f = healthy();
        f.cni.files.insert(
            0,
            CniFile {
                name: "00-broken.conf".into(),
                parsed: Err("EOF".into()),
            },
        );
        assert_eq!(faults(&f), Vec::<String>::new());
        let mut f = healthy();
        f.cni.files.clear();
        assert_eq!(faults(&f), ["cni-config-missing"]);
        // ... but before the node is ready, no config is what should be.
        f.cni.node_ready = false;
        assert_eq!(faults(&f), Vec::<String>::new());
        let mut f = healthy();
        f.datastore_reach = Some(Err("TCP connect to 198.51.100.2:2379: timed out".into()));
        assert_eq!(faults(&f), ["datastore-unreachable"]);
        let mut f = healthy();
        f.legacy.push(crate::facts::LegacyChain {
            table: "nat".into(),
            name: "KUBE-SERVICES".into(),
            policy: "-".into(),
        });
        assert_eq!(faults(&f), ["leftover-rules"]);
    }

    #[test]
    fn stale_conntrack_is_an_entry_whose_endpoint_is_gone() {
        let entry = |reply: &str| crate::facts::CtEntry {
            proto: "udp".into(),
            src: "10.244.0.5".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            sport: 40000,
            dport: 53,
            reply_src: reply.parse().unwrap(),
            reply_sport: 53,
            reply_dst: "10.244.0.5".parse().unwrap(),
        };
        let now = vec![("10.244.2.7".parse().unwrap(), 53)];
        let mut f = healthy();
        f.service_ct = vec![(entry("10.244.2.7"), now.clone())];
        assert_eq!(faults(&f), Vec::<String>::new());
        f.service_ct.push((entry("10.244.2.9"), now));
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].fault, "stale-conntrack");
        assert!(
            found[0].fix.contains(
                "conntrack -D -p udp --orig-dst 10.96.0.10 --dport 53 --reply-src 10.244.2.9"
            ),
            "{}",
            found[0].fix
        );
    }

    #[test]
    fn ip_in_ip_from_the_other_nics_address_is_wrong_source() {
        // Seed 002, case 2: the default route moved to a second NIC, so the
        // route to the peer picks that NIC's address; tunl0 sends from it.
        let mut i = intent();
        i.peers[0].mode = Some(Mode::Ipip);
        let mut f = healthy();
        f.links.push(LinkFact {
            index: 4,
            name: "eth1".into(),
            mtu: 1500,
            addrs: vec!["198.51.100.75/26".parse().unwrap()],
        });
        let lookup = |src: &str, oif: u32| RouteLookup {
            prefix: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("198.51.100.126".parse().unwrap()),
            oif: Some(oif),
            table: MAIN_TABLE,
            protocol: 3,
            kind: "unicast".into(),
            onlink: false,
            src: Some(src.parse().unwrap()),
            metric: 0,
        };
        f.underlay_lookups
            .insert("node2".into(), Ok(lookup("198.51.100.10", 2)));
        assert!(check(&i, &f).is_empty());
        f.underlay_lookups
            .insert("node2".into(), Ok(lookup("198.51.100.75", 4)));
        let found = check(&i, &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].fault, "wrong-source");
        assert!(
            found[0]
                .summary
                .contains("leaves by eth1 from 198.51.100.75"),
            "{}",
            found[0].summary
        );
        // VXLAN pins its source (`local`): the same route is harmless.
        assert!(check(&intent(), &f).is_empty());
    }

    #[test]
    fn a_lease_not_renewed_for_half_its_ttl_is_expiring() {
        let mut f = healthy();
        let st = f.status.as_mut().unwrap();
        st.lease_ttl = Some(15);
        st.lease_renewed_unix = Some(1_000_000 - 5);
        assert_eq!(faults(&f), Vec::<String>::new());
        f.status.as_mut().unwrap().lease_renewed_unix = Some(1_000_000 - 9);
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].fault, "lease-expiring");
        assert!(
            found[0].evidence[0].contains("expires in 6 s"),
            "{found:#?}"
        );
        // With the datastore away, the lease is evidence of that finding.
        f.datastore_reach = Some(Err("TCP connect to 198.51.100.2:2379: timed out".into()));
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].fault, "datastore-unreachable");
        assert!(
            found[0]
                .evidence
                .iter()
                .any(|e| e.contains("expires in 6 s")),
            "{found:#?}"
        );
        // kubelet's Lease (Kubernetes mode): its own finding, named as kubelet's.
        let mut f = healthy();
        let st = f.status.as_mut().unwrap();
        st.lease_holder = Some("kubelet".into());
        st.lease_ttl = Some(40);
        st.lease_renewed_unix = Some(1_000_000 - 14);
        assert_eq!(faults(&f), Vec::<String>::new());
        f.status.as_mut().unwrap().lease_renewed_unix = Some(1_000_000 - 25);
        let found = check(&intent(), &f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].summary.starts_with(
                "kubelet has not renewed this node's Lease in kube-node-lease for 25 s"
            ),
            "{}",
            found[0].summary
        );
    }

    #[test]
    fn a_node_waiting_for_its_pod_cidr_has_that_one_finding() {
        let mut f = healthy();
        f.probes[0].pod = false;
        f.status = Some(StatusView {
            datastore: "waiting".into(),
            last_error: Some("Node n2 has no spec.podCIDR yet".into()),
            ..Default::default()
        });
        assert_eq!(faults(&f), ["podcidr-unassigned"]);
    }

    #[test]
    fn a_route_finding_on_one_node_absorbs_the_echo_on_its_peer() {
        let cause = Finding {
            fault: "wrong-next-hop".into(),
            node: "a".into(),
            peer: Some("b".into()),
            summary: String::new(),
            evidence: vec![],
            fix: String::new(),
        };
        let echo = Finding {
            fault: "vxlan-blocked".into(),
            node: "b".into(),
            peer: Some("a".into()),
            ..cause.clone()
        };
        let unrelated = Finding {
            fault: "vxlan-blocked".into(),
            node: "c".into(),
            peer: Some("a".into()),
            ..cause.clone()
        };
        let out = crate::correlate(vec![echo, cause, unrelated]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].fault, "wrong-next-hop");
        assert!(out[0].evidence[0].contains("b's probes of a fail too"));
        assert_eq!(out[1].node, "c");
    }
}
