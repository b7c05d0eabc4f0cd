//! `tweed lab fault`: break a lab the way clusters break in the field, so
//! `tweed doctor` can be shown (and tested) to find each fault by itself.
//!
//! Each fault is made the way it happens for real: a route written by hand
//! on the node, a leftover Calico blackhole, a firewall in the *fabric's*
//! namespace (never on the nodes) for a blocked port, a switch port with a
//! smaller MTU, a sysctl flipped, Docker's FORWARD policy, a leftover
//! kube-proxy chain, a flannel conflist left in the CNI directory. Every
//! injection records the exact commands that undo it (in the lab's
//! `faults.json`), and `clear` runs them, collecting every error.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tweed_plan::NodeIntent;

use crate::lab::{run, run_stdin, Lab, LabError, LabState};

type Result<T, E = LabError> = std::result::Result<T, E>;

/// The faults a lab can inject: (name, needs a peer, how it is made).
pub const FAULTS: &[(&str, bool, &str)] = &[
    ("wrong-next-hop", true, "on NODE, the route to PEER's pod subnet rewritten by hand with the tunnel and underlay addresses mixed up (seed 002, case 1); the agent repairs it at its next resync"),
    ("foreign-route", true, "on NODE, a leftover Calico block blackhole (proto bird) inside PEER's pod subnet"),
    ("vxlan-blocked", true, "in the fabric, UDP to the VXLAN port dropped between NODE and PEER (seed 000)"),
    ("mtu", false, "the fabric's port for NODE carries 100 bytes less than the underlay MTU"),
    ("ip-forward-off", false, "on NODE, net.ipv4.ip_forward=0"),
    ("forward-drop", false, "on NODE, Docker's FORWARD chain with policy drop (table ip filter)"),
    ("rp-filter-strict", false, "on NODE, net.ipv4.conf.all.rp_filter=1"),
    ("leftover-rules", false, "on NODE, kube-proxy's KUBE-SERVICES and KUBE-POSTROUTING chains in iptables-legacy"),
    ("cni-config-missing", false, "on NODE, tweed's conflist removed from the CNI config directory"),
    ("cni-plugin-missing", false, "on NODE (a kubelet lab), tweed's plugin binary removed from the runtime's CNI plugin directory"),
    ("cni-config-shadowed", false, "on NODE, flannel's 10-flannel.conflist left as 00-flannel.conflist, sorting before tweed's"),
    ("lease-expiring", false, "on NODE, the agent frozen (SIGSTOP), so its node record's etcd lease is not renewed; with kubelets, kubelet frozen, so the node's Lease is not; doctor names it once half the lease's TTL has passed"),
    ("datastore-unreachable", false, "in the fabric, NODE's traffic to the datastore dropped"),
    ("not-on-link", true, "on NODE, direct routing (host-gw, forced onlink) to a PEER on another segment (seed 003); the agent repairs it at its next resync"),
    ("default-route-other-nic", false, "on NODE (two NICs), the default route moved to the NIC of the address peers do not know: seed 002 case 2's trigger, harmful only with IP-in-IP (VXLAN and direct routes pin the source; doctor names it wrong-source for IP-in-IP peers)"),
    ("stale-conntrack", false, "on NODE, a conntrack entry sending a Service connection to an endpoint address no pod has"),
];

/// One injected fault and how to undo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Injected {
    pub fault: String,
    pub node: String,
    #[serde(default)]
    pub peer: Option<String>,
    /// Argument vectors run in order to undo the fault.
    pub undo: Vec<Vec<String>>,
}

