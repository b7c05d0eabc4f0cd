//! Root tests of the appliers against the real kernel, each in a network
//! namespace of its own (never the machine's). They need root; without it
//! they fail saying so.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::process::Command;

use tweed_model::vtep_mac_for;
use tweed_netlink::{Netlink, TWEED_RTPROTO};
use tweed_plan::{Fdb, Neigh, Route, VxlanLink};

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!("tw-nltest-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "needs root to create network namespaces: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ns(name)
    }
    fn ip(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }
    /// Run `f` on a thread that has entered this namespace.
    fn run<F: std::future::Future<Output = ()>>(&self, f: impl FnOnce() -> F + Send + 'static) {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(path).unwrap();
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f());
        })
        .join()
        .unwrap();
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn spec(vni: u32, mtu: u32) -> VxlanLink {
    VxlanLink {
        name: "tweed.1".into(),
        vni,
        port: 8472,
        local: "198.51.100.10".parse().unwrap(),
        underlay_dev: "ul0".into(),
        mtu,
        mac: vtep_mac_for("n1"),
        address: "10.244.1.0".parse().unwrap(),
    }
}

#[test]
fn vxlan_device_is_idempotent_and_recreated_only_when_it_must_be() {
    let ns = Ns::new("vx");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]);
    ns.ip(&["addr", "add", "198.51.100.10/24", "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.run(|| async {
        let nl = Netlink::open().unwrap();
        let i1 = nl.ensure_vxlan(&spec(1, 1450)).await.unwrap();
        assert_eq!(
            nl.ensure_vxlan(&spec(1, 1450)).await.unwrap(),
            i1,
            "second ensure re-created the device"
        );
        // MTU changes in place.
        assert_eq!(nl.ensure_vxlan(&spec(1, 1400)).await.unwrap(), i1);
        assert_eq!(nl.link("tweed.1").await.unwrap().unwrap().mtu, 1400);
        // The VNI cannot change in place: the device is re-created.
        let i2 = nl.ensure_vxlan(&spec(7, 1400)).await.unwrap();
        assert_ne!(i2, i1);
        let l = nl.link("tweed.1").await.unwrap().unwrap();
        assert_eq!(
            (l.vxlan.unwrap().vni, l.up, l.mac),
            (Some(7), true, Some(vtep_mac_for("n1")))
        );
        assert_eq!(
            nl.ipv4_addrs(i2).await.unwrap(),
            vec!["10.244.1.0/32".parse().unwrap()]
        );
    });
    let d = ns.ip(&["-d", "link", "show", "tweed.1"]);
    assert!(
        d.contains("vxlan id 7") && d.contains("dstport 8472") && d.contains("nolearning"),
        "{d}"
    );
}

#[test]
fn routes_neighbours_and_fdb_round_trip_and_foreign_routes_are_invisible() {
    let ns = Ns::new("rt");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]);
    ns.ip(&["addr", "add", "198.51.100.10/24", "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.run(|| async {
        let nl = Netlink::open().unwrap();
        nl.ensure_vxlan(&spec(1, 1450)).await.unwrap();
    });
    // A route on our device that tweed did not make.
    ns.ip(&["route", "add", "10.9.0.0/24", "dev", "tweed.1"]);
    ns.run(|| async {
        let nl = Netlink::open().unwrap();
        let r = Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "10.244.2.0".parse().unwrap(),
            dev: "tweed.1".into(),
            onlink: true,
            src: None,
        };
        let n = Neigh {
            ip: "10.244.2.0".parse().unwrap(),
            mac: vtep_mac_for("n2"),
            dev: "tweed.1".into(),
        };
        let f = Fdb {
            mac: vtep_mac_for("n2"),
            dst: "198.51.100.11".parse().unwrap(),
            dev: "tweed.1".into(),
        };
        for _ in 0..2 {
            nl.add_fdb(&f).await.unwrap();
            nl.add_neigh(&n).await.unwrap();
            nl.add_route(&r).await.unwrap();
        }
        assert_eq!(
            nl.owned_routes("tweed.1").await.unwrap(),
            BTreeSet::from([r.clone()])
        );
        assert_eq!(
            nl.permanent_neighs("tweed.1").await.unwrap(),
            BTreeSet::from([n.clone()])
        );
        assert!(nl.fdb("tweed.1").await.unwrap().contains(&f));
        for _ in 0..2 {
            nl.del_route(&r).await.unwrap();
            nl.del_neigh(&n).await.unwrap();
            nl.del_fdb(&f).await.unwrap();
        }
        assert!(nl.owned_routes("tweed.1").await.unwrap().is_empty());
        assert!(nl.permanent_neighs("tweed.1").await.unwrap().is_empty());
        assert!(!nl.fdb("tweed.1").await.unwrap().contains(&f));
    });
    let routes = ns.ip(&["route"]);
    assert!(
        routes.contains("10.9.0.0/24 dev tweed.1"),
        "the foreign route was touched: {routes}"
    );
    assert!(
        !routes.contains(&format!("proto {TWEED_RTPROTO}")),
        "{routes}"
    );
}

