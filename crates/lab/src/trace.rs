//! `tweed lab trace`: a packet from a pod, node or outside host followed
//! across the lab. Each node's half is `tweed trace` run inside that node's
//! namespace against its own kernel and its own agent's plan; where a half
//! ends by sending the packet to a peer (VXLAN, direct, IP-in-IP), the
//! peer's half starts from the device it arrives on. `--verify` then sends
//! a real request the same way and checks what the echo server saw
//! against the prediction.

use std::net::Ipv4Addr;
use std::process::Command;

use serde::Serialize;
use tweed_explain::trace::{Exit, NodeTrace};

use crate::lab::{Lab, LabError, LabState};

type Result<T, E = LabError> = std::result::Result<T, E>;

/// A whole trace: every node's half, in the order the packet meets them.
#[derive(Debug, Clone, Serialize)]
pub struct LabTrace {
    pub halves: Vec<NodeTrace>,
    /// (endpoint pod IP, the source it sees) for every way the packet is delivered.
    pub predicted: Vec<(Ipv4Addr, Ipv4Addr)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub pod: String,
    pub pod_ip: String,
    pub client: String,
    pub agrees: bool,
    pub why: String,
    /// nftables' trace of the same connection, checked step by step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nftrace: Vec<String>,
}

/// What to trace: the destination port and protocol, an endpoint to pin,
/// `--verify`, and `--ct established`.
#[derive(Debug, Clone, Default)]
pub struct TraceOpts {
    pub port: Option<u16>,
    pub proto: String,
    pub pin: Option<Ipv4Addr>,
    pub verify: bool,
    pub established: bool,
}

/// What `--verify` sends, and what the trace predicted for it.
#[derive(Clone, Copy)]
struct Case<'a> {
    s: &'a Endpoint,
    d: &'a Endpoint,
    port: Option<u16>,
    proto: &'a str,
    pin: Option<Ipv4Addr>,
    predicted: &'a [(Ipv4Addr, Ipv4Addr)],
    expect: Expect,
}

/// What the prediction says a real request meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An echo server answers (which one, and the client it saw: `predicted`).
    Answer,
    /// Refused at once (TCP reset / ICMP port unreachable), by tweed's
    /// reject chain or (no listener) by the kernel itself.
    Refused { by_rule: bool },
    /// Silently dropped by a rule.
    Dropped,
    /// Nothing delivers it (no route, a loop, …).
    Nothing,
}

impl Expect {
    fn of(halves: &[NodeTrace], predicted: &[(Ipv4Addr, Ipv4Addr)]) -> Self {
        if !predicted.is_empty() {
            return Expect::Answer;
        }
        let ends: Vec<&Exit> = halves
            .iter()
            .flat_map(|h| &h.branches)
            .map(|b| &b.exit)
            .filter(|e| !matches!(e, Exit::Forwarded { .. }))
            .collect();
        if !ends.is_empty() && ends.iter().all(|e| matches!(e, Exit::Rejected { .. })) {
            let by_rule = halves
                .iter()
                .flat_map(|h| {
                    h.steps
                        .iter()
                        .chain(h.branches.iter().flat_map(|b| &b.steps))
                })
                .any(|s| s.kind == "reject");
            Expect::Refused { by_rule }
        } else if !ends.is_empty() && ends.iter().all(|e| matches!(e, Exit::Dropped { .. })) {
            Expect::Dropped
        } else {
            Expect::Nothing
        }
    }
}

/// Where a name points: an address, and the node whose half starts the walk.
struct Endpoint {
    ip: Ipv4Addr,
    /// The namespace a real packet is sent from (`--verify`).
    ns: String,
    node: Option<String>,
}

