//! The plugin's commands. ADD wires a pod like Calico's routed mode: the
//! pod gets `IP/32` on its interface and a default route via a link-local
//! gateway (169.254.1.1) that is pinned to the host veth's MAC; the node
//! gets a `/32` route to the pod over the host veth. No bridge, no ARP
//! between pod and node, and the node routes every pod packet.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde_json::Value;
use tweed_model::{HostPorts, NodeState, PodAttachment, DEFAULT_GSO_MAX_SIZE};
use tweed_netlink::Netlink;

use crate::ipam::{self, IpamError, Owner};
use crate::spec::{
    code, AddResult, CniError, Command, Env, Interface, IpConfig, NetConf, RouteConfig,
};

/// The pods' default gateway; never on the wire, pinned by a permanent
/// neighbour entry to the host side of the veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The host-side veth name for an attachment: stable, so DEL and GC find it
/// without any state (`tw` + 11 hex digits of FNV-1a over id and ifname).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("tw{:011x}", h & 0x0fff_ffff_ffff)
}

fn node_state(conf: &NetConf) -> Result<NodeState, CniError> {
    let p = conf.run_dir.join("node.json");
    let body = std::fs::read(&p).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "the tweed agent has not set up this node's network yet ({} missing)",
                p.display()
            ),
        )
        .details(e)
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        CniError::new(code::IO_FAILURE, format!("{} does not decode", p.display())).details(e)
    })
}

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted(s) => CniError::new(
            code::SUBNET_EXHAUSTED,
            format!("no free pod address left in this node's subnet {s}"),
        ),
        other => CniError::new(code::IO_FAILURE, "IPAM store failed").details(other),
    }
}

fn dp_err(what: &str) -> impl FnOnce(tweed_netlink::NetlinkError) -> CniError + '_ {
    move |e| CniError::new(code::DATAPLANE, what.to_string()).details(e)
}

/// Run one invocation; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(crate::spec::version_result()));
    }
    let conf = NetConf::parse(stdin)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the runtime").details(e))?;
    let mut out = rt.block_on(async {
        match env.command {
            Command::Add => add(env, &conf).await.map(Some),
            Command::Del => del(env, &conf).await.map(|_| None),
            Command::Check => check(env, &conf).await.map(|_| None),
            Command::Status => node_state(&conf).map(|_| None),
            Command::Gc => gc(&conf).await.map(|_| None),
            Command::Version => unreachable!(),
        }
    });
    if let Err(e) = &mut out {
        e.cni_version = conf.cni_version.clone();
    }
    out
}

