//! The Kubernetes API as the agent's datastore (in a cluster).
//!
//! The node's subnet is its Node's `spec.podCIDR`, which the
//! controller-manager assigns; until it does, the agent waits and says so
//! (log, `tweed status`, an Event on the Node) rather than crash-looping as
//! flannel does. The node's record lives in annotations on its own Node.
//! Nodes, Services and EndpointSlices are list-watched; a watch that fails
//! (an API server restart, `410 Gone`, a refused verb) retries with backoff
//! and re-lists, and [`tweed_k8s::mirror`] turns the new list into the
//! changes since the old one. Meanwhile the data plane stays as it is.

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Service as KService};
use kube::runtime::watcher::Event;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tweed_k8s::client::{self as kc, KubeError, KubeOpts};
use tweed_k8s::mirror::{Change, KeptSlice, Mirror, Slices};
use tweed_k8s::{node_pod_cidr, node_record, EndpointSlice};
use tweed_model::{ClusterConfig, NodeRecord, Service};

use crate::datastore::{Datastore, Lease, Snapshot, Update};
use crate::error::AgentError;

type Watch<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, KubeError>> + Send>>;

pub struct Kubernetes {
    client: Client,
    node: String,
    describe: String,
    nodes: Mirror<NodeRecord>,
    services: Mirror<Service>,
    slices: Slices,
    watches: Option<(Watch<Node>, Watch<KService>, Watch<EndpointSlice>)>,
    /// The last watch error, until a watch works again.
    trouble: Option<String>,
    /// When to read kubelet's Lease of this node next (for doctor).
    lease_tick: tokio::time::Interval,
    /// The renew time last reported, so only a renewal is an update.
    lease_seen: Option<std::time::SystemTime>,
}

/// How often the agent reads kubelet's node Lease: well under half of its
/// 40 s duration (kubelet renews every 10 s), so doctor, which warns at
/// half, never mistakes a slow read for a lapse.
const LEASE_READ: std::time::Duration = std::time::Duration::from_secs(5);

fn id_of<K: kube::Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

/// Conversions answer `Err(())` for an object tweed cannot use (logged
/// here, naming the object and the field): its last good version, if any,
/// stays in force, so a bad edit loses nothing.
fn record_of(n: &Node) -> Result<Option<NodeRecord>, ()> {
    node_record(n).map_err(|e| {
        tracing::warn!(node = %n.name_any(), error = %e, "malformed tweed record on a Node; keeping its last good one, if any")
    })
}

fn service_of(s: &KService, cfg: &ClusterConfig) -> Result<Option<Service>, ()> {
    tweed_k8s::service(s, cfg.service_cidr).map_err(|e| {
        tracing::warn!(service = %id_of(s), error = %e, "a Service tweed cannot proxy; keeping its last good version, if any")
    })
}

/// Feed one watch event to a mirror: the changes it makes.
fn feed<K: kube::Resource, V: Clone + PartialEq>(
    m: &mut Mirror<V>,
    ev: Event<K>,
    id: impl Fn(&K) -> String,
    conv: impl Fn(K) -> Result<Option<V>, ()>,
) -> Vec<Change<V>> {
    match ev {
        Event::Init => {
            m.init();
            Vec::new()
        }
        Event::InitApply(o) => {
            let i = id(&o);
            let v = conv(o).unwrap_or_else(|()| m.known().get(&i).cloned());
            m.init_apply(i, v);
            Vec::new()
        }
        Event::InitDone => m.init_done(),
        Event::Apply(o) => {
            let i = id(&o);
            match conv(o) {
                Ok(v) => m.apply(i, v).into_iter().collect(),
                Err(()) => Vec::new(),
            }
        }
        Event::Delete(o) => m.delete(&id(&o)).into_iter().collect(),
    }
}

impl Kubernetes {
    pub async fn connect(opts: &KubeOpts, node: &str) -> Result<Self, AgentError> {
        let (client, url) = kc::connect(opts).await?;
        // Fail now, naming the call, if the API server is away or refuses.
        let v = client
            .apiserver_version()
            .await
            .map_err(|source| KubeError::Api {
                what: "get the API server's version".into(),
                source,
            })?;
        Ok(Self {
            client,
            node: node.to_string(),
            describe: format!("kubernetes {url} ({})", v.git_version),
            nodes: Mirror::default(),
            services: Mirror::default(),
            slices: Slices::default(),
            watches: None,
            trouble: None,
            lease_tick: tokio::time::interval(LEASE_READ),
            lease_seen: None,
        })
    }

