//! The rendered ruleset loads into a real kernel, and deltas apply on top
//! of it, in a network namespace of the test's own. Needs root.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::process::Command;

use tweed_model::{
    Endpoint, Endpoints, Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
};
use tweed_plan::services::{plan_service, render_delta, render_full, ProxyConfig};

fn in_new_netns<T: Send + 'static>(tag: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = format!("tw-nfttest-{tag}-{}", std::process::id());
    let o = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "needs root to create a network namespace: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let path = format!("/run/netns/{name}");
    let r = std::thread::spawn(move || {
        let fd = std::fs::File::open(path).unwrap();
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join();
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    r.unwrap()
}

fn svc(name: &str, ip: &str, np: Option<u16>, affinity: Option<u32>) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        service_type: if np.is_some() {
            ServiceType::NodePort
        } else {
            ServiceType::ClusterIP
        },
        cluster_ip: Some(ip.parse().unwrap()),
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::TCP,
            port: 80,
            target_port: Some(TargetPort::Number(8080)),
            node_port: np,
        }],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: Vec::new(),
        health_check_node_port: None,
        affinity_timeout: affinity,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        selector: BTreeMap::new(),
    }
}

fn eps(n: usize) -> Endpoints {
    Endpoints {
        namespace: "default".into(),
        name: "x".into(),
        endpoints: (0..n)
            .map(|i| Endpoint {
                ip: format!("10.244.1.{}", i + 2).parse().unwrap(),
                node: "n1".into(),
                ports: [(String::new(), 8080)].into(),
                ready: true,
                serving: true,
                terminating: false,
                pod: String::new(),
            })
            .collect(),
    }
}

#[test]
fn full_ruleset_and_deltas_load_into_the_kernel() {
    in_new_netns("load", || {
        let cfg = ProxyConfig {
            node: "n1".into(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            node_subnet: "10.244.1.0/24".parse().unwrap(),
        };
        let a = plan_service(
            &cfg,
            &svc("a", "10.96.0.10", Some(30080), None),
            Some(&eps(3)),
        );
        let b = plan_service(&cfg, &svc("b", "10.96.0.11", None, None), Some(&eps(0)));
        let c = plan_service(&cfg, &svc("c", "10.96.0.12", None, Some(60)), Some(&eps(2)));
        let (script, shape) = render_full(&cfg, [&a, &b, &c].into_iter());
        tweed_nft::apply(&script).unwrap_or_else(|e| panic!("{e}\n{script}"));
        // Applying the full ruleset again replaces it atomically.
        tweed_nft::apply(&script).unwrap();
        // b gets 20 endpoints (a new endpoint count).
        let b2 = plan_service(&cfg, &svc("b", "10.96.0.11", None, None), Some(&eps(20)));
        let d = render_delta(&b, &b2, &shape).expect("20 is a preset K").0;
        tweed_nft::apply(&d).unwrap_or_else(|e| panic!("{e}\n{d}"));
        // c (affinity) goes from 2 to 3 endpoints, then its timeout changes, then it goes away.
        let c2 = plan_service(&cfg, &svc("c", "10.96.0.12", None, Some(60)), Some(&eps(3)));
        let c3 = plan_service(&cfg, &svc("c", "10.96.0.12", None, Some(5)), Some(&eps(3)));
        for (from, to) in [(&c, &c2), (&c2, &c3)] {
            let d = render_delta(from, to, &shape).unwrap().0;
            tweed_nft::apply(&d).unwrap_or_else(|e| panic!("{e}\n{d}"));
        }
        let mid = String::from_utf8(
            Command::new("nft")
                .args(["list", "table", "ip", "tweed"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            mid.contains("timeout 5s") && !mid.contains("timeout 1m"),
            "{mid}"
        );
        let d = render_delta(&c3, &Default::default(), &shape).unwrap().0;
        tweed_nft::apply(&d).unwrap_or_else(|e| panic!("{e}\n{d}"));
        // a loses its endpoints.
        let a2 = plan_service(
            &cfg,
            &svc("a", "10.96.0.10", Some(30080), None),
            Some(&eps(0)),
        );
        tweed_nft::apply(&render_delta(&a, &a2, &shape).unwrap().0).unwrap();
        let listing = String::from_utf8(
            Command::new("nft")
                .args(["list", "table", "ip", "tweed"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            listing.contains("10.96.0.11 . 80 . 19 : 10.244.1.21 . 8080"),
            "{listing}"
        );
        assert!(
            !listing.contains("chain aff-") && !listing.contains("10.96.0.12"),
            "affinity leftovers: {listing}"
        );
        assert!(
            listing.contains("set rej-lb") && listing.contains("10.96.0.10 . tcp . 80"),
            "{listing}"
        );
        assert!(
            listing.contains("set lb-tcp-20") && listing.contains("10.96.0.11 . 80"),
            "{listing}"
        );
        // A bad transaction changes nothing.
        assert!(tweed_nft::apply("add element ip tweed be { 1.2.3.4 }\nadd element ip tweed rej-lb { 10.96.0.99 . tcp . 80 }\n").is_err());
        let after = String::from_utf8(
            Command::new("nft")
                .args(["list", "table", "ip", "tweed"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(!after.contains("10.96.0.99"));
    });
}
