use std::collections::BTreeSet;

use tweed_netlink::{Netlink, NetlinkError};
use tweed_plan::{diff, route_devices, Fdb, IpipLink, Neigh, NodePlan, Route, VxlanLink};

/// The kernel operations reconciling needs, so the agent's logic can be
/// exercised against a fake. Implemented for [`Netlink`].
#[allow(async_fn_in_trait)]
pub trait Dataplane {
    async fn ensure_vxlan(&self, spec: &VxlanLink) -> Result<(), NetlinkError>;
    async fn ensure_ipip(&self, spec: &IpipLink) -> Result<(), NetlinkError>;
    async fn routes(&self, dev: &str) -> Result<BTreeSet<Route>, NetlinkError>;
    async fn add_route(&self, r: &Route) -> Result<(), NetlinkError>;
    async fn del_route(&self, r: &Route) -> Result<(), NetlinkError>;
    async fn neighs(&self, dev: &str) -> Result<BTreeSet<Neigh>, NetlinkError>;
    async fn add_neigh(&self, n: &Neigh) -> Result<(), NetlinkError>;
    async fn del_neigh(&self, n: &Neigh) -> Result<(), NetlinkError>;
    async fn fdb(&self, dev: &str) -> Result<BTreeSet<Fdb>, NetlinkError>;
    async fn add_fdb(&self, f: &Fdb) -> Result<(), NetlinkError>;
    async fn del_fdb(&self, f: &Fdb) -> Result<(), NetlinkError>;
}

impl Dataplane for Netlink {
    async fn ensure_vxlan(&self, spec: &VxlanLink) -> Result<(), NetlinkError> {
        Netlink::ensure_vxlan(self, spec).await.map(|_| ())
    }
    async fn ensure_ipip(&self, spec: &IpipLink) -> Result<(), NetlinkError> {
        Netlink::ensure_ipip(self, spec).await.map(|_| ())
    }
    async fn routes(&self, dev: &str) -> Result<BTreeSet<Route>, NetlinkError> {
        self.owned_routes(dev).await
    }
    async fn add_route(&self, r: &Route) -> Result<(), NetlinkError> {
        Netlink::add_route(self, r).await
    }
    async fn del_route(&self, r: &Route) -> Result<(), NetlinkError> {
        Netlink::del_route(self, r).await
    }
    async fn neighs(&self, dev: &str) -> Result<BTreeSet<Neigh>, NetlinkError> {
        self.permanent_neighs(dev).await
    }
    async fn add_neigh(&self, n: &Neigh) -> Result<(), NetlinkError> {
        Netlink::add_neigh(self, n).await
    }
    async fn del_neigh(&self, n: &Neigh) -> Result<(), NetlinkError> {
        Netlink::del_neigh(self, n).await
    }
    async fn fdb(&self, dev: &str) -> Result<BTreeSet<Fdb>, NetlinkError> {
        Netlink::fdb(self, dev).await
    }
    async fn add_fdb(&self, f: &Fdb) -> Result<(), NetlinkError> {
        Netlink::add_fdb(self, f).await
    }
    async fn del_fdb(&self, f: &Fdb) -> Result<(), NetlinkError> {
        Netlink::del_fdb(self, f).await
    }
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: usize,
    pub removed: usize,
}

