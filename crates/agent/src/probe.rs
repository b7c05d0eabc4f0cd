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

pub use tweed_plan::{OLD_PROBE_MARK, PROBE_MARK, PROBE_TABLE};

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).stdin(Stdio::null()).output()
}

/// Make probe packets use the probe table. Equivalent:
/// `ip rule add fwmark 0x3744 lookup 7744 priority 7744` (once), and
/// `ip rule del fwmark 0x7744 lookup 7744` (an older agent's rule).
pub fn ensure_rule() -> std::io::Result<()> {
    let rules = ip(&["rule", "show"])?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    if rules.contains(&format!("fwmark {OLD_PROBE_MARK:#x} lookup {PROBE_TABLE}")) {
        let _ = ip(&[
            "rule",
            "del",
            "fwmark",
            &format!("{OLD_PROBE_MARK:#x}"),
            "lookup",
            &PROBE_TABLE.to_string(),
        ]);
    }
    if rules.contains(&format!("fwmark {PROBE_MARK:#x} lookup {PROBE_TABLE}")) {
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
/// come back within two seconds? Echoes go every 0.2 s until the first
/// answer, so one lost packet (a busy host, a neighbour still resolving,
/// a peer that registered a moment before its VXLAN device had its
/// address) does not decide the peer's mode.
/// Equivalent: `ip route replace VTEP/32 via VIA dev DEV table 7744 && ping -c1 -w2 -i0.2 -m 0x3744 VTEP`.
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
            "-w",
            "2",
            "-i",
            "0.2",
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

/// Probes in a row a direct peer may miss before it falls back to VXLAN.
/// Switching modes is not free (node-to-pod connections change source
/// address), so one bad moment must not flip a peer back and forth.
pub const MISSES_TO_FALL_BACK: u32 = 2;

/// What the planner is told about one probe. `misses` counts unanswered
/// probes in a row (reset by an answer); a peer routed directly now keeps
/// its mode until it has missed [`MISSES_TO_FALL_BACK`] of them.
pub fn judge(direct_now: bool, answered: bool, misses: &mut u32) -> bool {
    if answered {
        *misses = 0;
        return true;
    }
    *misses = misses.saturating_add(1);
    direct_now && *misses < MISSES_TO_FALL_BACK
}

/// Should the agent probe again soon rather than at the next resync? While
/// a peer has missed only a few probes in a row: a peer that registered a
/// moment before its device was up, or a direct peer held on one miss.
pub fn reprobe_soon(misses: u32) -> bool {
    (1..=3).contains(&misses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_peer_survives_one_miss_and_falls_back_on_the_second() {
        let mut m = 0;
        assert!(judge(true, false, &mut m));
        assert!(reprobe_soon(m));
        assert!(!judge(true, false, &mut m));
        assert_eq!(m, 2);
        assert!(
            judge(false, true, &mut m),
            "one answer is enough to go direct"
        );
        assert_eq!(m, 0);
    }

    #[test]
    fn a_peer_not_direct_stays_on_vxlan_at_the_first_miss_and_is_probed_again_soon() {
        let mut m = 0;
        assert!(!judge(false, false, &mut m));
        assert!(reprobe_soon(m));
        for _ in 0..3 {
            judge(false, false, &mut m);
        }
        assert!(
            !reprobe_soon(m),
            "a peer that never answers waits for the resync"
        );
    }
}
