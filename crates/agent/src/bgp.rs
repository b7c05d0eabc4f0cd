//! The node's BGP speaker: Debian's BIRD 2, run as a separate process (it
//! is GPL-2; tweed starts it, never links it), configured by the file
//! `tweed_bgp::bird::render` writes and told to re-read it through its
//! control socket.
//!
//! - BIRD runs from `RUN_DIR/bird/`: `bird.conf`, the control socket
//!   `bird.ctl`, `bird.pid` and its log `bird.log`.
//! - It outlives the agent: an agent restart or upgrade finds it running
//!   by its pid file and only reconfigures it, so the node's routes are
//!   never withdrawn by an agent restart (and BIRD's graceful restart
//!   covers BIRD's own).
//! - BGP turned off in the cluster config stops it.
//! - What it learnt sits in kernel table [`LEARNT_TABLE`]; the agent reads
//!   it and decides, per peer, whether to route natively through it.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
pub use tweed_bgp::bird::LEARNT_TABLE;
// Doctor and trace know the table by tweed-plan's name for it.
const _: () = assert!(LEARNT_TABLE == tweed_plan::LEARNT_TABLE);
use tweed_bgp::{parse_bfd_sessions, parse_protocols, BgpPlan, Diagnosis, ProtocolStatus};

/// One BGP session, as `tweed status` shows it (`calicoctl node status`'s
/// columns, and the reason when it is not up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerStatus {
    /// BIRD's protocol name (`mesh_node2`, `node_198_51_100_1`).
    pub name: String,
    pub address: String,
    pub asn: u32,
    /// node-to-node mesh, route reflector, global, node specific, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    /// BIRD's state: up, start, down (or "unknown" if BIRD did not say).
    pub state: String,
    pub since: String,
    /// BIRD's info column: Established, Active, ... and the last error.
    pub info: String,
    /// Established, wrong-asn, peer-unreachable, hold-timer-expired, ...
    pub diagnosis: Diagnosis,
    /// The diagnosis in words.
    pub explain: String,
    /// The BFD session's state (up, down, init, admindown) when the
    /// cluster runs BFD; `None` without BFD or before BIRD has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<String>,
}

/// The speaker as `tweed status` and `tweed doctor` see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpStatus {
    pub speaker: String,
    /// running, not running, or why it could not be started.
    pub state: String,
    pub local_asn: u32,
    pub router_id: String,
    pub hold_time: u16,
    /// BFD's timers, when the cluster runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<tweed_bgp::config::BfdConfig>,
    pub announce: Vec<String>,
    pub peers: Vec<BgpPeerStatus>,
    /// Peers' subnets in the learnt table, each with its next hop.
    #[serde(default)]
    pub learnt: Vec<(String, String)>,
}

pub struct Speaker {
    dir: PathBuf,
    /// The BIRD this agent started, to reap when it exits.
    child: Option<Child>,
    /// Why BIRD could not be started or reconfigured, last time.
    trouble: Option<String>,
}

fn conf_path(dir: &Path) -> PathBuf {
    dir.join("bird.conf")
}

fn ctl_path(dir: &Path) -> PathBuf {
    dir.join("bird.ctl")
}

fn pid_path(dir: &Path) -> PathBuf {
    dir.join("bird.pid")
}

/// Is `pid` a live BIRD? (A pid file can outlive its process, and the
/// number be reused.)
fn is_bird(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "bird")
}

impl Speaker {
    pub fn new(run_dir: &Path) -> Self {
        Speaker {
            dir: run_dir.join("bird"),
            child: None,
            trouble: None,
        }
    }

