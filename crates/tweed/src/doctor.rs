//! `tweed doctor`: this node's faults, each with its evidence and fix; a
//! table for people, `-o json` for machines. Exit 0: nothing found; 1:
//! findings. `--all-nodes` runs it in every node's agent pod through
//! `kubectl exec` (the API server authenticates and authorises it; tweed
//! opens no port) and judges the nodes together; `tweed lab doctor` does
//! the same on every lab node.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use tweed_explain::{facts, Report};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// The agent's run directory (default: /run/tweed, or inside a lab
    /// node's namespace, that node's).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// `table` (default) or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    /// Every node of the cluster: `kubectl exec` into each node's agent
    /// pod (namespace tweed-system) and judge the reports together.
    #[arg(long)]
    all_nodes: bool,
    /// With --all-nodes: the kubectl to run.
    #[arg(long, default_value = "kubectl")]
    kubectl: PathBuf,
    /// With --all-nodes: kubectl's --kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

pub fn run(a: DoctorArgs) -> Result<ExitCode> {
    if a.all_nodes {
        let report = all_nodes(&a.kubectl, a.kubeconfig.as_deref())?;
        return print_report(&report, &a.output);
    }
    let dir = crate::status::run_dir(a.run_dir, "plan.json");
    // A node waiting for its subnet has no plan yet (or a stale one).
    if let Some(st) = facts::read_status(&dir) {
        if let Some(w) = tweed_explain::doctor::waiting(&st.node, &st) {
            let report = Report {
                nodes: vec![st.node.clone()],
                findings: vec![w],
                errors: Vec::new(),
            };
            return print_report(&report, &a.output);
        }
    }
    let (intent, status) = facts::read_intent(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let f = rt.block_on(facts::gather(&intent, status, &dir))?;
    let report = Report {
        nodes: vec![intent.node.clone()],
        findings: tweed_explain::check(&intent, &f),
        errors: Vec::new(),
    };
    print_report(&report, &a.output)
}

/// Print a report; exit 1 when it found anything or a node could not be examined.
pub fn print_report(report: &Report, output: &str) -> Result<ExitCode> {
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", tweed_explain::render(&report.findings, &report.nodes));
        for e in &report.errors {
            println!("could not examine {e}");
        }
    }
    Ok(if report.findings.is_empty() && report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `tweed doctor -o json` in every node's agent pod, at once.
fn all_nodes(kubectl: &std::path::Path, kubeconfig: Option<&std::path::Path>) -> Result<Report> {
    let cmd = || {
        let mut c = std::process::Command::new(kubectl);
        if let Some(k) = kubeconfig {
            c.arg("--kubeconfig").arg(k);
        }
        c.args(["-n", "tweed-system"]);
        c
    };
    let out = cmd()
        .args([
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=tweed",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {.metadata.name}{\"\\n\"}{end}",
        ])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", kubectl.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "listing tweed's agent pods: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pods: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (node, pod) = l.trim().split_once(' ')?;
            Some((node.to_string(), pod.to_string()))
        })
        .collect();
    if pods.is_empty() {
        anyhow::bail!(
            "no tweed agent pods in namespace tweed-system (label app.kubernetes.io/name=tweed)"
        );
    }
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|(node, pod)| {
                let mut c = cmd();
                c.args([
                    "exec", pod, "-c", "agent", "--", "tweed", "doctor", "-o", "json",
                ]);
                s.spawn(move || {
                    let r = match c.output() {
                        // 0: nothing found, 1: findings; both print the report.
                        Ok(o) if matches!(o.status.code(), Some(0 | 1)) => {
                            serde_json::from_slice::<Report>(&o.stdout)
                                .map_err(|e| format!("its report does not decode: {e}"))
                        }
                        Ok(o) => Err(format!(
                            "kubectl exec {pod}: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    (node.clone(), r)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("doctor thread"))
            .collect()
    });
    Ok(Report::merge(results))
}
