//! `tweed`: one binary. Invoked by a container runtime (CNI_COMMAND set) it
//! is the CNI plugin; otherwise its subcommands are the agent, the lab and
//! the tools around them.
#![forbid(unsafe_code)]

mod agent;
mod doctor;
mod status;
mod trace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tweed_lab::{probe, Lab, Topology};

#[derive(Parser)]
#[command(
    name = "tweed",
    version,
    about = "Kubernetes cluster networking: pod network, agent, lab"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent(Box<agent::AgentArgs>),
    /// Show what this node's agent reports (peers, subnet, datastore).
    Status(status::StatusArgs),
    /// Find this node's network faults: each with its evidence and the fix.
    Doctor(doctor::DoctorArgs),
    /// Walk one packet through this node's real rules and routes.
    Trace(trace::TraceArgs),
    /// A multi-node cluster in network namespaces on this machine.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// The echo server lab pods run (also the default command of tweed's
    /// image, so a pod of it answers who it is).
    Echo {
        /// Default: the hostname, which Kubernetes sets to the pod's name.
        #[arg(long, env = "POD_NAME")]
        pod: Option<String>,
        #[arg(long, env = "NODE_NAME", default_value = "")]
        node: String,
        /// Where to serve (repeatable): HTTP on TCP and echo on UDP.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Small network clients used inside lab namespaces.
    Probe {
        #[command(subcommand)]
        cmd: ProbeCmd,
    },
    /// Benchmarks (run by bench/*.sh inside a namespace of their own).
    #[command(hide = true)]
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Datastore writes (JSON on stdin, JSON on stdout); the lab runs these
    /// inside its control-plane namespace.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "http://127.0.0.1:2379",
            global = true
        )]
        etcd_endpoints: Vec<String>,
        #[arg(long, default_value = "/tweed", global = true)]
        etcd_prefix: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The agent's service proxy, in-process, against this namespace's kernel:
    /// N services × E endpoints; the first and last services' endpoints are
    /// all LISTEN (a live server) so connect() can be timed through them.
    Proxy {
        #[arg(long)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        #[arg(long, default_value = "10.244.255.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Create or update Services (a JSON list); prints [{"ok": stored} | {"error": why}].
    ApplyServices,
    /// Delete Services by "namespace/name" (a JSON list).
    DeleteServices,
    /// Write Endpoints (a JSON list).
    PutEndpoints,
    /// Print every Service.
    GetServices,
    /// Write N synthetic ClusterIP Services with E endpoints each (benchmarks only).
    #[command(hide = true)]
    BulkLoad {
        #[arg(long)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build a lab from a topology file, then print a pod-to-pod matrix.
    Up {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// Do not print the reachability matrix.
        #[arg(long)]
        no_matrix: bool,
    },
    /// Remove everything a lab made (also after a crash).
    Down {
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Nodes, leases, pods and their addresses.
    Status {
        #[arg(long, default_value = "demo")]
        name: String,
        /// `table` (default) or `json`.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Every pod to every pod over HTTP, with the client address each pod saw.
    Matrix {
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Pods: created through the real CNI plugin.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Stop or start a node's agent.
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// Make a segment's fabric drop pod-addressed traffic (`--drop true`) or
    /// pass it again, to watch the auto backend move peers to VXLAN and back.
    Fabric {
        /// The segment ("ul" for a lab with one underlay).
        #[arg(long, default_value = "ul")]
        segment: String,
        #[arg(long, action = clap::ArgAction::Set)]
        drop_pod_traffic: bool,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Stop or start the lab's etcd (to see the cluster ride out a datastore outage).
    Etcd {
        #[command(subcommand)]
        cmd: EtcdCmd,
    },
    /// Stop or start the lab's kube-apiserver (a `kubernetes: true` lab).
    Apiserver {
        #[command(subcommand)]
        cmd: EtcdCmd,
    },
    /// Real kubectl against a `kubernetes: true` lab, e.g.
    /// `tweed lab kubectl --name k8s -- get nodes -o wide`.
    Kubectl {
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Import an OCI image archive into every node's containerd (labs with
    /// kubelets; there is no registry), e.g. a re-tagged agent image.
    ImageImport {
        file: PathBuf,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Apply Deployment, Pod and Service manifests (like kubectl apply -f).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Delete what a manifest file describes.
    Delete {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Scale a Deployment: `tweed lab scale deployment/NAME --replicas N`.
    Scale {
        target: String,
        #[arg(long)]
        replicas: u32,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// `tweed doctor` on every node of the lab (or one), at once.
    Doctor {
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(long)]
        node: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Follow a packet across the lab: SRC and DST are pods, nodes, hosts or
    /// addresses; DST may carry :PORT[/PROTO].
    Trace {
        src: String,
        dst: String,
        #[arg(long, default_value = "demo")]
        name: String,
        /// Follow only this Service endpoint.
        #[arg(long)]
        endpoint: Option<std::net::Ipv4Addr>,
        /// Send a real request and check the prediction against what the echo server saw.
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        minimal: bool,
        /// One line per way the packet goes.
        #[arg(long)]
        summary: bool,
        /// `new` (default) or `established` (the NAT conntrack holds).
        #[arg(long, default_value = "new", value_parser = ["new", "established"])]
        ct: String,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Break the lab the way clusters break in the field (and mend it).
    Fault {
        #[command(subcommand)]
        cmd: FaultCmd,
    },
    /// Run a command inside a node's or pod's namespace (also: cp, underlay).
    Exec {
        #[arg(long, default_value = "demo")]
        name: String,
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Subcommand)]
enum FaultCmd {
    /// The faults a lab can inject.
    List,
    /// Inject a fault on a node (towards a peer, for faults between two nodes).
    Inject {
        fault: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        peer: Option<String>,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Undo injected faults (all, or those of one kind / on one node).
    Clear {
        fault: Option<String>,
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand)]
enum PodCmd {
    Add {
        pod: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    Del {
        pod: String,
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    Stop {
        node: String,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    Start {
        node: String,
        #[arg(long, default_value = "demo")]
        name: String,
        /// Return at once instead of waiting for the agent to reach the datastore.
        #[arg(long)]
        no_wait: bool,
    },
    Restart {
        node: String,
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand)]
enum EtcdCmd {
    Stop {
        #[arg(long, default_value = "demo")]
        name: String,
    },
    Start {
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand)]
enum ProbeCmd {
    /// GET / (or --path) and print the body.
    Http {
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 3)]
        timeout: u64,
        /// Keep retrying failed attempts for this many seconds.
        #[arg(long, default_value_t = 0)]
        retry_for: u64,
        /// Print only the number of body bytes received.
        #[arg(long)]
        count: bool,
        /// Also print `local-port N` (the connection's source port) on stderr.
        #[arg(long)]
        print_local_port: bool,
    },
    /// Wait until ADDR accepts TCP connections.
    TcpWait {
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Hold one TCP connection, one request every --interval-ms, for --duration seconds.
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds one request may take (TCP retransmitting through a path change).
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// COUNT separate connections; prints how many each pod answered (JSON).
    HttpMany {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// One UDP socket: whoami every --interval-ms for --duration s; prints who answered, one per line.
    UdpWatch {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// Time COUNT TCP handshakes to ADDR; prints {"p50us":..,"p99us":..}.
    ConnectLatency {
        addr: SocketAddr,
        #[arg(long, default_value_t = 500)]
        count: usize,
    },
    /// A link's IPv4 GSO/GRO max sizes (BIG TCP), read over netlink as
    /// JSON; `--set BYTES` sets both first (iproute2 6.1 can do neither).
    Gso {
        dev: String,
        #[arg(long)]
        set: Option<u32>,
    },
    /// Send a UDP datagram and print the reply.
    Udp {
        addr: SocketAddr,
        #[arg(long, default_value = "whoami")]
        payload: String,
        #[arg(long, default_value_t = 3)]
        timeout: u64,
        /// Keep resending from the same socket for this many seconds.
        #[arg(long, default_value_t = 0)]
        retry_for: u64,
        /// Also print `local-port N` (the socket's source port) on stderr.
        #[arg(long)]
        print_local_port: bool,
    },
}

fn main() -> ExitCode {
    // A container runtime runs plugins with CNI_COMMAND set: be the plugin.
    if std::env::var_os("CNI_COMMAND").is_some() {
        let (code, out) = tweed_cni::main_with(|k| std::env::var(k).ok(), std::io::stdin().lock());
        if !out.is_empty() {
            println!("{out}");
        }
        return ExitCode::from(code as u8);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tweed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Agent(a) => agent::run(*a)?,
        Cmd::Status(a) => status::run(a)?,
        Cmd::Doctor(a) => return doctor::run(a),
        Cmd::Trace(a) => return trace::run(a),
        Cmd::Lab { cmd } => return lab(cmd),
        Cmd::Echo {
            pod,
            node,
            listen,
            ready_file,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let pod = match pod {
                Some(p) => p,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default(),
            };
            rt.block_on(tweed_lab::echo::serve(tweed_lab::echo::EchoOpts {
                pod,
                node,
                listen,
                ready_file,
            }))?;
        }
        Cmd::Probe { cmd } => probe_cmd(cmd)?,
        Cmd::Store {
            cmd,
            etcd_endpoints,
            etcd_prefix,
        } => store_cmd(cmd, etcd_endpoints, etcd_prefix)?,
        Cmd::Bench {
            cmd:
                BenchCmd::Proxy {
                    services,
                    endpoints,
                    listen,
                },
        } => bench_proxy(services, endpoints, listen)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_matrix(lab: &Lab) -> Result<bool> {
    let m = lab.matrix()?;
    let st = lab.state()?;
    let pods: Vec<_> = st.pods.values().collect();
    let w = pods.iter().map(|p| p.name.len()).max().unwrap_or(4).max(10);
    println!("\nPod-to-pod reachability (HTTP to each pod's echo server; each cell is the client address the target saw):");
    print!("{:<w$}", "from \\ to", w = w + 2);
    for p in &pods {
        print!("  {:<16}", format!("{}@{}", p.name, p.node));
    }
    println!();
    let mut all_ok = true;
    for from in &pods {
        print!("{:<w$}", format!("{} {}", from.name, ""), w = w + 2);
        for to in &pods {
            let cell = m
                .iter()
                .find(|(f, t, _)| *f == from.name && *t == to.name)
                .map(|(_, _, r)| r);
            let text = match cell {
                Some(Ok(seen)) if seen.client == from.ip.to_string() && seen.pod == to.name => {
                    seen.client.clone()
                }
                Some(Ok(seen)) => {
                    all_ok = false;
                    format!("NAT:{}", seen.client)
                }
                _ => {
                    all_ok = false;
                    "FAIL".into()
                }
            };
            print!("  {text:<16}");
        }
        println!();
    }
    println!(
        "\n{}",
        if all_ok {
            "every pod reached every pod, and each saw the true client pod IP"
        } else {
            "SOME PATHS FAILED (see the cells above)"
        }
    );
    Ok(all_ok)
}

fn lab(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up {
            file,
            name,
            no_matrix,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("topology {}", file.display()))?;
            let topo =
                Topology::parse(&text).with_context(|| format!("topology {}", file.display()))?;
            let name = name.or(topo.name.clone()).unwrap_or_else(|| "demo".into());
            let lab = Lab::new(&name)?;
            let started = Instant::now();
            lab.up(&topo)?;
            println!(
                "lab {name} is up in {:.1} s\n",
                started.elapsed().as_secs_f64()
            );
            print!("{}", lab.status_text()?);
            if !no_matrix && !lab.state()?.pods.is_empty() && !print_matrix(&lab)? {
                return Ok(ExitCode::FAILURE);
            }
            println!("\nnext: tweed lab exec --name {name} NODE|POD -- CMD...   |   tweed lab down --name {name}");
        }
        LabCmd::Down { name } => {
            Lab::new(&name)?.down()?;
            println!("lab {name} is down");
        }
        LabCmd::Status { name, output } => {
            let lab = Lab::new(&name)?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&lab.status_json()?)?);
            } else {
                print!("{}", lab.status_text()?);
            }
        }
        LabCmd::Matrix { name } => {
            if !print_matrix(&Lab::new(&name)?)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        LabCmd::Pod {
            cmd: PodCmd::Add { pod, node, name },
        } => {
            let p = Lab::new(&name)?.pod_add(&pod, &node)?;
            println!("pod {} on {} has {}", p.name, p.node, p.ip);
        }
        LabCmd::Pod {
            cmd: PodCmd::Del { pod, name },
        } => {
            Lab::new(&name)?.pod_del(&pod)?;
            println!("pod {pod} deleted");
        }
        LabCmd::Agent { cmd } => match cmd {
            AgentCmd::Stop { node, name } => Lab::new(&name)?.agent_stop(&node)?,
            AgentCmd::Start {
                node,
                name,
                no_wait,
            } => Lab::new(&name)?.agent_start(&node, !no_wait)?,
            AgentCmd::Restart { node, name } => {
                let lab = Lab::new(&name)?;
                lab.agent_stop(&node)?;
                lab.agent_start(&node, true)?;
            }
        },
        LabCmd::Fabric {
            segment,
            drop_pod_traffic,
            name,
        } => {
            Lab::new(&name)?.fabric_drop_pod_traffic(&segment, drop_pod_traffic)?;
            println!(
                "segment {segment}: pod-addressed traffic {}",
                if drop_pod_traffic {
                    "dropped"
                } else {
                    "passed"
                }
            );
        }
        LabCmd::Apply { file, name } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("manifest {}", file.display()))?;
            for line in Lab::new(&name)?.apply(&text)? {
                println!("{line}");
            }
        }
        LabCmd::Delete { file, name } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("manifest {}", file.display()))?;
            for line in Lab::new(&name)?.delete(&text)? {
                println!("{line}");
            }
        }
        LabCmd::Scale {
            target,
            replicas,
            name,
        } => {
            let d = target
                .strip_prefix("deployment/")
                .or_else(|| target.strip_prefix("deploy/"))
                .unwrap_or(&target);
            Lab::new(&name)?.scale(d, replicas)?;
            println!("deployment/{d} scaled to {replicas}");
        }
        LabCmd::Etcd {
            cmd: EtcdCmd::Stop { name },
        } => Lab::new(&name)?.etcd_stop()?,
        LabCmd::Etcd {
            cmd: EtcdCmd::Start { name },
        } => Lab::new(&name)?.etcd_start()?,
        LabCmd::Apiserver {
            cmd: EtcdCmd::Stop { name },
        } => Lab::new(&name)?.apiserver_stop()?,
        LabCmd::Apiserver {
            cmd: EtcdCmd::Start { name },
        } => Lab::new(&name)?.apiserver_start()?,
        LabCmd::Kubectl { name, args } => {
            let lab = Lab::new(&name)?;
            let status = lab.kubectl_command(&lab.state()?)?.args(&args).status()?;
            return Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        LabCmd::ImageImport { file, name } => {
            Lab::new(&name)?.import_image(&file)?;
            println!("imported {} on every node of lab {name}", file.display());
        }
        LabCmd::Doctor { name, node, output } => {
            let report = Lab::new(&name)?.doctor(node.as_deref())?;
            return doctor::print_report(&report, &output);
        }
        LabCmd::Trace {
            src,
            dst,
            name,
            endpoint,
            verify,
            minimal,
            summary,
            ct,
            output,
        } => {
            // DST may be a name: split off :PORT/PROTO by hand.
            let (host, rest) = match dst.split_once(':') {
                Some((h, r)) => (h.to_string(), Some(r.to_string())),
                None => match dst.split_once('/') {
                    Some((h, _)) => (h.to_string(), None),
                    None => (dst.clone(), None),
                },
            };
            let (port, proto) = match rest {
                Some(r) => {
                    let (_, p, proto) = trace::parse_target(&format!("0.0.0.0:{r}"))?;
                    (p, proto)
                }
                None => (None, "tcp".to_string()),
            };
            let lab = Lab::new(&name)?;
            let opts = tweed_lab::trace::TraceOpts {
                port,
                proto,
                pin: endpoint,
                verify,
                established: ct == "established",
            };
            let t = lab.trace(&src, &host, &opts)?;
            let style = match (summary, minimal) {
                (true, _) => tweed_lab::trace::Style::Summary,
                (false, true) => tweed_lab::trace::Style::Minimal,
                (false, false) => tweed_lab::trace::Style::Tree,
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!(
                    "{}",
                    tweed_lab::trace::render_as(&t, style, &lab.address_names()?)
                );
            }
            if t.verified.as_ref().is_some_and(|v| !v.agrees) {
                return Ok(ExitCode::from(1));
            }
        }
        LabCmd::Fault { cmd } => match cmd {
            FaultCmd::List => {
                for (f, peer, how) in tweed_lab::faults::FAULTS {
                    println!("{f:<22} {:<7} {how}", if *peer { "+peer" } else { "" });
                }
            }
            FaultCmd::Inject {
                fault,
                node,
                peer,
                name,
            } => {
                let i = Lab::new(&name)?.fault_inject(&fault, &node, peer.as_deref())?;
                match &i.peer {
                    Some(p) => println!("injected {} on {} (peer {p})", i.fault, i.node),
                    None => println!("injected {} on {}", i.fault, i.node),
                }
            }
            FaultCmd::Clear { fault, node, name } => {
                for i in Lab::new(&name)?.fault_clear(fault.as_deref(), node.as_deref())? {
                    println!("cleared {} on {}", i.fault, i.node);
                }
            }
        },
        LabCmd::Exec { name, target, cmd } => {
            let ns = Lab::new(&name)?.target_ns(&target)?;
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(&cmd)
                .status()?;
            return Ok(ExitCode::from(status.code().unwrap_or(1) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_proxy(n: usize, e: usize, listen: SocketAddr) -> Result<()> {
    use tweed_model::{
        Endpoint, Endpoints, Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
    };
    let SocketAddr::V4(listen) = listen else {
        bail!("--listen must be IPv4")
    };
    let svc_ip = |i: usize| {
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
    };
    let svc = |i: usize| Service {
        namespace: "bench".into(),
        name: format!("s{i}"),
        service_type: ServiceType::ClusterIP,
        cluster_ip: Some(svc_ip(i)),
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::TCP,
            port: 80,
            target_port: Some(TargetPort::Number(8080)),
            node_port: None,
        }],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: Vec::new(),
        health_check_node_port: None,
        affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        selector: Default::default(),
    };
    let eps = |i: usize, count: usize| Endpoints {
        namespace: "bench".into(),
        name: format!("s{i}"),
        endpoints: (0..count)
            .map(|j| {
                let ip = if i == 0 || i == n - 1 {
                    *listen.ip()
                } else {
                    std::net::Ipv4Addr::from(
                        u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0))
                            + (i * e + j) as u32 % 65000,
                    )
                };
                Endpoint {
                    ip,
                    node: "bench".into(),
                    ports: [(String::new(), listen.port())].into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    pod: String::new(),
                }
            })
            .collect(),
    };
    let cfg = tweed_plan::services::ProxyConfig {
        node: "bench".into(),
        cluster_cidr: "10.244.0.0/16".parse()?,
        service_cidr: "10.96.0.0/12".parse()?,
        node_subnet: "10.244.255.0/24".parse()?,
    };
    let run_dir = std::env::temp_dir().join(format!("tweed-bench-{}", std::process::id()));
    let mut proxy = tweed_agent::Proxy::new(cfg, run_dir);
    proxy.load(
        (0..n).map(|i| (format!("bench/s{i}"), svc(i))).collect(),
        (0..n).map(|i| (format!("bench/s{i}"), eps(i, e))),
    );
    tracing::debug!(hwm_mib = tweed_agent::mem::peak_rss_mib(), "model loaded");
    let full = proxy.full_sync()?;
    // The periodic (and restarted agent's) full sync: over the table the
    // first one made, refilling it in place.
    let refull = proxy.full_sync()?;
    // Each change is made REPS times on different services; medians and maxima are reported.
    const REPS: usize = 15;
    let mut timed = |f: &mut dyn FnMut(&mut tweed_agent::Proxy, usize)| -> Result<(f64, f64)> {
        let mut ms = Vec::new();
        for r in 0..REPS {
            let t = Instant::now();
            f(&mut proxy, r);
            proxy.flush()?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok((ms[REPS / 2], ms[REPS - 1]))
    };
    let add_svc = timed(&mut |p, r| {
        p.set_service(format!("bench/s{}", n + r), Some(svc(n + r)));
        p.set_endpoints(format!("bench/s{}", n + r), Some(eps(n + r, e)));
    })?;
    let add_ep = timed(&mut |p, r| {
        p.set_endpoints(format!("bench/s{}", n / 2 + r), Some(eps(n / 2 + r, e + 1)))
    })?;
    let del_svc = timed(&mut |p, r| {
        p.set_service(format!("bench/s{}", n + r), None);
        p.set_endpoints(format!("bench/s{}", n + r), None);
    })?;
    println!(
        "{}",
        serde_json::json!({
            "services": n, "endpoints": e,
            "fullSyncMs": full.millis,
            "refullSyncMs": refull.millis,
            "addServiceMs": add_svc.0, "addServiceMaxMs": add_svc.1,
            "addEndpointMs": add_ep.0, "addEndpointMaxMs": add_ep.1,
            "delServiceMs": del_svc.0, "delServiceMaxMs": del_svc.1,
            "peakRssMiB": tweed_agent::mem::peak_rss_mib(),
            "first": format!("{}:80", svc_ip(0)), "last": format!("{}:80", svc_ip(n - 1)),
        })
    );
    Ok(())
}

fn store_cmd(cmd: StoreCmd, endpoints: Vec<String>, prefix: String) -> Result<()> {
    use std::io::Read;
    let mut input = String::new();
    if !matches!(cmd, StoreCmd::GetServices | StoreCmd::BulkLoad { .. }) {
        std::io::stdin().read_to_string(&mut input)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        let mut store = tweed_store::Store::connect(&endpoints, &prefix).await?;
        let cfg = store.config().await?.unwrap_or_default();
        Ok::<_, anyhow::Error>(match cmd {
            StoreCmd::ApplyServices => {
                let svcs: Vec<tweed_model::Service> =
                    serde_json::from_str(&input).context("services do not decode")?;
                let mut out = Vec::new();
                for s in svcs {
                    out.push(match store.apply_service(&cfg, &s).await {
                        Ok(stored) => serde_json::json!({ "ok": stored }),
                        Err(tweed_store::StoreError::Invalid { err, .. }) => {
                            serde_json::json!({ "error": err.to_string() })
                        }
                        Err(e) => return Err(e.into()),
                    });
                }
                serde_json::Value::Array(out)
            }
            StoreCmd::DeleteServices => {
                let ids: Vec<String> = serde_json::from_str(&input).context("ids do not decode")?;
                for id in &ids {
                    store.delete_service(id).await?;
                }
                serde_json::json!(ids)
            }
            StoreCmd::PutEndpoints => {
                let eps: Vec<tweed_model::Endpoints> =
                    serde_json::from_str(&input).context("endpoints do not decode")?;
                for e in &eps {
                    store.put_endpoints(e).await?;
                }
                serde_json::json!(eps.len())
            }
            StoreCmd::GetServices => serde_json::to_value(store.services().await?)?,
            StoreCmd::BulkLoad { services, endpoints } => {
                let mut kvs = Vec::with_capacity(services * 2);
                for i in 0..services {
                    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32);
                    let svc = serde_json::json!({
                        "namespace": "bench", "name": format!("s{i}"), "clusterIp": ip,
                        "ports": [{"name": "", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                    });
                    let eps: Vec<_> = (0..endpoints)
                        .map(|j| {
                            let ep = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + ((i * endpoints + j) % 65000) as u32);
                            serde_json::json!({"ip": ep, "node": "elsewhere", "ports": [["", 8080]]})
                        })
                        .collect();
                    kvs.push((format!("{}bench/s{i}", store.services_prefix()), svc.to_string().into_bytes()));
                    kvs.push((format!("{}bench/s{i}", store.endpoints_prefix()), serde_json::json!({"namespace": "bench", "name": format!("s{i}"), "endpoints": eps}).to_string().into_bytes()));
                }
                store.put_many(kvs).await?;
                serde_json::json!(services)
            }
        })
    })?;
    println!("{out}");
    Ok(())
}

fn probe_cmd(cmd: ProbeCmd) -> Result<()> {
    match cmd {
        ProbeCmd::Http {
            addr,
            path,
            timeout,
            retry_for,
            count,
            print_local_port,
        } => {
            let deadline = Instant::now() + Duration::from_secs(retry_for);
            loop {
                match probe::http_get_port(addr, &path, Duration::from_secs(timeout)) {
                    Ok((body, port)) => {
                        if print_local_port {
                            eprintln!("local-port {port}");
                        }
                        if count {
                            println!("{}", body.len());
                        } else {
                            println!("{}", String::from_utf8_lossy(&body));
                        }
                        return Ok(());
                    }
                    Err(e) if Instant::now() >= deadline => bail!("GET http://{addr}{path}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        ProbeCmd::TcpWait { addr, timeout } => probe::tcp_wait(addr, Duration::from_secs(timeout))?,
        ProbeCmd::Hold {
            addr,
            interval_ms,
            duration,
            timeout,
        } => {
            let n = probe::hold(
                addr,
                Duration::from_millis(interval_ms),
                Duration::from_secs(duration),
                Duration::from_secs(timeout),
            )?;
            println!("{n}");
        }
        ProbeCmd::ConnectLatency { addr, count } => {
            let (p50, p99) = probe::connect_latency(addr, count)?;
            println!("{}", serde_json::json!({ "p50us": p50, "p99us": p99 }));
        }
        ProbeCmd::HttpMany {
            addr,
            count,
            timeout,
        } => {
            println!(
                "{}",
                serde_json::to_string(&probe::http_many(
                    addr,
                    count,
                    Duration::from_secs(timeout)
                ))?
            );
        }
        ProbeCmd::UdpWatch {
            addr,
            interval_ms,
            duration,
        } => {
            for who in probe::udp_watch(
                addr,
                Duration::from_millis(interval_ms),
                Duration::from_secs(duration),
            )? {
                println!("{who}");
            }
        }
        ProbeCmd::Gso { dev, set } => {
            let sizes = tweed_lab::bigtcp::link_sizes(&dev, set)?;
            println!("{}", serde_json::to_string(&sizes)?);
        }
        ProbeCmd::Udp {
            addr,
            payload,
            timeout,
            retry_for,
            print_local_port,
        } => {
            let (r, port) = probe::udp_retry(
                addr,
                payload.as_bytes(),
                Duration::from_secs(timeout),
                Duration::from_secs(retry_for),
            )?;
            if print_local_port {
                eprintln!("local-port {port}");
            }
            println!("{}", String::from_utf8_lossy(&r));
        }
    }
    Ok(())
}
