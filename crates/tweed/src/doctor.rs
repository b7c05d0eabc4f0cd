//! `tweed doctor`: this node's faults, each with its evidence and fix; a
//! table for people, `-o json` for machines. Exit 0: nothing found; 1:
//! findings. `tweed lab doctor` runs it on every lab node at once.

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
}

pub fn run(a: DoctorArgs) -> Result<ExitCode> {
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
