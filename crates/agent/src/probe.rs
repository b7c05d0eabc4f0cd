//! Does pod-addressed traffic reach a peer without a tunnel? Some fabrics
//! (cloud VPCs with source/destination checks, filtering switches) drop a
//! packet whose destination is not the host it is sent to, even on one
//! subnet. The probe sends exactly such a packet: an ICMP echo to the peer's
//! VTEP address (in its pod subnet), routed straight to the peer's underlay
//! address. The probe packets carry a firewall mark that sends them through
//! a routing table of their own, so probing never changes how real traffic
//! is routed.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

pub use tweed_plan::{PROBE_MARK, PROBE_TABLE};

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).stdin(Stdio::null()).output()
}

/// Make probe packets use the probe table. Equivalent:
/// `ip rule add fwmark 0x7744 lookup 7744 priority 7744` (once).
pub fn ensure_rule() -> std::io::Result<()> {
    let rules = ip(&["rule", "show"])?;
    if String::from_utf8_lossy(&rules.stdout)
        .contains(&format!("fwmark {PROBE_MARK:#x} lookup {PROBE_TABLE}"))
    {
        return Ok(());
    }
    let out = ip(&[
        "rule",
        "add",
        "fwmark",
        &format!("{PROBE_MARK:#x}"),
        "lookup",
        &PROBE_TABLE.to_string(),
        "priority",
        &PROBE_TABLE.to_string(),
    ])?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Probe one peer: does an echo to `vtep` sent straight to `via` on `dev`
/// come back within a second?
/// Equivalent: `ip route replace VTEP/32 via VIA dev DEV table 7744 && ping -c1 -W1 -m 0x7744 VTEP`.
pub fn probe(vtep: Ipv4Addr, via: Ipv4Addr, dev: &str) -> bool {
    let route = ip(&[
        "route",
        "replace",
        &format!("{vtep}/32"),
        "via",
        &via.to_string(),
        "dev",
        dev,
        "table",
        &PROBE_TABLE.to_string(),
    ]);
    if !route.is_ok_and(|o| o.status.success()) {
        return false;
    }
    Command::new("ping")
        .args([
            "-c",
            "1",
            "-W",
            "1",
            "-q",
            "-m",
            &PROBE_MARK.to_string(),
            &vtep.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Probe many peers at once: (name, VTEP address, underlay address) → answered?
pub fn probe_all(peers: &[(String, Ipv4Addr, Ipv4Addr)], dev: &str) -> Vec<(String, bool)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = peers
            .iter()
            .map(|(n, vtep, via)| s.spawn(move || (n.clone(), probe(*vtep, *via, dev))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    })
}