    /// kubelet's Lease of this node (kube-node-lease/NODE), if it has one
    /// and tweed may read it: when it was renewed and for how long.
    async fn node_lease(&self) -> Option<Lease> {
        use k8s_openapi::api::coordination::v1::Lease as KLease;
        let api = Api::<KLease>::namespaced(self.client.clone(), "kube-node-lease");
        let l = match api.get_opt(&self.node).await {
            Ok(l) => l?,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read this node's Lease");
                return None;
            }
        };
        let spec = l.spec?;
        let renewed = spec.renew_time?.0;
        Some(Lease {
            holder: "kubelet",
            ttl_secs: i64::from(spec.lease_duration_seconds?),
            renewed: std::time::SystemTime::from(renewed),
        })
    }

    fn node_map(&self) -> BTreeMap<Ipv4Net, NodeRecord> {
        self.nodes
            .known()
            .values()
            .map(|r| (r.subnet, r.clone()))
            .collect()
    }

    /// One watch event, folded in; `None` when it changes nothing the
    /// agent acts on.
    fn absorb(&mut self, cfg: &ClusterConfig, item: Item) -> Option<Update> {
        match item {
            Item::Node(ev) => {
                let ch = feed(
                    &mut self.nodes,
                    *ev,
                    |n: &Node| n.name_any(),
                    |n| record_of(&n),
                );
                (!ch.is_empty()).then(|| Update::Nodes(self.node_map()))
            }
            Item::Service(ev) => {
                let ch = feed(&mut self.services, *ev, id_of, |s| service_of(&s, cfg));
                (!ch.is_empty())
                    .then(|| Update::Services(ch.into_iter().map(|c| (c.id, c.new)).collect()))
            }
            Item::Slice(ev) => {
                let ch = feed(&mut self.slices.mirror, *ev, id_of, |s| {
                    Ok(KeptSlice::new(s))
                });
                let eps = self.slices.absorb(ch);
                (!eps.is_empty()).then_some(Update::Endpoints(eps))
            }
            Item::LeaseDue => None,
            Item::Failed(e) => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, "Kubernetes watch failed; retrying with backoff, the data plane stays");
                let changed = self.trouble.as_deref() != Some(msg.as_str());
                self.trouble = Some(msg.clone());
                changed.then_some(Update::Trouble(msg))
            }
        }
    }

    async fn next_item(&mut self) -> Item {
        let (n, s, e) = self.watches.as_mut().expect("watches start in snapshot()");
        let tick = &mut self.lease_tick;
        tokio::select! {
            Some(ev) = n.next() => ev.map(|e| Item::Node(Box::new(e))).unwrap_or_else(Item::Failed),
            Some(ev) = s.next() => ev.map(|e| Item::Service(Box::new(e))).unwrap_or_else(Item::Failed),
            Some(ev) = e.next() => ev.map(|e| Item::Slice(Box::new(e))).unwrap_or_else(Item::Failed),
            _ = tick.tick() => Item::LeaseDue,
            else => Item::Failed(KubeError::Config("the watches ended".into())),
        }
    }
}

enum Item {
    Node(Box<Event<Node>>),
    Service(Box<Event<KService>>),
    Slice(Box<Event<EndpointSlice>>),
    /// Time to read kubelet's Lease of this node.
    LeaseDue,
    Failed(KubeError),
}

impl Datastore for Kubernetes {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn assigns_load_balancer_ips(&self) -> bool {
        true
    }

    async fn set_load_balancer_ips(
        &mut self,
        id: &str,
        ips: &[std::net::Ipv4Addr],
    ) -> Result<(), AgentError> {
        let (ns, name) = id.split_once('/').unwrap_or(("default", id));
        Ok(kc::set_lb_ingress(&self.client, ns, name, ips).await?)
    }

    /// In a cluster the config is the ConfigMap the DaemonSet mounts (the
    /// agent's `--cluster-config`): there is nothing to agree on through
    /// the API, as there is no subnet allocation of tweed's own.
    async fn config(&mut self, default: &ClusterConfig) -> Result<ClusterConfig, AgentError> {
        Ok(default.clone())
    }

