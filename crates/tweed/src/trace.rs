//! `tweed trace SRC DST[:PORT[/PROTO]]`: one packet through this node's
//! real rules and routes (a tree for people, `--minimal` for golden tests,
//! `-o json` for machines). `tweed lab trace` stitches every node's half.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tweed_explain::{facts, trace};

#[derive(clap::Args)]
pub struct TraceArgs {
    /// The source address: a pod on this node, one of the node's own, or
    /// 0.0.0.0 for a process of this node (the kernel picks the source).
    pub src: Ipv4Addr,
    /// DST[:PORT[/PROTO]], e.g. 10.96.0.10:80/tcp (PROTO defaults to tcp).
    pub dst: String,
    /// Follow only this Service endpoint.
    #[arg(long)]
    pub endpoint: Option<Ipv4Addr>,
    /// The packet arrives on this device (the remote half of a trace).
    #[arg(long)]
    pub arrive_on: Option<String>,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Only the decisions, without citations (stable, for golden tests).
    #[arg(long)]
    pub minimal: bool,
    /// One line per way the packet goes.
    #[arg(long)]
    pub summary: bool,
    /// Trace a connection's first packet (`new`) or a later one
    /// (`established`: the NAT its conntrack entry holds).
    #[arg(long, default_value = "new")]
    pub ct: trace::Ct,
    /// `table` (default) or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// `IP[:PORT[/PROTO]]` → (IP, port, protocol).
pub fn parse_target(s: &str) -> Result<(Ipv4Addr, Option<u16>, String)> {
    let (addr, proto) = match s.split_once('/') {
        Some((a, p)) => (a, p.to_ascii_lowercase()),
        None => (s, "tcp".to_string()),
    };
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        bail!("{s}: protocol {proto:?} is not tcp, udp or sctp");
    }
    let (host, port) = match addr.split_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("{s}: port {p:?}"))?,
            ),
        ),
        None => (addr, None),
    };
    Ok((
        host.to_string()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s}: {host:?} is not an IPv4 address"))?,
        port,
        proto,
    ))
}

pub fn run(a: TraceArgs) -> Result<ExitCode> {
    let (dst, port, proto) = parse_target(&a.dst)?;
    let dir = crate::status::run_dir(a.run_dir, "plan.json");
    let (intent, _) = facts::read_intent(&dir)?;
    let pkt = trace::Packet {
        src: a.src,
        dst,
        proto,
        port,
    };
    let ingress = match a.arrive_on {
        Some(d) => trace::Ingress::Arrived(d),
        None => trace::Ingress::Here,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rs = trace::KernelRuleset::read();
    let t = rt.block_on(trace::walk(&intent, pkt, ingress, a.endpoint, a.ct, &rs))?;
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&[&t])?);
    } else if a.summary {
        print!("{}", trace::render_summary(&[t]));
    } else {
        print!("{}", trace::render(&[t], a.minimal));
    }
    Ok(ExitCode::SUCCESS)
}
