//! The datastore: etcd v3.
//!
//! Layout under a prefix (default `/tweed`):
//! - `PREFIX/config`: the cluster config (JSON, [`ClusterConfig`]);
//! - `PREFIX/subnets/10.244.1.0-24`: a node's [`NodeRecord`], bound to an
//!   etcd lease so it disappears when the node stops renewing it.
//!
//! A subnet is claimed with a compare-and-swap transaction (the key must
//! not exist yet), so two agents starting at once never share one.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;
use tweed_model::{
    allocate_cluster_ip, allocate_lb_ip, allocate_node_port, first_free_subnet, subnet_from_key,
    subnet_key, ClusterConfig, Endpoints, FieldError, NodeRecord, Service,
};

pub use etcd_client::{Error as EtcdError, LeaseKeepAliveStream, LeaseKeeper};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cluster config at {key}: {source}")]
    Config {
        key: String,
        #[source]
        source: tweed_model::ConfigError,
    },
    #[error(transparent)]
    Subnet(#[from] tweed_model::SubnetError),
    #[error("could not claim a subnet for {node} after {tries} tries (too much contention)")]
    Contention { node: String, tries: u32 },
    #[error("the lease for {0} expired")]
    LeaseExpired(String),
    #[error("the watch on {0} ended")]
    WatchEnded(String),
    #[error("service {id}: {err}")]
    Invalid { id: String, err: FieldError },
    #[error("{key} does not decode: {msg}")]
    Decode { key: String, msg: String },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A node record as stored, with the revision needed to update it safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNode {
    pub key: String,
    pub record: NodeRecord,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A change seen by a watch on the node records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    Put(NodeRecord),
    /// The record under this subnet key is gone (deleted or lease expired).
    Gone(Ipv4Net),
}

pub struct Store {
    client: Client,
    endpoints: String,
    prefix: String,
}

impl Store {
    /// Connect to etcd. Fails fast (a few seconds) when no endpoint answers,
    /// so callers can retry with their own backoff.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        let mut s = Self {
            client,
            endpoints: joined,
            prefix: prefix.trim_end_matches('/').to_string(),
        };
        // Connecting is lazy; ask for something so an absent etcd shows now.
        s.client.status().await.map_err(|e| s.err(e))?;
        Ok(s)
    }

    fn err(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// The cluster config; `None` if nobody has written one.
    pub async fn config(&mut self) -> Result<Option<ClusterConfig>> {
        let key = self.config_key();
        let r = self
            .client
            .get(key.clone(), None)
            .await
            .map_err(|e| self.err(e))?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => ClusterConfig::from_json(kv.value())
                .map(Some)
                .map_err(|source| StoreError::Config { key, source }),
        }
    }

    /// Write the cluster config unless one exists; returns the one in force.
    pub async fn init_config(&mut self, cfg: &ClusterConfig) -> Result<ClusterConfig> {
        cfg.validate().map_err(|source| StoreError::Config {
            key: self.config_key(),
            source,
        })?;
        let key = self.config_key();
        let body = serde_json::to_vec(cfg).expect("config serialises");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, body, None)]);
        self.client.txn(txn).await.map_err(|e| self.err(e))?;
        Ok(self.config().await?.unwrap_or_else(|| cfg.clone()))
    }

    /// Every node record and the store revision they were read at. Records
    /// that do not decode are logged and still count as taking their subnet.
    pub async fn nodes(&mut self) -> Result<(Vec<StoredNode>, BTreeSet<Ipv4Net>, i64)> {
        let prefix = self.subnets_prefix();
        let r = self
            .client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let mut nodes = Vec::new();
        let mut taken = BTreeSet::new();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let sub = key.strip_prefix(&prefix).unwrap_or(&key);
            match subnet_from_key(sub) {
                Ok(s) => {
                    taken.insert(s);
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "ignoring a key that is not a subnet");
                    continue;
                }
            }
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(record) => nodes.push(StoredNode {
                    key,
                    record,
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                }),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "node record does not decode; its subnet stays taken")
                }
            }
        }
        Ok((nodes, taken, rev))
    }

    /// Claim a subnet for `want.name`, bound to a fresh lease of `ttl`
    /// seconds. Re-uses the node's existing record if there is one, else
    /// `want.subnet` if it is free (an agent's memory of its last subnet),
    /// else the first free subnet. Returns the record and the lease id.
    pub async fn claim(
        &mut self,
        cfg: &ClusterConfig,
        want: &NodeRecord,
        ttl: i64,
    ) -> Result<(NodeRecord, i64)> {
        const TRIES: u32 = 50;
        let lease = self
            .client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.err(e))?
            .id();
        for _ in 0..TRIES {
            let (nodes, taken, _) = self.nodes().await?;
            let (key, record, cmp) = match nodes.iter().find(|n| n.record.name == want.name) {
                Some(mine) => {
                    let mut rec = want.clone();
                    rec.subnet = mine.record.subnet;
                    let cmp = Compare::mod_revision(
                        mine.key.clone(),
                        CompareOp::Equal,
                        mine.mod_revision,
                    );
                    (mine.key.clone(), rec, cmp)
                }
                None => {
                    let pref = (cfg.cluster_cidr.trunc().contains(&want.subnet)
                        && want.subnet.prefix_len() == cfg.node_subnet_len)
                        .then_some(want.subnet);
                    let subnet =
                        first_free_subnet(cfg.cluster_cidr, cfg.node_subnet_len, &taken, pref)?;
                    let key = format!("{}{}", self.subnets_prefix(), subnet_key(subnet));
                    let cmp = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
                    (
                        key,
                        NodeRecord {
                            subnet,
                            ..want.clone()
                        },
                        cmp,
                    )
                }
            };
            let body = serde_json::to_vec(&record).expect("record serialises");
            let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
                key,
                body,
                Some(PutOptions::new().with_lease(lease)),
            )]);
            if self
                .client
                .txn(txn)
                .await
                .map_err(|e| self.err(e))?
                .succeeded()
            {
                return Ok((record, lease));
            }
        }
        Err(StoreError::Contention {
            node: want.name.clone(),
            tries: TRIES,
        })
    }

    /// Rewrite this node's own record (bound to its lease), e.g. to report
    /// the peers it cannot reach.
    pub async fn publish(&mut self, record: &NodeRecord, lease: i64) -> Result<()> {
        let key = format!("{}{}", self.subnets_prefix(), subnet_key(record.subnet));
        let body = serde_json::to_vec(record).expect("record serialises");
        self.client
            .put(key, body, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Start keeping `lease` alive; the caller sends a keep-alive at least
    /// every TTL/3 through the [`LeaseKeeper`] and reads the replies.
    pub async fn keep_alive(&mut self, lease: i64) -> Result<(LeaseKeeper, LeaseKeepAliveStream)> {
        self.client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| self.err(e))
    }

    pub fn services_prefix(&self) -> String {
        format!("{}/services/", self.prefix)
    }

    pub fn endpoints_prefix(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    fn alloc_ip_key(&self, ip: std::net::Ipv4Addr) -> String {
        format!("{}/alloc/clusterip/{ip}", self.prefix)
    }

    fn alloc_lb_key(&self, ip: std::net::Ipv4Addr) -> String {
        format!("{}/alloc/lbip/{ip}", self.prefix)
    }

    fn alloc_port_key(&self, port: u16) -> String {
        format!("{}/alloc/nodeport/{port}", self.prefix)
    }

    /// Everything under `prefix` (keys without the prefix) and the revision,
    /// read in pages at one revision: a single response holding every
    /// Service of a large cluster would pass gRPC's 4 MiB message limit.
    pub async fn list_prefix(&mut self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64)> {
        let mut out = Vec::new();
        let rev = self
            .scan_prefix(prefix, |k, v| out.push((k, v.to_vec())))
            .await?;
        Ok((out, rev))
    }

    /// [`Store::list_prefix`], handing each key (without the prefix) and
    /// value to `f` as its page arrives, so a caller that decodes them
    /// never holds the whole listing as bytes. Returns the revision.
    pub async fn scan_prefix(
        &mut self,
        prefix: &str,
        mut f: impl FnMut(String, &[u8]),
    ) -> Result<i64> {
        const PAGE: i64 = 256;
        let end = prefix_end(prefix.as_bytes());
        let mut from: Vec<u8> = prefix.as_bytes().to_vec();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let r = self
                .client
                .get(from.clone(), Some(opts))
                .await
                .map_err(|e| self.err(e))?;
            if rev == 0 {
                rev = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in r.kvs() {
                let k = String::from_utf8_lossy(kv.key());
                f(k.strip_prefix(prefix).unwrap_or(&k).to_string(), kv.value());
            }
            match (r.more(), r.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(rev),
            }
        }
    }

    /// Watch everything under `prefix` from `after_rev + 1` on.
    pub async fn watch_prefix(&mut self, prefix: &str, after_rev: i64) -> Result<PrefixWatch> {
        // One response may batch many events (a burst of writes); allow it.
        let stream = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20)
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(after_rev + 1),
                ),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(PrefixWatch {
            stream,
            prefix: prefix.to_string(),
            endpoints: self.endpoints.clone(),
        })
    }

    /// Every service, by `namespace/name`.
    pub async fn services(&mut self) -> Result<BTreeMap<String, Service>> {
        let (kvs, _) = self.list_prefix(&self.services_prefix()).await?;
        kvs.into_iter()
            .map(|(k, v)| {
                serde_json::from_slice::<Service>(&v)
                    .map(|s| (k.clone(), s))
                    .map_err(|e| StoreError::Decode {
                        key: k,
                        msg: e.to_string(),
                    })
            })
            .collect()
    }

    /// Create or update a service: validate it, keep the addresses it
    /// already has, allocate a cluster IP and node ports it lacks, and claim
    /// them with index keys in the same transaction, so two writers can
    /// never hand out the same address or port.
    pub async fn apply_service(&mut self, cfg: &ClusterConfig, svc: &Service) -> Result<Service> {
        let id = svc.id();
        let invalid = |err: FieldError| StoreError::Invalid {
            id: id.clone(),
            err,
        };
        svc.validate(cfg.service_cidr.trunc()).map_err(invalid)?;
        let key = format!("{}{id}", self.services_prefix());
        for _ in 0..20 {
            let cur = self
                .client
                .get(key.clone(), None)
                .await
                .map_err(|e| self.err(e))?;
            let (old, old_rev): (Option<Service>, i64) = match cur.kvs().first() {
                Some(kv) => (serde_json::from_slice(kv.value()).ok(), kv.mod_revision()),
                None => (None, 0),
            };
            let (ips, _) = self
                .list_prefix(&format!("{}/alloc/clusterip/", self.prefix))
                .await?;
            let (ports, _) = self
                .list_prefix(&format!("{}/alloc/nodeport/", self.prefix))
                .await?;
            let (lbs, _) = self
                .list_prefix(&format!("{}/alloc/lbip/", self.prefix))
                .await?;
            let owner = |v: &Vec<u8>| String::from_utf8_lossy(v).to_string();
            let lbs: BTreeMap<std::net::Ipv4Addr, String> = lbs
                .into_iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, owner(&v))))
                .collect();
            let ips: BTreeMap<std::net::Ipv4Addr, String> = ips
                .into_iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, owner(&v))))
                .collect();
            let ports: BTreeMap<u16, String> = ports
                .into_iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, owner(&v))))
                .collect();
            let mut new = svc.clone();
            // Addresses: the one asked for, else the one it had, else a fresh one.
            let ip = match (svc.cluster_ip, old.as_ref().and_then(|o| o.cluster_ip)) {
                (Some(want), _) => {
                    if ips.get(&want).is_some_and(|o| *o != id) {
                        return Err(invalid(FieldError {
                            field: "spec.clusterIP".into(),
                            msg: format!("{want} is already allocated to {}", ips[&want]),
                        }));
                    }
                    want
                }
                (None, Some(had)) => had,
                (None, None) => {
                    allocate_cluster_ip(cfg.service_cidr.trunc(), &ips.keys().copied().collect())
                        .ok_or_else(|| {
                            invalid(FieldError {
                                field: "spec.clusterIP".into(),
                                msg: format!("the service CIDR {} is full", cfg.service_cidr),
                            })
                        })?
                }
            };
            new.cluster_ip = Some(ip);
            let mut taken: BTreeSet<u16> = ports.keys().copied().collect();
            let needs_ports = matches!(
                svc.service_type,
                tweed_model::ServiceType::NodePort | tweed_model::ServiceType::LoadBalancer
            );
            for (i, p) in new.ports.iter_mut().enumerate() {
                if !needs_ports {
                    p.node_port = None;
                    continue;
                }
                let had = old
                    .as_ref()
                    .and_then(|o| {
                        o.ports
                            .iter()
                            .find(|q| q.name == p.name && q.protocol == p.protocol)
                    })
                    .and_then(|q| q.node_port);
                let port = match (p.node_port, had) {
                    (Some(want), _) => {
                        if ports.get(&want).is_some_and(|o| *o != id) {
                            return Err(invalid(FieldError {
                                field: format!("spec.ports[{i}].nodePort"),
                                msg: format!("{want} is already allocated to {}", ports[&want]),
                            }));
                        }
                        want
                    }
                    (None, Some(h)) => h,
                    (None, None) => allocate_node_port(&taken).ok_or_else(|| {
                        invalid(FieldError {
                            field: format!("spec.ports[{i}].nodePort"),
                            msg: "no node port is free".into(),
                        })
                    })?,
                };
                taken.insert(port);
                p.node_port = Some(port);
            }
            // A LoadBalancer's address: the one it had, else the first free
            // one of the pools (none: it stays pending). Other types keep
            // what they were given (a status written by someone else).
            let mut new_lbs: BTreeSet<std::net::Ipv4Addr> = BTreeSet::new();
            if svc.service_type == tweed_model::ServiceType::LoadBalancer
                && !cfg.load_balancer_pools.is_empty()
            {
                let had: Vec<std::net::Ipv4Addr> = lbs
                    .iter()
                    .filter(|(_, o)| **o == id)
                    .map(|(ip, _)| *ip)
                    .collect();
                let ip = match had.first() {
                    Some(ip) => *ip,
                    None => {
                        allocate_lb_ip(&cfg.load_balancer_pools, &lbs.keys().copied().collect())
                            .ok_or_else(|| {
                                invalid(FieldError {
                                    field: "status.loadBalancer.ingress".into(),
                                    msg: format!(
                                        "every address of loadBalancerPools {:?} is taken",
                                        cfg.load_balancer_pools
                                    ),
                                })
                            })?
                    }
                };
                new.load_balancer_ips = vec![ip];
                new_lbs.insert(ip);
            }
            // Its health check port (LoadBalancer, policy Local), as the
            // API server allocates it.
            if svc.service_type == tweed_model::ServiceType::LoadBalancer
                && svc.external_traffic_policy == tweed_model::TrafficPolicy::Local
            {
                let hc = match (
                    svc.health_check_node_port,
                    old.as_ref().and_then(|o| o.health_check_node_port),
                ) {
                    (Some(want), _) => {
                        if ports.get(&want).is_some_and(|o| *o != id)
                            || taken.contains(&want) && !ports.contains_key(&want)
                        {
                            return Err(invalid(FieldError {
                                field: "spec.healthCheckNodePort".into(),
                                msg: format!(
                                    "{want} is already allocated to {}",
                                    ports
                                        .get(&want)
                                        .cloned()
                                        .unwrap_or_else(|| "a port of this service".into())
                                ),
                            }));
                        }
                        want
                    }
                    (None, Some(h)) if !new.ports.iter().any(|p| p.node_port == Some(h)) => h,
                    _ => allocate_node_port(&taken).ok_or_else(|| {
                        invalid(FieldError {
                            field: "spec.healthCheckNodePort".into(),
                            msg: "no node port is free".into(),
                        })
                    })?,
                };
                taken.insert(hc);
                new.health_check_node_port = Some(hc);
            } else {
                new.health_check_node_port = None;
            }
            let mut cmps = vec![if old_rev == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, old_rev)
            }];
            let mut ops = vec![TxnOp::put(
                key.clone(),
                serde_json::to_vec(&new).expect("json"),
                None,
            )];
            let claim = |cmps: &mut Vec<Compare>, ops: &mut Vec<TxnOp>, k: String, mine: bool| {
                if !mine {
                    cmps.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(k, id.clone(), None));
                }
            };
            claim(
                &mut cmps,
                &mut ops,
                self.alloc_ip_key(ip),
                ips.get(&ip) == Some(&id),
            );
            let new_ports: BTreeSet<u16> = new
                .ports
                .iter()
                .filter_map(|p| p.node_port)
                .chain(new.health_check_node_port)
                .collect();
            for ip in &new_lbs {
                claim(
                    &mut cmps,
                    &mut ops,
                    self.alloc_lb_key(*ip),
                    lbs.get(ip) == Some(&id),
                );
            }
            for (old_ip, o) in &lbs {
                if *o == id && !new_lbs.contains(old_ip) {
                    ops.push(TxnOp::delete(self.alloc_lb_key(*old_ip), None));
                }
            }
            for p in &new_ports {
                claim(
                    &mut cmps,
                    &mut ops,
                    self.alloc_port_key(*p),
                    ports.get(p) == Some(&id),
                );
            }
            // Give back what the previous version held and this one does not.
            for (old_ip, o) in &ips {
                if *o == id && *old_ip != ip {
                    ops.push(TxnOp::delete(self.alloc_ip_key(*old_ip), None));
                }
            }
            for (old_port, o) in &ports {
                if *o == id && !new_ports.contains(old_port) {
                    ops.push(TxnOp::delete(self.alloc_port_key(*old_port), None));
                }
            }
            if self
                .client
                .txn(Txn::new().when(cmps).and_then(ops))
                .await
                .map_err(|e| self.err(e))?
                .succeeded()
            {
                return Ok(new);
            }
        }
        Err(StoreError::Contention {
            node: id,
            tries: 20,
        })
    }

    /// Delete a service, its endpoints and its allocations. Absent is fine.
    pub async fn delete_service(&mut self, id: &str) -> Result<bool> {
        let mut ops = vec![
            TxnOp::delete(format!("{}{id}", self.services_prefix()), None),
            TxnOp::delete(format!("{}{id}", self.endpoints_prefix()), None),
        ];
        for kind in ["clusterip", "nodeport", "lbip"] {
            let prefix = format!("{}/alloc/{kind}/", self.prefix);
            let (held, _) = self.list_prefix(&prefix).await?;
            for (k, v) in held {
                if v == id.as_bytes() {
                    ops.push(TxnOp::delete(format!("{prefix}{k}"), None));
                }
            }
        }
        let r = self
            .client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.succeeded())
    }

    /// Write a service's endpoints.
    pub async fn put_endpoints(&mut self, eps: &Endpoints) -> Result<()> {
        let key = format!("{}{}/{}", self.endpoints_prefix(), eps.namespace, eps.name);
        self.client
            .put(key, serde_json::to_vec(eps).expect("json"), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Write many keys in as few transactions as etcd allows (128 ops each);
    /// used to load benchmarks.
    pub async fn put_many(&mut self, kvs: Vec<(String, Vec<u8>)>) -> Result<()> {
        for chunk in kvs.chunks(128) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None))
                .collect();
            self.client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Watch node records from `after_rev + 1` on.
    pub async fn watch_nodes(&mut self, after_rev: i64) -> Result<NodeWatch> {
        let prefix = self.subnets_prefix();
        self.watch_prefix(&prefix, after_rev).await.map(NodeWatch)
    }
}

