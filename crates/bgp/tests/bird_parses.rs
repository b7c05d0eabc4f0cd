//! The generated configurations are ones the real BIRD 2 accepts: each
//! golden file through `bird -p` (parse only: no socket, no routes). Needs
//! `bird` (Debian's bird2) on PATH; a machine without it says so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn skip(test: &str, why: &str) {
    use std::io::Write;
    eprintln!("SKIPPED {test}: {why}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{test}: {why}");
    }
}

fn bird() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("bird"))
        .find(|p| p.exists())
}

#[test]
fn every_golden_configuration_parses_with_bird() {
    let Some(bird) = bird() else {
        skip(
            "every_golden_configuration_parses_with_bird",
            "no `bird` (Debian's bird2) on this machine; the configurations are checked against golden files only",
        );
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "conf") {
            continue;
        }
        let o = Command::new(&bird)
            .arg("-p")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("run bird");
        assert!(
            o.status.success(),
            "bird refuses {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        n += 1;
    }
    assert!(
        n >= 4,
        "only {n} golden configurations in {}",
        dir.display()
    );
}