impl Lab {
    fn resolve(&self, st: &LabState, what: &str) -> Result<Endpoint> {
        if let Some(p) = st.pods.get(what) {
            return Ok(Endpoint {
                ip: p.ip,
                ns: p.ns.clone(),
                node: Some(p.node.clone()),
            });
        }
        if let Some(n) = st.nodes.iter().find(|n| n.name == what) {
            return Ok(Endpoint {
                ip: n.ip,
                ns: n.ns.clone(),
                node: Some(n.name.clone()),
            });
        }
        if let Some(h) = st.hosts.iter().find(|h| h.name == what) {
            return Ok(Endpoint {
                ip: h.ip,
                ns: h.ns.clone(),
                node: None,
            });
        }
        let ip: Ipv4Addr = what.parse().map_err(|_| {
            LabError::Invalid(format!(
                "{what:?} is no pod, node or host of lab {} and not an IPv4 address",
                self.name
            ))
        })?;
        let owner = st
            .pods
            .values()
            .find(|p| p.ip == ip)
            .map(|p| (p.ns.clone(), Some(p.node.clone())))
            .or_else(|| {
                st.nodes
                    .iter()
                    .find(|n| n.ip == ip)
                    .map(|n| (n.ns.clone(), Some(n.name.clone())))
            })
            .or_else(|| {
                st.hosts
                    .iter()
                    .find(|h| h.ip == ip)
                    .map(|h| (h.ns.clone(), None))
            });
        Ok(match owner {
            Some((ns, node)) => Endpoint { ip, ns, node },
            None => Endpoint {
                ip,
                ns: String::new(),
                node: None,
            },
        })
    }