    /// The running BIRD's PID, from its pid file.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(pid_path(&self.dir))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        is_bird(pid).then_some(pid)
    }

    fn reap(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(st)) = c.try_wait() {
                tracing::warn!(status = %st, log = %self.dir.join("bird.log").display(), "BIRD exited");
                self.child = None;
            }
        }
    }

    /// Bring BIRD to `conf` (the whole file); `None`: BGP is off, stop it.
    /// Errors are returned as text for the status and retried next time.
    pub fn converge(&mut self, conf: Option<&str>) -> Result<(), String> {
        self.reap();
        let res = match conf {
            None => self.stop(),
            Some(c) => self.apply(c),
        };
        match &res {
            Err(e) if self.trouble.as_ref() != Some(e) => {
                tracing::error!(error = %e, "BGP speaker");
            }
            _ => {}
        }
        self.trouble = res.as_ref().err().cloned();
        res
    }

    fn stop(&mut self) -> Result<(), String> {
        if let Some(pid) = self.pid() {
            tracing::info!(pid, "BGP is off; stopping BIRD");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(conf_path(&self.dir));
        Ok(())
    }

    fn apply(&mut self, conf: &str) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let path = conf_path(&self.dir);
        let changed = std::fs::read_to_string(&path).ok().as_deref() != Some(conf);
        if changed {
            // Checked before it replaces the one BIRD runs on: a file BIRD
            // refuses would leave it on the old one, and say so only in its log.
            let new = self.dir.join("bird.conf.new");
            std::fs::write(&new, conf).map_err(|e| format!("{}: {e}", new.display()))?;
            let out = Command::new("bird")
                .arg("-p")
                .arg("-c")
                .arg(&new)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run bird (is Debian's bird2 installed?): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "BIRD refuses the generated configuration {}: {}",
                    new.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            std::fs::rename(&new, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if self.pid().is_some() {
            if changed {
                let reply = self.command("configure")?;
                if !reply.contains("Reconfigur") {
                    return Err(format!("BIRD did not take the new configuration: {reply}"));
                }
                tracing::info!("BIRD reconfigured");
            }
            return Ok(());
        }
        self.start()
    }

    fn start(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("bird.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let _ = std::fs::remove_file(ctl_path(&self.dir));
        // A pid file left behind means BIRD died under a running node: its
        // peers hold the node's routes as stale (graceful restart) and -R
        // has it tell them when it has re-learnt and re-announced
        // everything. Not on a first start: -R waits for every peer's
        // end-of-RIB, up to 4 minutes for one that never comes up.
        let recovering = pid_path(&self.dir).exists();
        let mut cmd = Command::new("bird");
        if recovering {
            cmd.arg("-R");
        }
        let child = cmd
            .arg("-f")
            .arg("-c")
            .arg(conf_path(&self.dir))
            .arg("-s")
            .arg(ctl_path(&self.dir))
            .arg("-P")
            .arg(pid_path(&self.dir))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for the agent must not
            // take the node's routes with it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start bird (is Debian's bird2 installed?): {e}"))?;
        tracing::info!(pid = child.id(), recovering, log = %log_path.display(), "BIRD started");
        self.child = Some(child);
        Ok(())
    }

    /// One command over BIRD's control socket; the reply's text.
    fn command(&self, cmd: &str) -> Result<String, String> {
        let ctl = ctl_path(&self.dir);
        let s = UnixStream::connect(&ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
        let t = Some(Duration::from_secs(3));
        let _ = s.set_read_timeout(t);
        let _ = s.set_write_timeout(t);
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut out = String::new();
        // "0001 BIRD 2.0.12 ready."
        read_reply(&mut r, &mut out)?;
        (&s).write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("{}: {e}", ctl.display()))?;
        out.clear();
        read_reply(&mut r, &mut out)?;
        Ok(out)
    }

    /// `show protocols`, parsed; `None` when BIRD does not answer.
    pub fn protocols(&self) -> Option<Vec<ProtocolStatus>> {
        self.command("show protocols")
            .ok()
            .map(|t| parse_protocols(&t))
    }

    /// The status for `tweed status`: the plan's sessions, each with what
    /// BIRD says of it.
    pub fn status(&self, plan: &BgpPlan, learnt: &[(Ipv4Net, Ipv4Addr)]) -> BgpStatus {
        let running = self.pid().is_some();
        let protos = if running { self.protocols() } else { None };
        let bfd = match (&plan.bfd, &protos) {
            (Some(_), Some(_)) => self
                .command("show bfd sessions")
                .map(|t| parse_bfd_sessions(&t))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let state = match (&self.trouble, running, &protos) {
            (Some(t), _, _) => t.clone(),
            (None, true, Some(_)) => "running".into(),
            (None, true, None) => "running, not answering on its control socket".into(),
            (None, false, _) => "not running".into(),
        };
        let peers = plan
            .sessions
            .iter()
            .map(|s| {
                let p = protos
                    .as_ref()
                    .and_then(|ps| ps.iter().find(|p| p.name == s.name));
                let diagnosis = p.map(Diagnosis::of).unwrap_or(Diagnosis::Other);
                BgpPeerStatus {
                    name: s.name.clone(),
                    address: s.address.to_string(),
                    asn: s.peer_asn,
                    kind: s.kind.to_string(),
                    peer_node: s.peer_node.clone(),
                    state: p.map_or("unknown".into(), |p| p.state.clone()),
                    since: p.map(|p| p.since.clone()).unwrap_or_default(),
                    info: p.map(|p| p.info.clone()).unwrap_or_default(),
                    diagnosis,
                    explain: if p.is_some() {
                        diagnosis.explain().into()
                    } else {
                        "BIRD does not report this session".into()
                    },
                    bfd: bfd
                        .iter()
                        .find(|b| b.address == std::net::IpAddr::V4(s.address))
                        .map(|b| b.state.clone()),
                }
            })
            .collect();
        BgpStatus {
            speaker: "bird".into(),
            state,
            local_asn: plan.local_asn,
            router_id: plan.router_id.to_string(),
            hold_time: plan.hold_time,
            bfd: plan.bfd,
            announce: plan
                .announce
                .iter()
                .chain(&plan.services)
                .map(|n| n.to_string())
                .collect(),
            peers,
            learnt: learnt
                .iter()
                .map(|(n, g)| (n.to_string(), g.to_string()))
                .collect(),
        }
    }
}

/// Read one reply of BIRD's socket protocol: lines `NNNN-text` (more
/// follows), ` text` (continuation) and a last `NNNN text`.
fn read_reply(r: &mut impl BufRead, out: &mut String) -> Result<(), String> {
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| format!("BIRD's control socket: {e}"))?;
        if n == 0 {
            return Err("BIRD closed its control socket".into());
        }
        out.push_str(&line);
        let b = line.as_bytes();
        if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b' ' {
            // 8xxx and 9xxx are errors (e.g. "8002 Configuration error").
            if matches!(b[0], b'8' | b'9') {
                return Err(format!("BIRD: {}", line.trim()));
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_ends_at_its_final_code_and_errors_are_errors() {
        let mut out = String::new();
        let text =
            "1002-device1 Device --- up 2026-12-02 11:17:44\n mesh_node2 BGP --- up\n0000 \nnext";
        read_reply(&mut text.as_bytes(), &mut out).unwrap();
        assert!(out.ends_with("0000 \n"), "{out:?}");
        let mut out = String::new();
        let e = read_reply(&mut "8002 Reconfiguration rejected\n".as_bytes(), &mut out);
        assert_eq!(e, Err("BIRD: 8002 Reconfiguration rejected".into()));
        let mut out = String::new();
        assert!(read_reply(&mut "1002-half".as_bytes(), &mut out).is_err());
    }
}