/// Make the kernel match `plan`. Entries a peer needs are added before its
/// route (so the route works the moment it exists) and routes are removed
/// before the entries they use. Only tweed's device and tweed's routes are
/// read or changed.
pub async fn reconcile<D: Dataplane>(
    dp: &D,
    plan: &NodePlan,
    underlay_dev: &str,
) -> Result<ReconcileReport, NetlinkError> {
    if let Some(v) = &plan.vxlan {
        dp.ensure_vxlan(v).await?;
    }
    if let Some(i) = &plan.ipip {
        dp.ensure_ipip(i).await?;
    }
    let mut rep = ReconcileReport::default();
    let (mut fdb_add, mut fdb_del, mut nb_add, mut nb_del) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if let Some(v) = &plan.vxlan {
        (fdb_add, fdb_del) = diff(&plan.fdb, &dp.fdb(&v.name).await?);
        (nb_add, nb_del) = diff(&plan.neighs, &dp.neighs(&v.name).await?);
    }
    let mut actual = BTreeSet::new();
    for dev in route_devices(plan, underlay_dev) {
        actual.extend(dp.routes(&dev).await?);
    }
    let (rt_add, rt_del) = diff(&plan.routes, &actual);
    // A route whose destination is being added again (a peer switching
    // between direct and VXLAN) is replaced in place, not deleted first, so
    // its pods are never without a route.
    let replaced: BTreeSet<_> = rt_add.iter().map(|r| r.dst).collect();

    for f in &fdb_add {
        dp.add_fdb(f).await?;
    }
    for n in &nb_add {
        dp.add_neigh(n).await?;
    }
    for r in &rt_add {
        dp.add_route(r).await?;
    }
    for r in rt_del.iter().filter(|r| !replaced.contains(&r.dst)) {
        dp.del_route(r).await?;
    }
    for f in &fdb_del {
        dp.del_fdb(f).await?;
    }
    for n in &nb_del {
        dp.del_neigh(n).await?;
    }
    rep.added = fdb_add.len() + nb_add.len() + rt_add.len();
    rep.removed = fdb_del.len() + nb_del.len() + rt_del.len();
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use tweed_model::{vtep_mac_for, Backend, ClusterConfig, NodeRecord};
    use tweed_plan::{plan_node, LocalNode};

    /// An in-memory kernel that records the order of operations.
    #[derive(Default)]
    struct Fake {
        routes: RefCell<BTreeSet<Route>>,
        neighs: RefCell<BTreeSet<Neigh>>,
        fdb: RefCell<BTreeSet<Fdb>>,
        log: RefCell<Vec<String>>,
    }

    impl Dataplane for Fake {
        async fn ensure_vxlan(&self, s: &VxlanLink) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("vxlan {}", s.name));
            Ok(())
        }
        async fn ensure_ipip(&self, s: &IpipLink) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("ipip {}", s.name));
            Ok(())
        }
        async fn routes(&self, dev: &str) -> Result<BTreeSet<Route>, NetlinkError> {
            Ok(self
                .routes
                .borrow()
                .iter()
                .filter(|r| r.dev == dev)
                .cloned()
                .collect())
        }
        async fn add_route(&self, r: &Route) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("+route {}", r.dst));
            // Like `ip route replace`: one route per destination.
            self.routes.borrow_mut().retain(|x| x.dst != r.dst);
            self.routes.borrow_mut().insert(r.clone());
            Ok(())
        }
        async fn del_route(&self, r: &Route) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("-route {}", r.dst));
            self.routes.borrow_mut().remove(r);
            Ok(())
        }
        async fn neighs(&self, _: &str) -> Result<BTreeSet<Neigh>, NetlinkError> {
            Ok(self.neighs.borrow().clone())
        }
        async fn add_neigh(&self, n: &Neigh) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("+neigh {}", n.ip));
            self.neighs.borrow_mut().insert(n.clone());
            Ok(())
        }
        async fn del_neigh(&self, n: &Neigh) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("-neigh {}", n.ip));
            self.neighs.borrow_mut().remove(n);
            Ok(())
        }
        async fn fdb(&self, _: &str) -> Result<BTreeSet<Fdb>, NetlinkError> {
            Ok(self.fdb.borrow().clone())
        }
        async fn add_fdb(&self, f: &Fdb) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("+fdb {}", f.dst));
            self.fdb.borrow_mut().insert(f.clone());
            Ok(())
        }
        async fn del_fdb(&self, f: &Fdb) -> Result<(), NetlinkError> {
            self.log.borrow_mut().push(format!("-fdb {}", f.dst));
            self.fdb.borrow_mut().remove(f);
            Ok(())
        }
    }

    fn rec(name: &str, n: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            public_ip: format!("198.51.100.{}", 10 + n).parse().unwrap(),
            backend: Backend::Vxlan,
            vtep_mac: vtep_mac_for(name),
            unreachable: Vec::new(),
            bgp: None,
        }
    }

    fn plan(peers: &[NodeRecord]) -> NodePlan {
        let me = LocalNode {
            record: rec("n1", 1),
            bind_ip: "198.51.100.11".parse().unwrap(),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        };
        let cfg = ClusterConfig {
            backend: Backend::Vxlan,
            ..Default::default()
        };
        plan_node(&cfg, &me, peers, &Default::default())
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn switching_a_peer_between_direct_and_vxlan_replaces_its_route_in_place() {
        let fake = Fake::default();
        let me = LocalNode {
            record: rec("n1", 1),
            bind_ip: "198.51.100.11".parse().unwrap(),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        };
        let cfg = ClusterConfig::default();
        let peers = [rec("n2", 2)];
        let direct: std::collections::BTreeMap<String, tweed_plan::PeerFacts> = [(
            "n2".to_string(),
            tweed_plan::PeerFacts {
                connected: true,
                probe: Some(true),
                learnt: None,
            },
        )]
        .into();
        block(reconcile(
            &fake,
            &plan_node(&cfg, &me, &peers, &Default::default()),
            "eth0",
        ))
        .unwrap();
        assert!(fake.routes.borrow().iter().any(|r| r.dev == "tweed.1"));
        fake.log.borrow_mut().clear();
        block(reconcile(
            &fake,
            &plan_node(&cfg, &me, &peers, &direct),
            "eth0",
        ))
        .unwrap();
        let log = fake.log.borrow().clone();
        assert!(
            !log.iter().any(|l| l.starts_with("-route")),
            "the route was deleted before its replacement: {log:?}"
        );
        let routes = fake.routes.borrow().clone();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes.iter().next().unwrap().dev, "eth0");
        // Its VXLAN entries go once the direct route is in.
        assert!(fake.fdb.borrow().is_empty() && fake.neighs.borrow().is_empty());
    }

    #[test]
    fn converges_orders_safely_and_is_idempotent() {
        let fake = Fake::default();
        let p = plan(&[rec("n2", 2), rec("n3", 3)]);
        let r = block(reconcile(&fake, &p, "eth0")).unwrap();
        assert_eq!(
            r,
            ReconcileReport {
                added: 6,
                removed: 0
            }
        );
        let log = fake.log.borrow().clone();
        let pos = |s: &str| log.iter().position(|l| l == s).unwrap();
        assert!(
            pos("+fdb 198.51.100.12") < pos("+route 10.244.2.0/24"),
            "{log:?}"
        );
        assert!(
            pos("+neigh 10.244.2.0") < pos("+route 10.244.2.0/24"),
            "{log:?}"
        );

        // Nothing to do the second time.
        assert_eq!(
            block(reconcile(&fake, &p, "eth0")).unwrap(),
            ReconcileReport::default()
        );

        // A route deleted by hand comes back; nothing else is touched.
        let gone = fake.routes.borrow().iter().next().unwrap().clone();
        fake.routes.borrow_mut().remove(&gone);
        assert_eq!(
            block(reconcile(&fake, &p, "eth0")).unwrap(),
            ReconcileReport {
                added: 1,
                removed: 0
            }
        );
        assert!(fake.routes.borrow().contains(&gone));

        // A peer leaving removes its route before its entries.
        fake.log.borrow_mut().clear();
        let r = block(reconcile(&fake, &plan(&[rec("n2", 2)]), "eth0")).unwrap();
        assert_eq!(
            r,
            ReconcileReport {
                added: 0,
                removed: 3
            }
        );
        let log = fake.log.borrow().clone();
        assert_eq!(log[1], "-route 10.244.3.0/24", "{log:?}");
    }
}