/// The whole plugin process: environment and stdin in, (exit code, stdout) out.
pub fn main_with(get: impl Fn(&str) -> Option<String>, mut stdin: impl Read) -> (i32, String) {
    let res = Env::from_vars(get).and_then(|env| {
        let mut buf = Vec::new();
        if env.command != Command::Version {
            stdin.read_to_end(&mut buf).map_err(|e| {
                CniError::new(code::IO_FAILURE, "cannot read the config on stdin").details(e)
            })?;
        }
        run(&env, &buf)
    });
    match res {
        Ok(Some(v)) => (0, serde_json::to_string(&v).expect("json")),
        Ok(None) => (0, String::new()),
        Err(e) => (1, serde_json::to_string(&e).expect("json")),
    }
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {} does not exist", path.display()),
        )
        .details(e)
    })
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let node = node_state(conf)?;
    let netns_path = env.netns.as_ref().expect("validated");
    let netns = open_netns(netns_path)?;
    let store = ipam::Store::new(conf.data_dir());
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let ip = store.allocate(node.subnet, &owner).map_err(ipam_err)?;
    let host = host_veth_name(&env.container_id, &env.ifname);
    let wired = match conf.port_mappings() {
        Ok(maps) => match wire(env, conf, &node, &netns, netns_path, ip, &host).await {
            Ok(v) => add_hostports(conf, env, ip, &maps)
                .and_then(|_| record_attachment(conf, env, netns_path, &host))
                .map(|_| v),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match wired {
        Ok(v) => Ok(v),
        Err(e) => {
            // Leave nothing behind: deleting the host end removes the pair.
            if let Ok(nl) = Netlink::open() {
                let _ = nl.del_link(&host).await;
            }
            del_hostports(conf, &env.container_id, &env.ifname);
            let _ = std::fs::remove_file(attachment_file(conf, &host));
            let _ = store.release(&owner);
            Err(e)
        }
    }
}

async fn wire(
    env: &Env,
    conf: &NetConf,
    node: &NodeState,
    netns: &File,
    netns_path: &Path,
    ip: Ipv4Addr,
    host: &str,
) -> Result<Value, CniError> {
    let mtu = conf.mtu.unwrap_or(node.mtu);
    let nl = Netlink::open().map_err(dp_err("cannot open netlink"))?;
    let pod = Netlink::open_in(netns_path).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            "cannot enter the pod's network namespace",
        )
        .details(e)
    })?;
    if pod
        .link(&env.ifname)
        .await
        .map_err(dp_err("cannot list the pod's links"))?
        .is_some()
    {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "interface {} already exists in {}",
                env.ifname,
                netns_path.display()
            ),
        ));
    }
    // A retried ADD may find its own half-made host end; it is ours by name.
    nl.del_link(host)
        .await
        .map_err(dp_err("cannot remove a stale host veth"))?;
    nl.add_veth_into(host, &env.ifname, netns, mtu)
        .await
        .map_err(dp_err("cannot create the veth pair"))?;
    let h = nl
        .link(host)
        .await
        .map_err(dp_err("host veth"))?
        .ok_or_else(|| CniError::new(code::DATAPLANE, "host veth vanished"))?;
    let p = pod
        .link(&env.ifname)
        .await
        .map_err(dp_err("pod veth"))?
        .ok_or_else(|| CniError::new(code::DATAPLANE, "pod veth vanished"))?;
    let (hmac, pmac) = (
        h.mac.expect("veth has a MAC"),
        p.mac.expect("veth has a MAC"),
    );
    let pod_ip = Ipv4Net::new(ip, 32).expect("/32");
    // IPv4 BIG TCP as the agent decided: the pod sends large packets only
    // while every path carries them, the node hands it what the underlay
    // does. Before the pod has an address, so its first socket has the size.
    if node.pod_gso_max_size > DEFAULT_GSO_MAX_SIZE {
        pod.set_ipv4_max_sizes(p.index, node.pod_gso_max_size)
            .await
            .map_err(dp_err("pod veth GSO/GRO size"))?;
    }
    if node.host_gso_max_size > DEFAULT_GSO_MAX_SIZE {
        nl.set_ipv4_max_sizes(h.index, node.host_gso_max_size)
            .await
            .map_err(dp_err("host veth GSO/GRO size"))?;
    }

    if let Some(lo) = pod.link("lo").await.map_err(dp_err("pod lo"))? {
        pod.set_up(lo.index)
            .await
            .map_err(dp_err("ip link set lo up"))?;
    }
    pod.add_addr(p.index, pod_ip)
        .await
        .map_err(dp_err("pod address"))?;
    pod.set_up(p.index).await.map_err(dp_err("pod link up"))?;
    pod.add_neigh_on(p.index, POD_GATEWAY, hmac)
        .await
        .map_err(dp_err("pod gateway neighbour"))?;
    pod.add_default_route(POD_GATEWAY, p.index)
        .await
        .map_err(dp_err("pod default route"))?;

    nl.set_up(h.index).await.map_err(dp_err("host veth up"))?;
    nl.add_device_route(pod_ip, h.index)
        .await
        .map_err(dp_err("host route to the pod"))?;
    nl.add_neigh_on(h.index, ip, pmac)
        .await
        .map_err(dp_err("host neighbour for the pod"))?;

    let legacy = conf.legacy_result();
    let res = AddResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host.to_string(),
                mac: hmac.to_string(),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: pmac.to_string(),
                sandbox: Some(netns_path.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            version: legacy.then(|| "4".to_string()),
            address: pod_ip.to_string(),
            gateway: POD_GATEWAY.to_string(),
            interface: 1,
        }],
        routes: vec![RouteConfig {
            dst: "0.0.0.0/0".into(),
            gw: Some(POD_GATEWAY.to_string()),
        }],
        dns: serde_json::json!({}),
    };
    Ok(serde_json::to_value(res).expect("json"))
}

