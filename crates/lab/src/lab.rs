//! Building, driving and tearing down a lab.
//!
//! Every namespace of lab `L` is named `tw-L_...` (`_` cannot appear in a
//! lab name, so one lab's prefix never matches another's). Every process the
//! lab starts runs inside one of them, its PID recorded in the lab's state
//! file, and its command line carries the lab's directory, which is checked
//! before any signal is sent, so `down` never kills a recycled PID.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::echo::Seen;
use crate::manifest::{ContainerPort, Workload};
use crate::topology::{valid_name, Topology};

pub const ECHO_PORT: u16 = 8080;
const ETCD_PORT: u16 = 2379;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab name {0:?} must be 1-12 of [a-z0-9-]")]
    Name(String),
    #[error("lab {0} is already up (run `tweed lab down --name {0}` first)")]
    AlreadyUp(String),
    #[error("lab {0} is not up")]
    NotUp(String),
    #[error("`{cmd}` failed: {msg}")]
    Cmd { cmd: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} did not happen within {secs} s{hint}")]
    Timeout {
        what: String,
        secs: u64,
        hint: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI {command} for pod {pod} failed: {msg}")]
    Cni {
        command: String,
        pod: String,
        msg: String,
    },
    #[error("teardown finished with errors:\n  {}", .0.join("\n  "))]
    Teardown(Vec<String>),
    #[error("{}rejected:\n  {}", if done.is_empty() { String::new() } else { format!("applied:\n  {}\n", done.join("\n  ")) }, errors.join("\n  "))]
    Manifest {
        done: Vec<String>,
        errors: Vec<String>,
    },
}

type Result<T, E = LabError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub agent_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub node: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub echo_pid: Option<u32>,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// The workload (Deployment or Pod manifest) that owns it.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub seq: u64,
}

fn default_ns() -> String {
    "default".into()
}

/// A router running FRR (one with `bgp:`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterState {
    pub name: String,
    pub ns: String,
    pub zebra_pid: Option<u32>,
    pub bgpd_pid: Option<u32>,
    /// With `bgp.bfd`.
    #[serde(default)]
    pub bfdd_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// What a new pod is to be.
#[derive(Debug, Clone, Default)]
pub struct NewPod {
    pub name: String,
    pub node: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ContainerPort>,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub topology: Topology,
    pub ul_ns: String,
    pub cp_ns: String,
    pub cp_ip: Ipv4Addr,
    pub etcd_pid: Option<u32>,
    pub nodes: Vec<NodeState>,
    pub pods: BTreeMap<String, PodState>,
    #[serde(default)]
    pub hosts: Vec<HostState>,
    /// Routers running BGP (FRR).
    #[serde(default)]
    pub routers: Vec<RouterState>,
    #[serde(default)]
    pub workloads: BTreeMap<String, Workload>,
    /// Services as stored (with their allocated addresses).
    #[serde(default)]
    pub services: BTreeMap<String, tweed_model::Service>,
    /// Endpoints as last written.
    #[serde(default)]
    pub endpoints: BTreeMap<String, tweed_model::Endpoints>,
    #[serde(default)]
    pub seq: u64,
    /// The Kubernetes control plane (`kubernetes: true`).
    #[serde(default)]
    pub kube: Option<crate::kube_state::KubeState>,
}

impl LabState {
    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Invalid(format!("lab {} has no node {name:?}", self.name)))
    }
    pub fn etcd_url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", self.cp_ip)
    }
}

/// Run a command to completion; an error carries its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    run_with(cmd, None)
}

/// Run a command with `input` on its stdin; an error carries its stderr.
pub(crate) fn run_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    run_with(cmd, Some(input))
}

