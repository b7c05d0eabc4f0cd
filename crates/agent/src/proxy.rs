//! The service proxy: kube-proxy's job on nftables. It keeps what it
//! committed to the kernel in memory, per service, and turns each change
//! into a small transaction of element updates, sent as raw nf_tables
//! netlink (no `nft` process unless the shape changes); it never lists the
//! ruleset in steady state. A full sync keeps the table and refills every
//! element set in one batch ([`render_full_txn`]), so nothing is refused
//! while it runs. A failed transaction, or a change the ruleset's shape
//! cannot take, falls back to a full sync; a full sync the kernel refuses
//! (a map outgrew its size) replaces the table atomically through `nft`
//! (conntrack keeps established connections flowing through it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use crate::packed::{for_planning, PackedEndpoints};
use tweed_model::{Endpoints, HostPorts, Service};
use tweed_nft::NftError;
use tweed_plan::services::{
    plan_hostports, plan_service_from, render_delta_txn, render_full, render_full_txn, stale_flows,
    Contribution, Flow, ProxyConfig, Shape, Txn,
};

fn hostport_contribution(h: &HostPorts) -> Contribution {
    let m: Vec<_> = h
        .mappings
        .iter()
        .map(|(p, hp, cp)| (*p, *hp, h.pod_ip, *cp))
        .collect();
    plan_hostports(&m)
}

/// Read every host-port record (ids are `hostport/FILE`).
pub fn read_hostports(run_dir: &std::path::Path) -> BTreeMap<String, Contribution> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(run_dir.join("hostports")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(e.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<HostPorts>(&b).map_err(|e| e.to_string()))
            {
                Ok(h) => {
                    out.insert(format!("hostport/{name}"), hostport_contribution(&h));
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), %err, "ignoring a host-port record")
                }
            }
        }
    }
    out
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub full: bool,
    pub services: usize,
    pub millis: f64,
}

pub struct Proxy {
    cfg: ProxyConfig,
    run_dir: PathBuf,
    services: BTreeMap<String, Service>,
    endpoints: BTreeMap<String, PackedEndpoints>,
    /// What the kernel holds, per service id (and per host-port record).
    committed: BTreeMap<String, Contribution>,
    /// `None` until a full sync has succeeded.
    shape: Option<Shape>,
    dirty: BTreeSet<String>,
    /// Services with external or load balancer IPs or a health check
    /// port: the few that BGP announcements and health checks look at.
    addressed: BTreeSet<String>,
}