fn attachment_file(conf: &NetConf, host: &str) -> std::path::PathBuf {
    conf.run_dir.join("pods").join(format!("{host}.json"))
}

/// Tell the agent where the pod's end of this veth lives, so it can
/// change that end later (the BIG TCP size follows the peers' paths).
fn record_attachment(conf: &NetConf, env: &Env, netns: &Path, host: &str) -> Result<(), CniError> {
    let a = PodAttachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: netns.to_path_buf(),
        host_veth: host.to_string(),
    };
    let f = attachment_file(conf, host);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(f.parent().expect("in a directory"))?;
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&a).expect("json"))?;
        std::fs::rename(&tmp, &f)
    };
    write().map_err(|e| {
        CniError::new(code::IO_FAILURE, format!("cannot write {}", f.display())).details(e)
    })
}

fn hostport_file(conf: &NetConf, container_id: &str, ifname: &str) -> std::path::PathBuf {
    conf.run_dir
        .join("hostports")
        .join(format!("{container_id}-{ifname}.json"))
}

fn hostport_elements(h: &HostPorts) -> String {
    h.mappings
        .iter()
        .map(|(p, hp, cp)| format!("{} . {hp} : {} . {cp}", p.nft(), h.pod_ip))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Record the pod's host ports for the agent (which includes them in every
/// full sync) and add them to the live table now. A host port another pod
/// holds is refused.
fn add_hostports(
    conf: &NetConf,
    env: &Env,
    ip: Ipv4Addr,
    maps: &[(tweed_model::Protocol, u16, u16)],
) -> Result<(), CniError> {
    if maps.is_empty() {
        return Ok(());
    }
    let dir = conf.run_dir.join("hostports");
    let mine = hostport_file(conf, &env.container_id, &env.ifname);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if e.path() == mine {
            continue;
        }
        let Ok(other) = std::fs::read(e.path())
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<HostPorts>(&b).map_err(|_| ()))
        else {
            continue;
        };
        for (p, hp, _) in maps {
            if other.mappings.iter().any(|(q, h, _)| q == p && h == hp) {
                return Err(CniError::new(
                    code::HOSTPORT_CONFLICT,
                    format!(
                        "hostPort {hp}/{} is already used by {}",
                        p.nft(),
                        e.file_name().to_string_lossy().trim_end_matches(".json")
                    ),
                ));
            }
        }
    }
    let h = HostPorts {
        pod_ip: ip,
        mappings: maps.to_vec(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        CniError::new(code::IO_FAILURE, format!("cannot create {}", dir.display())).details(e)
    })?;
    std::fs::write(&mine, serde_json::to_vec(&h).expect("json")).map_err(|e| {
        CniError::new(code::IO_FAILURE, format!("cannot write {}", mine.display())).details(e)
    })?;
    let script = format!(
        "add element ip {} hostports {{ {} }}\n",
        tweed_plan::services::TABLE,
        hostport_elements(&h)
    );
    if let Err(e) = tweed_nft::apply(&script) {
        let _ = std::fs::remove_file(&mine);
        return Err(CniError::new(code::DATAPLANE, "cannot add the host ports").details(e));
    }
    Ok(())
}

/// Undo [`add_hostports`]; absent is fine.
fn del_hostports(conf: &NetConf, container_id: &str, ifname: &str) {
    let f = hostport_file(conf, container_id, ifname);
    if let Ok(h) = std::fs::read(&f)
        .map_err(|_| ())
        .and_then(|b| serde_json::from_slice::<HostPorts>(&b).map_err(|_| ()))
    {
        let keys = h
            .mappings
            .iter()
            .map(|(p, hp, _)| format!("{} . {hp}", p.nft()))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = tweed_nft::apply(&format!(
            "delete element ip {} hostports {{ {keys} }}\n",
            tweed_plan::services::TABLE
        ));
    }
    let _ = std::fs::remove_file(&f);
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    // DEL must succeed for things already gone, so every step tolerates absence.
    del_hostports(conf, &env.container_id, &env.ifname);
    let host = host_veth_name(&env.container_id, &env.ifname);
    let _ = std::fs::remove_file(attachment_file(conf, &host));
    let nl = Netlink::open().map_err(dp_err("cannot open netlink"))?;
    nl.del_link(&host)
        .await
        .map_err(dp_err("cannot delete the host veth"))?;
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    ipam::Store::new(conf.data_dir())
        .release(&owner)
        .map_err(ipam_err)?;
    Ok(())
}