    fn trace_half(&self, st: &LabState, node: &str, args: &[String]) -> Result<NodeTrace> {
        st.node(node)?;
        let mut a = vec!["trace", "-o", "json"];
        a.extend(args.iter().map(String::as_str));
        let out = self
            .node_tweed(st, node, &a)?
            .output()
            .map_err(|e| LabError::Invalid(format!("tweed trace on {node}: {e}")))?;
        if !out.status.success() {
            return Err(LabError::Invalid(format!(
                "tweed trace on {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut v: Vec<NodeTrace> = serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Invalid(format!("tweed trace on {node} printed no trace: {e}"))
        })?;
        v.pop()
            .ok_or_else(|| LabError::Invalid(format!("tweed trace on {node} printed no trace")))
    }

    /// Follow `src` → `dst[:port/proto]` across the lab's nodes.
    pub fn trace(&self, src: &str, dst: &str, o: &TraceOpts) -> Result<LabTrace> {
        let TraceOpts {
            port,
            ref proto,
            pin,
            verify,
            established,
        } = *o;
        let proto = proto.as_str();
        if verify && established {
            return Err(LabError::Invalid(
                "--verify opens a new connection; it cannot check --ct established".into(),
            ));
        }
        let st = self.state()?;
        let s = self.resolve(&st, src)?;
        let d = self.resolve(&st, dst)?;
        let target = |ip: Ipv4Addr| match port {
            Some(p) => format!("{ip}:{p}/{proto}"),
            None => ip.to_string(),
        };
        // The first half: on the source's node, or for an outside host, on
        // the node it sends to (it arrives on that node's underlay NIC).
        let (first_node, mut args) = match &s.node {
            // A node's own process: the kernel picks its source (0.0.0.0).
            Some(n) if st.nodes.iter().any(|x| x.ip == s.ip) => (
                n.clone(),
                vec![Ipv4Addr::UNSPECIFIED.to_string(), target(d.ip)],
            ),
            Some(n) => (n.clone(), vec![s.ip.to_string(), target(d.ip)]),
            None => {
                let n = d.node.clone().filter(|n| st.nodes.iter().any(|x| &x.name == n && x.ip == d.ip)).ok_or_else(|| {
                    LabError::Invalid(format!(
                        "from outside the cluster, trace to a node's address (a node port); {dst} is not one"
                    ))
                })?;
                let dev = self.node_intent(&st, &n)?.underlay_dev;
                (
                    n,
                    vec![s.ip.to_string(), target(d.ip), "--arrive-on".into(), dev],
                )
            }
        };
        if let Some(p) = pin {
            args.extend(["--endpoint".into(), p.to_string()]);
        }
        if established {
            args.extend(["--ct".into(), "established".into()]);
        }
        let mut halves = vec![self.trace_half(&st, &first_node, &args)?];
        let mut predicted = Vec::new();
        // Breadth-first over branches that leave for a peer (bounded: a
        // packet crosses at most a few nodes; a loop is a finding of its own).
        let mut i = 0;
        while i < halves.len() && halves.len() < 16 {
            let t = halves[i].clone();
            i += 1;
            for b in &t.branches {
                match &b.exit {
                    Exit::Delivered { packet, .. } => predicted.push((packet.dst, packet.src)),
                    Exit::Forwarded {
                        encap,
                        peer: Some(peer),
                        packet,
                        ..
                    } => {
                        let pi = self.node_intent(&st, peer)?;
                        let dev = match encap.as_str() {
                            "vxlan" => pi
                                .plan
                                .vxlan
                                .as_ref()
                                .map(|v| v.name.clone())
                                .unwrap_or_default(),
                            "ipip" => tweed_plan::IPIP_DEV.to_string(),
                            _ => pi.underlay_dev.clone(),
                        };
                        let mut a = vec![
                            packet.src.to_string(),
                            match packet.port {
                                Some(p) => format!("{}:{p}/{}", packet.dst, packet.proto),
                                None => packet.dst.to_string(),
                            },
                            "--arrive-on".into(),
                            dev,
                        ];
                        if let Some(p) = pin {
                            a.extend(["--endpoint".into(), p.to_string()]);
                        }
                        halves.push(self.trace_half(&st, peer, &a)?);
                    }
                    _ => {}
                }
            }
        }
        let verified = if verify {
            let case = Case {
                s: &s,
                d: &d,
                port,
                proto,
                pin,
                predicted: &predicted,
                expect: Expect::of(&halves, &predicted),
            };
            Some(self.verify(&st, &case, &halves)?)
        } else {
            None
        };
        Ok(LabTrace {
            halves,
            predicted,
            verified,
        })
    }

    /// Send a real request the traced way and compare what the echo server
    /// saw (which pod, which client address) with the prediction.
    /// Start `nft monitor trace` on a node for packets src → dst: a rule
    /// `meta nftrace set 1` in two chains of tweed's own table (prerouting
    /// for pods and arriving packets, output for the node's processes),
    /// removed by [`Lab::nftrace_stop`].
    fn nftrace_start(
        &self,
        ns: &str,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<(std::process::Child, std::path::PathBuf)> {
        let file = self.dir.join(format!("nftrace-{ns}.txt"));
        let out = std::fs::File::create(&file).map_err(|source| LabError::Io {
            path: file.clone(),
            source,
        })?;
        let child = Command::new("ip")
            // Line-buffered: nft's stdout to a file is block-buffered.
            .args([
                "netns", "exec", ns, "stdbuf", "-oL", "nft", "monitor", "trace",
            ])
            .stdout(out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| LabError::Invalid(format!("nft monitor trace: {e}")))?;
        // Events before the monitor joins nftables' trace group are lost:
        // wait (with a deadline) until its netlink socket shows the group
        // (NFNLGRP_NFTRACE, 9: bit 8) in /proc/PID/net/netlink.
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_to_string(format!("/proc/{pid}/net/netlink"))
            .is_ok_and(|t| trace_subscribed(&t, pid))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let t = tweed_plan::services::TABLE;
        let rules = format!(
            "add chain ip {t} trace-pre {{ type filter hook prerouting priority -350; }}\n\
             add chain ip {t} trace-out {{ type filter hook output priority -350; }}\n\
             add rule ip {t} trace-pre ip saddr {src} ip daddr {dst} meta nftrace set 1\n\
             add rule ip {t} trace-out ip saddr {src} ip daddr {dst} meta nftrace set 1\n"
        );
        if let Err(e) = crate::lab::run_stdin(
            Command::new("ip").args(["netns", "exec", ns, "nft", "-f", "-"]),
            &rules,
        ) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok((child, file))
    }

    fn nftrace_stop(&self, ns: &str, tracer: (std::process::Child, std::path::PathBuf)) {
        let t = tweed_plan::services::TABLE;
        for chain in ["trace-pre", "trace-out"] {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "nft", "delete", "chain", "ip", t, chain,
                ])
                .output();
        }
        let (mut child, file) = tracer;
        let _ = child.kill();
        let _ = child.wait();
        // TWEED_KEEP_NFTRACE=1 keeps the raw `nft monitor trace` output
        // in the lab directory, for debugging a disagreement.
        if std::env::var_os("TWEED_KEEP_NFTRACE").is_none() {
            let _ = std::fs::remove_file(file);
        }
    }

    fn verify(&self, st: &LabState, case: &Case, halves: &[NodeTrace]) -> Result<Verified> {
        // nftables' trace bit does not survive a veth or a tunnel: one
        // monitor per node the packet may cross, each matching the packet
        // as that node sees it (one half per node).
        let mut tracers = Vec::new();
        let mut seen_nodes = Vec::new();
        let mut result = Ok(());
        for h in halves {
            if seen_nodes.contains(&h.node) {
                continue;
            }
            seen_nodes.push(h.node.clone());
            let ns = st.node(&h.node)?.ns.clone();
            match self.nftrace_start(&ns, h.packet.src, h.packet.dst) {
                Ok(t) => tracers.push((ns, h, t)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let r = result.and_then(|()| {
            let files: Vec<(&NodeTrace, std::path::PathBuf)> =
                tracers.iter().map(|(_, h, t)| (*h, t.1.clone())).collect();
            self.verify_traced(st, case, &files)
        });
        for (ns, _, t) in tracers {
            self.nftrace_stop(&ns, t);
        }
        r
    }

    fn verify_traced(
        &self,
        st: &LabState,
        case: &Case,
        traced_halves: &[(&NodeTrace, std::path::PathBuf)],
    ) -> Result<Verified> {
        let (first, file) = (traced_halves[0].0, traced_halves[0].1.as_path());
        let read = |f: &std::path::Path| std::fs::read_to_string(f).unwrap_or_default();
        // Where the request that counts starts in each remote monitor's output.
        let remote_marks = || -> Vec<usize> {
            traced_halves[1..]
                .iter()
                .map(|(_, f)| read(f).len())
                .collect()
        };
        let Case {
            s,
            d,
            port,
            proto,
            pin,
            predicted,
            expect,
        } = *case;
        if !matches!(proto, "tcp" | "udp") || s.ns.is_empty() {
            return Err(LabError::Invalid(
                "--verify sends a TCP (HTTP) or UDP request from a pod, node or host of the lab"
                    .into(),
            ));
        }
        let addr = format!("{}:{}", d.ip, port.unwrap_or(crate::lab::ECHO_PORT));
        // Retry only what should answer (an endpoint may still be starting);
        // a refusal or a drop is seen on the first try.
        let (retry, timeout) = match expect {
            Expect::Answer => ("3", "3"),
            Expect::Refused { .. } => ("0", "2"),
            Expect::Dropped | Expect::Nothing => ("0", "1"),
        };
        let get = || {
            Command::new("ip")
                .args(["netns", "exec", &s.ns])
                .arg(&self.exe)
                .args([
                    "probe",
                    if proto == "tcp" { "http" } else { "udp" },
                    &addr,
                    "--retry-for",
                    retry,
                    "--timeout",
                    timeout,
                    "--print-local-port",
                ])
                .output()
                .map_err(|e| LabError::Invalid(format!("verify: {e}")))
        };
        let traced = || std::fs::read_to_string(file).unwrap_or_default();
        let started = || {
            traced()
                .lines()
                .any(|l| tweed_explain::trace::first_packet(l, proto))
        };
        // The monitor subscribes asynchronously: requests until one of them
        // shows up in it (with a deadline), then the request that counts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut out = get()?;
        while !started() && std::time::Instant::now() < deadline {
            out = get()?;
        }
        let mut offset = traced().len();
        let mut marks = remote_marks();
        if started() {
            out = get()?;
        } else {
            offset = 0;
            marks = vec![0; marks.len()];
        }
        // The kernel draws an endpoint per connection; a pinned trace is
        // checked on a connection that drew the pinned one (40 tries: at 1/K
        // each, missing it is vanishingly rare for the K a lab has).
        if let Some(p) = pin {
            for _ in 0..40 {
                let hit =
                    serde_json::from_slice::<crate::echo::Seen>(&out.stdout).is_ok_and(|seen| {
                        seen.ip == p.to_string()
                            || st.pods.get(&seen.pod).is_some_and(|x| x.ip == p)
                    });
                if hit || !out.status.success() {
                    break;
                }
                offset = traced().len();
                marks = remote_marks();
                out = get()?;
            }
        }
        let after = || {
            let t = traced();
            t[offset.min(t.len())..].to_string()
        };
        if !out.status.success() {
            return Ok(self.verify_failure(&first.node, expect, proto, &out, &after));
        }
        let seen: crate::echo::Seen = serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Invalid(format!("verify: the echo answer does not decode: {e}"))
        })?;
        // A wildcard-bound UDP socket does not know the address a datagram
        // came to: the pod's name does.
        let pod_ip: Ipv4Addr = seen
            .ip
            .parse()
            .ok()
            .filter(|ip: &Ipv4Addr| !ip.is_unspecified())
            .or_else(|| st.pods.get(&seen.pod).map(|p| p.ip))
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let client: Ipv4Addr = seen.client.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let want: Vec<&(Ipv4Addr, Ipv4Addr)> =
            predicted.iter().filter(|(ip, _)| *ip == pod_ip).collect();
        let (agrees, why) = match want.first() {
            None => (
                false,
                format!(
                    "answered by {} ({pod_ip}), which the trace did not predict",
                    seen.pod
                ),
            ),
            Some((_, src)) if *src == client => (
                true,
                format!(
                    "{} ({pod_ip}) saw the client {client}, as predicted",
                    seen.pod
                ),
            ),
            Some((_, src)) => (
                false,
                format!(
                    "{} ({pod_ip}) saw the client {client}; the trace predicted {src}",
                    seen.pod
                ),
            ),
        };
        // The same connection as nftables saw it on the first node (its
        // events reach the monitor asynchronously: wait for the first
        // packet's postrouting verdict, with a deadline).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let sport: Option<u16> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("local-port ")?.trim().parse().ok());
        while tweed_explain::trace::observe_first(&after(), proto, sport)
            .is_none_or(|o| o.masquerade.is_none())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (mut nf_ok, mut nftrace) = compare_nftrace(first, pod_ip, &after(), proto, sport);
        // The node that delivered it, if not the first: its own trace of the
        // same packet as it arrived. The source port survives unless a node
        // on the way masqueraded it (fully random): the first node, or one
        // in between (a node port reached from a pod on another node).
        let masqueraded = tweed_explain::trace::observe_first(&after(), proto, sport)
            .and_then(|o| o.masquerade)
            .unwrap_or(false);
        if let Some((i, (h, f))) = traced_halves
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, (h, _))| delivers_to(h, pod_ip))
        {
            let rsport = if masqueraded || h.packet.src != first.packet.src {
                None
            } else {
                sport
            };
            let rafter = || {
                let t = read(f);
                t[marks[i - 1].min(t.len())..].to_string()
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while tweed_explain::trace::observe_first(&rafter(), proto, rsport)
                .is_none_or(|o| o.masquerade.is_none())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let (ok, lines) = compare_nftrace(h, pod_ip, &rafter(), proto, rsport);
            nf_ok &= ok;
            nftrace.extend(lines);
        }
        Ok(Verified {
            pod: seen.pod,
            pod_ip: pod_ip.to_string(),
            client: seen.client,
            agrees: agrees && nf_ok,
            why,
            nftrace,
        })
    }
}

impl Lab {
    /// A request that got no answer, checked against what was predicted:
    /// refused at once (and nftables sent it to the reject chain), or
    /// silently dropped (a rule's drop verdict), or simply undelivered.
    fn verify_failure(
        &self,
        first_node: &str,
        expect: Expect,
        proto: &str,
        out: &std::process::Output,
        after: &dyn Fn() -> String,
    ) -> Verified {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let refused = err.contains("refused");
        // The failed request printed no source port; any first packet after
        // the offset is one of these identical failing requests.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let seen = |o: &tweed_explain::trace::Observed| match expect {
            Expect::Refused { by_rule } => o.rejected == by_rule,
            Expect::Dropped => o.dropped,
            _ => true,
        };
        let mut obs = tweed_explain::trace::observe_first(&after(), proto, None);
        while !obs.as_ref().is_some_and(seen) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            obs = tweed_explain::trace::observe_first(&after(), proto, None);
        }
        let mut nftrace = Vec::new();
        let mut nf_ok = true;
        let mut check = |good: bool, what: &str| {
            nf_ok &= good;
            nftrace.push(format!(
                "nftrace on {}: {what} {}",
                first_node,
                if good { "✓" } else { "✗ DISAGREES" }
            ));
        };
        match (expect, &obs) {
            (Expect::Refused { by_rule: true }, Some(o)) => {
                check(o.rejected, "sent to the reject chain")
            }
            (Expect::Refused { by_rule: false }, Some(o)) => check(
                !o.rejected && !o.dropped,
                "no rule rejected or dropped it (the kernel refused it)",
            ),
            (Expect::Dropped, Some(o)) => check(o.dropped, "dropped by a rule"),
            (Expect::Refused { .. } | Expect::Dropped, None) => {
                check(false, "the first packet was traced")
            }
            _ => {}
        }
        let (agrees, why) = match expect {
            Expect::Answer => (
                false,
                format!("no answer, but the trace predicted delivery: {err}"),
            ),
            Expect::Refused { .. } if refused => (true, "refused at once, as predicted".into()),
            Expect::Refused { .. } => (false, format!("the trace predicted a refusal, but: {err}")),
            _ if refused => (
                false,
                format!("refused, but the trace predicted no answer: {err}"),
            ),
            Expect::Dropped => (true, "no answer: dropped, as predicted".into()),
            Expect::Nothing => (true, "no answer, as predicted (nothing delivers it)".into()),
        };
        Verified {
            pod: String::new(),
            pod_ip: String::new(),
            client: String::new(),
            agrees: agrees && nf_ok,
            why,
            nftrace,
        }
    }
}

