//! The lab's BGP routers: FRR on every router with `bgp:`. Routers that
//! share a segment peer with each other; nodes on a router's segments are
//! accepted as eBGP peers with ASes of their own. Until the agent speaks
//! BGP, BIRD stands in for the nodes here (the speaker the agent runs),
//! so this is already BIRD-to-FRR interop. Needs Debian's frr (and bird2
//! for the nodes' half); a machine without them says so.

mod common;
use common::*;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tweed_lab::{Lab, Topology};

/// A core router on a transit segment and a ToR per rack.
const FABRIC: &str = "
segments:
  - {name: rack-a, cidr: 198.51.100.0/26}
  - {name: rack-b, cidr: 198.51.100.64/26}
  - {name: transit, cidr: 198.51.100.128/26}
routers:
  - {name: core, segments: [transit], bgp: {asn: 65000}}
  - {name: tor-a, segments: [rack-a, transit], bgp: {asn: 65001}}
  - {name: tor-b, segments: [rack-b, transit], bgp: {asn: 65002}}
nodes:
  - {name: a1, segments: [rack-a]}
  - {name: a2, segments: [rack-a]}
  - {name: b1, segments: [rack-b]}
";

fn found(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(bin).exists())
}

/// BIRD on a node, standing in for the agent's: announces `routes` to the
/// node's ToR with graceful restart, as the agent's configuration does.
struct Bird {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Bird {
    fn start(
        ns: &str,
        name: &str,
        me: Ipv4Addr,
        asn: u32,
        tor: (Ipv4Addr, u32),
        routes: &[&str],
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("tweed-lab-frr-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let statics: String = routes
            .iter()
            .map(|r| format!("  route {r} blackhole;\n"))
            .collect();
        let conf = format!(
            "router id {me};
protocol device {{ }}
protocol static announce {{
  ipv4;
{statics}}}
protocol bgp tor {{
  local {me} as {asn};
  neighbor {} as {};
  hold time 9;
  connect retry time 1;
  graceful restart on;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
",
            tor.0, tor.1
        );
        std::fs::write(dir.join("bird.conf"), conf).unwrap();
        let mut b = Bird {
            ns: ns.into(),
            dir,
            child: None,
        };
        b.spawn(false);
        b
    }

    /// `recovering`: started again after a crash (`bird -R`), so its OPEN
    /// says it kept forwarding, and the ToR keeps the stale routes until
    /// the End-of-RIB (otherwise it drops them the moment the session is
    /// back, and learns them again a moment later).
    fn spawn(&mut self, recovering: bool) {
        let log = std::fs::File::create(self.dir.join("bird.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "bird", "-f", "-c"])
            .arg(self.dir.join("bird.conf"))
            .arg("-s")
            .arg(self.dir.join("bird.ctl"))
            .arg("-P")
            .arg(self.dir.join("bird.pid"))
            .args(recovering.then_some("-R"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: the speaker vanishes without a NOTIFICATION, as in a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Routes = Vec<(Ipv4Net, Vec<Ipv4Addr>)>;

fn routes(want: &[(&str, &[Ipv4Addr])]) -> Routes {
    let mut r: Routes = want
        .iter()
        .map(|(n, h)| (n.parse().unwrap(), h.to_vec()))
        .collect();
    r.sort();
    r
}

fn established_with(lab: &Lab, router: &str, addr: Ipv4Addr) -> bool {
    lab.router_bgp_peers(router)
        .unwrap()
        .iter()
        .any(|p| p.address == std::net::IpAddr::V4(addr) && p.established())
}

/// Does tor-a hold any stale route (graceful restart in progress)?
fn stale(g: &LabGuard, lab: &Lab) -> bool {
    let run = lab.router_dir("tor-a").join("run");
    let out = g.exec_ok(
        &lab.router_ns("tor-a"),
        &[
            "vtysh",
            "--vty_socket",
            run.to_str().unwrap(),
            "-d",
            "bgpd",
            "-c",
            "show bgp ipv4 unicast json",
        ],
    );
    out.contains("\"stale\":true")
}

#[test]
fn routers_peer_with_each_other_and_carry_what_nodes_announce() {
    let test = "routers_peer_with_each_other_and_carry_what_nodes_announce";
    if !Path::new("/usr/lib/frr/bgpd").exists() {
        skip(
            test,
            "no FRR (/usr/lib/frr/bgpd, Debian's frr): run scripts/install-deps.sh",
        );
        return;
    }
    let g = LabGuard::up("frr", FABRIC);
    let lab = Lab::new("frr").unwrap();
    let t = Topology::parse(FABRIC).unwrap();
    let (core_t, tora_t, torb_t) = (
        t.router_ip(0, "transit"),
        t.router_ip(1, "transit"),
        t.router_ip(2, "transit"),
    );

    // `lab up` returns once every router-to-router session is up: each
    // router peers with exactly the others (ToR to core, and the ToRs
    // with each other on the shared transit segment).
    for (router, asn, want) in [
        ("core", 65000, vec![(torb_t, 65002), (tora_t, 65001)]),
        ("tor-a", 65001, vec![(torb_t, 65002), (core_t, 65000)]),
        ("tor-b", 65002, vec![(tora_t, 65001), (core_t, 65000)]),
    ] {
        let peers = lab.router_bgp_peers(router).unwrap();
        let got: Vec<(Ipv4Addr, u32, bool, u64)> = peers
            .iter()
            .map(|p| {
                let std::net::IpAddr::V4(a) = p.address else {
                    panic!("{p:?}")
                };
                (a, p.remote_as, p.established(), p.prefixes_received)
            })
            .collect();
        let mut want: Vec<_> = want.into_iter().map(|(a, s)| (a, s, true, 0)).collect();
        want.sort();
        assert_eq!(got, want, "{router} (AS {asn}): {peers:?}");
        // Nobody originates anything: no router has learnt a route.
        assert_eq!(lab.router_routes(router).unwrap(), [], "{router}");
    }
    let status = ok(&["lab", "status", "--name", "frr", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    for r in status["routers"].as_array().unwrap() {
        assert_eq!(r["bgp"]["established"], 2, "{r}");
    }

    if !found("bird") {
        skip(
            "routers_peer_with_each_other_and_carry_what_nodes_announce (nodes' half)",
            "no `bird` (Debian's bird2): nodes peering with their ToR is not checked",
        );
        return;
    }
    // Nodes a1 and a2 (own ASes) announce their subnets and one service
    // address both serve, as policy-Local Services will be.
    let tor_a = (t.router_ip(1, "rack-a"), 65001);
    let (a1, a2) = (t.node_ip(0), t.node_ip(1));
    let mut bird_a1 = Bird::start(
        &g.node_ns("a1"),
        "a1",
        a1,
        64601,
        tor_a,
        &["10.244.201.0/24", "10.96.7.7/32"],
    );
    let _bird_a2 = Bird::start(
        &g.node_ns("a2"),
        "a2",
        a2,
        64602,
        tor_a,
        &["10.244.202.0/24", "10.96.7.7/32"],
    );
    eventually(
        "tor-a to accept a1 and a2 through its listen range",
        20,
        || established_with(&lab, "tor-a", a1) && established_with(&lab, "tor-a", a2),
    );
    let want_tor_a = routes(&[
        ("10.244.201.0/24", &[a1]),
        ("10.244.202.0/24", &[a2]),
        ("10.96.7.7/32", &[a1, a2]),
    ]);
    // Elsewhere every route goes through tor-a (tor-b straight over transit).
    let via_tor_a = routes(&[
        ("10.244.201.0/24", &[tora_t]),
        ("10.244.202.0/24", &[tora_t]),
        ("10.96.7.7/32", &[tora_t]),
    ]);
    eventually("the nodes' routes to reach every router", 20, || {
        lab.router_routes("tor-a").unwrap() == want_tor_a
            && lab.router_routes("core").unwrap() == via_tor_a
            && lab.router_routes("tor-b").unwrap() == via_tor_a
    });
    // zebra installed them in the routers' kernels: ECMP over both nodes.
    let k = g.exec_ok(
        &lab.router_ns("tor-a"),
        &["ip", "route", "show", "10.96.7.7"],
    );
    assert!(
        k.contains(&format!("via {a1} ")) && k.contains(&format!("via {a2} ")),
        "{k}"
    );
    let k = g.exec_ok(
        &lab.router_ns("tor-b"),
        &["ip", "route", "show", "proto", "bgp"],
    );
    assert!(
        k.contains("10.244.201.0/24 nhid") && k.contains(&format!("via {tora_t} ")),
        "{k}"
    );

    // a1's speaker dies (an agent restart): graceful restart keeps its
    // routes, stale, well past the hold time, everywhere.
    bird_a1.kill();
    eventually("tor-a to see a1's session go down", 15, || {
        !established_with(&lab, "tor-a", a1)
    });
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert_eq!(
            lab.router_routes("tor-a").unwrap(),
            want_tor_a,
            "a1's routes were withdrawn"
        );
        assert_eq!(lab.router_routes("tor-b").unwrap(), via_tor_a);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(stale(&g, &lab), "tor-a kept a1's routes but not as stale");
    // It comes back recovering: the routes never leave tor-a meanwhile.
    bird_a1.spawn(true);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(
            lab.router_routes("tor-a").unwrap(),
            want_tor_a,
            "a1's routes left tor-a while it came back"
        );
        if established_with(&lab, "tor-a", a1) && !stale(&g, &lab) {
            break;
        }
        assert!(Instant::now() < until, "a1 did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // b1 (rack b, no speaker) and the transit segment brought nothing else.
    let peers = lab.router_bgp_peers("tor-b").unwrap();
    assert!(peers.iter().all(|p| !p.dynamic), "{peers:?}");
}

#[test]
fn a_router_with_a_reserved_asn_is_refused_naming_the_field() {
    require_lab_prereqs();
    let file = std::env::temp_dir().join("tweed-topo-bad-frr.yaml");
    std::fs::write(
        &file,
        "segments: [{name: a, cidr: 198.51.100.0/26}]\nrouters: [{name: tor, segments: [a], bgp: {asn: 0}}]\nnodes: [{name: n1}]\n",
    )
    .unwrap();
    let o = tweed(&[
        "lab",
        "up",
        "-f",
        file.to_str().unwrap(),
        "--name",
        "frrbad",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("routers[0].bgp.asn"), "{err}");
    assert!(!Path::new("/run/netns/tw-frrbad_ul").exists());
}