fn run_with(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let shown = format!("{cmd:?}").replace('"', "");
    let failed = |msg: String| LabError::Cmd {
        cmd: shown.clone(),
        msg,
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(input) = input {
        // A write error means the command died early; its stderr says why.
        let _ = child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Wait for `cond` with a deadline, polling every 50 ms.
pub fn wait_for(what: &str, secs: u64, hint: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if cond() {
        return Ok(());
    }
    Err(LabError::Timeout {
        what: what.into(),
        secs,
        hint: hint.into(),
    })
}

/// Is PID alive (not gone, not a zombie) and is its command line ours?
/// Is PID gone: no such process, or a zombie waiting to be reaped?
fn gone(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state is the first field after the command name in parentheses.
    matches!(
        stat.rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next()),
        Some("Z" | "X")
    )
}

/// Is PID alive and is its command line ours?
fn ours_alive(pid: u32, marker: &str) -> bool {
    !gone(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
}

/// SIGTERM, then SIGKILL after 5 s. Only for a PID whose command line
/// carries `marker`. Returns an error description if it would not die.
pub(crate) fn stop_pid(pid: u32, marker: &str) -> Option<String> {
    if !ours_alive(pid, marker) {
        return None;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    if wait_for("", 5, "", || gone(pid)).is_ok() {
        return None;
    }
    let _ = kill(p, Signal::SIGKILL);
    wait_for("", 5, "", || gone(pid))
        .err()
        .map(|_| format!("process {pid} did not exit after SIGKILL"))
}

pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    /// The `tweed` binary, run inside namespaces as agent, CNI plugin, echo server and probe.
    pub exe: PathBuf,
}

impl Lab {
    pub fn new(name: &str) -> Result<Self> {
        if !valid_name(name) || name.len() > 12 {
            return Err(LabError::Name(name.into()));
        }
        let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
        let root = std::env::var_os("TWEED_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/tweed/lab"));
        Ok(Self {
            name: name.into(),
            dir: root.join(name),
            exe,
        })
    }

    fn ns(&self, what: &str) -> String {
        format!("tw-{}_{what}", self.name)
    }
    pub fn node_ns(&self, node: &str) -> String {
        self.ns(&format!("n-{node}"))
    }
    pub fn pod_ns(&self, pod: &str) -> String {
        self.ns(&format!("p-{pod}"))
    }
    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    /// The marker every lab process carries on its command line.
    pub(crate) fn marker(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn is_up(&self) -> bool {
        self.state_path().exists()
    }

    pub fn state(&self) -> Result<LabState> {
        let p = self.state_path();
        let body = std::fs::read(&p).map_err(|_| LabError::NotUp(self.name.clone()))?;
        serde_json::from_slice(&body)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))
    }

    pub(crate) fn save(&self, st: &LabState) -> Result<()> {
        let p = self.state_path();
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).expect("json")).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    /// Serialise changes to the state between concurrent `tweed lab` calls.
    pub(crate) fn lock(&self) -> Result<Flock<File>> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let p = self.dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| LabError::Io {
            path: p,
            source: e.into(),
        })
    }

    /// Start a long-running process inside `ns`, detached, its output
    /// appended to `log`. Equivalent: `ip netns exec NS CMD... >>LOG 2>&1 &`.
    pub(crate) fn spawn_in(
        &self,
        ns: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<u32> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(log))?;
        let f2 = f.try_clone().map_err(io_err(log))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .process_group(0);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().map_err(|e| LabError::Cmd {
            cmd: format!("ip netns exec {ns} {}", program.display()),
            msg: e.to_string(),
        })?;
        Ok(child.id())
    }

    /// Run the `tweed` binary inside `ns` to completion.
    pub fn tweed_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.exe)
            .args(args))
    }

    /// Build the lab. On any failure everything built so far is removed.
    pub fn up(&self, topo: &Topology) -> Result<LabState> {
        topo.validate()
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        if self.is_up() {
            return Err(LabError::AlreadyUp(self.name.clone()));
        }
        // Leftovers of a crashed lab of the same name would make this one fail halfway.
        let stale = self.namespaces();
        if !stale.is_empty() {
            return Err(LabError::Invalid(format!(
                "namespaces of an earlier lab {} still exist ({}); run `tweed lab down --name {}`",
                self.name,
                stale.join(", "),
                self.name
            )));
        }
        let built = self.build(topo);
        if built.is_err() {
            let _ = self.down();
        }
        built
    }

    fn build(&self, topo: &Topology) -> Result<LabState> {
        let _l = self.lock()?;
        let seg_mtu = |k: usize| {
            topo.segments()[k]
                .mtu
                .unwrap_or(topo.underlay.mtu)
                .to_string()
        };
        let mut st = LabState {
            name: self.name.clone(),
            topology: topo.clone(),
            ul_ns: self.ns("ul"),
            cp_ns: self.ns("cp"),
            cp_ip: topo.cp_ip(),
            etcd_pid: None,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            hosts: Vec::new(),
            routers: Vec::new(),
            workloads: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            seq: 0,
            kube: None,
        };
        // The state file exists from the first step on, so `down` can undo a partial build.
        self.save(&st)?;

        // Underlay: one bridge per L2 segment, all in one namespace.
        let segments = topo.segments();
        ip(&["netns", "add", &st.ul_ns])?;
        ip(&["-n", &st.ul_ns, "link", "set", "lo", "up"])?;
        // A `bigTcp` segment's links get BIG TCP sizes over netlink (iproute2 6.1 cannot).
        let big_tcp = |k: usize, ns: &str, devs: &[String]| -> Result<()> {
            if !segments[k].big_tcp {
                return Ok(());
            }
            crate::bigtcp::set_sizes_in(
                &Path::new("/run/netns").join(ns),
                devs,
                crate::bigtcp::BIG_TCP_SIZE,
            )
            .map_err(|e| {
                LabError::Invalid(format!(
                    "segment {}: cannot give {} in {ns} IPv4 BIG TCP sizes (bigTcp): {e}",
                    segments[k].name,
                    devs.join(", ")
                ))
            })
        };
        for k in 0..segments.len() {
            let br = format!("br{k}");
            let mtu = seg_mtu(k);
            ip(&[
                "-n", &st.ul_ns, "link", "add", &br, "mtu", &mtu, "type", "bridge",
            ])?;
            ip(&["-n", &st.ul_ns, "link", "set", &br, "up"])?;
        }
        let ports = std::cell::Cell::new(0u32);
        // A NIC `ifname` for `ns` (created if new) on segment `seg` with `addr`.
        let attach = |ns: &str, ifname: &str, seg: &str, addr: Ipv4Addr| -> Result<()> {
            if !Path::new("/run/netns").join(ns).exists() {
                ip(&["netns", "add", ns])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            let k = segments
                .iter()
                .position(|s| s.name == seg)
                .expect("validated");
            // Named for the segment, so the fabric can tell its segments apart.
            let port = format!("s{k}p{}", ports.get());
            ports.set(ports.get() + 1);
            // Born in the underlay namespace with its peer born in `ns`: never in the root namespace.
            let mtu = seg_mtu(k);
            ip(&[
                "-n", &st.ul_ns, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name",
                ifname, "netns", ns, "mtu", &mtu,
            ])?;
            big_tcp(k, ns, &[ifname.to_string()])?;
            ip(&[
                "-n",
                &st.ul_ns,
                "link",
                "set",
                &port,
                "master",
                &format!("br{k}"),
                "up",
            ])?;
            // The bridge takes sizes up to what its ports allow, so it
            // follows each new port (a bridge with no ports refuses them).
            big_tcp(k, &st.ul_ns, &[port.clone(), format!("br{k}")])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{}", segments[k].cidr.prefix_len()),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            Ok(())
        };
        let default_via = |ns: &str, seg: &str| -> Result<()> {
            if let Some(gw) = topo.gateway(seg) {
                ip(&["-n", ns, "route", "add", "default", "via", &gw.to_string()])?;
            }
            Ok(())
        };

        // Routers: a leg on each of their segments, forwarding on, routes to
        // segments one router away.
        for (r, spec) in topo.routers.iter().enumerate() {
            let ns = self.ns(&format!("r-{}", spec.name));
            for (j, seg) in spec.segments.iter().enumerate() {
                attach(&ns, &format!("eth{j}"), seg, topo.router_ip(r, seg))?;
            }
            ip(&[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            for seg in segments.iter().filter(|s| !spec.segments.contains(&s.name)) {
                let via = topo.routers.iter().enumerate().find_map(|(r2, other)| {
                    let shared = other.segments.iter().find(|t| spec.segments.contains(t))?;
                    other
                        .segments
                        .contains(&seg.name)
                        .then(|| topo.router_ip(r2, shared))
                });
                if let Some(via) = via {
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        &seg.cidr.trunc().to_string(),
                        "via",
                        &via.to_string(),
                    ])?;
                }
            }
        }
        // BGP routers: FRR, once every router has its legs (so each
        // finds its neighbours' addresses on the wire).
        for (r, spec) in topo.routers.iter().enumerate() {
            if spec.bgp.is_none() {
                continue;
            }
            self.frr_prepare(topo, r)?;
            st.routers.push(RouterState {
                name: spec.name.clone(),
                ns: self.router_ns(&spec.name),
                zebra_pid: None,
                bgpd_pid: None,
                bfdd_pid: None,
            });
            let k = st.routers.len() - 1;
            // zebra first: bgpd hands it the routes it selects.
            st.routers[k].zebra_pid = Some(self.frr_spawn(&spec.name, "zebra")?);
            self.save(&st)?;
            self.frr_wait(&spec.name, "zebra")?;
            // bfdd before bgpd: bgpd registers its BFD peers with it.
            if crate::frr::render_bfdd(spec).is_some() {
                st.routers[k].bfdd_pid = Some(self.frr_spawn(&spec.name, "bfdd")?);
                self.save(&st)?;
                self.frr_wait(&spec.name, "bfdd")?;
            }
            st.routers[k].bgpd_pid = Some(self.frr_spawn(&spec.name, "bgpd")?);
            self.save(&st)?;
            self.frr_wait(&spec.name, "bgpd")?;
        }
        self.wait_router_sessions(topo, 30)?;

        // Control plane: etcd.
        attach(&st.cp_ns, "eth0", &segments[0].name, st.cp_ip)?;
        default_via(&st.cp_ns, &segments[0].name)?;
        st.etcd_pid = Some(self.spawn_etcd(&st)?);
        self.save(&st)?;
        self.wait_etcd(&st)?;

        let cfg_path = self.dir.join("cluster.json");
        std::fs::write(
            &cfg_path,
            serde_json::to_vec_pretty(&topo.cluster).expect("json"),
        )
        .map_err(io_err(&cfg_path))?;

        // Nodes, each with its agent.
        for (i, n) in topo.nodes.iter().enumerate() {
            let node = NodeState {
                name: n.name.clone(),
                ns: self.node_ns(&n.name),
                ip: topo.node_ip(i),
                agent_pid: None,
            };
            st.nodes.push(node.clone());
            self.save(&st)?;
            let segs = topo.node_segments(i);
            for (j, seg) in segs.iter().enumerate() {
                attach(&node.ns, &format!("eth{j}"), seg, topo.node_ip_on(i, seg))?;
            }
            default_via(&node.ns, &segs[0])?;
            if let Some(public) = n.public_ip {
                self.nat(topo, &segs[0], public, node.ip)?;
            }
            std::fs::create_dir_all(self.node_dir(&n.name))
                .map_err(io_err(&self.node_dir(&n.name)))?;
        }
        if topo.kubernetes {
            // On a copy: `attach` above still borrows parts of `st`.
            let mut with = st.clone();
            self.kube_up(&mut with)?;
            st.kube = with.kube;
        }
        let kubelet = topo.kubelet.clone();
        if kubelet.is_some() {
            // On a copy, as above.
            let mut with = st.clone();
            for i in 0..with.nodes.len() {
                let (name, ip) = (with.nodes[i].name.clone(), with.nodes[i].ip);
                self.kubelet_up(&mut with, &name, ip)?;
                st.kube = with.kube.clone();
            }
            for n in &st.nodes {
                wait_for(
                    &format!("the kubelet on {} to register its Node", n.name),
                    60,
                    &format!(
                        "; see {}",
                        self.node_dir(&n.name).join("k/kubelet.log").display()
                    ),
                    || self.kubectl(&st, &["get", "node", &n.name], None).is_ok(),
                )?;
            }
        }
        if kubelet
            .as_ref()
            .is_some_and(|k| k.agent == crate::topology::AgentMode::DaemonSet)
        {
            self.kube_apply_deploy(&st, true)?;
        } else {
            for i in 0..st.nodes.len() {
                let pid = self.start_agent(&st, &st.nodes[i].name)?;
                st.nodes[i].agent_pid = Some(pid);
                self.save(&st)?;
            }
        }
        for (i, h) in topo.hosts.iter().enumerate() {
            let host = HostState {
                name: h.name.clone(),
                ns: self.ns(&format!("h-{}", h.name)),
                ip: topo.host_ip(i),
            };
            st.hosts.push(host.clone());
            self.save(&st)?;
            attach(&host.ns, "eth0", &topo.host_segment(i), host.ip)?;
            default_via(&host.ns, &topo.host_segment(i))?;
        }
        for n in &st.nodes {
            self.wait_node_ready(&n.name, 90)?;
        }
        self.wait_paths_settled(&st, 30)?;
        if kubelet.is_some() {
            // The runtime reports the network ready once it has read the conflist.
            self.kubectl(
                &st,
                &[
                    "wait",
                    "--for=condition=Ready",
                    "node",
                    "--all",
                    "--timeout=90s",
                ],
                None,
            )?;
        }
        for p in &topo.pods {
            let spec = NewPod {
                name: p.name.clone(),
                node: p.node.clone(),
                namespace: "default".into(),
                ..Default::default()
            };
            self.pod_add_locked(&mut st, spec)?;
        }
        drop(_l);
        self.state()
    }

    fn spawn_etcd(&self, st: &LabState) -> Result<u32> {
        let etcd_dir = self.dir.join("etcd");
        let url = st.etcd_url();
        let peer = "http://127.0.0.1:2380".to_string();
        self.spawn_in(
            &st.cp_ns,
            Path::new("etcd"),
            &[
                "--name".into(),
                "tweed-lab".into(),
                "--data-dir".into(),
                etcd_dir.display().to_string(),
                "--listen-client-urls".into(),
                url.clone(),
                "--advertise-client-urls".into(),
                url,
                "--listen-peer-urls".into(),
                peer.clone(),
                "--initial-advertise-peer-urls".into(),
                peer.clone(),
                "--initial-cluster".into(),
                format!("tweed-lab={peer}"),
                "--initial-cluster-state".into(),
                "new".into(),
            ],
            &self.dir.join("etcd.log"),
            &[],
        )
    }

    fn wait_etcd(&self, st: &LabState) -> Result<()> {
        let etcd_addr = format!("{}:{ETCD_PORT}", st.cp_ip);
        self.tweed_in(
            &st.cp_ns,
            &["probe", "tcp-wait", &etcd_addr, "--timeout", "30"],
        )
        .map(|_| ())
        .map_err(|e| {
            LabError::Invalid(format!(
                "etcd did not start (see {}): {e}",
                self.dir.join("etcd.log").display()
            ))
        })
    }

    /// Make segment `seg`'s fabric drop (or stop dropping) frames whose IPv4
    /// destination is a pod address, as cloud networks with destination
    /// checks and filtering switches do. Tunnelled traffic (addressed to
    /// nodes) passes. Equivalent: in the underlay namespace,
    /// `nft add rule bridge lab-fabric forward iifname "sKp*" ip daddr CLUSTER_CIDR drop`.
    pub fn fabric_drop_pod_traffic(&self, seg: &str, drop: bool) -> Result<()> {
        let st = self.state()?;
        let k = st
            .topology
            .segments()
            .iter()
            .position(|s| s.name == seg)
            .ok_or_else(|| {
                LabError::Invalid(format!("lab {} has no segment {seg:?}", self.name))
            })?;
        let table = format!("lab-fabric-br{k}");
        let script = if drop {
            format!(
                "table bridge {table} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"s{k}p*\" ip daddr {} drop\n  }}\n}}\n",
                st.topology.cluster.cluster_cidr.trunc()
            )
        } else {
            format!("add table bridge {table}\ndelete table bridge {table}\n")
        };
        run_stdin(
            Command::new("ip").args(["netns", "exec", &st.ul_ns, "nft", "-f", "-"]),
            &script,
        )
        .map(|_| ())
    }

    /// Stop the lab's etcd (the datastore vanishing), keeping its data.
    pub fn etcd_stop(&self) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        if let Some(pid) = st.etcd_pid.take() {
            if let Some(e) = stop_pid(pid, &self.marker()) {
                return Err(LabError::Invalid(e));
            }
        }
        self.save(&st)
    }

    /// Start the lab's etcd again on the same data.
    pub fn etcd_start(&self) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        if st.etcd_pid.is_some_and(|p| ours_alive(p, &self.marker())) {
            return Err(LabError::Invalid("etcd is already running".into()));
        }
        st.etcd_pid = Some(self.spawn_etcd(&st)?);
        self.save(&st)?;
        self.wait_etcd(&st)
    }

    /// 1:1 NAT on the router of `seg`: `public` is `private` to everyone
    /// else, and the private address takes no new connection that was not
    /// addressed to the public one (as in a cloud VPC). Equivalent: `nft -f`
    /// of a small table of the lab's own inside the router namespace.
    fn nat(&self, topo: &Topology, seg: &str, public: Ipv4Addr, private: Ipv4Addr) -> Result<()> {
        let r = topo
            .routers
            .iter()
            .position(|r| r.segments.iter().any(|s| s == seg))
            .expect("validated");
        let ns = self.ns(&format!("r-{}", topo.routers[r].name));
        let table = format!("lab-nat-{}", u32::from(private));
        let script = format!(
            "table ip {table} {{
  chain pre {{ type nat hook prerouting priority -100; policy accept; ip daddr {public} dnat to {private}; }}
  chain post {{ type nat hook postrouting priority 100; policy accept; ip saddr {private} snat to {public}; }}
  chain isolate {{ type filter hook forward priority 0; policy accept; ip daddr {private} ct state new ct status & dnat == 0 drop; }}
}}
"
        );
        run_stdin(
            Command::new("ip").args(["netns", "exec", &ns, "nft", "-f", "-"]),
            &script,
        )?;
        // Other routers that share a segment with this one send the public address to it.
        for other in topo
            .routers
            .iter()
            .filter(|o| o.name != topo.routers[r].name)
        {
            if let Some(shared) = other
                .segments
                .iter()
                .find(|t| topo.routers[r].segments.contains(t))
            {
                let via = topo.router_ip(r, shared).to_string();
                ip(&[
                    "-n",
                    &self.ns(&format!("r-{}", other.name)),
                    "route",
                    "add",
                    &format!("{public}/32"),
                    "via",
                    &via,
                ])?;
            }
        }
        Ok(())
    }

    fn agent_args(&self, st: &LabState, node: &str) -> Vec<String> {
        let d = self.node_dir(node);
        let mut args: Vec<String> = vec!["agent".into(), "--node-name".into(), node.into()];
        if st.kube.is_some() {
            args.extend([
                "--datastore=kubernetes".into(),
                format!("--kubeconfig={}", d.join("kubeconfig").display()),
            ]);
        } else {
            args.extend([
                "--datastore=etcd".into(),
                "--etcd-endpoints".into(),
                st.etcd_url(),
            ]);
        }
        args.extend([
            "--cni-conf-dir".into(),
            d.join("net.d").display().to_string(),
            "--run-dir".into(),
            d.join("run").display().to_string(),
            "--data-dir".into(),
            d.join("data").display().to_string(),
            "--lease-ttl".into(),
            st.topology.agent.lease_ttl.to_string(),
            "--resync".into(),
            st.topology.agent.resync.to_string(),
            "--cluster-config".into(),
            self.dir.join("cluster.json").display().to_string(),
        ]);
        if st.topology.kubelet.is_some() {
            // The runtime runs the plugin from the node's /opt/cni/bin.
            args.push("--cni-bin-dir".into());
            args.push(
                self.node_dir(node)
                    .join("k/opt/cni/bin")
                    .display()
                    .to_string(),
            );
        }
        let spec = st.topology.nodes.iter().find(|n| n.name == node);
        args.push("--underlay".into());
        args.push(
            spec.and_then(|n| n.underlay.clone())
                .unwrap_or_else(|| "interface=eth0".into()),
        );
        if let Some(public) = spec.and_then(|n| n.public_ip) {
            args.push("--public-ip".into());
            args.push(public.to_string());
        }
        if st.topology.cluster.bgp.is_some() {
            args.extend(self.bgp_args(&st.topology, node));
        }
        args
    }

    /// A node's BGP flags: its own AS if the topology gives one, and its
    /// peers (by default every BGP router on its first segment: its ToR).
    fn bgp_args(&self, topo: &Topology, node: &str) -> Vec<String> {
        let Some(i) = topo.nodes.iter().position(|n| n.name == node) else {
            return Vec::new();
        };
        let spec = topo.nodes[i].bgp.clone().unwrap_or_default();
        let mut args = Vec::new();
        if let Some(asn) = spec.asn {
            args.push(format!("--bgp-asn={asn}"));
        }
        let peers = spec.peers.unwrap_or_else(|| {
            let seg = topo.node_segments(i).into_iter().next().unwrap_or_default();
            topo.routers
                .iter()
                .enumerate()
                .filter(|(_, r)| r.segments.contains(&seg))
                .filter_map(|(r, spec)| {
                    let asn = spec.bgp.as_ref()?.asn;
                    Some(format!("{}:{asn}", topo.router_ip(r, &seg)))
                })
                .collect()
        });
        for p in peers {
            args.push(format!("--bgp-peer={p}"));
        }
        args
    }

    fn start_agent(&self, st: &LabState, node: &str) -> Result<u32> {
        let ns = st.node(node)?.ns.clone();
        let log = self.node_dir(node).join("agent.log");
        // TWEED_LAB_AGENT_LOG (a RUST_LOG filter) for a closer look, e.g.
        // `info,tweed_agent=debug` logs the agent's peak memory per step.
        let filter = std::env::var("TWEED_LAB_AGENT_LOG").unwrap_or_else(|_| "info".into());
        self.spawn_in(
            &ns,
            &self.exe,
            &self.agent_args(st, node),
            &log,
            &[("RUST_LOG", filter.as_str())],
        )
    }

    pub fn conflist_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("net.d").join("10-tweed.conflist")
    }

    fn wait_node_ready(&self, node: &str, secs: u64) -> Result<()> {
        let p = self.conflist_path(node);
        let log = self.node_dir(node).join("agent.log");
        wait_for(
            &format!("node {node} ready ({} written)", p.display()),
            secs,
            &format!("; see {}", log.display()),
            || p.exists(),
        )
    }

    /// Wait until every agent has seen every other node and none is about
    /// to probe a peer again (`probing` in status.json): until then a
    /// peer's mode (direct or VXLAN) may still change under a test.
    fn wait_paths_settled(&self, st: &LabState, secs: u64) -> Result<()> {
        let others = st.nodes.len().saturating_sub(1);
        wait_for("every node's peer paths to settle", secs, "", || {
            st.nodes.iter().all(|n| {
                std::fs::read(self.agent_status_path(st, &n.name))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| {
                        v["peers"].as_array().map_or(0, |p| p.len()) == others
                            && v["probing"] != true
                    })
            })
        })
    }

    /// Stop a node's agent (SIGTERM); its data plane stays.
    pub fn agent_stop(&self, node: &str) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        let n = st
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .ok_or_else(|| LabError::Invalid(format!("no node {node:?}")))?;
        if let Some(pid) = n.agent_pid.take() {
            if let Some(e) = stop_pid(pid, &self.marker()) {
                return Err(LabError::Invalid(e));
            }
        }
        self.save(&st)
    }

    /// Start a node's agent again and, if `wait`, wait until it has
    /// reconnected to the datastore.
    pub fn agent_start(&self, node: &str, wait: bool) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        if st
            .node(node)?
            .agent_pid
            .is_some_and(|p| ours_alive(p, &self.marker()))
        {
            return Err(LabError::Invalid(format!(
                "the agent on {node} is already running"
            )));
        }
        let pid = self.start_agent(&st, node)?;
        st.nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("checked")
            .agent_pid = Some(pid);
        self.save(&st)?;
        if !wait {
            return Ok(());
        }
        let status = self.node_dir(node).join("run").join("status.json");
        let since = std::time::SystemTime::now();
        wait_for(&format!("agent on {node} to reconnect"), 30, "", || {
            std::fs::metadata(&status)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
                && std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"connected\""))
        })
    }

    /// The plugin config a runtime would pass for the node's network: the
    /// conflist's plugin entry with the list's name and version added. The
    /// lab acts as a CNI 1.1 runtime: the highest of `cniVersions` wins.
    pub fn plugin_conf(&self, node: &str) -> Result<String> {
        let p = self.conflist_path(node);
        let body = std::fs::read(&p).map_err(|_| {
            LabError::Invalid(format!(
                "cni plugin not initialized on node {node} ({} missing)",
                p.display()
            ))
        })?;
        let list: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))?;
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersions"]
            .as_array()
            .and_then(|v| v.last())
            .unwrap_or(&list["cniVersion"])
            .clone();
        Ok(conf.to_string())
    }

    /// Invoke the CNI plugin inside a node's namespace exactly as a runtime
    /// does: CNI_* in the environment, the config on stdin. Returns (exit
    /// status success, stdout).
    pub fn cni(
        &self,
        node_ns: &str,
        command: &str,
        container_id: &str,
        netns: Option<&str>,
        ifname: &str,
        conf: &str,
    ) -> Result<(bool, String)> {
        use std::io::Write;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", node_ns]).arg(&self.exe);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", self.exe.parent().unwrap_or(Path::new("/")));
        if let Some(n) = netns {
            c.env("CNI_NETNS", n);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::Cmd {
                cmd: format!("CNI {command}"),
                msg: e.to_string(),
            })?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.as_bytes())
            .map_err(io_err(Path::new("cni stdin")))?;
        let out = child.wait_with_output().map_err(|e| LabError::Cmd {
            cmd: format!("CNI {command}"),
            msg: e.to_string(),
        })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        ))
    }

    /// Create a pod on `node`: its namespace, its wiring through the CNI
    /// plugin, and its echo server.
    pub fn pod_add(&self, pod: &str, node: &str) -> Result<PodState> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        self.pod_add_locked(
            &mut st,
            NewPod {
                name: pod.into(),
                node: node.into(),
                namespace: "default".into(),
                ..Default::default()
            },
        )
    }

    /// [`Lab::pod_add`] with the lab's lock already held; saves the state.
    pub(crate) fn pod_add_locked(&self, st: &mut LabState, spec: NewPod) -> Result<PodState> {
        let pod = spec.name.as_str();
        if !valid_name(pod) {
            return Err(LabError::Invalid(format!(
                "pod name {pod:?} must be 1-40 of [a-z0-9-]"
            )));
        }
        if st.pods.contains_key(pod) {
            return Err(LabError::Invalid(format!("pod {pod} exists")));
        }
        let node_ns = st.node(&spec.node)?.ns.clone();
        let mut conf: serde_json::Value =
            serde_json::from_str(&self.plugin_conf(&spec.node)?).expect("json");
        // The runtime's part of the portMappings capability.
        let maps: Vec<serde_json::Value> = spec
            .ports
            .iter()
            .filter_map(|p| p.host_port.map(|h| serde_json::json!({"hostPort": h, "containerPort": p.port, "protocol": p.protocol.nft()})))
            .collect();
        if !maps.is_empty() {
            conf["runtimeConfig"] = serde_json::json!({ "portMappings": maps });
        }
        let conf = conf.to_string();
        let ns = self.pod_ns(pod);
        ip(&["netns", "add", &ns])?;
        let netns = format!("/run/netns/{ns}");
        let cid = format!("{}-{pod}", self.name);
        let undo = |why: LabError| -> LabError {
            let _ = self.cni(&node_ns, "DEL", &cid, Some(&netns), "eth0", &conf);
            let _ = ip(&["netns", "del", &ns]);
            why
        };
        let (ok, out) = self
            .cni(&node_ns, "ADD", &cid, Some(&netns), "eth0", &conf)
            .map_err(undo)?;
        if !ok {
            return Err(undo(LabError::Cni {
                command: "ADD".into(),
                pod: pod.into(),
                msg: out,
            }));
        }
        let res: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
            undo(LabError::Invalid(format!(
                "CNI result does not decode: {e}: {out}"
            )))
        })?;
        let addr = res["ips"][0]["address"].as_str().unwrap_or_default();
        let pod_ip: Ipv4Addr =
            addr.split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|_| {
                    undo(LabError::Invalid(format!(
                        "CNI result has no address: {out}"
                    )))
                })?;
        let pods_dir = self.dir.join("pods");
        std::fs::create_dir_all(&pods_dir).map_err(io_err(&pods_dir))?;
        let ready = pods_dir.join(format!("{pod}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut args: Vec<String> = vec![
            "echo".into(),
            "--pod".into(),
            pod.into(),
            "--node".into(),
            spec.node.clone(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let mut listen: Vec<u16> = spec.ports.iter().map(|p| p.port).collect();
        listen.sort();
        listen.dedup();
        if listen.is_empty() {
            listen.push(ECHO_PORT);
        }
        for p in listen {
            args.push("--listen".into());
            args.push(format!("0.0.0.0:{p}"));
        }
        let pid = self
            .spawn_in(
                &ns,
                &self.exe,
                &args,
                &pods_dir.join(format!("{pod}.log")),
                &[],
            )
            .map_err(undo)?;
        st.seq += 1;
        let ps = PodState {
            name: pod.into(),
            node: spec.node.clone(),
            ns,
            ip: pod_ip,
            echo_pid: Some(pid),
            namespace: spec.namespace.clone(),
            labels: spec.labels.clone(),
            ports: spec.ports.clone(),
            owner: spec.owner.clone(),
            seq: st.seq,
        };
        st.pods.insert(pod.into(), ps.clone());
        self.save(st)?;
        wait_for(&format!("echo server in pod {pod}"), 10, "", || {
            ready.exists()
        })?;
        Ok(ps)
    }

    /// Delete a pod: its echo server, its wiring (CNI DEL), its namespace.
    pub fn pod_del(&self, pod: &str) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        self.pod_del_locked(&mut st, pod)
    }

    pub(crate) fn pod_del_locked(&self, st: &mut LabState, pod: &str) -> Result<()> {
        let p = st
            .pods
            .get(pod)
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("no pod {pod:?}")))?;
        let mut errs = Vec::new();
        if let Some(pid) = p.echo_pid {
            errs.extend(stop_pid(pid, &self.marker()));
        }
        let node_ns = st.node(&p.node)?.ns.clone();
        match self.plugin_conf(&p.node).and_then(|conf| {
            self.cni(
                &node_ns,
                "DEL",
                &format!("{}-{pod}", self.name),
                Some(&format!("/run/netns/{}", p.ns)),
                "eth0",
                &conf,
            )
        }) {
            Ok((true, _)) => {}
            Ok((false, out)) => errs.push(format!("CNI DEL: {out}")),
            Err(e) => errs.push(e.to_string()),
        }
        if let Err(e) = ip(&["netns", "del", &p.ns]) {
            errs.push(e.to_string());
        }
        st.pods.remove(pod);
        self.save(st)?;
        if errs.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown(errs))
        }
    }

    /// The namespace a lab target lives in: a node, a pod, `cp` or `underlay`.
    pub fn target_ns(&self, target: &str) -> Result<String> {
        let st = self.state()?;
        if let Some(p) = st.pods.get(target) {
            return Ok(p.ns.clone());
        }
        if let Ok(n) = st.node(target) {
            return Ok(n.ns.clone());
        }
        if let Some(h) = st.hosts.iter().find(|h| h.name == target) {
            return Ok(h.ns.clone());
        }
        match target {
            "cp" => Ok(st.cp_ns),
            "underlay" => Ok(st.ul_ns),
            _ => Err(LabError::Invalid(format!(
                "lab {} has no node or pod {target:?} (also: cp, underlay)",
                self.name
            ))),
        }
    }

    /// Every namespace of this lab that exists now.
    pub fn namespaces(&self) -> Vec<String> {
        let prefix = format!("tw-{}_", self.name);
        let mut out: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Remove everything the lab made. Works from the state file and, for
    /// what a crash left unrecorded, from the lab's namespace prefix; every
    /// step is attempted and every failure reported.
    pub fn down(&self) -> Result<()> {
        let mut errs = Vec::new();
        let marker = self.marker();
        // Kubelets first: nothing may restart the pods killed next.
        errs.extend(self.kubelets_down(self.state().ok().as_ref()));
        if let Ok(st) = self.state() {
            let pids = st
                .pods
                .values()
                .filter_map(|p| p.echo_pid)
                .chain(st.nodes.iter().filter_map(|n| n.agent_pid))
                .chain(st.kube.iter().flat_map(|k| k.pids()))
                .chain(
                    st.routers
                        .iter()
                        .flat_map(|r| [r.bgpd_pid, r.bfdd_pid, r.zebra_pid])
                        .flatten(),
                )
                .chain(st.etcd_pid);
            for pid in pids {
                errs.extend(stop_pid(pid, &marker));
            }
        }
        for ns in self.namespaces() {
            // Anything still running in our namespace is ours (a crash may
            // have lost its PID); ask the kernel which PIDs those are.
            if let Ok(out) = ip(&["netns", "pids", &ns]) {
                for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                    let p = Pid::from_raw(pid as i32);
                    let _ = kill(p, Signal::SIGKILL);
                    if wait_for("", 5, "", || gone(pid)).is_err() {
                        errs.push(format!("process {pid} in {ns} did not exit"));
                    }
                }
            }
            if let Err(e) = ip(&["netns", "del", &ns]) {
                errs.push(e.to_string());
            }
        }
        errs.extend(self.remove_cgroups());
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                errs.push(format!("{}: {e}", self.dir.display()));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown(errs))
        }
    }

    /// GET the echo server of `to` from inside `from_ns`, retrying for up to
    /// `secs` (routes to a new node take a moment to propagate).
    pub fn http_from(&self, from_ns: &str, to: Ipv4Addr, secs: u64) -> Result<Seen> {
        let addr = SocketAddr::from((to, ECHO_PORT)).to_string();
        let out = self.tweed_in(
            from_ns,
            &["probe", "http", &addr, "--retry-for", &secs.to_string()],
        )?;
        serde_json::from_str(&out)
            .map_err(|e| LabError::Invalid(format!("echo answer does not decode: {e}: {out}")))
    }

    /// Every pod to every pod over HTTP: (from, to, result).
    pub fn matrix(&self) -> Result<Vec<(String, String, Result<Seen>)>> {
        let st = self.state()?;
        let mut out = Vec::new();
        for from in st.pods.values() {
            for to in st.pods.values() {
                out.push((
                    from.name.clone(),
                    to.name.clone(),
                    self.http_from(&from.ns, to.ip, 5),
                ));
            }
        }
        Ok(out)
    }

    /// Are the agents the DaemonSet's pods (not lab processes)?
    pub fn agents_are_pods(&self, st: &LabState) -> bool {
        st.topology
            .kubelet
            .as_ref()
            .is_some_and(|k| k.agent == crate::topology::AgentMode::DaemonSet)
    }

    /// Where a node's agent writes its status: the lab's run directory, or
    /// for a DaemonSet pod `/run/tweed` in the node's own mount namespace
    /// (seen through its containerd's `/proc/PID/root`).
    /// The directory a node's agent writes status.json and plan.json to.
    pub fn agent_run_dir(&self, st: &LabState, node: &str) -> PathBuf {
        let status = self.agent_status_path(st, node);
        status
            .parent()
            .expect("a file in a directory")
            .to_path_buf()
    }

    pub fn agent_status_path(&self, st: &LabState, node: &str) -> PathBuf {
        let pod_run = self.agents_are_pods(st).then(|| {
            st.kube
                .as_ref()
                .and_then(|k| k.kubelets.get(node))
                .and_then(|r| r.containerd_pid)
        });
        match pod_run.flatten() {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/root/run/tweed/status.json")),
            None => self.node_dir(node).join("run/status.json"),
        }
    }

    /// What `tweed lab status -o json` prints: the same facts as
    /// [`Lab::status_text`], for scripts.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        use serde_json::json;
        let mut st = self.state()?;
        self.kube_refresh_load_balancers(&mut st);
        let etcd = st.etcd_pid.is_some_and(|p| ours_alive(p, &self.marker()));
        let nodes: Vec<_> = st
            .nodes
            .iter()
            .map(|n| {
                let (status, agent) = self.node_agent(&st, n);
                json!({
                    "name": n.name, "underlay": n.ip, "subnet": status["subnet"],
                    "agent": agent, "datastore": status["datastore"],
                })
            })
            .collect();
        let pods: Vec<_> = st
            .pods
            .values()
            .map(|p| {
                let alive = p.echo_pid.is_some_and(|pid| ours_alive(pid, &self.marker()));
                json!({"name": p.name, "node": p.node, "ip": p.ip, "echo": if alive { "running" } else { "down" }})
            })
            .collect();
        let hosts: Vec<_> = st
            .hosts
            .iter()
            .map(|h| json!({"name": h.name, "underlay": h.ip}))
            .collect();
        let routers: Vec<_> = st
            .topology
            .routers
            .iter()
            .enumerate()
            .map(|(r, spec)| {
                let legs: serde_json::Map<String, serde_json::Value> = spec
                    .segments
                    .iter()
                    .map(|g| (g.clone(), json!(st.topology.router_ip(r, g))))
                    .collect();
                let bgp = spec.bgp.as_ref().map(|b| {
                    let peers = self.router_bgp_peers(&spec.name).ok();
                    let bfd = b
                        .bfd
                        .and_then(|_| self.router_bfd_peers(&spec.name).ok());
                    json!({
                        "asn": b.asn,
                        "peers": peers.as_ref().map(|p| p.len()),
                        "established": peers.as_ref().map(|p| p.iter().filter(|p| p.established()).count()),
                        "bfd": bfd.map(|p| p.into_iter().map(|(a, s)| json!({"peer": a, "status": s})).collect::<Vec<_>>()),
                    })
                });
                json!({"name": spec.name, "segments": legs, "bgp": bgp})
            })
            .collect();
        let services: Vec<_> = st
            .services
            .iter()
            .map(|(id, svc)| {
                json!({
                    "id": id, "type": format!("{:?}", svc.service_type),
                    "clusterIp": svc.cluster_ip, "externalIps": svc.external_ips,
                    "loadBalancerIps": svc.load_balancer_ips,
                    "healthCheckNodePort": svc.health_check_node_port,
                    "ports": svc.ports_text(), "endpoints": self.endpoint_pods(&st, id),
                })
            })
            .collect();
        Ok(json!({
            "name": st.name,
            "etcd": {"url": st.etcd_url(), "running": etcd},
            "nodes": nodes, "pods": pods, "hosts": hosts, "routers": routers, "services": services,
        }))
    }

    /// A node's agent status file and whether its agent runs (a process
    /// of the lab's, or a pod that has written its status).
    fn node_agent(&self, st: &LabState, n: &NodeState) -> (serde_json::Value, &'static str) {
        let status: serde_json::Value = std::fs::read(self.agent_status_path(st, &n.name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let alive = n.agent_pid.is_some_and(|p| ours_alive(p, &self.marker()));
        let alive = alive || (self.agents_are_pods(st) && !status.is_null());
        let agent = match (alive, self.agents_are_pods(st)) {
            (true, true) => "pod",
            (true, false) => "running",
            (false, _) => "stopped",
        };
        (status, agent)
    }

    fn endpoint_pods(&self, st: &LabState, id: &str) -> Vec<String> {
        st.endpoints
            .get(id)
            .map(|e| e.endpoints.iter().map(|e| e.pod.clone()).collect())
            .unwrap_or_default()
    }

    pub fn status_text(&self) -> Result<String> {
        use std::fmt::Write;
        let mut st = self.state()?;
        self.kube_refresh_load_balancers(&mut st);
        let mut s = String::new();
        let etcd = st.etcd_pid.is_some_and(|p| ours_alive(p, &self.marker()));
        let _ = writeln!(
            s,
            "lab {}  etcd {} ({})",
            st.name,
            st.etcd_url(),
            if etcd { "running" } else { "DOWN" }
        );
        let _ = writeln!(
            s,
            "\n{:<12} {:<16} {:<18} {:<8} DATASTORE",
            "NODE", "UNDERLAY", "SUBNET", "AGENT"
        );
        for n in &st.nodes {
            let (status, agent) = self.node_agent(&st, n);
            let _ = writeln!(
                s,
                "{:<12} {:<16} {:<18} {:<8} {}",
                n.name,
                n.ip,
                status["subnet"].as_str().unwrap_or("-"),
                agent,
                status["datastore"].as_str().unwrap_or("-"),
            );
        }
        let _ = writeln!(s, "\n{:<20} {:<12} {:<16} ECHO", "POD", "NODE", "IP");
        for p in st.pods.values() {
            let alive = p
                .echo_pid
                .is_some_and(|pid| ours_alive(pid, &self.marker()));
            let _ = writeln!(
                s,
                "{:<20} {:<12} {:<16} {}",
                p.name,
                p.node,
                p.ip,
                if alive { "running" } else { "DOWN" }
            );
        }
        if !st.hosts.is_empty() {
            let _ = writeln!(s, "\n{:<20} UNDERLAY", "HOST (outside)");
            for h in &st.hosts {
                let _ = writeln!(s, "{:<20} {}", h.name, h.ip);
            }
        }
        if !st.topology.routers.is_empty() {
            let _ = writeln!(s, "\n{:<20} {:<40} SEGMENTS", "ROUTER", "BGP");
            for (r, spec) in st.topology.routers.iter().enumerate() {
                let legs: Vec<String> = spec
                    .segments
                    .iter()
                    .map(|g| format!("{g} {}", st.topology.router_ip(r, g)))
                    .collect();
                let bgp = match &spec.bgp {
                    None => "-".to_string(),
                    Some(b) => {
                        let bfd = match (b.bfd, self.router_bfd_peers(&spec.name)) {
                            (None, _) => String::new(),
                            (Some(_), Ok(p)) => format!(
                                ", BFD {}/{} up",
                                p.iter().filter(|(_, s)| s == "up").count(),
                                p.len()
                            ),
                            (Some(_), Err(_)) => ", BFD DOWN".into(),
                        };
                        match self.router_bgp_peers(&spec.name) {
                            Ok(p) => format!(
                                "AS {} {}/{} established{bfd}",
                                b.asn,
                                p.iter().filter(|p| p.established()).count(),
                                p.len()
                            ),
                            Err(_) => format!("AS {} DOWN", b.asn),
                        }
                    }
                };
                let _ = writeln!(s, "{:<20} {:<40} {}", spec.name, bgp, legs.join(", "));
            }
        }
        if !st.services.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<28} {:<10} {:<14} {:<16} {:<26} ENDPOINTS",
                "SERVICE", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"
            );
            for (id, svc) in &st.services {
                let eps = self.endpoint_pods(&st, id);
                // As kubectl shows it: load balancer addresses first,
                // `<pending>` for a LoadBalancer that has none yet.
                let ext: Vec<String> = svc
                    .load_balancer_ips
                    .iter()
                    .chain(&svc.external_ips)
                    .map(|i| i.to_string())
                    .collect();
                let ext = if ext.is_empty()
                    && svc.service_type == tweed_model::ServiceType::LoadBalancer
                {
                    vec!["<pending>".to_string()]
                } else {
                    ext
                };
                let _ = writeln!(
                    s,
                    "{:<28} {:<10} {:<14} {:<16} {:<26} {}",
                    id,
                    format!("{:?}", svc.service_type),
                    svc.cluster_ip.map(|i| i.to_string()).unwrap_or_default(),
                    if ext.is_empty() {
                        "<none>".to_string()
                    } else {
                        ext.join(",")
                    },
                    svc.ports_text(),
                    if eps.is_empty() {
                        "<none>".to_string()
                    } else {
                        eps.join(",")
                    }
                );
            }
        }
        Ok(s)
    }
}

