//! The generated router configurations are ones the real FRR accepts:
//! each golden `frr-*.conf` through `bgpd -C` and each `bfdd-*.conf`
//! through `bfdd -C` (dry run: parse, then exit).
//! It runs in a network namespace of its own (`unshare --net`) with no
//! BGP listener, no zebra and no TCP vty, so it touches nothing on the
//! machine. Needs Debian's frr; a machine without it says so.

use std::path::Path;
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

#[test]
fn every_golden_router_configuration_parses_with_bgpd() {
    let test = "every_golden_router_configuration_parses_with_bgpd";
    let bgpd = Path::new(tweed_lab::frr::SBIN).join("bgpd");
    let bfdd = Path::new(tweed_lab::frr::SBIN).join("bfdd");
    if !bgpd.exists() || !bfdd.exists() {
        skip(
            test,
            "no bgpd or bfdd (Debian's frr) on this machine; the configurations are checked against golden files only",
        );
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        skip(test, "bgpd -C needs root (it drops to the frr user)");
        return;
    }
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("frr-parses");
    std::fs::create_dir_all(&scratch).unwrap();
    // bfdd binds its control socket there after dropping to frr.
    if let Some(u) = nix::unistd::User::from_name("frr").ok().flatten() {
        nix::unistd::chown(&scratch, Some(u.uid), Some(u.gid)).unwrap();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let (mut n, mut n_bfd) = (0, 0);
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".conf") {
            continue;
        }
        let mut cmd = Command::new("unshare");
        cmd.arg("--net");
        if name.starts_with("frr-") {
            cmd.arg(&bgpd).args(["-Z", "-n", "-p", "0"]);
            n += 1;
        } else if name.starts_with("bfdd-") {
            cmd.arg(&bfdd)
                .arg("--bfdctl")
                .arg(scratch.join("bfdd.sock"));
            n_bfd += 1;
        } else {
            continue;
        }
        let o = cmd
            .args(["-C", "-P", "0", "-u", "frr", "-g", "frr"])
            .arg("-i")
            .arg(scratch.join("daemon.pid"))
            .arg("--vty_socket")
            .arg(&scratch)
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run bgpd");
        // bgpd -C exits 0 even on lines it refuses; it says so on its
        // output. The one line a good configuration prints is a notice.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let complaints: Vec<&str> = said
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && *l
                        != "Graceful restart configuration changed, reset all peers to take effect"
            })
            .collect();
        assert!(
            o.status.success() && complaints.is_empty(),
            "FRR refuses {}:\n{}",
            path.display(),
            complaints.join("\n")
        );
    }
    assert!(
        n >= 2 && n_bfd >= 1,
        "too few golden router configurations in {} ({n} bgpd, {n_bfd} bfdd)",
        dir.display()
    );
}