    async fn register(
        &mut self,
        cfg: &ClusterConfig,
        want: &NodeRecord,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<NodeRecord, AgentError> {
        let node = kc::get_node(&self.client, &self.node).await?;
        let subnet = match node_pod_cidr(&node).map_err(|e| bad_node(&self.node, e))? {
            Some(s) => s,
            None => {
                let why = format!(
                    "waiting for spec.podCIDR on Node {}: is the controller-manager run with --allocate-node-cidrs and --cluster-cidr={}?",
                    self.node, cfg.cluster_cidr
                );
                tracing::warn!("{why}");
                waiting(&why);
                if let Err(e) =
                    kc::node_event(&self.client, &self.node, "Warning", "NoPodCIDR", &why).await
                {
                    tracing::warn!(error = %e, "cannot record an Event");
                }
                self.wait_pod_cidr().await?
            }
        };
        if !cfg.cluster_cidr.trunc().contains(&subnet) {
            return Err(bad_node(
                &self.node,
                tweed_model::FieldError {
                    field: "spec.podCIDR".into(),
                    msg: format!(
                        "{subnet} is outside the cluster CIDR {} of tweed's config",
                        cfg.cluster_cidr
                    ),
                },
            ));
        }
        // A VTEP MAC published earlier is kept, so peers' neighbour and FDB
        // entries stay right across restarts.
        let vtep_mac = node_record(&node)
            .ok()
            .flatten()
            .map_or(want.vtep_mac, |r| r.vtep_mac);
        let mut me = NodeRecord {
            subnet,
            vtep_mac,
            ..want.clone()
        };
        // An operator's per-node BGP settings on the Node; the agent's own
        // flags win. A bad annotation is named and left out.
        match tweed_k8s::convert::node_bgp_overrides(&node) {
            Ok(Some(o)) => {
                let b = me.bgp.get_or_insert_with(Default::default);
                b.asn = b.asn.or(o.asn);
                for p in o.peers {
                    if !b.peers.iter().any(|q| q.address == p.address) {
                        b.peers.push(p);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(node = %self.node, error = %e, "ignoring the Node's BGP annotation")
            }
        }
        // BGP peers' node selectors match the Node's labels (as peers see
        // them through `node_record`).
        if let (Some(_), Some(labels)) = (&cfg.bgp, node.metadata.labels.as_ref()) {
            let b = me.bgp.get_or_insert_with(Default::default);
            for (k, v) in labels {
                b.labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        kc::publish_record(&self.client, &me).await?;
        tracing::info!(%subnet, "subnet from spec.podCIDR; record published on the Node");
        Ok(me)
    }

    async fn publish(&mut self, rec: &NodeRecord) -> Result<(), AgentError> {
        Ok(kc::publish_record(&self.client, rec).await?)
    }

    async fn network_ready(&mut self) -> Result<(), AgentError> {
        Ok(kc::set_network_available(&self.client, &self.node).await?)
    }

    async fn snapshot(&mut self, cfg: &ClusterConfig) -> Result<Snapshot, AgentError> {
        let slices_api = kc::endpointslice_version(&self.client).await?;
        tracing::info!(api = %slices_api.api_version, "EndpointSlices");
        self.nodes = Mirror::default();
        self.services = Mirror::default();
        self.slices = Slices::default();
        self.watches = Some((
            Box::pin(kc::watch_nodes(&self.client)),
            Box::pin(kc::watch_services(&self.client)),
            Box::pin(kc::watch_slices(&self.client, &slices_api)),
        ));
        // Until all three have listed once, errors end the session (the
        // agent backs off and starts again) so a missing verb is reported
        // at once instead of leaving a half-known cluster.
        while !(self.nodes.listed() && self.services.listed() && self.slices.mirror.listed()) {
            match self.next_item().await {
                Item::Failed(e) => return Err(e.into()),
                item => {
                    self.absorb(cfg, item);
                }
            }
        }
        Ok(Snapshot {
            nodes: self.node_map(),
            services: self.services.known().clone(),
            endpoints: self
                .slices
                .all()
                .into_iter()
                .map(|(k, e)| (k, e.into()))
                .collect(),
        })
    }

    async fn next(&mut self, cfg: &ClusterConfig) -> Result<Update, AgentError> {
        loop {
            let item = self.next_item().await;
            if matches!(item, Item::LeaseDue) {
                if let Some(l) = self.node_lease().await {
                    if self.lease_seen != Some(l.renewed) {
                        self.lease_seen = Some(l.renewed);
                        return Ok(Update::LeaseRenewed(l));
                    }
                }
                continue;
            }
            let failed = matches!(item, Item::Failed(_));
            if let Some(u) = self.absorb(cfg, item) {
                return Ok(u);
            }
            if !failed && self.trouble.take().is_some() {
                return Ok(Update::Healthy);
            }
        }
    }
}

impl Kubernetes {
    /// Watch our own Node until it has a pod subnet.
    async fn wait_pod_cidr(&self) -> Result<Ipv4Net, AgentError> {
        let api = Api::<Node>::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let mut w = std::pin::pin!(watcher(api, cfg).backoff(kc::RetryBackoff::default()));
        while let Some(ev) = w.next().await {
            let node = match ev {
                Ok(Event::Apply(n) | Event::InitApply(n)) => n,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watching our Node for spec.podCIDR");
                    continue;
                }
            };
            if let Some(s) = node_pod_cidr(&node).map_err(|e| bad_node(&self.node, e))? {
                return Ok(s);
            }
        }
        Err(KubeError::NoNode(self.node.clone()).into())
    }
}

fn bad_node(node: &str, e: tweed_model::FieldError) -> AgentError {
    AgentError::Invalid(format!("Node {node}: {e}"))
}
