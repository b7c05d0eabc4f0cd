//! What BIRD says about its sessions: `birdc show protocols`, parsed, and
//! why a session is not Established, in words an operator can act on
//! (where Calico's `calicoctl node status` leaves "BIRD is not ready").
//!
//! BIRD 2 prints the header capitalised (`Name Proto Table State Since
//! Info`), BIRD 1 in lower case, and birdc's raw socket protocol prefixes
//! each line with a 4-digit code: all are taken. `Since` is one or two
//! words (tweed's configuration asks for ISO dates: `2026-12-02 08:40:11`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolStatus {
    pub name: String,
    pub proto: String,
    pub table: String,
    /// up, down, start, stop, ...
    pub state: String,
    pub since: String,
    /// For BGP: Established, Active, Connect, OpenSent, ... and the last error.
    pub info: String,
}

impl ProtocolStatus {
    pub fn is_bgp(&self) -> bool {
        self.proto.eq_ignore_ascii_case("bgp")
    }

    pub fn established(&self) -> bool {
        self.info
            .split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("established"))
    }
}

/// Every protocol line of `birdc show protocols` output.
pub fn parse_protocols(text: &str) -> Vec<ProtocolStatus> {
    let mut out = Vec::new();
    let mut header = false;
    // In birdc's raw protocol a reply's further lines start with one
    // space; in its human output, indented lines are a protocol's details
    // (`show protocols all`).
    let mut raw_protocol = false;
    for raw in text.lines() {
        let line = strip_code(raw);
        raw_protocol |= line.len() < raw.len();
        let continuation = raw_protocol && raw.starts_with(' ') && !raw.starts_with("  ");
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.eq_ignore_ascii_case("name")
            && words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("proto"))
        {
            header = true;
            continue;
        }
        // Before the header: "BIRD 2.0.12 ready." and the like.
        let details = line.starts_with("  ") || line.starts_with('\t');
        if !header || details || (line.starts_with(' ') && !continuation) {
            continue;
        }
        let rest: Vec<&str> = line.split_whitespace().collect();
        if rest.len() < 4 {
            continue;
        }
        let mut i = 4;
        let mut since = Vec::new();
        while i < rest.len() && since.len() < 2 && looks_like_time(rest[i]) {
            since.push(rest[i]);
            i += 1;
        }
        out.push(ProtocolStatus {
            name: rest[0].to_string(),
            proto: rest[1].to_string(),
            table: rest[2].to_string(),
            state: rest[3].to_string(),
            since: since.join(" "),
            info: rest[i..].join(" "),
        });
    }
    out
}

/// One BFD session, as `birdc show bfd sessions` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BfdSession {
    pub address: std::net::IpAddr,
    /// up, down, init or admindown (lower case).
    pub state: String,
}

/// Every session of `birdc show bfd sessions`:
///
/// ```text
/// tweed_bfd:
/// IP address                Interface  State      Since         Interval  Timeout
/// 203.0.113.242             ---        Up         2026-12-02 14:41:34    0.300    0.900
/// ```
///
/// The interface is `---` for multihop sessions; the state is the first
/// word after the address that names one.
pub fn parse_bfd_sessions(text: &str) -> Vec<BfdSession> {
    const STATES: [&str; 4] = ["up", "down", "init", "admindown"];
    text.lines()
        .filter_map(|raw| {
            let mut words = strip_code(raw).split_whitespace();
            let address = words.next()?.parse().ok()?;
            let state = words
                .map(str::to_ascii_lowercase)
                .find(|w| STATES.contains(&w.as_str()))?;
            Some(BfdSession { address, state })
        })
        .collect()
}

/// birdc's socket protocol: "1002-name ..." or "2002 ...".
fn strip_code(line: &str) -> &str {
    let b = line.as_bytes();
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && (b[4] == b'-' || b[4] == b' ') {
        &line[5..]
    } else {
        line
    }
}

fn looks_like_time(w: &str) -> bool {
    w.starts_with(|c: char| c.is_ascii_digit())
        && w.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | ':' | '.'))
}

/// Why a BGP session is not up, from BIRD's info column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Diagnosis {
    Established,
    /// The peer answered with a different AS than configured.
    WrongAsn,
    /// Nothing accepts BGP at that address (refused, unreachable, timeout).
    PeerUnreachable,
    /// The session was up and the peer went quiet.
    HoldTimerExpired,
    /// The TCP MD5 password does not match (or one side has none).
    Authentication,
    /// Administratively down (disabled, or shutting down).
    Disabled,
    /// BFD declared the peer down (it stopped answering BFD packets).
    BfdDown,
    /// Still connecting: no error yet.
    Connecting,
    Other,
}