#[test]
fn ipv4_big_tcp_sizes_read_back_on_both_ends_of_a_veth() {
    let host = Ns::new("gsoh");
    let pod = Ns::new("gsop");
    host.ip(&[
        "link", "add", "h0", "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
    ]);
    let pod_path = std::path::PathBuf::from(format!("/run/netns/{}", pod.0));
    host.run(move || async move {
        let nl = Netlink::open().unwrap();
        let h = nl.link("h0").await.unwrap().unwrap();
        assert_eq!(
            (h.gso_ipv4_max_size, h.gro_ipv4_max_size),
            (Some(65_536), Some(65_536)),
            "the kernel's default (a kernel before 6.3 reports none: no IPv4 BIG TCP)"
        );
        nl.set_ipv4_max_sizes(h.index, 196_608).await.unwrap();
        let h = nl.link("h0").await.unwrap().unwrap();
        assert_eq!(
            (h.gso_ipv4_max_size, h.gro_ipv4_max_size),
            (Some(196_608), Some(196_608))
        );
        // The pod's end, from outside its namespace: set once, then a no-op.
        assert!(Netlink::set_ipv4_max_sizes_in(&pod_path, "eth0", 196_608)
            .await
            .unwrap());
        assert!(!Netlink::set_ipv4_max_sizes_in(&pod_path, "eth0", 196_608)
            .await
            .unwrap());
        let pod_end = || async {
            Netlink::open_in(&pod_path)
                .unwrap()
                .link("eth0")
                .await
                .unwrap()
                .unwrap()
        };
        let p = pod_end().await;
        assert_eq!(
            (p.gso_ipv4_max_size, p.gro_ipv4_max_size),
            (Some(196_608), Some(196_608))
        );
        // Back to the default; the host end keeps its own size.
        assert!(Netlink::set_ipv4_max_sizes_in(&pod_path, "eth0", 65_536)
            .await
            .unwrap());
        assert_eq!(pod_end().await.gso_ipv4_max_size, Some(65_536));
        let h = nl.link("h0").await.unwrap().unwrap();
        assert_eq!(h.gso_ipv4_max_size, Some(196_608));
        // A link that is not there is an error naming it.
        let e = Netlink::set_ipv4_max_sizes_in(&pod_path, "nope0", 65_536)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nope0"), "{e}");
    });
    // A size above what the device can do is refused, not clamped silently.
    host.run(|| async {
        let nl = Netlink::open().unwrap();
        let h = nl.link("h0").await.unwrap().unwrap();
        assert!(nl.set_ipv4_max_sizes(h.index, 1 << 30).await.is_err());
    });
}

/// The watch's next event, within a deadline.
async fn event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>, what: &str) {
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("the watch ended");
}

#[test]
fn a_table_is_watched_and_flushed_without_touching_the_others() {
    let ns = Ns::new("tbl");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]);
    ns.ip(&["addr", "add", "198.51.100.10/24", "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&["route", "add", "10.8.0.0/24", "via", "198.51.100.1"]);
    let name = ns.0.clone();
    ns.run(move || async move {
        let ip = |args: &[&str]| {
            let o = Command::new("ip")
                .args(["-n", &name])
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "ip {args:?}");
        };
        let mut rx = tweed_netlink::watch_table(7745).unwrap();
        // A route in another table says nothing.
        ip(&[
            "route",
            "add",
            "10.9.0.0/24",
            "via",
            "198.51.100.1",
            "table",
            "100",
        ]);
        ip(&[
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "198.51.100.11",
            "table",
            "7745",
        ]);
        // Events come in order: the first one must be table 7745's add.
        event(&mut rx, "no event for table 7745 within 5 s").await;
        assert!(rx.try_recv().is_err(), "table 100's route was reported");
        ip(&[
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "198.51.100.12",
            "table",
            "7745",
        ]);
        event(&mut rx, "no event for the second route").await;
        let nl = Netlink::open().unwrap();
        assert_eq!(nl.flush_table(7745).await.unwrap(), 2);
        assert_eq!(
            nl.flush_table(7745).await.unwrap(),
            0,
            "flushing is idempotent"
        );
        // Each deletion is reported too.
        for _ in 0..2 {
            event(&mut rx, "no event for a deletion").await;
        }
    });
    assert_eq!(ns.ip(&["route", "show", "table", "7745"]).trim(), "");
    assert!(ns
        .ip(&["route", "show", "table", "100"])
        .contains("10.9.0.0/24"));
    assert!(ns.ip(&["route"]).contains("10.8.0.0/24"));
}
