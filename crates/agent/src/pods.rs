//! Keeping existing pods' veths at the node's IPv4 BIG TCP sizes.
//!
//! The pod's end decides the largest packet the pod sends, so it follows
//! the peers' paths ([`tweed_plan::pod_gso_max_size`]); the host's end only
//! decides what the node hands the pod, and a large packet can only arrive
//! from a peer that sends it directly, so it stays at the underlay's own
//! size (measured: a receiver whose host end stays large takes a sender's
//! 192 KiB packets at full speed, one that shrank both ends fell from ~20
//! to 7–9 Gbit/s). So a peer's path change never depends on what the peer
//! decided.
//!
//! The CNI plugin gives a new pod the sizes node.json holds and records
//! where the pod's end lives (`RUN_DIR/pods/HOST_VETH.json`). The agent
//! brings every recorded pod to the current sizes, level-triggered: a pod
//! added during a change, or one that failed, is fixed at the next converge.

use std::collections::BTreeMap;
use std::path::Path;

use tweed_model::{PodAttachment, DEFAULT_GSO_MAX_SIZE};
use tweed_netlink::Netlink;

/// Every attachment the CNI plugin recorded; unreadable files are skipped
/// (the plugin writes them atomically, so one is only ever whole or absent).
pub fn attachments(run_dir: &Path) -> Vec<PodAttachment> {
    let mut out: Vec<PodAttachment> = std::fs::read_dir(run_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by(|a, b| a.host_veth.cmp(&b.host_veth));
    out
}

/// What one pass changed, and what it could not.
#[derive(Debug, Default)]
pub struct SizeReport {
    pub changed: usize,
    pub failed: Vec<String>,
}

/// Give every recorded pod veth `host` on its host end and `pod` on its
/// pod end. `known` is the pod-end size last set or seen per host veth, so
/// a steady node reads one link dump per pass and enters no namespace; a
/// pod it has not seen yet is read (and set if need be) once. A pod whose
/// veth is gone (deleted, its record not yet) is skipped.
pub async fn converge_sizes(
    nl: &Netlink,
    run_dir: &Path,
    host: u32,
    pod: u32,
    known: &mut BTreeMap<String, u32>,
) -> SizeReport {
    let mut rep = SizeReport::default();
    let pods = attachments(run_dir);
    known.retain(|veth, _| pods.iter().any(|a| a.host_veth == *veth));
    if pods.is_empty() {
        return rep;
    }
    let links = match nl.links().await {
        Ok(l) => l,
        Err(e) => {
            rep.failed.push(e.to_string());
            return rep;
        }
    };
    for a in pods {
        let Some(h) = links.iter().find(|l| l.name == a.host_veth) else {
            continue;
        };
        let fail = |e: tweed_netlink::NetlinkError| {
            format!(
                "{} ({} in {}): {e}",
                a.host_veth,
                a.ifname,
                a.netns.display()
            )
        };
        // The plugin never gives a pod's end more than its host end, so a
        // pod whose host end is at the default needs no look inside while
        // the default is what it should have: nodes without BIG TCP never
        // enter a pod's namespace.
        let host_big = h
            .gso_ipv4_max_size
            .is_some_and(|s| s > DEFAULT_GSO_MAX_SIZE)
            || h.gro_ipv4_max_size
                .is_some_and(|s| s > DEFAULT_GSO_MAX_SIZE);
        let look = pod > DEFAULT_GSO_MAX_SIZE || host_big;
        if look && known.get(&a.host_veth) != Some(&pod) {
            match Netlink::set_ipv4_max_sizes_in(&a.netns, &a.ifname, pod).await {
                Ok(changed) => {
                    rep.changed += usize::from(changed);
                    known.insert(a.host_veth.clone(), pod);
                }
                Err(e) => {
                    // The host end stays as it is, so this pod is looked at again.
                    known.remove(&a.host_veth);
                    rep.failed.push(fail(e));
                    continue;
                }
            }
        }
        if h.gso_ipv4_max_size != Some(host) || h.gro_ipv4_max_size != Some(host) {
            match nl.set_ipv4_max_sizes(h.index, host).await {
                Ok(()) => rep.changed += 1,
                Err(e) => rep.failed.push(fail(e)),
            }
        }
    }
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_are_the_whole_records_in_host_veth_order() {
        let dir = std::env::temp_dir().join(format!("tweed-pods-{}", std::process::id()));
        let pods = dir.join("pods");
        std::fs::create_dir_all(&pods).unwrap();
        assert!(attachments(&dir.join("nowhere")).is_empty());
        let a = |veth: &str| PodAttachment {
            container_id: format!("c-{veth}"),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{veth}").into(),
            host_veth: veth.into(),
        };
        for x in [a("tw2"), a("tw1")] {
            std::fs::write(
                pods.join(format!("{}.json", x.host_veth)),
                serde_json::to_vec(&x).unwrap(),
            )
            .unwrap();
        }
        // A plugin mid-write leaves a temporary file; garbage is skipped.
        std::fs::write(pods.join("tw3.tmp"), b"{").unwrap();
        std::fs::write(pods.join("tw4.json"), b"not json").unwrap();
        assert_eq!(attachments(&dir), vec![a("tw1"), a("tw2")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