/// The BGP routers (FRR): see [`crate::frr`].
impl Lab {
    pub fn router_ns(&self, router: &str) -> String {
        self.ns(&format!("r-{router}"))
    }

    /// Router `router`'s FRR files: configurations, logs, and `run/`
    /// (pid files and sockets).
    pub fn router_dir(&self, router: &str) -> PathBuf {
        self.dir.join("routers").join(router)
    }

    /// Write router `r`'s configurations and give its daemons a runtime
    /// directory they own (they drop to the `frr` user).
    fn frr_prepare(&self, topo: &Topology, r: usize) -> Result<()> {
        let spec = &topo.routers[r];
        let missing = |what: &str| {
            LabError::Invalid(format!(
                "router {} has bgp: it runs FRR, and {what} is missing: run scripts/install-deps.sh (Debian's frr)",
                spec.name
            ))
        };
        let bfdd = crate::frr::render_bfdd(spec);
        let daemons: &[&str] = if bfdd.is_some() {
            &["zebra", "bgpd", "bfdd"]
        } else {
            &["zebra", "bgpd"]
        };
        for d in daemons {
            if !Path::new(crate::frr::SBIN).join(d).exists() {
                return Err(missing(&format!("{}/{d}", crate::frr::SBIN)));
            }
        }
        let user = nix::unistd::User::from_name("frr")
            .ok()
            .flatten()
            .ok_or_else(|| missing("the frr user"))?;
        let dir = self.router_dir(&spec.name);
        let run = dir.join("run");
        std::fs::create_dir_all(&run).map_err(io_err(&run))?;
        nix::unistd::chown(&run, Some(user.uid), Some(user.gid)).map_err(|e| LabError::Io {
            path: run.clone(),
            source: e.into(),
        })?;
        let bgpd = crate::frr::render(spec, topo).expect("a router with bgp");
        for (name, body) in [
            ("frr.conf", bgpd),
            ("zebra.conf", crate::frr::render_zebra(spec)),
        ]
        .into_iter()
        .chain(bfdd.map(|b| ("bfdd.conf", b)))
        {
            let p = dir.join(name);
            std::fs::write(&p, body).map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// Start `daemon` (zebra, bgpd or bfdd) in the router's namespace.
    /// Equivalent: `ip netns exec NS /usr/lib/frr/DAEMON -f ... &`.
    fn frr_spawn(&self, router: &str, daemon: &str) -> Result<u32> {
        let dir = self.router_dir(router);
        self.spawn_in(
            &self.router_ns(router),
            &Path::new(crate::frr::SBIN).join(daemon),
            &crate::frr::daemon_args(daemon, &dir),
            &dir.join(format!("{daemon}.log")),
            &[],
        )
    }

    /// Wait until `daemon` answers on its vty socket.
    fn frr_wait(&self, router: &str, daemon: &str) -> Result<()> {
        let log = self.router_dir(router).join(format!("{daemon}.log"));
        wait_for(
            &format!("{daemon} on router {router} to answer vtysh"),
            15,
            &format!("; see {}", log.display()),
            || self.vtysh(router, daemon, "show version").is_ok(),
        )
    }

    /// Run one vtysh command against one of a router's daemons.
    /// Equivalent: `ip netns exec NS vtysh --vty_socket DIR/run -d DAEMON -c CMD`.
    pub fn vtysh(&self, router: &str, daemon: &str, cmd: &str) -> Result<String> {
        let sockets = self.router_dir(router).join("run");
        run(Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router_ns(router),
                "vtysh",
                "--vty_socket",
            ])
            .arg(&sockets)
            .args(["-d", daemon, "-c", cmd]))
    }

