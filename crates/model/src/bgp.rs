//! The cluster's BGP configuration, as a user writes it (the cluster
//! config's `bgp:`), with Calico's defaults: AS 64512, a full node-to-node
//! mesh unless route reflectors or fabric peers are configured.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::FieldError;
use serde::{Deserialize, Serialize};

/// Calico's default AS number (a private one, RFC 6996).
pub const DEFAULT_ASN: u32 = 64512;
/// BGP's usual hold time; a dead peer's routes go after it.
pub const DEFAULT_HOLD_SECS: u16 = 90;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfig {
    /// The cluster's AS (a node may override it: see `BgpNode::asn`).
    #[serde(default = "default_asn")]
    pub asn: u32,
    /// Peers outside the cluster (ToR routers, route reflectors that are
    /// not nodes), each for every node or for the nodes its selector picks.
    #[serde(default)]
    pub peers: Vec<BgpPeer>,
    /// Every node peers with every other. Default: on, unless `peers` or
    /// `routeReflectors` are given (a mesh beside ToR peers would carry
    /// the same routes twice).
    #[serde(default)]
    pub mesh: Option<bool>,
    /// Nodes (by name) that reflect routes: every other node peers with
    /// them only, and they with each other and every node.
    #[serde(default)]
    pub route_reflectors: Vec<String>,
    /// Seconds without a keepalive before a peer's routes are withdrawn.
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    /// Every node also announces the whole Service CIDR, so the fabric
    /// reaches ClusterIPs (Calico's `serviceClusterIPs`). External and
    /// load balancer IPs are always announced.
    #[serde(default, rename = "advertiseClusterIPs")]
    pub advertise_cluster_ips: bool,
    /// BFD on every session (`bfd: {}` for the defaults): a dead peer is
    /// noticed in `interval` x `multiplier` milliseconds instead of the
    /// hold time. Both ends must run it; a peer without BFD is not held
    /// down by it (RFC 5882), it only gains nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdConfig>,
}

/// Bidirectional Forwarding Detection (RFC 5880) for BGP sessions. The
/// defaults are FRR's and MetalLB's: 300 ms, 3 missed packets (0.9 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BfdConfig {
    /// Milliseconds between packets, sent and wanted (min tx and min rx).
    #[serde(default = "default_bfd_interval")]
    pub interval: u32,
    /// Packets missed in a row before the peer is down.
    #[serde(default = "default_bfd_multiplier")]
    pub multiplier: u8,
}

pub const DEFAULT_BFD_INTERVAL_MS: u32 = 300;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;

fn default_bfd_interval() -> u32 {
    DEFAULT_BFD_INTERVAL_MS
}

fn default_bfd_multiplier() -> u8 {
    DEFAULT_BFD_MULTIPLIER
}

impl Default for BfdConfig {
    fn default() -> Self {
        BfdConfig {
            interval: DEFAULT_BFD_INTERVAL_MS,
            multiplier: DEFAULT_BFD_MULTIPLIER,
        }
    }
}

impl BfdConfig {
    /// How long a silent peer stays up: interval x multiplier.
    pub fn detection_ms(&self) -> u32 {
        self.interval * u32::from(self.multiplier)
    }