/// Has process `pid` a netfilter netlink socket (protocol 12) in the
/// trace group? `text`: `/proc/PID/net/netlink`.
pub fn trace_subscribed(text: &str, pid: u32) -> bool {
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[1] == "12"
            && f[2] == pid.to_string()
            && u32::from_str_radix(f[3], 16).is_ok_and(|g| g & (1 << 8) != 0)
    })
}

/// Does this half deliver the packet to `pod_ip` (after its own DNAT, if any)?
fn delivers_to(h: &NodeTrace, pod_ip: Ipv4Addr) -> bool {
    h.branches
        .iter()
        .any(|b| matches!(&b.exit, Exit::Delivered { packet, .. } if packet.dst == pod_ip))
}

/// Check a node's prediction for the branch that delivered to
/// `pod_ip` against nftables' own trace of the connection's first packet:
/// the DNAT (and the endpoint it chose), the masquerade decision, and the
/// device the packet left by. Returns (all agree, one line per check).
pub fn compare_nftrace(
    first: &NodeTrace,
    pod_ip: Ipv4Addr,
    text: &str,
    proto: &str,
    sport: Option<u16>,
) -> (bool, Vec<String>) {
    let node = &first.node;
    let Some(o) = tweed_explain::trace::observe_first(text, proto, sport) else {
        return (
            false,
            vec![format!(
                "nftrace on {node}: the connection's first packet was not traced ✗ DISAGREES"
            )],
        );
    };
    let mut lines = Vec::new();
    let mut ok = true;
    let mut check = |good: bool, what: String| {
        ok &= good;
        lines.push(format!(
            "nftrace on {node}: {what} {}",
            if good { "✓" } else { "✗ DISAGREES" }
        ));
    };
    let service = first.branches.iter().any(|b| b.endpoint.is_some());
    // The branch that led to the pod; with no Service on this node (one
    // branch), the only one, even if a peer DNATs it further (a hostPort).
    let branch = first
        .branches
        .iter()
        .find(|b| match &b.exit {
            Exit::Delivered { packet, .. } | Exit::Forwarded { packet, .. } => packet.dst == pod_ip,
            _ => false,
        })
        .or_else(|| (!service && first.branches.len() == 1).then(|| &first.branches[0]));
    if service {
        check(
            o.dnat.is_some() && o.daddr == Some(pod_ip),
            format!(
                "DNAT to {} by {}",
                o.daddr.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                o.dnat.clone().unwrap_or_else(|| "no rule".into())
            ),
        );
    } else {
        check(
            o.dnat.is_none(),
            format!(
                "no DNAT{}",
                o.dnat
                    .as_ref()
                    .map(|d| format!(" (but {d})"))
                    .unwrap_or_default()
            ),
        );
    }
    let Some(b) = branch else {
        check(false, format!("a predicted branch to {pod_ip}"));
        return (ok, lines);
    };
    let masq = b
        .steps
        .iter()
        .any(|s| s.kind == "masquerade" && s.text.starts_with("source "));
    check(
        o.masquerade.unwrap_or(false) == masq,
        format!(
            "masquerade {}",
            if o.masquerade.unwrap_or(false) {
                "applied"
            } else {
                "not applied"
            }
        ),
    );
    let dev = b
        .steps
        .iter()
        .find(|s| s.kind == "route")
        .and_then(|s| s.text.split(" dev ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string);
    if let (Some(want), Some(got)) = (dev, o.oif.clone()) {
        check(want == got, format!("out by {got}"));
    }
    (ok, lines)
}

impl Lab {
    /// Names for the lab's addresses, so a trace reads `pod-1a → myapp`
    /// rather than addresses that differ from run to run (subnets are
    /// claimed in whatever order the agents start).
    pub fn address_names(&self) -> Result<Vec<(String, String)>> {
        let st = self.state()?;
        let mut v: Vec<(String, String)> = Vec::new();
        for p in st.pods.values() {
            v.push((p.ip.to_string(), p.name.clone()));
        }
        for (i, n) in st.nodes.iter().enumerate() {
            v.push((n.ip.to_string(), n.name.clone()));
            if let Some(public) = st.topology.nodes[i].public_ip {
                v.push((public.to_string(), format!("{}-public", n.name)));
            }
            if let Ok(intent) = self.node_intent(&st, &n.name) {
                v.push((intent.vtep_ip().to_string(), format!("{}-vtep", n.name)));
                v.push((intent.subnet.to_string(), format!("{}-pods", n.name)));
            }
        }
        for h in &st.hosts {
            v.push((h.ip.to_string(), h.name.clone()));
        }
        for svc in st.services.values() {
            if let Some(ip) = svc.cluster_ip {
                v.push((ip.to_string(), format!("svc-{}", svc.name)));
            }
        }
        Ok(v)
    }
}

/// Replace whole addresses (and prefixes) in `text` by their names; an
/// address inside a longer one (10.244.2.1 in 10.244.2.10) is left alone.
pub fn name_addresses(text: &str, names: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let is_addr = |c: char| c.is_ascii_digit() || c == '.' || c == '/';
    while !rest.is_empty() {
        let start = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(|c: char| !is_addr(c)).unwrap_or(rest.len());
        let token = &rest[..end];
        // A trailing '.' ends a sentence, not the address.
        let token = token.trim_end_matches('.');
        let end = token.len();
        let host = token.strip_suffix("/32");
        match names.iter().find(|(a, _)| a == token) {
            Some((_, n)) => out.push_str(n),
            None => match host.and_then(|h| names.iter().find(|(a, _)| a == h)) {
                Some((_, n)) => out.push_str(&format!("{n}/32")),
                None => out.push_str(token),
            },
        }
        rest = &rest[end..];
    }
    out
}

/// veth names are made from container IDs: different every run.
fn name_veths(text: &str) -> String {
    text.split(' ')
        .map(|w| {
            let core = w.trim_end_matches([';', ',', ')']);
            let hex = core
                .strip_prefix("tw")
                .is_some_and(|h| h.len() == 11 && h.chars().all(|c| c.is_ascii_hexdigit()));
            if hex {
                w.replacen(core, "<veth>", 1)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The whole trace for people, or `--minimal`: only decisions, addresses
/// named, branches and halves in a stable order (for golden tests).
pub fn render(t: &LabTrace, minimal: bool, names: &[(String, String)]) -> String {
    render_as(t, if minimal { Style::Minimal } else { Style::Tree }, names)
}

/// How `tweed lab trace` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Tree,
    Minimal,
    /// One line per way the packet goes, addresses named.
    Summary,
}

pub fn render_as(t: &LabTrace, style: Style, names: &[(String, String)]) -> String {
    let minimal = style != Style::Tree;
    let mut s = if style == Style::Summary {
        tweed_explain::trace::render_summary(&t.halves)
            .lines()
            .map(|l| name_veths(&name_addresses(l, names)))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else if minimal {
        let mut halves = t.halves.clone();
        for h in &mut halves {
            h.branches
                .sort_by_key(|b| name_addresses(b.endpoint.as_deref().unwrap_or(""), names));
        }
        if halves.len() > 1 {
            halves[1..].sort_by(|a, b| {
                a.node.cmp(&b.node).then(
                    name_addresses(&a.packet.to_string(), names)
                        .cmp(&name_addresses(&b.packet.to_string(), names)),
                )
            });
        }
        let text = tweed_explain::trace::render(&halves, true);
        text.lines()
            .map(|l| name_veths(&name_addresses(l, names)))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        tweed_explain::trace::render(&t.halves, false)
    };
    if let Some(v) = &t.verified {
        let why = if minimal {
            name_addresses(&v.why, names)
        } else {
            v.why.clone()
        };
        s.push_str(&format!(
            "verify: {} — {why}\n",
            if v.agrees { "agrees" } else { "DISAGREES" }
        ));
        for l in &v.nftrace {
            let l = if minimal {
                name_veths(&name_addresses(l, names))
            } else {
                l.clone()
            };
            s.push_str(&format!("  {l}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitor_is_subscribed_once_its_socket_joins_the_trace_group() {
        let t = "sk               Eth Pid        Groups   Rmem\n000000000a276b3c 12  19672      00000100 0\n000000004a1e45ac 12  0          00000000 0\n";
        assert!(trace_subscribed(t, 19672));
        assert!(!trace_subscribed(t, 0));
        assert!(!trace_subscribed(t, 1));
    }

    #[test]
    fn addresses_are_named_whole() {
        let names = vec![
            ("10.244.2.1".to_string(), "pod-1a".to_string()),
            ("10.244.2.0/24".to_string(), "node1-pods".to_string()),
        ];
        assert_eq!(
            name_addresses("10.244.2.1 → 10.244.2.10:80/tcp via 10.244.2.0/24.", &names),
            "pod-1a → 10.244.2.10:80/tcp via node1-pods."
        );
        assert_eq!(name_veths("by tw8c66938576b; it"), "by <veth>; it");
        assert_eq!(name_veths("tweed.1 twx"), "tweed.1 twx");
    }
}
