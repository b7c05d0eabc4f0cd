//! Real kubelets for the lab (`kubelet:` in a topology): every node runs
//! Debian's containerd 1.6 and kubelet 1.20.2 inside its network namespace
//! and a mount namespace of its own, following TESTBED.md's recipe, with
//! guards so that nothing they do reaches the machine:
//!
//! - `ip netns exec` mounts a fresh sysfs, which hides the cgroup mounts:
//!   the node mounts each of the machine's cgroup hierarchies again (the
//!   same options re-attach the same hierarchy), and its pods live under a
//!   cgroup of the lab's own, `tweed-lab-LAB_NODE` (`--cgroup-root`), made
//!   here and removed at `down`.
//! - kubelet writes machine-wide sysctls at start (`vm.overcommit_memory`,
//!   `kernel.panic`, `kernel.panic_on_oops`, ...; they are not per
//!   namespace): files already holding the values it wants are bind-mounted
//!   over those `/proc/sys` files in the node's mount namespace, so it
//!   writes nothing.
//! - Paths kubelet and containerd hard-code (`/var/lib/kubelet`,
//!   `/var/log/pods`, `/run/containerd/s`, `/var/lib/cni`, `/opt/cni/bin`,
//!   `/etc/cni/net.d`) are the node's own: `/run` is a fresh tmpfs (the
//!   lab's directory is moved back into it), and `/var/lib`, `/var/log`,
//!   `/opt` and `/etc/cni/net.d` are bind mounts of directories under the
//!   node's lab directory.
//! - containerd may not lower `oom_score_adj` here (no CAP_SYS_RESOURCE):
//!   `restrict_oom_score_adj`.
//! - There is no registry: the pause image and the topology's images are
//!   imported from OCI archives (`ctr images import`).
//!
//! kubelet joins containerd's mount namespace (its volume mounts must be
//! visible to the runtime). Pods are wired by tweed's real CNI plugin, the
//! conflist the agent writes, as on any node.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::kube_state::NodeRuntime;
use crate::lab::{run, stop_pid, wait_for, Lab, LabError, LabState};

type Result<T, E = LabError> = std::result::Result<T, E>;

/// The pod sandbox image (a static `pause`), made by
/// `scripts/install-containerd.sh`.
pub const PAUSE_IMAGE: &str = "tweed.local/pause:3.2";

/// Where `scripts/install-containerd.sh` caches containerd, its shim, ctr
/// and the pause image archive.
pub fn containerd_dir() -> PathBuf {
    std::env::var_os("TWEED_CONTAINERD_DIR").map_or_else(
        || PathBuf::from("/var/cache/tweed/containerd"),
        PathBuf::from,
    )
}

fn need(p: PathBuf) -> Result<PathBuf> {
    if p.exists() {
        Ok(p)
    } else {
        Err(LabError::Invalid(format!(
            "kubelet: needs {} (run scripts/install-kubernetes.sh and scripts/install-containerd.sh)",
            p.display()
        )))
    }
}

/// The sysctls kubelet 1.20 sets when it starts (`setupKernelTunables`),
/// with the values it wants.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// Paths the node needs on the machine, as mount points for its own.
const MOUNT_POINTS: [&str; 5] = ["/mnt", "/var/lib", "/var/log", "/opt", "/etc/cni/net.d"];

/// One cgroup hierarchy as the machine mounts it.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    path: String,
    fstype: String,
    opts: String,
}

/// The machine's cgroup mounts under /sys/fs/cgroup, from a mounts table,
/// with the options that select the hierarchy (not rw, relatime, ...).
fn cgroup_mounts(table: &str) -> Vec<CgroupMount> {
    const GENERIC: [&str; 7] = [
        "rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
    ];
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (path, fstype, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
            if !(*fstype == "cgroup" || *fstype == "cgroup2") || !path.starts_with("/sys/fs/cgroup")
            {
                return None;
            }
            let mut o: Vec<&str> = opts.split(',').filter(|o| !GENERIC.contains(o)).collect();
            // A named hierarchy without controllers is mounted as `none,name=X`.
            if *fstype == "cgroup" && o.iter().all(|x| x.starts_with("name=")) {
                o.insert(0, "none");
            }
            Some(CgroupMount {
                path: path.to_string(),
                fstype: fstype.to_string(),
                opts: o.join(","),
            })
        })
        .collect()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script that prepares a node's mount namespace and becomes its
