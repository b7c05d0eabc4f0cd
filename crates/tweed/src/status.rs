//! `tweed status`: what this node's agent reports, as a table for people or
//! JSON (`-o json`) for machines. Inside a lab node's namespace it finds
//! that node's agent by itself.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tweed_agent::AgentStatus;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The agent's run directory (default: /run/tweed, or inside a lab
    /// node's namespace, that node's).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// `table` (default) or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

/// The lab node whose network namespace this process is in, as its run
/// directory: namespaces are `tw-LAB_n-NODE`, their agents' state under
/// /run/tweed/lab/LAB/nodes/NODE/run (or inside the node, for a DaemonSet).
pub(crate) fn lab_run_dir() -> Option<PathBuf> {
    let mine = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    for e in std::fs::read_dir("/run/netns").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == mine) {
            let (lab, node) = name.strip_prefix("tw-")?.split_once("_n-")?;
            // The lab knows where: its own directory, or for a DaemonSet
            // agent, /run/tweed in the node's mount namespace.
            let lab = tweed_lab::Lab::new(lab).ok()?;
            let st = lab.state().ok()?;
            return lab
                .agent_status_path(&st, node)
                .parent()
                .map(Path::to_path_buf);
        }
    }
    None
}

/// The agent's run directory: as given, else /run/tweed when it holds
/// `file`, else (inside a lab node's namespace) that node's.
pub(crate) fn run_dir(given: Option<PathBuf>, file: &str) -> PathBuf {
    given.unwrap_or_else(|| {
        let default = PathBuf::from("/run/tweed");
        if default.join(file).exists() {
            default
        } else {
            lab_run_dir().unwrap_or(default)
        }
    })
}

pub fn run(a: StatusArgs) -> Result<()> {
    let dir = run_dir(a.run_dir, "status.json");
    let p = dir.join("status.json");
    let body = std::fs::read(&p).with_context(|| {
        format!(
            "no agent status at {} (is the agent running? --run-dir names another)",
            p.display()
        )
    })?;
    let st: AgentStatus = serde_json::from_slice(&body)
        .with_context(|| format!("{} does not decode", p.display()))?;
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", table(&st, &p));
    }
    Ok(())
}

fn table(st: &AgentStatus, from: &Path) -> String {
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: &str| s.push_str(&format!("{k:<12} {v}\n"));
    row(&mut s, "NODE", &st.node);
    row(&mut s, "SUBNET", &st.subnet);
    row(
        &mut s,
        "UNDERLAY",
        &format!(
            "{} {} (peers reach it at {})",
            st.underlay_dev, st.bind_ip, st.public_ip
        ),
    );
    row(
        &mut s,
        "DATASTORE",
        &format!("{} {}", st.datastore, st.datastore_at),
    );
    let sync = if st.last_sync.is_empty() {
        "not synced yet".to_string()
    } else {
        format!("{} synced, last at {}", st.services, st.last_sync)
    };
    row(&mut s, "SERVICES", &sync);
    if st.pod_gso_max_size > 65_536 {
        row(
            &mut s,
            "POD GSO",
            &format!(
                "{} (IPv4 BIG TCP: every peer is direct)",
                st.pod_gso_max_size
            ),
        );
    }
    if let Some(e) = &st.last_error {
        row(&mut s, "PROBLEM", e);
    }
    s.push('\n');
    s.push_str(&format!(
        "{:<14} {:<18} {:<16} {:<12} {}\n",
        "PEER", "SUBNET", "ADDRESS", "MODE", "WHY"
    ));
    for p in &st.peers {
        let why = if p.problem.is_empty() {
            p.reason.clone()
        } else {
            format!("{} ({})", p.reason, p.problem)
        };
        s.push_str(&format!(
            "{:<14} {:<18} {:<16} {:<12} {}\n",
            p.name, p.subnet, p.address, p.mode, why
        ));
    }
    if st.peers.is_empty() {
        s.push_str("(no peers)\n");
    }
    if let Some(b) = &st.bgp {
        s.push_str(&bgp_table(b));
    }
    s.push_str(&format!("\nfrom {}\n", from.display()));
    s
}

/// BGP sessions as `calicoctl node status` shows them, with the reason
/// when one is not up.
fn bgp_table(b: &tweed_agent::bgp::BgpStatus) -> String {
    let bfd = b
        .bfd
        .map(|c| {
            format!(
                ", BFD {} ms x {} = {} ms",
                c.interval,
                c.multiplier,
                c.detection_ms()
            )
        })
        .unwrap_or_default();
    let mut s = format!(
        "\nBGP: {} {} (AS {}, router id {}, hold time {} s{bfd}), announces {}\n",
        b.speaker,
        b.state,
        b.local_asn,
        b.router_id,
        b.hold_time,
        if b.announce.is_empty() {
            "nothing".to_string()
        } else {
            b.announce.join(", ")
        }
    );
    // The BFD column only when the cluster runs BFD.
    let bfd_col = |v: &str| {
        if b.bfd.is_some() {
            format!("{v:<10}")
        } else {
            String::new()
        }
    };
    s.push_str(&format!(
        "{:<16} {:<24} {:<8} {:<6} {:<20} {}{}\n",
        "PEER ADDRESS",
        "PEER TYPE",
        "AS",
        "STATE",
        "SINCE",
        bfd_col("BFD"),
        "INFO"
    ));
    for p in &b.peers {
        let kind = match &p.peer_node {
            Some(n) => format!("{} {n}", p.kind),
            None => p.kind.clone(),
        };
        let info = if p.diagnosis == tweed_bgp::Diagnosis::Established {
            p.info.clone()
        } else {
            format!("{} ({})", p.info, p.explain)
        };
        s.push_str(&format!(
            "{:<16} {:<24} {:<8} {:<6} {:<20} {}{}\n",
            p.address,
            kind,
            p.asn,
            p.state,
            p.since,
            bfd_col(p.bfd.as_deref().unwrap_or("-")),
            info
        ));
    }
    if b.peers.is_empty() {
        s.push_str("(no BGP peers)\n");
    }
    s
}
