//! The one interface the agent has to its datastore, and its etcd side.
//!
//! The agent's logic (plan, apply, proxy) never knows which store it talks
//! to: it registers the node, takes a complete snapshot, then follows
//! [`Update`]s. Each store is level-triggered underneath (etcd: list at a
//! revision, watch from it; Kubernetes: list-watch with re-lists after
//! `410 Gone`), and hands over only what changed, so one endpoint change
//! stays one small nftables transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::Ipv4Net;
use tweed_model::{ClusterConfig, Endpoints, NodeRecord, Service};
use tweed_store::{apply_events, LeaseKeepAliveStream, LeaseKeeper, NodeEvent, NodeWatch};
use tweed_store::{PrefixWatch, Store, StoreError};

use crate::error::AgentError;
use crate::packed::PackedEndpoints;

/// Everything the agent follows, complete, at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every node with a published record, by subnet (this node included).
    pub nodes: BTreeMap<Ipv4Net, NodeRecord>,
    /// By "namespace/name".
    pub services: BTreeMap<String, Service>,
    /// Packed as each is decoded (an agent holds 300k endpoints at 30k
    /// Services).
    pub endpoints: BTreeMap<String, PackedEndpoints>,
}

/// A change since the snapshot or the last update.
#[derive(Debug)]
pub enum Update {
    /// The node records now (complete; they are few).
    Nodes(BTreeMap<Ipv4Net, NodeRecord>),
    /// Services that changed (`None`: gone, or no longer proxied).
    Services(Vec<(String, Option<Service>)>),
    Endpoints(Vec<(String, Option<Endpoints>)>),
    /// The store is having trouble it will retry by itself (e.g. a watch
    /// refused or the API server away); the data plane stays as it is.
    Trouble(String),
    /// The trouble is over.
    Healthy,
    /// The node record's lease was renewed (etcd): for `tweed doctor`,
    /// which warns before it expires.
    LeaseRenewed(Lease),
}

/// The lease a node lives by. etcd: the agent's, on its node record
/// (peers drop a node whose lease expires, and its subnet can then be
/// claimed by another node). Kubernetes: kubelet's, in kube-node-lease
/// (the node controller marks the node NotReady, and its pods leave
/// every Service's endpoints).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    /// "agent" or "kubelet".
    pub holder: &'static str,
    pub ttl_secs: i64,
    pub renewed: std::time::SystemTime,
}

#[allow(async_fn_in_trait)]
pub trait Datastore {
    /// Where it is, for logs and `tweed status`.
    fn describe(&self) -> String;
    /// The cluster config in force.
    async fn config(&mut self, default: &ClusterConfig) -> Result<ClusterConfig, AgentError>;
    /// Take (etcd) or learn (Kubernetes: the Node's `spec.podCIDR`) this
    /// node's subnet, then publish its record. May wait; `waiting` is told
    /// why, as often as that changes.
    async fn register(
        &mut self,
        cfg: &ClusterConfig,
        want: &NodeRecord,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<NodeRecord, AgentError>;
    /// Rewrite this node's record.
    async fn publish(&mut self, rec: &NodeRecord) -> Result<(), AgentError>;
    /// This node's pod network is programmed and its CNI config written.
    async fn network_ready(&mut self) -> Result<(), AgentError>;
    /// Everything, complete.
    async fn snapshot(&mut self, cfg: &ClusterConfig) -> Result<Snapshot, AgentError>;
    /// The next change. Cancel-safe: the agent races it against its timers.
    async fn next(&mut self, cfg: &ClusterConfig) -> Result<Update, AgentError>;
    /// Does the agent hand out LoadBalancer addresses here? (etcd: no,
    /// they are claimed when the Service is written.)
    fn assigns_load_balancer_ips(&self) -> bool {
        false
    }
    /// Write a LoadBalancer Service's address (`ns/name`).
    async fn set_load_balancer_ips(
        &mut self,
        _id: &str,
        _ips: &[std::net::Ipv4Addr],
    ) -> Result<(), AgentError> {
        Ok(())
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Option<T> {
    serde_json::from_slice(v)
        .map_err(|e| tracing::warn!(%key, error = %e, "ignoring a record that does not decode"))
        .ok()
}

/// tweed's own keys in etcd v3 (the lab's datastore): subnets claimed by
/// compare-and-swap, bound to a lease this side keeps alive.
pub struct Etcd {
    store: Store,
    endpoints: String,
    ttl: i64,
    lease: i64,
    me: Option<NodeRecord>,
    keep: Option<(LeaseKeeper, LeaseKeepAliveStream, tokio::time::Interval)>,
    nodes: BTreeMap<Ipv4Net, NodeRecord>,
    /// Revisions the snapshot was read at: the watches start after them.
    revs: (i64, i64, i64),
    watches: Option<(NodeWatch, PrefixWatch, PrefixWatch)>,
}

impl Etcd {
    pub async fn connect(endpoints: &[String], prefix: &str, ttl: i64) -> Result<Self, AgentError> {
        Ok(Self {
            store: Store::connect(endpoints, prefix).await?,
            endpoints: endpoints.join(","),
            ttl,
            lease: 0,
            me: None,
            keep: None,
            nodes: BTreeMap::new(),
            revs: (0, 0, 0),
            watches: None,
        })
    }

    fn etcd_err(&self, source: tweed_store::EtcdError) -> AgentError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
        .into()
    }
}

impl Datastore for Etcd {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints)
    }