    /// Router `router`'s BGP sessions (`show bgp summary json`).
    pub fn router_bgp_peers(&self, router: &str) -> Result<Vec<crate::frr::RouterPeer>> {
        let out = self.vtysh(router, "bgpd", "show bgp summary json")?;
        crate::frr::parse_summary(&out)
            .map_err(|e| LabError::Invalid(format!("router {router}: bgp summary: {e}")))
    }

    /// Router `router`'s BFD sessions (`show bfd peers json`): each
    /// peer's address and status. Fails on a router without BFD.
    pub fn router_bfd_peers(&self, router: &str) -> Result<Vec<(IpAddr, String)>> {
        let out = self.vtysh(router, "bfdd", "show bfd peers json")?;
        crate::frr::parse_bfd_peers(&out)
            .map_err(|e| LabError::Invalid(format!("router {router}: bfd peers: {e}")))
    }

    /// The BGP routes router `router` selected, with their next hops
    /// (`show ip route bgp json`: what zebra installed in its namespace).
    pub fn router_routes(&self, router: &str) -> Result<Vec<(ipnet::Ipv4Net, Vec<Ipv4Addr>)>> {
        let out = self.vtysh(router, "zebra", "show ip route bgp json")?;
        crate::frr::parse_routes(&out)
            .map_err(|e| LabError::Invalid(format!("router {router}: bgp routes: {e}")))
    }

    /// Wait until every router-to-router BGP session is Established.
    fn wait_router_sessions(&self, topo: &Topology, secs: u64) -> Result<()> {
        for (r, spec) in topo.routers.iter().enumerate() {
            if spec.bgp.is_none() {
                continue;
            }
            let want = crate::frr::neighbours(topo, r);
            let log = self.router_dir(&spec.name).join("bgpd.log");
            wait_for(
                &format!(
                    "router {}'s BGP sessions with {} to be Established",
                    spec.name,
                    want.iter()
                        .map(|(n, a)| format!("{n} ({a})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                secs,
                &format!("; see {}", log.display()),
                || {
                    self.router_bgp_peers(&spec.name).is_ok_and(|peers| {
                        want.iter().all(|(_, a)| {
                            peers
                                .iter()
                                .any(|p| p.address == IpAddr::V4(*a) && p.established())
                        })
                    })
                },
            )?;
        }
        Ok(())
    }
}
