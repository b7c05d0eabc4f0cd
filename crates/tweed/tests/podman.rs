//! A real container runtime (Debian's podman, CNI backend) wires a
//! container through the tweed plugin inside a lab node, and the container
//! reaches a pod on another node with its true address.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// A busybox root filesystem (no image registry is reachable here).
fn rootfs(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("busybox-static is needed: run scripts/install-deps.sh");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
}

#[test]
fn podman_wires_a_container_through_tweed() {
    require_lab_prereqs();
    assert!(
        Path::new("/usr/bin/podman").exists() && Path::new("/usr/sbin/runc").exists(),
        "podman and runc are needed: run scripts/install-deps.sh"
    );
    let lab = LabGuard::up("podman", &topology(&["n1", "n2"], &[("far", "n2")], ""));
    let work = std::env::temp_dir().join("tweed-podman-test");
    rootfs(&work.join("rootfs"));
    // Podman finds plugins by type name in cni_plugin_dirs.
    let bin = work.join("cni-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let _ = std::fs::remove_file(bin.join("tweed"));
    std::os::unix::fs::symlink(TWEED, bin.join("tweed")).unwrap();
    let conf = work.join("containers.conf");
    std::fs::write(
        &conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n",
            bin.display(),
            lab.dir.join("nodes/n1/net.d").display()
        ),
    )
    .unwrap();
    let far = lab.pod_ip("far");
    // nsenter, not `ip netns exec`: runc needs the real /sys (cgroups), and
    // explicit low ulimits, since this VM refuses podman's defaults.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node_ns("n1")))
        .args([
            "podman",
            "--runtime",
            "/usr/sbin/runc",
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "tweed",
            "--rootfs",
        ])
        .arg(work.join("rootfs"))
        .args([
            "/bin/sh",
            "-c",
            &format!("ip -4 -o addr show eth0; wget -qO- http://{far}:8080/"),
        ])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let subnet: ipnet::Ipv4Net = lab.node_subnet("n1").parse().unwrap();
    let ip = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .expect("container has an address")
        .trim_end_matches("/32")
        .to_string();
    assert!(
        subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{ip} not in {subnet}"
    );
    let json = stdout.lines().last().unwrap();
    let seen: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        (seen["pod"].as_str(), seen["client"].as_str()),
        (Some("far"), Some(ip.as_str()))
    );
    // --rm ran CNI DEL: nothing of the container is left on the node.
    let ipam: Vec<_> = std::fs::read_dir(lab.dir.join("nodes/n1/data/ipam"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(
        ipam.is_empty(),
        "reservations left after podman --rm: {ipam:?}"
    );
    let links = lab.exec_ok(
        &lab.node_ns("n1"),
        &["ip", "-o", "link", "show", "type", "veth"],
    );
    assert!(!links.contains(": tw"), "{links}");
    std::fs::remove_dir_all(&work).unwrap();
}