/// A change under a watched prefix: the key (without the prefix) and its
/// new value, or `None` when it was deleted.
pub type KeyEvent = (String, Option<Vec<u8>>);

pub struct PrefixWatch {
    stream: WatchStream,
    prefix: String,
    endpoints: String,
}

impl PrefixWatch {
    /// The next batch of changes; an error means the caller must re-list.
    pub async fn next(&mut self) -> Result<Vec<KeyEvent>> {
        loop {
            let msg = self
                .stream
                .message()
                .await
                .map_err(|source| StoreError::Etcd {
                    endpoints: self.endpoints.clone(),
                    source,
                })?
                .ok_or_else(|| StoreError::WatchEnded(self.prefix.clone()))?;
            if msg.canceled() {
                return Err(StoreError::WatchEnded(format!(
                    "{} ({})",
                    self.prefix,
                    msg.cancel_reason()
                )));
            }
            let out: Vec<KeyEvent> = msg
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let key = String::from_utf8_lossy(kv.key());
                    let key = key.strip_prefix(&self.prefix).unwrap_or(&key).to_string();
                    Some(match ev.event_type() {
                        EventType::Delete => (key, None),
                        EventType::Put => (key, Some(kv.value().to_vec())),
                    })
                })
                .collect();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// A watch on node records, decoded.
pub struct NodeWatch(PrefixWatch);

impl NodeWatch {
    /// The next batch of node changes. An error means the watch is broken
    /// and the caller must re-list and watch again.
    pub async fn next(&mut self) -> Result<Vec<NodeEvent>> {
        loop {
            let mut out = Vec::new();
            for (key, value) in self.0.next().await? {
                let Ok(subnet) = subnet_from_key(&key) else {
                    continue;
                };
                match value {
                    None => out.push(NodeEvent::Gone(subnet)),
                    Some(v) => match serde_json::from_slice::<NodeRecord>(&v) {
                        Ok(r) => out.push(NodeEvent::Put(r)),
                        Err(e) => tracing::warn!(%key, error = %e, "node record does not decode"),
                    },
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Fold watch events into a map of node records keyed by subnet.
pub fn apply_events(map: &mut BTreeMap<Ipv4Net, NodeRecord>, events: Vec<NodeEvent>) {
    for ev in events {
        match ev {
            NodeEvent::Put(r) => {
                map.insert(r.subnet, r);
            }
            NodeEvent::Gone(s) => {
                map.remove(&s);
            }
        }
    }
}
