//! Shared harness for the lab end-to-end tests. They need root, network
//! namespaces and Debian's etcd; when those are missing the tests fail with
//! a message saying so (they never pass silently).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const TWEED: &str = env!("CARGO_BIN_EXE_tweed");

pub fn require_lab_prereqs() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("1").to_string())
        })
        .unwrap_or_default();
    assert_eq!(uid, "0", "lab end-to-end tests need root (they build network namespaces); run `sudo scripts/test.sh`");
    for bin in ["etcd", "ip"] {
        let found = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .any(|d| std::path::Path::new(d).join(bin).exists());
        assert!(
            found,
            "lab end-to-end tests need `{bin}` on PATH: run scripts/install-deps.sh"
        );
    }
}

/// A test that cannot run here says so: on stderr, and in
/// `target/tmp/skipped-tests.txt`, which scripts/test.sh prints at the end.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    eprintln!("SKIPPED {test}: {why}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{test}: {why}");
    }
}

pub fn tweed(args: &[&str]) -> Output {
    Command::new(TWEED).args(args).output().expect("run tweed")
}

pub fn ok(args: &[&str]) -> String {
    let o = tweed(args);
    assert!(
        o.status.success(),
        "tweed {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Wait for a condition with a deadline; panics with `what` on timeout.
pub fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cond(), "timed out after {secs} s waiting for: {what}");
}

/// A lab that is torn down when the test ends, and whose teardown is
/// checked: no namespace, no process, no file may remain.
pub struct LabGuard {
    pub name: String,
    pub dir: PathBuf,
}

impl LabGuard {
    pub fn up(name: &str, topology: &str) -> Self {
        require_lab_prereqs();
        let dir = PathBuf::from("/run/tweed/lab").join(name);
        // A previous run that crashed may have left this lab behind.
        let _ = tweed(&["lab", "down", "--name", name]);
        let file = std::env::temp_dir().join(format!("tweed-topo-{name}.yaml"));
        std::fs::write(&file, topology).unwrap();
        let g = LabGuard {
            name: name.into(),
            dir,
        };
        ok(&[
            "lab",
            "up",
            "-f",
            file.to_str().unwrap(),
            "--name",
            name,
            "--no-matrix",
        ]);
        g
    }

    /// `tweed lab apply -f` of a manifest given as text.
    pub fn apply(&self, text: &str) -> Output {
        let file = std::env::temp_dir().join(format!(
            "tweed-manifest-{}-{}.yaml",
            self.name,
            std::process::id()
        ));
        std::fs::write(&file, text).unwrap();
        tweed(&[
            "lab",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--name",
            &self.name,
        ])
    }

    pub fn apply_ok(&self, text: &str) {
        let o = self.apply(text);
        assert!(
            o.status.success(),
            "apply failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `tweed lab kubectl -- ARGS` with `input` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut c = Command::new(TWEED)
            .args(["lab", "kubectl", "--name", &self.name, "--"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("state.json")).unwrap()).unwrap()
    }

    pub fn pod_ip(&self, pod: &str) -> String {
        self.state()["pods"][pod]["ip"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn node_ns(&self, node: &str) -> String {
        format!("tw-{}_n-{node}", self.name)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        format!("tw-{}_p-{pod}", self.name)
    }

    /// Run a command inside a namespace of this lab.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .unwrap()
    }

    pub fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        let o = self.exec(ns, cmd);
        assert!(
            o.status.success(),
            "{cmd:?} in {ns} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Fetch `bytes` bytes from `to`'s echo server inside `ns`; how many arrived.
    pub fn transfer(&self, ns: &str, to: &str, bytes: usize) -> usize {
        let out = self.exec_ok(
            ns,
            &[
                TWEED,
                "probe",
                "http",
                &format!("{}:8080", self.pod_ip(to)),
                "--path",
                &format!("/bytes/{bytes}"),
                "--count",
                "--timeout",
                "10",
            ],
        );
        out.trim().parse().unwrap()
    }

    /// HTTP GET to a pod's echo server from inside `ns`; the JSON it returns.
    pub fn get(&self, ns: &str, ip: &str) -> Option<serde_json::Value> {
        let o = self.exec(
            ns,
            &[
                TWEED,
                "probe",
                "http",
                &format!("{ip}:8080"),
                "--timeout",
                "2",
            ],
        );
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    pub fn node_subnet(&self, node: &str) -> String {
        let s: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.dir.join("nodes").join(node).join("run/status.json")).unwrap(),
        )
        .unwrap();
        s["subnet"].as_str().unwrap().to_string()
    }

    pub fn routes(&self, node: &str) -> String {
        self.exec_ok(
            &self.node_ns(node),
            &["ip", "route", "show", "proto", "144"],
        )
    }

    pub fn namespaces(&self) -> Vec<String> {
        let prefix = format!("tw-{}_", self.name);
        std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// PIDs of live processes whose command line mentions this lab's directory.
    pub fn processes(&self) -> Vec<u32> {
        let marker = self.dir.display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next())
                    == Some("Z");
                !zombie
                    && std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                        .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let o = tweed(&["lab", "down", "--name", &self.name]);
        if std::thread::panicking() {
            // Keep the original failure visible; still clean up.
            return;
        }
        assert!(
            o.status.success(),
            "lab down failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            self.namespaces().is_empty(),
            "lab down left namespaces: {:?}",
            self.namespaces()
        );
        assert!(
            self.processes().is_empty(),
            "lab down left processes: {:?}",
            self.processes()
        );
        assert!(!self.dir.exists(), "lab down left {}", self.dir.display());
        assert!(
            self.cgroups().is_empty(),
            "lab down left cgroups: {:?}",
            self.cgroups()
        );
    }
}

impl LabGuard {
    /// The lab's pod cgroups (kubelet labs), in every hierarchy.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let prefix = format!("tweed-lab-{}_", self.name);
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }
}

pub fn topology(nodes: &[&str], pods: &[(&str, &str)], extra: &str) -> String {
    let mut t = String::from("nodes:\n");
    for n in nodes {
        t += &format!("  - name: {n}\n");
    }
    if !pods.is_empty() {
        t += "pods:\n";
        for (p, n) in pods {
            t += &format!("  - {{name: {p}, node: {n}}}\n");
        }
    }
    t + extra
}

/// Hold one TCP connection from namespace `ns` to `addr` for `secs`
/// seconds, a request every 100 ms, each allowed `patience` seconds (TCP
/// retransmits through a path change). Returns once it is established.
pub fn start_hold(
    lab: &LabGuard,
    ns: &str,
    addr: &str,
    secs: u64,
    patience: u64,
) -> std::process::Child {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            TWEED,
            "probe",
            "hold",
            addr,
            "--interval-ms",
            "100",
            "--duration",
            &secs.to_string(),
            "--timeout",
            &patience.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the held connection to be established", 5, || {
        lab.exec_ok(ns, &["ss", "-Htn", "state", "established"])
            .contains(addr)
    });
    child
}

/// Wait for a hold to end: it must not have broken (`during` says while
/// what) and at least `min` requests must have gone through.
pub fn finish_hold(child: std::process::Child, during: &str, min: u64) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the held connection broke during {during}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        n >= min,
        "only {n} requests went through the held connection during {during}"
    );
}