    async fn config(&mut self, default: &ClusterConfig) -> Result<ClusterConfig, AgentError> {
        Ok(self.store.init_config(default).await?)
    }

    async fn register(
        &mut self,
        cfg: &ClusterConfig,
        want: &NodeRecord,
        _waiting: &mut dyn FnMut(&str),
    ) -> Result<NodeRecord, AgentError> {
        let (me, lease) = self.store.claim(cfg, want, self.ttl).await?;
        tracing::info!(subnet = %me.subnet, lease, "subnet claimed");
        let (keeper, stream) = self.store.keep_alive(lease).await?;
        let every = Duration::from_secs((self.ttl as u64 / 3).max(1));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        self.keep = Some((keeper, stream, tick));
        self.lease = lease;
        self.me = Some(me.clone());
        Ok(me)
    }

    async fn publish(&mut self, rec: &NodeRecord) -> Result<(), AgentError> {
        self.store.publish(rec, self.lease).await?;
        Ok(())
    }

    async fn network_ready(&mut self) -> Result<(), AgentError> {
        Ok(())
    }

    async fn snapshot(&mut self, _cfg: &ClusterConfig) -> Result<Snapshot, AgentError> {
        let (nodes, _, node_rev) = self.store.nodes().await?;
        self.nodes = nodes
            .into_iter()
            .map(|n| (n.record.subnet, n.record))
            .collect();
        let mut services = BTreeMap::new();
        let svc_rev = self
            .store
            .scan_prefix(&self.store.services_prefix(), |k, v| {
                if let Some(s) = decode::<Service>(&k, v) {
                    services.insert(k, crate::packed::for_planning(s));
                }
            })
            .await?;
        let mut endpoints = BTreeMap::new();
        let ep_rev = self
            .store
            .scan_prefix(&self.store.endpoints_prefix(), |k, v| {
                if let Some(e) = decode::<Endpoints>(&k, v) {
                    endpoints.insert(k, PackedEndpoints::from(e));
                }
            })
            .await?;
        self.revs = (node_rev, svc_rev, ep_rev);
        self.watches = None;
        Ok(Snapshot {
            nodes: self.nodes.clone(),
            services,
            endpoints,
        })
    }

    async fn next(&mut self, _cfg: &ClusterConfig) -> Result<Update, AgentError> {
        if self.watches.is_none() {
            let (n, s, e) = self.revs;
            let nodes = self.store.watch_nodes(n).await?;
            let svc_prefix = self.store.services_prefix();
            let svcs = self.store.watch_prefix(&svc_prefix, s).await?;
            let ep_prefix = self.store.endpoints_prefix();
            let eps = self.store.watch_prefix(&ep_prefix, e).await?;
            self.watches = Some((nodes, svcs, eps));
        }
        let me = self.me.as_ref().map(|m| m.subnet);
        loop {
            let (Some((nw, sw, ew)), Some((keeper, ka, tick))) =
                (self.watches.as_mut(), self.keep.as_mut())
            else {
                return Err(AgentError::RecordGone);
            };
            tokio::select! {
                evs = nw.next() => {
                    let evs = evs?;
                    if evs.iter().any(|e| matches!(e, NodeEvent::Gone(s) if Some(*s) == me)) {
                        return Err(AgentError::RecordGone);
                    }
                    apply_events(&mut self.nodes, evs);
                    return Ok(Update::Nodes(self.nodes.clone()));
                }
                evs = sw.next() => {
                    return Ok(Update::Services(
                        evs?.into_iter()
                            .map(|(id, v)| { let s = v.and_then(|v| decode(&id, &v)); (id, s) })
                            .collect(),
                    ));
                }
                evs = ew.next() => {
                    return Ok(Update::Endpoints(
                        evs?.into_iter()
                            .map(|(id, v)| { let e = v.and_then(|v| decode(&id, &v)); (id, e) })
                            .collect(),
                    ));
                }
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return Err(self.etcd_err(e));
                    }
                }
                msg = ka.message() => {
                    match msg {
                        Err(e) => return Err(self.etcd_err(e)),
                        Ok(Some(m)) if m.ttl() > 0 => {
                            return Ok(Update::LeaseRenewed(Lease {
                                holder: "agent",
                                ttl_secs: self.ttl,
                                renewed: std::time::SystemTime::now(),
                            }));
                        }
                        Ok(_) => {
                            let name = self.me.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                            return Err(StoreError::LeaseExpired(name).into());
                        }
                    }
                }
            }
        }
    }
}