    /// Every problem, each under `prefix` (`bgp.bfd`).
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let mut errs = Vec::new();
        // FRR's bounds (BIRD takes a wider range): both ends must agree.
        if !(10..=60_000).contains(&self.interval) {
            errs.push(ferr(
                format!("{prefix}.interval"),
                format!(
                    "{} ms: must be 10-60000 milliseconds (the default is {DEFAULT_BFD_INTERVAL_MS})",
                    self.interval
                ),
            ));
        }
        if self.multiplier < 2 {
            errs.push(ferr(
                format!("{prefix}.multiplier"),
                format!(
                    "{}: must be 2-255 (one lost packet must not take a session down)",
                    self.multiplier
                ),
            ));
        }
        errs
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeer {
    pub address: Ipv4Addr,
    pub asn: u32,
    /// TCP MD5 password (RFC 2385), if the peer wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Node labels that must all match (empty: every node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

fn default_asn() -> u32 {
    DEFAULT_ASN
}

fn default_hold() -> u16 {
    DEFAULT_HOLD_SECS
}

impl Default for BgpConfig {
    fn default() -> Self {
        BgpConfig {
            asn: DEFAULT_ASN,
            peers: Vec::new(),
            mesh: None,
            route_reflectors: Vec::new(),
            hold_time: DEFAULT_HOLD_SECS,
            advertise_cluster_ips: false,
            bfd: None,
        }
    }
}

fn ferr(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Is `asn` usable as a speaker's or peer's AS? 0 and AS_TRANS (23456,
/// RFC 6793) are reserved; 4-byte numbers are fine.
pub fn valid_asn(asn: u32) -> bool {
    asn != 0 && asn != 23456 && asn != u32::MAX
}

impl BgpConfig {
    /// Is the node-to-node mesh on?
    pub fn mesh_on(&self) -> bool {
        self.mesh
            .unwrap_or(self.peers.is_empty() && self.route_reflectors.is_empty())
    }

    /// Every problem at once, each naming its field (`bgp.peers[1].asn`).
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        if !valid_asn(self.asn) {
            errs.push(ferr(
                "bgp.asn",
                format!(
                    "{} is reserved (0, 23456 and 4294967295 cannot be used)",
                    self.asn
                ),
            ));
        }
        // RFC 4271: 0 (no keepalives) or at least 3 seconds.
        if self.hold_time != 0 && self.hold_time < 3 {
            errs.push(ferr(
                "bgp.holdTime",
                format!(
                    "{} s: must be 0 (no keepalives) or at least 3",
                    self.hold_time
                ),
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            let f = |x: &str| format!("bgp.peers[{i}].{x}");
            if !valid_asn(p.asn) {
                errs.push(ferr(f("asn"), format!("{} is reserved", p.asn)));
            }
            if p.address.is_unspecified()
                || p.address.is_broadcast()
                || p.address.is_multicast()
                || p.address.is_loopback()
            {
                errs.push(ferr(
                    f("address"),
                    format!("{} cannot be a BGP peer", p.address),
                ));
            }
            if let Some(pw) = &p.password {
                // It goes into the speaker's configuration between quotes.
                if pw.is_empty()
                    || pw.len() > 80
                    || pw.chars().any(|c| c == '"' || c == '\\' || c.is_control())
                {
                    errs.push(ferr(
                        f("password"),
                        "must be 1-80 characters without quotes, backslashes or control characters",
                    ));
                }
            }
            if let Some(j) = seen.insert(p.address, i) {
                errs.push(ferr(
                    f("address"),
                    format!("{} is also bgp.peers[{j}]", p.address),
                ));
            }
        }
        if let Some(b) = &self.bfd {
            errs.extend(b.validate("bgp.bfd"));
        }
        if self.mesh == Some(true) && !self.route_reflectors.is_empty() {
            errs.push(ferr(
                "bgp.mesh",
                "a full mesh and route reflectors exclude each other",
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// A node-specific peer as a flag gives it: `ADDRESS:ASN` or
/// `ADDRESS:ASN:PASSWORD` (`--bgp-peer 198.51.100.1:65001`).
pub fn parse_peer(s: &str) -> Result<BgpPeer, String> {
    let mut it = s.splitn(3, ':');
    let (Some(a), Some(n)) = (it.next(), it.next()) else {
        return Err(format!("{s:?} is not ADDRESS:ASN[:PASSWORD]"));
    };
    let address: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
    let asn: u32 = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not an AS number"))?;
    let peer = BgpPeer {
        address,
        asn,
        password: it.next().map(str::to_string),
        node_selector: BTreeMap::new(),
    };
    // The same checks as the cluster config's peers.
    let one = BgpConfig {
        peers: vec![peer.clone()],
        ..Default::default()
    };
    if let Err(errs) = one.validate() {
        let msgs: Vec<String> = errs
            .iter()
            .map(|e| format!("{}: {}", e.field.replace("bgp.peers[0].", ""), e.msg))
            .collect();
        return Err(format!("{s:?}: {}", msgs.join("; ")));
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_flag_is_read_and_checked() {
        let p = parse_peer("198.51.100.1:65001").unwrap();
        assert_eq!(
            (p.address.to_string(), p.asn, p.password),
            ("198.51.100.1".into(), 65001, None)
        );
        let p = parse_peer("198.51.100.1:65001:s3:cret").unwrap();
        assert_eq!(p.password.as_deref(), Some("s3:cret"));
        assert!(parse_peer("198.51.100.1")
            .unwrap_err()
            .contains("ADDRESS:ASN"));
        assert!(parse_peer("tor1:65001")
            .unwrap_err()
            .contains("not an IPv4 address"));
        assert!(parse_peer("198.51.100.1:0")
            .unwrap_err()
            .contains("asn: 0 is reserved"));
        assert!(parse_peer("127.0.0.1:65001")
            .unwrap_err()
            .contains("address"));
    }

    fn peer(addr: &str, asn: u32) -> BgpPeer {
        BgpPeer {
            address: addr.parse().unwrap(),
            asn,
            password: None,
            node_selector: BTreeMap::new(),
        }
    }

    #[test]
    fn defaults_are_calicos() {
        let c: BgpConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.asn, 64512);
        assert!(c.mesh_on(), "a mesh when nothing else is configured");
        let tor = BgpConfig {
            peers: vec![peer("198.51.100.1", 65001)],
            ..Default::default()
        };
        assert!(!tor.mesh_on(), "fabric peers turn the mesh off");
        let both = BgpConfig {
            mesh: Some(true),
            ..tor
        };
        assert!(both.mesh_on(), "unless it is asked for");
    }

    #[test]
    fn every_problem_is_named_by_its_field() {
        let mut bad_pw = peer("198.51.100.2", 65001);
        bad_pw.password = Some("a\"b".into());
        let c = BgpConfig {
            asn: 23456,
            hold_time: 2,
            peers: vec![peer("198.51.100.1", 0), bad_pw, peer("198.51.100.1", 65002)],
            mesh: Some(true),
            route_reflectors: vec!["n1".into()],
            advertise_cluster_ips: false,
            bfd: Some(BfdConfig {
                interval: 5,
                multiplier: 1,
            }),
        };
        let fields: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "bgp.asn",
                "bgp.holdTime",
                "bgp.peers[0].asn",
                "bgp.peers[1].password",
                "bgp.peers[2].address",
                "bgp.bfd.interval",
                "bgp.bfd.multiplier",
                "bgp.mesh",
            ]
        );
    }

    #[test]
    fn bfd_defaults_to_300_ms_times_3() {
        let c: BgpConfig = serde_json::from_str(r#"{"bfd": {}}"#).unwrap();
        let b = c.bfd.unwrap();
        assert_eq!((b.interval, b.multiplier, b.detection_ms()), (300, 3, 900));
        assert!(c.validate().is_ok());
        let c: BgpConfig = serde_json::from_str(r#"{"bfd": {"interval": 100}}"#).unwrap();
        assert_eq!(c.bfd.unwrap().detection_ms(), 300);
        assert_eq!(BgpConfig::default().bfd, None, "off unless asked for");
        let e = serde_json::from_str::<BgpConfig>(r#"{"bfd": {"intervalMs": 100}}"#).unwrap_err();
        assert!(e.to_string().contains("intervalMs"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<BgpConfig>(r#"{"asm": 65000}"#).unwrap_err();
        assert!(e.to_string().contains("asm"), "{e}");
    }
}
