//! What doctor reads from the node (and probes), as plain data. All I/O of
//! the explain crate lives here; every call is read-only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tweed_netlink::{Netlink, RouteLookup};
use tweed_plan::NodeIntent;

pub use crate::conntrack::{parse_conntrack, CtEntry};
use crate::ExplainError;

/// The parts of the agent's `status.json` doctor needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub datastore: String,
    #[serde(default)]
    pub datastore_at: String,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The lease the node lives by: "agent" (etcd: its node record's) or
    /// "kubelet" (kube-node-lease), its TTL, and when it was last renewed.
    #[serde(default)]
    pub lease_holder: Option<String>,
    #[serde(default)]
    pub lease_ttl: Option<i64>,
    #[serde(default)]
    pub lease_renewed_unix: Option<u64>,
    /// The BGP speaker and its sessions, when the cluster runs BGP.
    #[serde(default)]
    pub bgp: Option<BgpView>,
}

/// The agent's `bgp` in status.json: the speaker and each session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpView {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub local_asn: u32,
    #[serde(default)]
    pub router_id: String,
    #[serde(default)]
    pub hold_time: u16,
    /// BFD's timers, when the cluster runs it.
    #[serde(default)]
    pub bfd: Option<tweed_model::bgp::BfdConfig>,
    #[serde(default)]
    pub peers: Vec<BgpPeerView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerView {
    pub address: String,
    pub asn: u32,
    pub kind: String,
    #[serde(default)]
    pub peer_node: Option<String>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub info: String,
    /// established, wrong-asn, peer-unreachable, hold-timer-expired, ...
    pub diagnosis: String,
    #[serde(default)]
    pub explain: String,
    /// The BFD session's state, when the cluster runs BFD.
    #[serde(default)]
    pub bfd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkFact {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub addrs: Vec<Ipv4Net>,
}

/// A chain in the nftables ruleset (any family, any table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NftChain {
    pub family: String,
    pub table: String,
    pub name: String,
    /// For base chains: the hook and policy.
    pub hook: Option<String>,
    pub policy: Option<String>,
    /// The chain's rules as nft's JSON text (for matching, not display).
    pub rules: Vec<String>,
}

/// A chain in iptables-legacy (`iptables-legacy-save`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegacyChain {
    pub table: String,
    pub name: String,
    /// "DROP"/"ACCEPT" for built-in chains, "-" for user chains.
    pub policy: String,
}

/// One file in the CNI config directory, in the order the runtime reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniFile {
    pub name: String,
    /// The network name and plugin types, or why it does not parse.
    pub parsed: Result<(String, Vec<String>), String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniFacts {
    pub dir: PathBuf,
    pub files: Vec<CniFile>,
    /// Plugin types of the chosen config missing from the bin directory
    /// (only looked at when the agent knows the bin directory).
    pub missing_bins: Vec<String>,
    /// The agent has published the node as ready (RUN_DIR/node.json).
    pub node_ready: bool,
}

/// Probe results towards one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerProbe {
    pub peer: String,
    /// Its underlay (public) address answers a ping.
    pub underlay: bool,
    /// Its VTEP address (in its pod subnet) answers, by the node's normal routes.
    pub pod: bool,
    /// ...and a full-size packet with DF set (`size` bytes of ICMP payload) does too.
    pub full_size: bool,
    pub size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub links: Vec<LinkFact>,
    /// Every IPv4 route, every table.
    pub routes: Vec<RouteLookup>,
    /// Output lookup of an address in each peer's pod subnet (errno if refused).
    pub pod_lookups: BTreeMap<String, Result<RouteLookup, i32>>,
    /// Output lookup of each peer's underlay address.
    pub underlay_lookups: BTreeMap<String, Result<RouteLookup, i32>>,
    /// Neighbour state of each peer route's gateway on its device.
    pub gateway_neigh: BTreeMap<String, Option<String>>,
    pub ip_forward: Option<bool>,
    /// (device, effective rp_filter = max(all, device)).
    pub rp_filter: Vec<(String, u8)>,
    pub nft: Vec<NftChain>,
    pub legacy: Vec<LegacyChain>,
    pub cni: CniFacts,
    pub status: Option<StatusView>,
    /// A TCP connect to the datastore's address: `None` when not known.
    pub datastore_reach: Option<Result<(), String>>,
    pub probes: Vec<PeerProbe>,
    /// Conntrack entries towards Service IPs that were DNATed, each with
    /// the Service's endpoints now (empty: it has none, or is gone).
    pub service_ct: Vec<(CtEntry, Backends)>,
    /// When the facts were read (seconds since the epoch): lease ages.
    pub now_unix: u64,
}

