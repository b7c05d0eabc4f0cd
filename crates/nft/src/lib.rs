//! Kernel I/O for services: nftables transactions through `nft -f -` (one
//! atomic transaction per call: it all applies or nothing does) and
//! conntrack entry deletion through `conntrack -D` (ctnetlink).
#![forbid(unsafe_code)]

pub mod elements;
pub mod txn;

use std::io::Write;
use std::process::{Command, Stdio};

use tweed_plan::services::Flow;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {tool}: {source} (install it: scripts/install-deps.sh)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nft rejected the transaction (nothing was changed): {stderr}")]
    Rejected { stderr: String },
    #[error("conntrack -D failed: {0}")]
    Conntrack(String),
    /// The batch went to the kernel, but its answer could not be read.
    #[error("nf_tables netlink: {0} (the transaction may or may not have applied; a full sync puts it right)")]
    Unknown(String),
}

/// Apply a script as one transaction. Equivalent: `nft -f - <<< SCRIPT`.
pub fn apply(script: &str) -> Result<(), NftError> {
    if script.is_empty() {
        return Ok(());
    }
    // For debugging a ruleset by hand: TWEED_NFT_DUMP=DIR keeps every transaction.
    if let Some(dir) = std::env::var_os("TWEED_NFT_DUMP") {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::write(
            std::path::Path::new(&dir).join(format!("{}-{n}.nft", std::process::id())),
            script,
        );
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NftError::Spawn {
            tool: "nft",
            source,
        })?;
    // A write error means nft died early; its stderr says why.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(|source| NftError::Spawn {
        tool: "nft",
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Keep the error readable: nft echoes the failing line, which can be huge.
        let short: String = stderr
            .lines()
            .take(6)
            .map(|l| if l.len() > 300 { &l[..300] } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        Err(NftError::Rejected { stderr: short })
    }
}

/// Remove tweed's table. Equivalent: `nft delete table ip tweed` (absent is fine).
pub fn delete_table() -> Result<(), NftError> {
    apply(&format!(
        "add table ip {t}\ndelete table ip {t}\n",
        t = tweed_plan::services::TABLE
    ))
}

/// Forget conntrack entries of a flow.
/// Equivalent: `conntrack -D -p udp [--orig-dst SVC] --dport PORT [--reply-src BACKEND]`.
/// "No entries" is success.
pub fn forget(flow: &Flow) -> Result<(), NftError> {
    let (proto, dst, port, backend) = flow;
    let mut c = Command::new("conntrack");
    c.args(["-D", "-p", proto.nft()]);
    if let Some(d) = dst {
        c.args(["--orig-dst", &d.to_string()]);
    }
    c.args(["--dport", &port.to_string()]);
    if let Some(b) = backend {
        c.args(["--reply-src", &b.to_string()]);
    }
    let out = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| NftError::Spawn {
            tool: "conntrack",
            source,
        })?;
    let err = String::from_utf8_lossy(&out.stderr);
    // conntrack exits 1 with "0 flow entries have been deleted" when there were none.
    if out.status.success() || err.contains("0 flow entries") {
        Ok(())
    } else {
        Err(NftError::Conntrack(err.trim().to_string()))
    }
}