/// Does BGP or a health check need to look at this Service?
fn addressed(s: &Service) -> bool {
    !s.external_ips.is_empty()
        || !s.load_balancer_ips.is_empty()
        || s.health_check_node_port.is_some()
        || s.service_type == tweed_model::ServiceType::LoadBalancer
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, run_dir: PathBuf) -> Self {
        Self {
            cfg,
            run_dir,
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            committed: BTreeMap::new(),
            shape: None,
            dirty: BTreeSet::new(),
            addressed: BTreeSet::new(),
        }
    }

    /// Replace the whole model (after a fresh list from the datastore).
    /// Endpoints are packed one by one as they are taken.
    pub fn load<E: Into<PackedEndpoints>>(
        &mut self,
        services: BTreeMap<String, Service>,
        endpoints: impl IntoIterator<Item = (String, E)>,
    ) {
        self.services = services
            .into_iter()
            .map(|(k, s)| (k, for_planning(s)))
            .collect();
        self.endpoints = endpoints.into_iter().map(|(k, e)| (k, e.into())).collect();
        self.addressed = self
            .services
            .iter()
            .filter(|(_, s)| addressed(s))
            .map(|(k, _)| k.clone())
            .collect();
        self.shape = None;
    }

    pub fn set_service(&mut self, id: String, svc: Option<Service>) {
        if svc.as_ref().is_some_and(addressed) {
            self.addressed.insert(id.clone());
        } else {
            self.addressed.remove(&id);
        }
        match svc {
            Some(s) => self.services.insert(id.clone(), for_planning(s)),
            None => self.services.remove(&id),
        };
        self.dirty.insert(id);
    }

    pub fn set_endpoints(&mut self, id: String, eps: Option<Endpoints>) {
        match eps {
            Some(e) => self.endpoints.insert(id.clone(), e.into()),
            None => self.endpoints.remove(&id),
        };
        self.dirty.insert(id);
    }

    /// The Service addresses this node announces by BGP: external IPs
    /// and load balancer IPs, for policy Local only while an endpoint is
    /// ready here (the fabric's ECMP must never pick a node that would
    /// drop the traffic), for policy Cluster always.
    pub fn announced_ips(&self) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
        let mut out = std::collections::BTreeSet::new();
        for (id, s) in self
            .addressed
            .iter()
            .filter_map(|id| Some((id, self.services.get(id)?)))
        {
            let here = match s.external_traffic_policy {
                tweed_model::TrafficPolicy::Cluster => true,
                tweed_model::TrafficPolicy::Local => self.ready_here(id) > 0,
            };
            if here {
                out.extend(s.external_ips.iter().chain(&s.load_balancer_ips));
            }
        }
        out
    }

    fn ready_here(&self, id: &str) -> usize {
        self.endpoints
            .get(id)
            .map_or(0, |e| e.ready_on(&self.cfg.node))
    }

    /// Each health check node port: the Service (`ns/name`) and how many
    /// ready endpoints it has on this node.
    pub fn health_checks(&self) -> BTreeMap<u16, (String, usize)> {
        self.addressed
            .iter()
            .filter_map(|id| {
                let port = self.services.get(id)?.health_check_node_port?;
                Some((port, (id.clone(), self.ready_here(id))))
            })
            .collect()
    }

    /// LoadBalancer Services with no address yet (by id), and every
    /// load balancer address in use.
    pub fn load_balancers(&self) -> (Vec<String>, std::collections::BTreeSet<std::net::Ipv4Addr>) {
        let mut pending = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        for (id, s) in self
            .addressed
            .iter()
            .filter_map(|id| Some((id, self.services.get(id)?)))
        {
            used.extend(s.load_balancer_ips.iter().copied());
            if s.service_type == tweed_model::ServiceType::LoadBalancer
                && s.load_balancer_ips.is_empty()
            {
                pending.push(id.clone());
            }
        }
        (pending, used)
    }

    fn plan(&self, id: &str) -> Contribution {
        self.plan_from(id, self.committed.get(id))
    }

    /// Plan one service; `prev` (what the kernel holds) keeps its
    /// endpoints in the slots they have.
    fn plan_from(&self, id: &str, prev: Option<&Contribution>) -> Contribution {
        self.services
            .get(id)
            .map(|s| {
                let eps = self.endpoints.get(id).map(|e| e.unpack());
                plan_service_from(&self.cfg, s, eps.as_ref(), prev)
            })
            .unwrap_or_default()
    }

    /// Plan everything and replace the table in one transaction.
    pub fn full_sync(&mut self) -> Result<SyncReport, NftError> {
        let t = Instant::now();
        // Each old plan is dropped as soon as its service is planned anew,
        // with what lost its backend noted: holding both sets of plans
        // would double them at the peak (13 MiB each at 30k Services).
        // Until this sync succeeds nothing is known to be committed, so a
        // failure leaves the next flush a full sync to do.
        let mut old = std::mem::take(&mut self.committed);
        self.shape = None;
        let mut stale: Vec<Flow> = Vec::new();
        let mut planned: BTreeMap<String, Contribution> = BTreeMap::new();
        for id in self.services.keys() {
            let prev = old.remove(id);
            let new = self.plan_from(id, prev.as_ref());
            if let Some(prev) = prev {
                stale.extend(stale_flows(&prev, &new));
            }
            planned.insert(id.clone(), new);
        }
        for (id, new) in read_hostports(&self.run_dir) {
            if let Some(prev) = old.remove(&id) {
                stale.extend(stale_flows(&prev, &new));
            }
            planned.insert(id, new);
        }
        drop(old);
        tracing::debug!(hwm_mib = crate::mem::peak_rss_mib(), "full sync planned");
        let kept = tweed_nft::txn::existing().and_then(|existing| {
            let (txn, shape) = render_full_txn(&self.cfg, planned.values(), &existing);
            let rendered = t.elapsed();
            tracing::debug!(hwm_mib = crate::mem::peak_rss_mib(), "full sync rendered");
            tweed_nft::txn::apply_txn(&txn)?;
            tracing::debug!(
                render_ms = rendered.as_secs_f64() * 1000.0,
                kernel_ms = (t.elapsed() - rendered).as_secs_f64() * 1000.0,
                elements = txn.additions(),
                "full sync"
            );
            Ok(shape)
        });
        let shape = match kept {
            Ok(shape) => shape,
            Err(e) => {
                // E.g. a map outgrew the size it was made with: make the
                // table anew, in one transaction.
                tracing::info!(error = %e, "full sync over the existing table refused; replacing the table");
                let (script, shape) = render_full(&self.cfg, planned.values());
                tweed_nft::apply(&script)?;
                shape
            }
        };
        self.committed = planned;
        self.shape = Some(shape);
        self.dirty.clear();
        forget(&stale);
        Ok(SyncReport {
            full: true,
            services: self.services.len(),
            millis: t.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Apply what changed since the last call, as one small transaction;
    /// falls back to a full sync when that is impossible or fails.
    pub fn flush(&mut self) -> Result<Option<SyncReport>, NftError> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        let Some(shape) = self.shape.clone() else {
            return self.full_sync().map(Some);
        };
        let t = Instant::now();
        let dirty: Vec<String> = std::mem::take(&mut self.dirty).into_iter().collect();
        let empty = Contribution::default();
        let mut txn = Txn::default();
        let mut planned = Vec::new();
        for id in &dirty {
            let new = self.plan(id);
            let old = self.committed.get(id).unwrap_or(&empty);
            match render_delta_txn(old, &new, &shape) {
                Some((d, kept)) => {
                    txn.extend(d);
                    planned.push((id.clone(), new, kept));
                }
                None => {
                    tracing::info!(service = %id, "a new endpoint count needs a full sync");
                    return self.full_sync().map(Some);
                }
            }
        }
        if let Err(e) = tweed_nft::txn::apply_txn(&txn) {
            tracing::warn!(error = %e, "incremental update failed; doing a full sync");
            return self.full_sync().map(Some);
        }
        let mut stale = Vec::new();
        for (id, new, kept) in planned {
            let old = self.committed.remove(&id).unwrap_or_default();
            stale.extend(stale_flows(&old, &new));
            if self.services.contains_key(&id) {
                // What the kernel holds: the plan plus harmless leftovers.
                self.committed.insert(id, kept);
            }
        }
        forget(&stale);
        Ok(Some(SyncReport {
            full: false,
            services: dirty.len(),
            millis: t.elapsed().as_secs_f64() * 1000.0,
        }))
    }
}

/// Delete conntrack entries of flows that lost their backend, on a thread
/// of its own right after the rules changed: each deletion is a
/// `conntrack` process, and the rule update must not wait for them.
/// Failures are logged, not fatal (the entries time out on their own).
fn forget(flows: &[Flow]) {
    if flows.is_empty() {
        return;
    }
    let flows = flows.to_vec();
    std::thread::spawn(move || {
        for f in &flows {
            if let Err(e) = tweed_nft::forget(f) {
                tracing::warn!(error = %e, "conntrack clean-up failed");
            }
        }
    });
}

/// Is tweed's table in the kernel? (`nft list tables`: names only, cheap.)
pub fn table_present() -> bool {
    std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == format!("table ip {}", tweed_plan::services::TABLE))
        })
        .unwrap_or(false)
}