async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    node_state(conf)?;
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let ip = ipam::Store::new(conf.data_dir())
        .lookup(&owner)
        .map_err(ipam_err)?
        .ok_or_else(|| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no address is reserved for {}/{}",
                    env.container_id, env.ifname
                ),
            )
        })?;
    let netns_path = env.netns.as_ref().expect("validated");
    open_netns(netns_path)?;
    let fail = |m: String| CniError::new(code::CHECK_FAILED, m);
    let nl = Netlink::open().map_err(dp_err("cannot open netlink"))?;
    let host = host_veth_name(&env.container_id, &env.ifname);
    let h = nl
        .link(&host)
        .await
        .map_err(dp_err("host veth"))?
        .ok_or_else(|| fail(format!("host veth {host} is missing")))?;
    if !h.up {
        return Err(fail(format!("host veth {host} is down")));
    }
    let pod_ip = Ipv4Net::new(ip, 32).expect("/32");
    if !nl
        .has_device_route(pod_ip, h.index)
        .await
        .map_err(dp_err("routes"))?
    {
        return Err(fail(format!("host route {pod_ip} dev {host} is missing")));
    }
    let pod = Netlink::open_in(netns_path).map_err(dp_err("cannot enter the pod's namespace"))?;
    let p = pod
        .link(&env.ifname)
        .await
        .map_err(dp_err("pod link"))?
        .ok_or_else(|| fail(format!("{} is missing in the pod", env.ifname)))?;
    if !pod
        .ipv4_addrs(p.index)
        .await
        .map_err(dp_err("pod addresses"))?
        .contains(&pod_ip)
    {
        return Err(fail(format!("{} does not hold {pod_ip}", env.ifname)));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let store = ipam::Store::new(conf.data_dir());
    let nl = Netlink::open().map_err(dp_err("cannot open netlink"))?;
    let mut errors = Vec::new();
    for (_, owner) in store.list().map_err(ipam_err)? {
        if valid.contains(&(owner.container_id.clone(), owner.ifname.clone())) {
            continue;
        }
        // Keep going past one failure: GC should free as much as it can.
        let host = host_veth_name(&owner.container_id, &owner.ifname);
        if let Err(e) = nl.del_link(&host).await {
            errors.push(e.to_string());
        }
        let _ = std::fs::remove_file(attachment_file(conf, &host));
        if let Err(e) = store.release(&owner) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(
            CniError::new(code::IO_FAILURE, "GC could not release everything")
                .details(errors.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_short_stable_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("tw"), "{a}");
    }

    #[test]
    fn version_needs_no_config() {
        let (rc, out) = main_with(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_string()),
            &b""[..],
        );
        assert_eq!(rc, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "1.1.0"));
    }

    #[test]
    fn status_before_the_agent_is_ready_is_50() {
        let dir = std::env::temp_dir().join(format!("tweed-status-{}", std::process::id()));
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"t","type":"tweed","runDir":"{}"}}"#,
            dir.display()
        );
        let (rc, out) = main_with(
            |k| (k == "CNI_COMMAND").then(|| "STATUS".to_string()),
            conf.as_bytes(),
        );
        assert_eq!(rc, 1);
        let e: CniError = serde_json::from_str(&out).unwrap();
        assert_eq!(e.code, 50);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("node.json"),
            r#"{"node":"n1","subnet":"10.244.1.0/24","mtu":1450}"#,
        )
        .unwrap();
        let (rc, out) = main_with(
            |k| (k == "CNI_COMMAND").then(|| "STATUS".to_string()),
            conf.as_bytes(),
        );
        assert_eq!((rc, out.as_str()), (0, ""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