/// containerd. Pure, so the guards can be read (and tested) in one place.
fn setup_script(
    lab_dir: &Path,
    node_dir: &Path,
    cgroups: &[CgroupMount],
    sysctl_binds: &[(String, PathBuf)],
    containerd_dir: &Path,
    config: &Path,
) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let k = node_dir.join("k");
    let mut s = String::from("#!/bin/sh\n# Written by tweed's lab: a node's mount namespace, then its containerd.\nset -eu\n");
    // cgroups: ip netns exec mounted a fresh sysfs.
    if !cgroups.iter().any(|c| c.path == "/sys/fs/cgroup") {
        s += "mount -t tmpfs -o mode=755 tweed-cgroup /sys/fs/cgroup\n";
    }
    for c in cgroups {
        let opts = if c.opts.is_empty() {
            String::new()
        } else {
            format!(" -o {}", c.opts)
        };
        s += &format!(
            "mkdir -p {p}\nmount -t {t}{opts} {t} {p}\n",
            p = sh_quote(&c.path),
            t = c.fstype
        );
    }
    // kubelet finds the values it wants and writes nothing.
    for (sysctl, file) in sysctl_binds {
        s += &format!("mount --bind {} /proc/sys/{sysctl}\n", q(file));
    }
    // A fresh /run, with the lab's directory moved back in.
    s += &format!(
        "mount --bind {lab} /mnt\nmount -t tmpfs -o mode=755 tweed-run /run\nmkdir -p {lab}\nmount --move /mnt {lab}\n",
        lab = q(lab_dir)
    );
    for (from, to) in [
        (k.join("var-lib"), "/var/lib"),
        (k.join("var-log"), "/var/log"),
        (k.join("opt"), "/opt"),
        (node_dir.join("net.d"), "/etc/cni/net.d"),
    ] {
        s += &format!("mount --bind {} {to}\n", q(&from));
    }
    s += &format!(
        "export PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexec {} --config {}\n",
        q(containerd_dir),
        q(&containerd_dir.join("containerd")),
        q(config)
    );
    s
}

fn containerd_config(node_dir: &Path) -> String {
    let k = node_dir.join("k");
    format!(
        r#"# Written by tweed's lab.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: lowering oom_score_adj would fail.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
# (node directory: {})
"#,
        k.display()
    )
}

impl Lab {
    /// The cgroup every pod of `node` lives under, in every hierarchy.
    pub fn node_cgroup(&self, node: &str) -> String {
        format!("{}{node}", self.cgroup_prefix())
    }
    fn cgroup_prefix(&self) -> String {
        // `_` cannot appear in a lab name: one lab's prefix never matches another's.
        format!("tweed-lab-{}_", self.name)
    }