/// The command that puts tweed's planned route back (the undo of a route
/// written by hand): `ip route replace DST via VIA dev DEV [onlink] proto 144 [src SRC]`.
fn restore_route(r: &tweed_plan::Route) -> Vec<String> {
    let mut v = argv(&[
        "ip",
        "route",
        "replace",
        &r.dst.to_string(),
        "via",
        &r.via.to_string(),
        "dev",
        &r.dev,
    ]);
    if r.onlink {
        v.push("onlink".into());
    }
    v.extend(argv(&["proto", "144"]));
    if let Some(src) = r.src {
        v.extend(argv(&["src", &src.to_string()]));
    }
    v
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Lab {
    fn faults_path(&self) -> PathBuf {
        self.dir.join("faults.json")
    }

    /// Faults injected and not cleared yet.
    pub fn faults(&self) -> Vec<Injected> {
        std::fs::read(self.faults_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_faults(&self, f: &[Injected]) -> Result<()> {
        let p = self.faults_path();
        std::fs::write(&p, serde_json::to_vec_pretty(f).expect("json"))
            .map_err(|source| LabError::Io { path: p, source })
    }

    /// Move a node's file into the lab's directory as `keep` (a file gone
    /// the way an operator's mistake removes it); returns the undo.
    fn move_aside(&self, path: &std::path::Path, keep: &str) -> Result<Vec<String>> {
        let keep = self.dir.join(keep);
        std::fs::rename(path, &keep).map_err(|source| LabError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(argv(&[
            "mv",
            &keep.display().to_string(),
            &path.display().to_string(),
        ]))
    }

    /// The plan a node's agent last wrote (what doctor judges it by).
    pub fn node_intent(&self, st: &LabState, node: &str) -> Result<NodeIntent> {
        let p = self.agent_run_dir(st, node).join("plan.json");
        let body = std::fs::read(&p).map_err(|source| LabError::Io {
            path: p.clone(),
            source,
        })?;
        serde_json::from_slice(&body)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))
    }

    /// Make `fault` happen on `node` (towards `peer` where it needs one).
    pub fn fault_inject(&self, fault: &str, node: &str, peer: Option<&str>) -> Result<Injected> {
        let Some(&(_, needs_peer, _)) = FAULTS.iter().find(|f| f.0 == fault) else {
            return Err(LabError::Invalid(format!(
                "no fault {fault:?}; `tweed lab fault list` names them: {}",
                FAULTS.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
            )));
        };
        let st = self.state()?;
        let n = st.node(node)?.clone();
        let peer = match (needs_peer, peer) {
            (true, Some(p)) => Some(st.node(p)?.clone()),
            (true, None) => {
                // The first other node, so `inject vxlan-blocked --node a` just works.
                let other = st.nodes.iter().find(|m| m.name != node).ok_or_else(|| {
                    LabError::Invalid(format!(
                        "fault {fault} needs a peer, and lab {} has one node",
                        self.name
                    ))
                })?;
                Some(other.clone())
            }
            (false, _) => None,
        };
        if peer.as_ref().is_some_and(|p| p.name == n.name) {
            return Err(LabError::Invalid(format!(
                "--peer must be another node than {node}"
            )));
        }
        let intent = self.node_intent(&st, node)?;
        let peer_intent = peer
            .as_ref()
            .map(|p| {
                intent
                    .peers
                    .iter()
                    .find(|x| x.name == p.name)
                    .cloned()
                    .ok_or_else(|| {
                        LabError::Invalid(format!("{node}'s agent does not know {} yet", p.name))
                    })
            })
            .transpose()?;
        let in_node = |args: &[&str]| -> Vec<String> {
            let mut v = argv(&["ip", "netns", "exec", &n.ns]);
            v.extend(argv(args));
            v
        };
        let mut undo: Vec<Vec<String>> = Vec::new();
        let exec = |v: &[String]| -> Result<String> { run(Command::new(&v[0]).args(&v[1..])) };
        let nft_in = |ns: &str, script: &str| -> Result<String> {
            run_stdin(
                Command::new("ip").args(["netns", "exec", ns, "nft", "-f", "-"]),
                script,
            )
        };
        // The node's underlay addresses as the fabric may see them (private and public).
        let addrs_of = |name: &str| -> Vec<Ipv4Addr> {
            let i = st
                .nodes
                .iter()
                .position(|m| m.name == name)
                .expect("known node");
            let mut v = vec![st.nodes[i].ip];
            v.extend(st.topology.nodes[i].public_ip);
            v
        };
        let set = |v: &[Ipv4Addr]| {
            format!(
                "{{ {} }}",
                v.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        // A firewall in the fabric (the underlay's bridges), never on the
        // nodes: frames matching any of `rules` are dropped. Returns the undo.
        // Equivalent: `nft add table bridge T; ... hook forward ... RULE drop`.
        let fabric_table = format!("lab-fault-{fault}-{node}");
        let fabric_drop = |rules: &[String]| -> Result<Vec<String>> {
            let body: String = rules
                .iter()
                .map(|r| format!("    ether type ip {r} drop\n"))
                .collect();
            nft_in(
                &st.ul_ns,
                &format!(
                    "table bridge {fabric_table} {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n{body}  }}\n}}\n"
                ),
            )?;
            Ok(argv(&[
                "ip",
                "netns",
                "exec",
                &st.ul_ns,
                "nft",
                "delete",
                "table",
                "bridge",
                &fabric_table,
            ]))
        };
        match fault {
            "wrong-next-hop" => {
                let p = peer_intent.as_ref().expect("peer");
                let planned = intent.route_to(p.subnet).ok_or_else(|| {
                    LabError::Invalid(format!("{node} has no route to {} to break", p.name))
                })?;
                // Seed 002: the next hop written by hand is the peer's tunnel
                // address where its underlay address belongs (or the other way
                // round on the tunnel device).
                let (via, dev) = if planned.dev == intent.underlay_dev {
                    (p.vtep_ip, planned.dev.clone())
                } else {
                    (p.public_ip, planned.dev.clone())
                };
                let dst = p.subnet.to_string();
                exec(&in_node(&[
                    "ip",
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &via.to_string(),
                    "dev",
                    &dev,
                    "onlink",
                ]))?;
                let back = restore_route(planned);
                undo.push(in_node(
                    &back.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
            }
            "foreign-route" => {
                let p = peer_intent.as_ref().expect("peer");
                let block = Ipv4Net::new(p.subnet.network(), (p.subnet.prefix_len() + 2).min(32))
                    .expect("valid prefix")
                    .to_string();
                exec(&in_node(&[
                    "ip",
                    "route",
                    "add",
                    "blackhole",
                    &block,
                    "proto",
                    "bird",
                ]))?;
                undo.push(in_node(&["ip", "route", "del", "blackhole", &block]));
            }
            "vxlan-blocked" => {
                let p = peer.as_ref().expect("peer");
                let (a, b) = (set(&addrs_of(&n.name)), set(&addrs_of(&p.name)));
                let port = intent.vxlan_port;
                let rule1 = format!("ip saddr {a} ip daddr {b} udp dport {port}");
                let rule2 = format!("ip saddr {b} ip daddr {a} udp dport {port}");
                undo.push(fabric_drop(&[rule1, rule2])?);
            }
            "datastore-unreachable" => {
                let at = tweed_explain::facts::read_status(&self.agent_run_dir(&st, node))
                    .map(|v| v.datastore_at)
                    .unwrap_or_default();
                let addr = tweed_explain::facts::datastore_addr(&at).ok_or_else(|| {
                    LabError::Invalid(format!(
                        "{node}'s agent reports no datastore address ({at:?})"
                    ))
                })?;
                let a = set(&addrs_of(&n.name));
                let (ip, port) = (addr.ip(), addr.port());
                let rule1 = format!("ip saddr {a} ip daddr {ip} tcp dport {port}");
                let rule2 = format!("ip saddr {ip} ip daddr {a} tcp sport {port}");
                undo.push(fabric_drop(&[rule1, rule2])?);
            }
            "mtu" => {
                // The fabric's end of the node's underlay NIC: the veth peer
                // whose index the node's link names.
                let out = run(Command::new("ip").args([
                    "-j",
                    "-n",
                    &n.ns,
                    "link",
                    "show",
                    &intent.underlay_dev,
                ]))?;
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                let peer_index = v[0]["link_index"].as_u64().ok_or_else(|| {
                    LabError::Invalid(format!(
                        "{node}'s {} is not a veth into the fabric",
                        intent.underlay_dev
                    ))
                })?;
                let links: serde_json::Value = serde_json::from_str(&run(
                    Command::new("ip").args(["-j", "-n", &st.ul_ns, "link", "show"])
                )?)
                .unwrap_or_default();
                let port = links
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|l| l["ifindex"].as_u64() == Some(peer_index))
                    .and_then(|l| l["ifname"].as_str())
                    .ok_or_else(|| LabError::Invalid(format!("no fabric port for {node}")))?
                    .to_string();
                let small = intent.underlay_mtu.saturating_sub(100).to_string();
                let was = intent.underlay_mtu.to_string();
                exec(&argv(&[
                    "ip", "-n", &st.ul_ns, "link", "set", &port, "mtu", &small,
                ]))?;
                undo.push(argv(&[
                    "ip", "-n", &st.ul_ns, "link", "set", &port, "mtu", &was,
                ]));
            }
            "ip-forward-off" => {
                exec(&in_node(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]))?;
                undo.push(in_node(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]));
            }
            "rp-filter-strict" => {
                let was = exec(&in_node(&["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]))?;
                exec(&in_node(&[
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.rp_filter=1",
                ]))?;
                undo.push(in_node(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.all.rp_filter={}", was.trim()),
                ]));
            }
            "forward-drop" => {
                nft_in(
                    &n.ns,
                    "table ip filter {\n  chain FORWARD {\n    type filter hook forward priority 0; policy drop;\n  }\n}\n",
                )?;
                undo.push(in_node(&["nft", "delete", "table", "ip", "filter"]));
            }
            "leftover-rules" => {
                for args in [
                    &["-t", "nat", "-N", "KUBE-SERVICES"][..],
                    &["-t", "nat", "-N", "KUBE-POSTROUTING"],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "KUBE-POSTROUTING",
                        "-m",
                        "mark",
                        "--mark",
                        "0x4000/0x4000",
                        "-j",
                        "MASQUERADE",
                    ],
                    &["-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"],
                ] {
                    let mut v = vec!["iptables-legacy"];
                    v.extend(args);
                    exec(&in_node(&v))?;
                }
                for args in [
                    &["-t", "nat", "-D", "POSTROUTING", "-j", "KUBE-POSTROUTING"][..],
                    &["-t", "nat", "-F", "KUBE-POSTROUTING"],
                    &["-t", "nat", "-X", "KUBE-POSTROUTING"],
                    &["-t", "nat", "-X", "KUBE-SERVICES"],
                ] {
                    let mut v = vec!["iptables-legacy"];
                    v.extend(args);
                    undo.push(in_node(&v));
                }
            }
            "cni-config-missing" => {
                // The node's directory as the host sees it (a DaemonSet
                // agent's plan names the path inside its own mounts).
                let conf = self.node_dir(node).join("net.d/10-tweed.conflist");
                undo.push(self.move_aside(&conf, &format!("fault-{node}-10-tweed.conflist"))?);
            }
            "lease-expiring" => {
                // Whoever renews the node's lease hangs: alive, renewing
                // nothing. With kubelets, kubelet (its node Lease); else
                // the agent (its etcd lease).
                let kubelet = st
                    .kube
                    .as_ref()
                    .and_then(|k| k.kubelets.get(node))
                    .and_then(|r| r.kubelet_pid);
                let pid = kubelet
                    .or(n.agent_pid.filter(|_| !self.agents_are_pods(&st)))
                    .ok_or_else(|| {
                        LabError::Invalid(format!(
                            "lease-expiring freezes {node}'s kubelet or agent process, and this lab has neither running"
                        ))
                    })?;
                exec(&argv(&["kill", "-STOP", &pid.to_string()]))?;
                undo.push(argv(&["kill", "-CONT", &pid.to_string()]));
            }
            "cni-plugin-missing" => {
                // The runtime's plugin directory as the host sees it (the
                // node's /opt is its own directory of the lab's).
                if st.topology.kubelet.is_none() {
                    return Err(LabError::Invalid(
                        "cni-plugin-missing needs a lab with kubelets (a runtime that runs plugins from /opt/cni/bin), e.g. examples/kubelets.yaml".into(),
                    ));
                }
                let bin = self.node_dir(node).join("k/opt/cni/bin/tweed");
                undo.push(self.move_aside(&bin, &format!("fault-{node}-cni-tweed"))?);
            }
            "not-on-link" => {
                // Seed 003: direct routing (flannel host-gw) towards a peer
                // on another VLAN, forced with `onlink`.
                let p = peer_intent.as_ref().expect("peer");
                let via = run(Command::new("ip").args([
                    "-j",
                    "-n",
                    &n.ns,
                    "route",
                    "get",
                    &p.public_ip.to_string(),
                ]))?;
                let v: serde_json::Value = serde_json::from_str(&via).unwrap_or_default();
                if v[0]["gateway"].is_null() {
                    return Err(LabError::Invalid(format!(
                        "{} is on {node}'s own segment; not-on-link needs a peer on another one (e.g. examples/seed-003-vlans.yaml)",
                        p.name
                    )));
                }
                let planned = intent.route_to(p.subnet).cloned().ok_or_else(|| {
                    LabError::Invalid(format!("{node} has no route to {} to break", p.name))
                })?;
                let (dst, gw) = (p.subnet.to_string(), p.public_ip.to_string());
                exec(&in_node(&[
                    "ip",
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &gw,
                    "dev",
                    &intent.underlay_dev,
                    "onlink",
                ]))?;
                let back = restore_route(&planned);
                undo.push(in_node(
                    &back.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
            }
            "default-route-other-nic" => {
                // Seed 002, case 2: a second NIC, and the default route
                // moved to it.
                let i = st
                    .nodes
                    .iter()
                    .position(|m| m.name == node)
                    .expect("known node");
                let topo = &st.topology;
                let (addr, gw) = topo
                    .node_segments(i)
                    .iter()
                    .filter(|seg| topo.node_ip_on(i, seg) != intent.bind_ip)
                    .find_map(|seg| Some((topo.node_ip_on(i, seg), topo.gateway(seg)?)))
                    .ok_or_else(|| {
                        LabError::Invalid(format!(
                            "{node} has no second NIC with a router on its segment; default-route-other-nic needs one (e.g. node2 of examples/seed-002-two-nics.yaml)"
                        ))
                    })?;
                let addrs: serde_json::Value = serde_json::from_str(&run(
                    Command::new("ip").args(["-j", "-4", "-n", &n.ns, "addr", "show"])
                )?)
                .unwrap_or_default();
                let dev = addrs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|l| {
                        l["addr_info"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|a| a["local"].as_str() == Some(addr.to_string().as_str()))
                    })
                    .and_then(|l| l["ifname"].as_str())
                    .ok_or_else(|| LabError::Invalid(format!("{node}: no NIC has {addr}")))?
                    .to_string();
                let old: serde_json::Value = serde_json::from_str(&run(
                    Command::new("ip").args(["-j", "-n", &n.ns, "route", "show", "default"])
                )?)
                .unwrap_or_default();
                let back = match (old[0]["gateway"].as_str(), old[0]["dev"].as_str()) {
                    (Some(g), Some(d)) => {
                        in_node(&["ip", "route", "replace", "default", "via", g, "dev", d])
                    }
                    _ => in_node(&["ip", "route", "del", "default"]),
                };
                exec(&in_node(&[
                    "ip",
                    "route",
                    "replace",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    &dev,
                ]))?;
                undo.push(back);
            }
            "stale-conntrack" => {
                // A connection to a Service whose endpoint has gone, as a
                // missed clean-up leaves it: conntrack keeps sending it there.
                let (svc, port) = st
                    .services
                    .values()
                    .find_map(|s| Some((s.cluster_ip?, s.ports.first()?.clone())))
                    .ok_or_else(|| {
                        LabError::Invalid(format!(
                            "stale-conntrack needs a Service in lab {}",
                            self.name
                        ))
                    })?;
                let src = st
                    .pods
                    .values()
                    .find(|p| p.node == node)
                    .map(|p| p.ip)
                    .unwrap_or(n.ip)
                    .to_string();
                let gone = Ipv4Addr::from(u32::from(intent.subnet.network()) + 250).to_string();
                let proto = port.protocol.nft();
                let (svc, dport) = (svc.to_string(), port.port.to_string());
                let mut add = vec![
                    "conntrack",
                    "-I",
                    "-p",
                    proto,
                    "-s",
                    &src,
                    "-d",
                    &svc,
                    "--sport",
                    "40000",
                    "--dport",
                    &dport,
                    "-r",
                    &gone,
                    "-q",
                    &src,
                    "--reply-port-src",
                    &dport,
                    "--reply-port-dst",
                    "40000",
                    "-t",
                    "600",
                ];
                if proto == "tcp" {
                    add.extend(["--state", "ESTABLISHED"]);
                }
                exec(&in_node(&add))?;
                // Already deleted by hand (doctor's fix) is mended, not an error.
                let del = format!("conntrack -D -p {proto} -s {src} -d {svc} --sport 40000 --dport {dport} 2>/dev/null; true");
                undo.push(in_node(&["sh", "-c", &del]));
            }
            "cni-config-shadowed" => {
                let p = self.node_dir(node).join("net.d/00-flannel.conflist");
                let body = serde_json::json!({
                    "name": "cbr0",
                    "cniVersion": "0.3.1",
                    "plugins": [
                        {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                        {"type": "portmap", "capabilities": {"portMappings": true}}
                    ]
                });
                std::fs::write(&p, serde_json::to_vec_pretty(&body).expect("json")).map_err(
                    |source| LabError::Io {
                        path: p.clone(),
                        source,
                    },
                )?;
                undo.push(argv(&["rm", "-f", &p.display().to_string()]));
            }
            _ => unreachable!("listed in FAULTS"),
        }
        let inj = Injected {
            fault: fault.into(),
            node: node.into(),
            peer: peer.map(|p| p.name),
            undo,
        };
        let mut all = self.faults();
        all.push(inj.clone());
        self.save_faults(&all)?;
        Ok(inj)
    }

    /// Undo injected faults (all, or those matching `fault` / `node`), the
    /// newest first. Every undo step runs even if one fails; the failures
    /// are returned together.
    pub fn fault_clear(&self, fault: Option<&str>, node: Option<&str>) -> Result<Vec<Injected>> {
        let all = self.faults();
        let (gone, keep): (Vec<Injected>, Vec<Injected>) = all
            .into_iter()
            .partition(|i| fault.is_none_or(|f| f == i.fault) && node.is_none_or(|n| n == i.node));
        let mut errors = Vec::new();
        for i in gone.iter().rev() {
            for v in &i.undo {
                if let Err(e) = run(Command::new(&v[0]).args(&v[1..])) {
                    errors.push(format!("{} on {}: {}: {e}", i.fault, i.node, v.join(" ")));
                }
            }
        }
        self.save_faults(&keep)?;
        if errors.is_empty() {
            Ok(gone)
        } else {
            Err(LabError::Teardown(errors))
        }
    }
}

impl Lab {
    /// The name of `node`'s tweed agent pod (the DaemonSet's), leaving out
    /// one that is terminating, as during a rollout.
    pub fn agent_pod(&self, st: &LabState, node: &str) -> Result<String> {
        let out = self.kubectl(
            st,
            &[
                "-n",
                "tweed-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=tweed",
                "--field-selector",
                &format!("spec.nodeName={node}"),
                "-o",
                "json",
            ],
            None,
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| LabError::Invalid(format!("kubectl get pods: {e}")))?;
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["metadata"]["deletionTimestamp"].is_null())
            .and_then(|p| p["metadata"]["name"].as_str())
            .map(str::to_string)
            .ok_or_else(|| LabError::Invalid(format!("no tweed agent pod on {node}")))
    }

    /// `tweed ARGS --run-dir DIR` as a node's own tools run it: in its
    /// network namespace, given its agent's run directory. With the agent
    /// as a DaemonSet, exactly as in a real cluster: `kubectl exec` into
    /// the node's agent pod, whose plan names paths as the pod mounts them.
    pub fn node_tweed(&self, st: &LabState, node: &str, args: &[&str]) -> Result<Command> {
        let n = st.node(node)?;
        if self.agents_are_pods(st) {
            let pod = self.agent_pod(st, node)?;
            let pod = pod.as_str();
            let mut c = self.kubectl_command(st)?;
            c.args([
                "-n",
                "tweed-system",
                "exec",
                pod,
                "-c",
                "agent",
                "--",
                "tweed",
            ])
            .args(args)
            .args(["--run-dir", "/run/tweed"]);
            return Ok(c);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &n.ns])
            .arg(&self.exe)
            .args(args)
            .arg("--run-dir")
            .arg(self.agent_run_dir(st, node));
        Ok(c)
    }

    /// `tweed doctor` on every node (or one), at once, each inside its
    /// node's namespace judging by its own agent's plan; the reports merged.
    pub fn doctor(&self, only: Option<&str>) -> Result<tweed_explain::Report> {
        let st = self.state()?;
        if let Some(n) = only {
            st.node(n)?;
        }
        let nodes: Vec<_> = st
            .nodes
            .iter()
            .filter(|n| only.is_none_or(|o| o == n.name))
            .collect();
        let results: Vec<(String, std::result::Result<tweed_explain::Report, String>)> =
            std::thread::scope(|s| {
                let hs: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        let c = self.node_tweed(&st, &n.name, &["doctor", "-o", "json"]);
                        s.spawn(move || {
                            let out = c
                                .map_err(|e| std::io::Error::other(e.to_string()))
                                .and_then(|mut c| c.output());
                            let r = match out {
                                // 0: nothing found, 1: findings; both print the report.
                                Ok(o) if matches!(o.status.code(), Some(0 | 1)) => {
                                    serde_json::from_slice(&o.stdout).map_err(|e| {
                                        format!("doctor's report does not decode: {e}")
                                    })
                                }
                                Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                                Err(e) => Err(e.to_string()),
                            };
                            (n.name.clone(), r)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("doctor thread"))
                    .collect()
            });
        Ok(tweed_explain::Report::merge(results))
    }
}