impl Diagnosis {
    pub fn of(p: &ProtocolStatus) -> Diagnosis {
        let info = p.info.to_ascii_lowercase();
        if p.established() {
            Diagnosis::Established
        } else if info.contains("bad peer as") {
            Diagnosis::WrongAsn
        } else if info.contains("hold timer expired") {
            Diagnosis::HoldTimerExpired
        } else if info.contains("bfd session down") {
            Diagnosis::BfdDown
        } else if info.contains("connection refused")
            || info.contains("no route to host")
            || info.contains("network is unreachable")
            || info.contains("connection timed out")
        {
            Diagnosis::PeerUnreachable
        } else if info.contains("authentication") || info.contains("md5") {
            Diagnosis::Authentication
        } else if p.state.eq_ignore_ascii_case("down") && !info.contains("error") {
            Diagnosis::Disabled
        } else if info.is_empty()
            || ["active", "connect", "opensent", "openconfirm", "idle"]
                .iter()
                .any(|s| info.split_whitespace().next() == Some(s))
                && !info.contains("error")
        {
            Diagnosis::Connecting
        } else {
            Diagnosis::Other
        }
    }

    /// One line for `tweed status` and `tweed doctor`.
    pub fn explain(self) -> &'static str {
        match self {
            Diagnosis::Established => "established",
            Diagnosis::WrongAsn => {
                "the peer's AS is not the one configured for it (BGP error: bad peer AS)"
            }
            Diagnosis::PeerUnreachable => "nothing answers BGP (TCP 179) at the peer's address",
            Diagnosis::HoldTimerExpired => {
                "the peer stopped answering for longer than the hold time"
            }
            Diagnosis::Authentication => "the TCP MD5 password does not match the peer's",
            Diagnosis::BfdDown => {
                "BFD took the session down: the peer stopped answering BFD (dead node, link or path)"
            }
            Diagnosis::Disabled => "the session is administratively down",
            Diagnosis::Connecting => "connecting (no error yet)",
            Diagnosis::Other => "not established; see the info column",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BIRD 2.0.12 through birdc, capitalised header.
    const BIRD2: &str = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     2026-12-02 08:40:11
tweed_subnet Static   master4    up     2026-12-02 08:40:11
tweed_kernel Kernel   master4    up     2026-12-02 08:40:11
mesh_node2 BGP        ---        up     2026-12-02 08:40:14  Established
global_198_51_100_1 BGP        ---        start  2026-12-02 08:40:11  Active        Socket: Connection refused
node_203_0_113_1 BGP  ---        start  2026-12-02 08:41:02  Idle          Received: Bad peer AS
rr_node9   BGP        ---        start  2026-12-02 08:42:00  Active        Received: Hold timer expired
mesh_node3 BGP        ---        start  2026-12-02 14:41:45  Idle          Error: BFD session down
";

    #[test]
    fn bird2_output_is_read_and_each_failure_named() {
        let ps = parse_protocols(BIRD2);
        assert_eq!(ps.len(), 8, "{ps:#?}");
        let bgp: Vec<_> = ps.iter().filter(|p| p.is_bgp()).collect();
        assert_eq!(bgp.len(), 5);
        assert_eq!(bgp[0].name, "mesh_node2");
        assert_eq!(bgp[0].since, "2026-12-02 08:40:14");
        assert!(bgp[0].established());
        let d: Vec<Diagnosis> = bgp.iter().map(|p| Diagnosis::of(p)).collect();
        assert_eq!(
            d,
            [
                Diagnosis::Established,
                Diagnosis::PeerUnreachable,
                Diagnosis::WrongAsn,
                Diagnosis::HoldTimerExpired,
                Diagnosis::BfdDown,
            ]
        );
        assert_eq!(bgp[2].info, "Idle Received: Bad peer AS");
    }

    #[test]
    fn bfd_sessions_single_hop_and_multihop() {
        // BIRD 2.0.12, through its socket (codes) and through birdc.
        let raw = "0001 BIRD 2.0.12 ready.
1020-tweed_bfd:
 IP address                Interface  State      Since         Interval  Timeout
 198.51.100.62             eth0       Up         2026-12-02 14:41:34    0.300    0.900
 203.0.113.242             ---        Down       2026-12-02 14:41:45    1.000    0.000
0000 
";
        let got: Vec<(String, String)> = parse_bfd_sessions(raw)
            .into_iter()
            .map(|s| (s.address.to_string(), s.state))
            .collect();
        assert_eq!(
            got,
            [
                ("198.51.100.62".into(), "up".into()),
                ("203.0.113.242".into(), "down".into())
            ]
        );
        assert!(parse_bfd_sessions("BIRD 2.0.12 ready.\ntweed_bfd:\n").is_empty());
    }

    #[test]
    fn bird1_and_the_raw_socket_protocol_too() {
        let raw = "0001 BIRD 1.6.8 ready.
2002-name     proto    table    state  since       info
1002-Mesh_172_16_1_88 BGP      master   up     08:12:01    Established
 Mesh_172_16_1_89 BGP      master   start  08:12:01    Connect
1006-  Description:    not a protocol
0000 
";
        let ps = parse_protocols(raw);
        assert_eq!(ps.len(), 2, "{ps:#?}");
        assert_eq!(ps[1].info, "Connect");
        assert_eq!(ps[0].name, "Mesh_172_16_1_88");
        assert_eq!(ps[0].since, "08:12:01");
        assert!(ps[0].established());
        let plain = "name     proto    table    state  since       info\nMesh_1 BGP master start 08:12:01 Connect\n";
        assert_eq!(
            Diagnosis::of(&parse_protocols(plain)[0]),
            Diagnosis::Connecting
        );
    }
}