    fn kubelet_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("k")
    }

    /// Start containerd and kubelet on `node` and import the images; the
    /// kubelet registers its Node. PIDs are recorded as they start.
    pub(crate) fn kubelet_up(&self, st: &mut LabState, node: &str, ip: Ipv4Addr) -> Result<()> {
        let ctrd = containerd_dir();
        need(ctrd.join("containerd"))?;
        need(ctrd.join("containerd-shim-runc-v2"))?;
        need(ctrd.join("ctr"))?;
        let pause = need(ctrd.join("pause.oci.tar"))?;
        let kubelet = need(crate::kube::bin_dir().join("kubelet"))?;
        let loopback = need(PathBuf::from("/usr/lib/cni/loopback"))?;
        for m in MOUNT_POINTS {
            if !Path::new(m).is_dir() {
                return Err(LabError::Invalid(format!(
                    "kubelet: {m} does not exist on this machine; the lab mounts the node's own over it"
                )));
            }
        }
        let nd = self.node_dir(node);
        let k = self.kubelet_dir(node);
        for d in ["var-lib", "var-log", "opt/cni/bin", "flex", "pki"] {
            let p = k.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))?;
        }
        std::fs::create_dir_all(nd.join("net.d")).map_err(|e| LabError::Invalid(e.to_string()))?;
        // The node's OS provides `loopback`, as kubeadm's kubernetes-cni does;
        // tweed installs its own plugin.
        let lo = k.join("opt/cni/bin/loopback");
        std::fs::copy(&loopback, &lo)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", lo.display())))?;

        // The node's cgroup, in every hierarchy (cpuset needs its cpus and
        // mems filled before a task may join).
        let table = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        let cgroups = cgroup_mounts(&table);
        if cgroups.is_empty() {
            return Err(LabError::Invalid(
                "kubelet: no cgroup hierarchy is mounted under /sys/fs/cgroup".into(),
            ));
        }
        let cg = self.node_cgroup(node);
        for c in &cgroups {
            let d = Path::new(&c.path).join(&cg);
            std::fs::create_dir_all(&d)
                .map_err(|e| LabError::Invalid(format!("{}: {e}", d.display())))?;
            if c.opts.split(',').any(|o| o == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(Path::new(&c.path).join(f)).unwrap_or_default();
                    let _ = std::fs::write(d.join(f), v.trim());
                }
            }
        }

        let mut binds = Vec::new();
        for (sysctl, want) in KUBELET_SYSCTLS {
            let now =
                std::fs::read_to_string(Path::new("/proc/sys").join(sysctl)).unwrap_or_default();
            if now.trim() != want {
                let f = k.join(format!("sysctl-{}", sysctl.replace('/', ".")));
                std::fs::write(&f, format!("{want}\n"))
                    .map_err(|e| LabError::Invalid(e.to_string()))?;
                binds.push((sysctl.to_string(), f));
            }
        }
        let config = k.join("containerd.toml");
        std::fs::write(&config, containerd_config(&nd))
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        let script = k.join("node.sh");
        std::fs::write(
            &script,
            setup_script(&self.dir, &nd, &cgroups, &binds, &ctrd, &config),
        )
        .map_err(|e| LabError::Invalid(e.to_string()))?;

        let ns = st.node(node)?.ns.clone();
        let cpid = self.spawn_in(
            &ns,
            Path::new("sh"),
            &[script.display().to_string()],
            &k.join("containerd.log"),
            &[],
        )?;
        st.kube
            .as_mut()
            .expect("kubelet implies kubernetes")
            .kubelets
            .insert(
                node.into(),
                NodeRuntime {
                    containerd_pid: Some(cpid),
                    kubelet_pid: None,
                },
            );
        self.save(st)?;
        wait_for(
            &format!("containerd on {node}"),
            30,
            &format!("; see {}", k.join("containerd.log").display()),
            || self.ctr(cpid, &["version"], None).is_ok(),
        )?;
        for img in std::iter::once(&pause)
            .chain(st.topology.kubelet.as_ref().expect("kubelet").images.iter())
        {
            let f = std::fs::File::open(img).map_err(|e| {
                LabError::Invalid(format!("kubelet.images: {}: {e}", img.display()))
            })?;
            self.ctr(cpid, &["images", "import", "-"], Some(f))
                .map_err(|e| {
                    LabError::Invalid(format!("importing {} on {node}: {e}", img.display()))
                })?;
        }

        let kc = self.kubelet_kubeconfig(node);
        let p = |x: &Path| x.display().to_string();
        let args: Vec<String> = vec![
            "--container-runtime=remote".into(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            format!("--kubeconfig={}", p(&kc)),
            format!("--hostname-override={node}"),
            format!("--node-ip={ip}"),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root=/{cg}"),
            "--fail-swap-on=false".into(),
            "--read-only-port=0".into(),
            "--anonymous-auth=false".into(),
            format!("--client-ca-file={}", p(&self.kube_dir().join("ca.crt"))),
            "--authorization-mode=Webhook".into(),
            format!("--volume-plugin-dir={}", p(&k.join("flex"))),
            format!("--cert-dir={}", p(&k.join("pki"))),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            // No cluster DNS in the lab, and no resolver of the machine's.
            "--resolv-conf=".into(),
            // Never evict for the shared machine's disk or memory.
            "--eviction-hard=".into(),
            "--image-gc-high-threshold=100".into(),
            // The pod network's rules are tweed's.
            "--make-iptables-util-chains=false".into(),
            // Lowering it needs CAP_SYS_RESOURCE, which root lacks here.
            "--oom-score-adj=0".into(),
            "--v=1".into(),
        ];
        let log = k.join("kubelet.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", log.display())))?;
        let f2 = f
            .try_clone()
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        let child = Command::new("nsenter")
            .args(["--mount", "--net", "--target", &cpid.to_string(), "--"])
            .arg(&kubelet)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::Cmd {
                cmd: "nsenter ... kubelet".into(),
                msg: e.to_string(),
            })?;
        st.kube
            .as_mut()
            .expect("kube")
            .kubelets
            .get_mut(node)
            .expect("inserted")
            .kubelet_pid = Some(child.id());
        self.save(st)
    }

    /// Run `ctr` against a node's containerd (by its PID), inside its
    /// namespaces; `input` becomes its stdin.
    fn ctr(
        &self,
        containerd_pid: u32,
        args: &[&str],
        input: Option<std::fs::File>,
    ) -> Result<String> {
        let mut c = Command::new("nsenter");
        c.args([
            "--mount",
            "--net",
            "--target",
            &containerd_pid.to_string(),
            "--",
        ])
        .arg(containerd_dir().join("ctr"))
        .args([
            "--address",
            "/run/containerd/containerd.sock",
            "-n",
            "k8s.io",
        ])
        .args(args);
        if let Some(f) = input {
            c.stdin(f);
            let out = c.output().map_err(|e| LabError::Cmd {
                cmd: "ctr".into(),
                msg: e.to_string(),
            })?;
            return if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into())
            } else {
                Err(LabError::Cmd {
                    cmd: format!("ctr {}", args.join(" ")),
                    msg: String::from_utf8_lossy(&out.stderr).trim().into(),
                })
            };
        }
        run(&mut c)
    }

    /// `ctr -n k8s.io ARGS` on a node (e.g. `images ls`).
    pub fn node_ctr(&self, node: &str, args: &[&str]) -> Result<String> {
        let st = self.state()?;
        let pid = st
            .kube
            .as_ref()
            .and_then(|k| k.kubelets.get(node))
            .and_then(|r| r.containerd_pid)
            .ok_or_else(|| LabError::Invalid(format!("node {node} runs no containerd")))?;
        self.ctr(pid, args, None)
    }

    /// Import an OCI archive into every node's containerd (a new image for
    /// a running lab, e.g. a re-tagged agent).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let st = self.state()?;
        for (node, r) in st.kube.iter().flat_map(|k| k.kubelets.iter()) {
            let pid = r
                .containerd_pid
                .ok_or_else(|| LabError::Invalid(format!("node {node} runs no containerd")))?;
            let f = std::fs::File::open(archive)
                .map_err(|e| LabError::Invalid(format!("{}: {e}", archive.display())))?;
            self.ctr(pid, &["images", "import", "-"], Some(f))?;
        }
        Ok(())
    }

    pub(crate) fn kubelet_kubeconfig(&self, node: &str) -> PathBuf {
        self.kubelet_dir(node).join("kubelet.kubeconfig")
    }

    /// Stop every kubelet (so nothing restarts what follows is killed),
    /// every process in the lab's pod cgroups, then every containerd.
    /// Also works from a lost state: the cgroups are found by name.
    pub(crate) fn kubelets_down(&self, st: Option<&LabState>) -> Vec<String> {
        let marker = self.marker();
        let mut errs = Vec::new();
        let runtimes: Vec<NodeRuntime> = st
            .and_then(|s| s.kube.as_ref())
            .map(|k| k.kubelets.values().cloned().collect())
            .unwrap_or_default();
        for r in &runtimes {
            errs.extend(r.kubelet_pid.and_then(|p| stop_pid(p, &marker)));
        }
        errs.extend(self.kill_cgroups());
        for r in &runtimes {
            errs.extend(r.containerd_pid.and_then(|p| stop_pid(p, &marker)));
        }
        errs
    }

    /// The lab's cgroup directories, in every hierarchy.
    fn lab_cgroups(&self) -> Vec<PathBuf> {
        let prefix = self.cgroup_prefix();
        let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        cgroup_mounts(&table)
            .iter()
            .flat_map(|c| std::fs::read_dir(&c.path).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }

    fn cgroup_pids(&self) -> Vec<u32> {
        fn walk(d: &Path, out: &mut Vec<u32>) {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        for d in self.lab_cgroups() {
            walk(&d, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILL every process in the lab's pod cgroups until none is left.
    fn kill_cgroups(&self) -> Option<String> {
        let res = wait_for("", 10, "", || {
            let pids = self.cgroup_pids();
            for p in &pids {
                let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
            }
            pids.is_empty()
        });
        res.err().map(|_| {
            format!(
                "processes left in the lab's pod cgroups: {:?}",
                self.cgroup_pids()
            )
        })
    }

    /// Remove the lab's cgroups, deepest first (after every process is gone).
    pub(crate) fn remove_cgroups(&self) -> Vec<String> {
        fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&e.path(), out);
                }
            }
            out.push(d.to_path_buf());
        }
        let mut errs = Vec::new();
        for top in self.lab_cgroups() {
            let mut all = Vec::new();
            dirs(&top, &mut all);
            for d in all {
                let r = wait_for("", 5, "", || std::fs::remove_dir(&d).is_ok() || !d.exists());
                if r.is_err() {
                    errs.push(format!("cgroup {} would not go", d.display()));
                }
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn cgroup_mounts_keep_the_options_that_select_a_hierarchy() {
        let m = cgroup_mounts(MOUNTS);
        let got: Vec<(&str, &str, &str)> = m
            .iter()
            .map(|c| (c.path.as_str(), c.fstype.as_str(), c.opts.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/sys/fs/cgroup/cpu", "cgroup", "cpu"),
                (
                    "/sys/fs/cgroup/net_cls,net_prio",
                    "cgroup",
                    "net_cls,net_prio"
                ),
                ("/sys/fs/cgroup/systemd", "cgroup", "none,name=systemd"),
                ("/sys/fs/cgroup/unified", "cgroup2", ""),
            ]
        );
    }

    #[test]
    fn the_setup_script_guards_sysctls_and_keeps_writes_in_the_node() {
        let s = setup_script(
            Path::new("/run/tweed/lab/x"),
            Path::new("/run/tweed/lab/x/nodes/n1"),
            &cgroup_mounts(MOUNTS),
            &[(
                "kernel/panic".into(),
                PathBuf::from("/run/tweed/lab/x/nodes/n1/k/sysctl-kernel.panic"),
            )],
            Path::new("/var/cache/tweed/containerd"),
            Path::new("/run/tweed/lab/x/nodes/n1/k/containerd.toml"),
        );
        assert!(s.contains("mount -t tmpfs -o mode=755 tweed-cgroup /sys/fs/cgroup\n"));
        assert!(
            s.contains("mount -t cgroup -o none,name=systemd cgroup '/sys/fs/cgroup/systemd'\n")
        );
        assert!(s.contains("mount --bind '/run/tweed/lab/x/nodes/n1/k/sysctl-kernel.panic' /proc/sys/kernel/panic\n"));
        // /run is replaced only after the lab's directory is held elsewhere.
        let hold = s.find("mount --bind '/run/tweed/lab/x' /mnt").unwrap();
        let run = s.find("tweed-run /run").unwrap();
        let back = s.find("mount --move /mnt '/run/tweed/lab/x'").unwrap();
        assert!(hold < run && run < back);
        for p in ["/var/lib", "/var/log", "/opt", "/etc/cni/net.d"] {
            assert!(s.contains(&format!(" {p}\n")), "{p} is not the node's own");
        }
        assert!(s.ends_with("--config '/run/tweed/lab/x/nodes/n1/k/containerd.toml'\n"));
    }
}