/// A Service's endpoints, (IP, port) each.
pub type Backends = Vec<(Ipv4Addr, u16)>;

/// The status file alone (enough to tell a node that waits for its subnet).
pub fn read_status(run_dir: &Path) -> Option<StatusView> {
    std::fs::read(run_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Conntrack entries to Service IPs that were DNATed, with each Service's
/// endpoints as the kernel's maps hold them now. Read-only (`conntrack -L`,
/// `nft get element`).
fn service_conntrack(intent: &NodeIntent) -> Vec<(CtEntry, Backends)> {
    let Ok(out) = Command::new("conntrack")
        .args(["-L", "-d", &intent.service_cidr.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let entries: Vec<CtEntry> = parse_conntrack(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|e| intent.service_cidr.contains(&e.dst) && e.reply_src != e.dst)
        .collect();
    if entries.is_empty() {
        return Vec::new();
    }
    let rs = crate::trace::KernelRuleset::read();
    let mut known: BTreeMap<(Ipv4Addr, String, u16), Option<Backends>> = BTreeMap::new();
    entries
        .into_iter()
        .filter_map(|e| {
            let key = (e.dst, e.proto.clone(), e.dport);
            let backends = known
                .entry(key)
                .or_insert_with(|| crate::trace::current_backends(&rs, e.dst, &e.proto, e.dport))
                .clone()?;
            Some((e, backends))
        })
        .collect()
}

impl Facts {
    pub fn link(&self, index: u32) -> Option<&LinkFact> {
        self.links.iter().find(|l| l.index == index)
    }
    pub fn dev_name(&self, index: Option<u32>) -> String {
        index
            .and_then(|i| self.link(i))
            .map(|l| l.name.clone())
            .unwrap_or_else(|| "?".into())
    }
}

/// Read the agent's plan (and status) from its run directory.
pub fn read_intent(run_dir: &Path) -> Result<(NodeIntent, Option<StatusView>), ExplainError> {
    let p = run_dir.join("plan.json");
    let body = std::fs::read(&p).map_err(|source| ExplainError::Read {
        path: p.display().to_string(),
        source,
    })?;
    let intent = serde_json::from_slice(&body).map_err(|source| ExplainError::Decode {
        path: p.display().to_string(),
        source,
    })?;
    Ok((intent, read_status(run_dir)))
}

/// An address inside a subnet that pods may hold (the first host address),
/// used to ask the kernel how it would route pod traffic there.
pub fn sample_addr(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Read everything doctor judges, in the calling thread's network namespace.
/// Must run inside a tokio runtime (netlink).
pub async fn gather(
    intent: &NodeIntent,
    status: Option<StatusView>,
    run_dir: &Path,
) -> Result<Facts, ExplainError> {
    let nl = Netlink::open()?;
    let mut links = Vec::new();
    for l in nl.links().await? {
        let addrs = nl.ipv4_addrs(l.index).await.unwrap_or_default();
        links.push(LinkFact {
            index: l.index,
            name: l.name,
            mtu: l.mtu,
            addrs,
        });
    }
    let routes = nl.all_routes().await?;
    let mut pod_lookups = BTreeMap::new();
    let mut underlay_lookups = BTreeMap::new();
    let mut gateway_neigh = BTreeMap::new();
    for p in &intent.peers {
        let pod = nl
            .route_lookup(sample_addr(p.subnet), None, None, None)
            .await?;
        if let Ok(r) = &pod {
            if let (Some(gw), Some(oif)) = (r.gateway, r.oif) {
                gateway_neigh.insert(p.name.clone(), nl.neigh_state(oif, gw).await?);
            }
        }
        pod_lookups.insert(p.name.clone(), pod);
        underlay_lookups.insert(
            p.name.clone(),
            nl.route_lookup(p.public_ip, None, None, None).await?,
        );
    }
    let sysctl = |path: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{path}"))
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
    };
    let ip_forward = sysctl("ip_forward").map(|v| v == 1);
    let all = sysctl("conf/all/rp_filter").unwrap_or(0);
    let rp_filter = intent
        .devices()
        .into_iter()
        .filter_map(|d| sysctl(&format!("conf/{d}/rp_filter")).map(|v| (d, v.max(all))))
        .collect();
    let datastore_reach = status
        .as_ref()
        .and_then(|s| datastore_addr(&s.datastore_at))
        .map(|a| {
            TcpStream::connect_timeout(&a, Duration::from_secs(1))
                .map(|_| ())
                .map_err(|e| format!("TCP connect to {a}: {e}"))
        });
    let probes = probe_peers(intent);
    let service_ct = service_conntrack(intent);
    Ok(Facts {
        links,
        routes,
        pod_lookups,
        underlay_lookups,
        gateway_neigh,
        ip_forward,
        rp_filter,
        nft: nft_chains(),
        legacy: legacy_chains(),
        cni: cni_facts(intent, run_dir),
        status,
        datastore_reach,
        probes,
        service_ct,
        now_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// `etcd http://198.51.100.2:2379` or `https://10.0.0.1:6443` → the address.
pub fn datastore_addr(at: &str) -> Option<SocketAddr> {
    at.split([' ', ',', '/'])
        .filter(|w| !w.is_empty())
        .find_map(|w| w.parse::<SocketAddr>().ok())
}

/// `nft -j list ruleset`, flattened to chains with their rules. Read-only.
fn nft_chains() -> Vec<NftChain> {
    let Ok(out) = Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    parse_nft(&String::from_utf8_lossy(&out.stdout))
}

/// The chains of an `nft -j list ruleset` document.
pub fn parse_nft(json: &str) -> Vec<NftChain> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
    let mut chains: Vec<NftChain> = items
        .iter()
        .filter_map(|i| i.get("chain"))
        .map(|c| NftChain {
            family: s(&c["family"]),
            table: s(&c["table"]),
            name: s(&c["name"]),
            hook: c["hook"].as_str().map(str::to_string),
            policy: c["policy"].as_str().map(str::to_string),
            rules: Vec::new(),
        })
        .collect();
    for r in items.iter().filter_map(|i| i.get("rule")) {
        if let Some(c) = chains.iter_mut().find(|c| {
            c.family == s(&r["family"]) && c.table == s(&r["table"]) && c.name == s(&r["chain"])
        }) {
            c.rules.push(r["expr"].to_string());
        }
    }
    chains
}

/// Chains in the legacy iptables tables of this namespace. The kernel
/// lists registered legacy tables in /proc/net/ip_tables_names (reading it
/// loads nothing); only when there are some is `iptables-legacy-save` run.
fn legacy_chains() -> Vec<LegacyChain> {
    let names = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
    if names.trim().is_empty() {
        return Vec::new();
    }
    let Ok(out) = Command::new("iptables-legacy-save")
        .stdin(Stdio::null())
        .output()
    else {
        return names
            .lines()
            .map(|t| LegacyChain {
                table: t.to_string(),
                name: "(iptables-legacy-save not installed)".into(),
                policy: "-".into(),
            })
            .collect();
    };
    parse_iptables_save(&String::from_utf8_lossy(&out.stdout))
}

/// The chains of an `iptables-save` listing.
pub fn parse_iptables_save(text: &str) -> Vec<LegacyChain> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(c) = line.strip_prefix(':') {
            let mut w = c.split_whitespace();
            if let (Some(name), Some(policy)) = (w.next(), w.next()) {
                out.push(LegacyChain {
                    table: table.clone(),
                    name: name.into(),
                    policy: policy.into(),
                });
            }
        }
    }
    out
}

/// The CNI config directory as a runtime reads it: `.conf`, `.conflist`
/// and `.json` files in name order (libcni's ConfFiles), each parsed.
fn cni_facts(intent: &NodeIntent, run_dir: &Path) -> CniFacts {
    let dir = intent.cni_conf_dir.clone();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| {
                    n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json")
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let files: Vec<CniFile> = names
        .into_iter()
        .map(|name| {
            let parsed = std::fs::read(dir.join(&name))
                .map_err(|e| e.to_string())
                .and_then(|b| parse_cni(&b));
            CniFile { name, parsed }
        })
        .collect();
    let mut missing_bins = Vec::new();
    if let (Some(bin), Some(Ok((_, types)))) = (
        &intent.cni_bin_dir,
        files.iter().find(|f| f.parsed.is_ok()).map(|f| &f.parsed),
    ) {
        for t in types {
            if !bin.join(t).exists() {
                missing_bins.push(t.clone());
            }
        }
    }
    CniFacts {
        dir,
        files,
        missing_bins,
        node_ready: run_dir.join("node.json").exists(),
    }
}

/// A CNI config (a list, or a single plugin's config) → (network name, plugin types).
pub fn parse_cni(body: &[u8]) -> Result<(String, Vec<String>), String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let name = v["name"].as_str().ok_or("no \"name\"")?.to_string();
    let types: Vec<String> = match v["plugins"].as_array() {
        Some(ps) => ps
            .iter()
            .map(|p| {
                p["type"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or("a plugin without \"type\"")
            })
            .collect::<Result<_, _>>()?,
        None => vec![v["type"]
            .as_str()
            .ok_or("no \"type\" nor \"plugins\"")?
            .to_string()],
    };
    if types.is_empty() {
        return Err("\"plugins\" is empty".into());
    }
    Ok((name, types))
}

/// `ping -c 2 -i 0.2 -W 1 [-M do -s SIZE] DST`: does anything come back?
fn ping(dst: Ipv4Addr, df_size: Option<u32>) -> bool {
    let mut c = Command::new("ping");
    c.args(["-n", "-q", "-c", "2", "-i", "0.2", "-W", "1"]);
    if let Some(s) = df_size {
        c.args(["-M", "do", "-s", &s.to_string()]);
    }
    c.arg(dst.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Probe every planned peer at once: its underlay address, its VTEP
/// address by the normal routes, and the same with a full pod-MTU packet
/// that must not be fragmented. About 1 s when something fails, a few ms
/// when nothing does.
fn probe_peers(intent: &NodeIntent) -> Vec<PeerProbe> {
    // ICMP echo: 20 bytes of IP header, 8 of ICMP.
    let size = intent.pod_mtu.saturating_sub(28);
    std::thread::scope(|s| {
        let handles: Vec<_> = intent
            .peers
            .iter()
            .filter(|p| p.mode.is_some_and(|m| m != tweed_plan::Mode::Unreachable))
            .map(|p| {
                s.spawn(move || {
                    let (underlay, (pod, full_size)) = std::thread::scope(|s2| {
                        let u = s2.spawn(|| ping(p.public_ip, None));
                        let v = s2.spawn(|| ping(p.vtep_ip, None));
                        let f = s2.spawn(|| ping(p.vtep_ip, Some(size)));
                        (
                            u.join().unwrap_or(false),
                            (v.join().unwrap_or(false), f.join().unwrap_or(false)),
                        )
                    });
                    PeerProbe {
                        peer: p.name.clone(),
                        underlay,
                        pod,
                        full_size,
                        size,
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn datastore_addresses() {
        assert_eq!(
            datastore_addr("etcd http://198.51.100.2:2379"),
            Some("198.51.100.2:2379".parse().unwrap())
        );
        assert_eq!(
            datastore_addr("kubernetes https://198.51.100.2:6443 (v1beta1)"),
            Some("198.51.100.2:6443".parse().unwrap())
        );
        assert_eq!(datastore_addr("kubernetes in-cluster"), None);
    }

    #[test]
    fn cni_configs() {
        assert_eq!(
            parse_cni(br#"{"name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#),
            Ok(("cbr0".into(), vec!["flannel".into(), "portmap".into()]))
        );
        assert_eq!(
            parse_cni(br#"{"name":"n","type":"bridge"}"#),
            Ok(("n".into(), vec!["bridge".into()]))
        );
        assert!(parse_cni(b"{").is_err());
        assert!(parse_cni(br#"{"name":"n","plugins":[]}"#).is_err());
    }

    #[test]
    fn iptables_save() {
        let t = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:KUBE-SERVICES - [0:0]\n-A FORWARD -j KUBE-SERVICES\nCOMMIT\n*nat\n:FLANNEL-POSTRTG - [0:0]\nCOMMIT\n";
        let c = parse_iptables_save(t);
        assert_eq!(c.len(), 4);
        assert_eq!(c[1].name, "FORWARD");
        assert_eq!(c[1].policy, "DROP");
        assert_eq!(c[3].table, "nat");
    }

    #[test]
    fn nft_json() {
        let j = r#"{"nftables":[{"metainfo":{}},{"table":{"family":"ip","name":"filter","handle":1}},
          {"chain":{"family":"ip","table":"filter","name":"FORWARD","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":2,"expr":[{"accept":null}]}}]}"#;
        let c = parse_nft(j);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].hook.as_deref(), Some("forward"));
        assert_eq!(c[0].policy.as_deref(), Some("drop"));
        assert_eq!(c[0].rules.len(), 1);
    }
}
