use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::signal::unix::{signal, SignalKind};
use tweed_k8s::client::KubeOpts;
use tweed_model::{vtep_mac_for, ClusterConfig, NodeRecord, NodeState, DEFAULT_GSO_MAX_SIZE};
use tweed_netlink::Netlink;
use tweed_plan::services::ProxyConfig;
use tweed_plan::{plan_node, select_underlay, LocalNode, UnderlaySelector};

use crate::datastore::{Datastore, Etcd, Update};
pub use crate::error::AgentError;
use crate::files::{conflist, write_atomic, AgentStatus, PeerStatus};
use crate::health;
use crate::kube::Kubernetes;
use crate::proxy::{table_present, Proxy};
use crate::reconcile;

#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub node_name: String,
    pub datastore: DatastoreOpts,
    /// How to choose the underlay interface and address.
    pub underlay: UnderlaySelector,
    /// Turn VXLAN TX checksum offload off: `None` decides by kernel version
    /// (off below 5.7, where the offload corrupts NATed VXLAN checksums).
    pub vxlan_csum_off: Option<bool>,
    /// The address peers use to reach this node, when it differs from the
    /// bound one (1:1 NAT).
    pub public_ip: Option<Ipv4Addr>,
    pub cni_conf_dir: PathBuf,
    /// Where to install this binary as the CNI plugin `tweed` before the
    /// conflist appears (in a cluster: the host's /opt/cni/bin).
    pub cni_bin_dir: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub data_dir: PathBuf,
    pub lease_ttl: i64,
    pub resync: Duration,
    /// Written to the datastore when it holds no cluster config yet.
    pub default_config: ClusterConfig,
    /// Seconds between full service-proxy syncs (the table is also re-made
    /// at once if it goes missing, checked every resync).
    pub proxy_full_sync: Duration,
    /// Where to serve /healthz, /readyz and /metrics (`None`: nowhere).
    pub health_listen: Option<std::net::SocketAddr>,
    /// This node's BGP overrides, published in its record.
    pub bgp_node: Option<tweed_model::NodeBgp>,
}

/// Which datastore, and how to reach it.
#[derive(Debug, Clone)]
pub enum DatastoreOpts {
    /// tweed's own keys in etcd v3 (the lab's).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
    /// The Kubernetes API (in a cluster).
    Kubernetes(KubeOpts),
}

impl AgentOpts {
    fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join("ipam")
    }
}

struct Underlay {
    dev: String,
    ip: Ipv4Addr,
    mtu: u32,
}

async fn detect_underlay(nl: &Netlink, sel: &UnderlaySelector) -> Result<Underlay, AgentError> {
    let mut links = Vec::new();
    for l in nl.links().await? {
        let addrs = nl.ipv4_addrs(l.index).await?;
        links.push((l.index, (l.name, l.mtu, addrs)));
    }
    // A can-reach lookup is the kernel's answer, made before choosing.
    let route = match sel {
        UnderlaySelector::CanReach(dst) => nl.route_get(*dst).await?.and_then(|(oif, src)| {
            links
                .iter()
                .find(|(i, _)| *i == oif)
                .map(|(_, (n, _, _))| (n.clone(), src))
        }),
        _ => None,
    };
    let plain: Vec<tweed_plan::LinkAddrs> = links.into_iter().map(|(_, l)| l).collect();
    let (dev, ip, mtu) =
        select_underlay(&plain, sel, |_| route.clone()).map_err(AgentError::Underlay)?;
    Ok(Underlay { dev, ip, mtu })
}

/// Copy this very binary to `DIR/tweed`, where runtimes look for the CNI
/// plugin the conflist names: atomically (a runtime may be executing the
/// old one) and only when it differs, so an agent restart does not rewrite it.
fn install_plugin(dir: &std::path::Path) -> Result<(), AgentError> {
    let file_err = |path: PathBuf| move |source| AgentError::File { path, source };
    let me = std::env::current_exe().map_err(file_err("/proc/self/exe".into()))?;
    let body = std::fs::read(&me).map_err(file_err(me.clone()))?;
    let dst = dir.join("tweed");
    if std::fs::read(&dst).is_ok_and(|old| old == body) {
        return Ok(());
    }
    write_atomic(&dst, &body).map_err(file_err(dst.clone()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(file_err(dst.clone()))?;
    tracing::info!(plugin = %dst.display(), "CNI plugin installed");
    Ok(())
}

/// Write what `tweed status` shows (RUN_DIR/status.json).
fn save_status(run_dir: &std::path::Path, status: &AgentStatus) {
    let p = run_dir.join("status.json");
    if let Err(e) = write_atomic(&p, &serde_json::to_vec_pretty(status).expect("json")) {
        tracing::warn!(path = %p.display(), error = %e, "cannot write status");
    }
}

/// Waits out a failure, growing from 0.5 s to 10 s.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(500);
    }
}

enum Exit {
    Signal,
}

/// The next change BIRD made to the learnt-routes table, or never (no
/// watch). A change is usually a burst (a session's every route), so the
/// rest of the burst is taken with it.
async fn learnt_changed(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<()>>) {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    if r.recv().await.is_none() {
        *rx = None;
        return std::future::pending().await;
    }
    let until = tokio::time::Instant::now() + LEARNT_SETTLE;
    while let Ok(Some(())) = tokio::time::timeout_at(until, r.recv()).await {}
}

/// How long a burst of learnt-route changes may last before the agent acts.
const LEARNT_SETTLE: Duration = Duration::from_millis(100);

/// How soon a peer that just missed a probe is probed again.
const REPROBE_AFTER: Duration = Duration::from_secs(2);

/// Resolves at `at`, or never.
async fn reprobe(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Agent {
    opts: AgentOpts,
    nl: Netlink,
    underlay: Underlay,
    /// The subnet we hold, kept across datastore outages.
    subnet: Option<Ipv4Net>,
    ready: bool,
    /// Each peer's mode last time, so a resync does not repeat the log.
    modes: Vec<(String, tweed_plan::Mode)>,
    /// Peers we cannot route to ("NAME: why"), reported in our record.
    unreachable: Vec<String>,
    /// The probe's policy rule is in place (it is added once).
    probe_rule: std::cell::Cell<bool>,
    /// Unanswered probes in a row, per peer (see `probe::judge`).
    probe_misses: std::cell::RefCell<BTreeMap<String, u32>>,
    /// When to converge again before the resync: a peer has just missed
    /// a probe (see `probe::reprobe_soon`).
    reprobe_at: Option<tokio::time::Instant>,
    /// What `tweed status` shows (written to RUN_DIR/status.json).
    status: AgentStatus,
    mtu: u32,
    /// Did the last overlay reconcile succeed? Pods are only admitted then.
    dataplane_ok: bool,
    /// Has the service proxy completed a full sync (the table exists)?
    proxy_synced: bool,
    /// What /healthz, /readyz and /metrics serve.
    health: health::Shared,
    /// The datastore's own trouble (a watch failing and retrying), shown
    /// until it clears even though the data plane keeps converging.
    store_trouble: Option<String>,
    /// plan.json as last written.
    intent_written: Option<Vec<u8>>,
    /// The IPv4 GSO/GRO max sizes pod veths get now: the pod's end (see
    /// `tweed_plan::pod_gso_max_size`) and the host's (the underlay's own).
    pod_gso: u32,
    host_gso: u32,
    /// Each pod end's size as last set or read (see `pods::converge_sizes`).
    pod_gso_known: BTreeMap<String, u32>,
    /// Pods whose size could not be set, last time (logged when it changes).
    pod_gso_failed: Vec<String>,
    /// The BGP speaker (BIRD), when the cluster config has `bgp:`.
    speaker: crate::bgp::Speaker,
    /// The subnet we hold a blackhole route for (announced by BGP).
    blackhole: Option<Ipv4Net>,
    /// The BGP configuration and peer subnets last converged, and when
    /// they changed: for a while after, the agent looks again every few
    /// seconds for sessions and learnt routes still on their way.
    bgp_key: String,
    bgp_changed_at: std::time::Instant,
    bgp_settling: bool,
    /// The blackhole and table 7745 cleared since BGP went off (or since
    /// the agent started without BGP).
    bgp_cleared: bool,
    /// Service addresses this node announces (see `Proxy::announced_ips`).
    service_ips: std::collections::BTreeSet<Ipv4Addr>,
    /// Health check node ports served (LoadBalancer, policy Local).
    hc: crate::hc::HealthChecks,
    /// LoadBalancer addresses this agent wrote and has not yet seen come
    /// back through the watch (so it does not write them twice).
    lb_written: BTreeMap<String, Ipv4Addr>,
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOpts) -> Result<(), AgentError> {
    tweed_netlink::enable_ip_forwarding().map_err(|source| AgentError::File {
        path: "/proc/sys/net/ipv4/ip_forward".into(),
        source,
    })?;
    let nl = Netlink::open()?;
    let underlay = detect_underlay(&nl, &opts.underlay).await?;
    tracing::info!(dev = %underlay.dev, ip = %underlay.ip, mtu = underlay.mtu, "underlay");
    let remembered = std::fs::read(opts.data_dir.join("subnet.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<NodeRecord>(&b).ok())
        .map(|r| r.subnet);
    let status = AgentStatus {
        node: opts.node_name.clone(),
        subnet: remembered.map(|s| s.to_string()).unwrap_or_default(),
        underlay_dev: underlay.dev.clone(),
        bind_ip: underlay.ip.to_string(),
        public_ip: opts.public_ip.unwrap_or(underlay.ip).to_string(),
        datastore: String::new(),
        datastore_at: String::new(),
        peers: Vec::new(),
        last_error: None,
        services: 0,
        last_sync: String::new(),
        lease_holder: None,
        lease_ttl: None,
        lease_renewed: None,
        lease_renewed_unix: None,
        probing: false,
        pod_gso_max_size: DEFAULT_GSO_MAX_SIZE,
        bgp: None,
    };
    let opts_run_dir = opts.run_dir.clone();
    let mut agent = Agent {
        opts,
        nl,
        underlay,
        subnet: remembered,
        ready: false,
        modes: Vec::new(),
        unreachable: Vec::new(),
        probe_rule: std::cell::Cell::new(false),
        probe_misses: Default::default(),
        reprobe_at: None,
        status,
        mtu: 1450,
        dataplane_ok: false,
        proxy_synced: false,
        health: health::Shared::default(),
        store_trouble: None,
        intent_written: None,
        pod_gso: DEFAULT_GSO_MAX_SIZE,
        host_gso: DEFAULT_GSO_MAX_SIZE,
        pod_gso_known: BTreeMap::new(),
        pod_gso_failed: Vec::new(),
        speaker: crate::bgp::Speaker::new(&opts_run_dir),
        blackhole: None,
        bgp_key: String::new(),
        bgp_changed_at: std::time::Instant::now(),
        bgp_settling: false,
        bgp_cleared: false,
        service_ips: Default::default(),
        hc: Default::default(),
        lb_written: BTreeMap::new(),
    };
    if let Some(addr) = agent.opts.health_listen {
        let stale = agent.opts.resync * 3 + Duration::from_secs(30);
        health::serve(addr, agent.health.clone(), stale)
            .await
            .map_err(|source| AgentError::File {
                path: format!("health listener {addr}").into(),
                source,
            })?;
    }
    let mut term = signal(SignalKind::terminate()).map_err(|source| AgentError::File {
        path: "SIGTERM".into(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| AgentError::File {
        path: "SIGINT".into(),
        source,
    })?;
    let mut backoff = Backoff(Duration::from_millis(500));
    loop {
        let session = agent.session(&mut backoff);
        let res = tokio::select! {
            r = session => r,
            _ = term.recv() => Ok(Exit::Signal),
            _ = int.recv() => Ok(Exit::Signal),
        };
        match res {
            Ok(Exit::Signal) => {
                tracing::info!("stopping; the data plane stays as it is");
                return Ok(());
            }
            Err(
                e @ (AgentError::Store(_)
                | AgentError::Kube(_)
                | AgentError::Invalid(_)
                | AgentError::RecordGone
                | AgentError::Proxy(_)),
            ) => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in = ?wait, "datastore session ended; keeping the data plane as it is");
                agent.store_trouble = None;
                agent.write_status(None, Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

impl Agent {
    /// One connection to the datastore, whichever it is.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Exit, AgentError> {
        match self.opts.datastore.clone() {
            DatastoreOpts::Etcd { endpoints, prefix } => {
                let ds = Etcd::connect(&endpoints, &prefix, self.opts.lease_ttl).await?;
                self.follow(ds, backoff).await
            }
            DatastoreOpts::Kubernetes(k) => {
                let ds = Kubernetes::connect(&k, &self.opts.node_name).await?;
                self.follow(ds, backoff).await
            }
        }
    }

    /// Register, snapshot, reconcile, then follow the datastore's updates
    /// until something breaks.
    async fn follow<D: Datastore>(
        &mut self,
        mut ds: D,
        backoff: &mut Backoff,
    ) -> Result<Exit, AgentError> {
        self.status.datastore_at = ds.describe();
        let cfg = ds.config(&self.opts.default_config).await?;
        let want = NodeRecord {
            name: self.opts.node_name.clone(),
            subnet: self
                .subnet
                .unwrap_or_else(|| Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("literal")),
            public_ip: self.opts.public_ip.unwrap_or(self.underlay.ip),
            backend: cfg.backend,
            vtep_mac: vtep_mac_for(&self.opts.node_name),
            unreachable: Vec::new(),
            bgp: self.opts.bgp_node.clone(),
        };
        let (status, run_dir) = (&mut self.status, &self.opts.run_dir);
        let me = ds
            .register(&cfg, &want, &mut |why: &str| {
                status.datastore = "waiting".into();
                status.last_error = Some(why.to_string());
                save_status(run_dir, status);
            })
            .await?;
        if let Some(old) = self.subnet.filter(|s| *s != me.subnet) {
            tracing::error!(%old, new = %me.subnet, "our subnet changed while we were away; pods on the old subnet must be recreated");
        }
        self.subnet = Some(me.subnet);
        let path = self.opts.data_dir.join("subnet.json");
        write_atomic(&path, &serde_json::to_vec(&me).expect("json"))
            .map_err(|source| AgentError::File { path, source })?;
        backoff.reset();

        tracing::debug!(hwm_mib = crate::mem::peak_rss_mib(), "before listing");
        let snap = ds.snapshot(&cfg).await?;
        tracing::debug!(hwm_mib = crate::mem::peak_rss_mib(), "snapshot decoded");
        let mut map = snap.nodes;
        let local = LocalNode {
            record: me.clone(),
            bind_ip: self.underlay.ip,
            underlay_dev: self.underlay.dev.clone(),
            underlay_mtu: self.underlay.mtu,
        };
        let mut mine = me.clone();
        self.converge(&cfg, &local, &map).await?;
        self.report_unreachable(&mut ds, &mut mine).await?;

        // Services: full sync from the snapshot, then follow the updates.
        let proxy_cfg = ProxyConfig {
            node: me.name.clone(),
            cluster_cidr: cfg.cluster_cidr,
            service_cidr: cfg.service_cidr,
            node_subnet: me.subnet,
        };
        let mut proxy = Proxy::new(proxy_cfg, self.opts.run_dir.clone());
        proxy.load(snap.services, snap.endpoints);
        let rep = proxy.full_sync()?;
        self.record_sync(&rep);
        tracing::debug!(
            hwm_mib = crate::mem::peak_rss_mib(),
            "after the first full sync"
        );
        self.proxy_synced = true;
        self.after_services(&cfg, &local, &map, &proxy).await;
        self.assign_load_balancers(&mut ds, &cfg, &map, &proxy)
            .await;
        tracing::info!(
            services = rep.services,
            millis = format!("{:.1}", rep.millis),
            "service proxy: full sync"
        );
        if !self.ready && self.dataplane_ok {
            self.publish_ready(&local, self.mtu)?;
        }
        if self.ready {
            ds.network_ready().await?;
        }
        let mut announced = self.ready;
        self.beat();
        let mut full_tick = tokio::time::interval(self.opts.proxy_full_sync);
        full_tick.tick().await;
        let mut resync = tokio::time::interval(self.opts.resync);
        resync.tick().await;
        // BGP withdrawals and new routes act at once (a peer's native
        // route goes the moment BFD or a session drops it), not at the
        // next resync.
        let mut learnt = match tweed_netlink::watch_table(crate::bgp::LEARNT_TABLE) {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the learnt-routes table; BGP changes act at each resync");
                None
            }
        };
        loop {
            tokio::select! {
                u = ds.next(&cfg) => match u? {
                    Update::Nodes(nodes) => {
                        map = nodes;
                        self.converge(&cfg, &local, &map).await?;
                        self.report_unreachable(&mut ds, &mut mine).await?;
                    }
                    Update::Services(changes) => {
                        for (id, s) in changes {
                            proxy.set_service(id, s);
                        }
                        self.report(proxy.flush()?);
                        self.after_services(&cfg, &local, &map, &proxy).await;
                        self.assign_load_balancers(&mut ds, &cfg, &map, &proxy).await;
                    }
                    Update::Endpoints(changes) => {
                        for (id, e) in changes {
                            proxy.set_endpoints(id, e);
                        }
                        self.report(proxy.flush()?);
                        self.after_services(&cfg, &local, &map, &proxy).await;
                        self.assign_load_balancers(&mut ds, &cfg, &map, &proxy).await;
                    }
                    Update::Trouble(why) => {
                        self.store_trouble = Some(why.clone());
                        self.status.datastore = "retrying".into();
                        self.status.last_error = Some(why);
                        self.health.lock().expect("health").datastore_connected = false;
                        self.write_status_file();
                    }
                    Update::LeaseRenewed(l) => {
                        self.status.lease_holder = Some(l.holder.into());
                        self.status.lease_ttl = Some(l.ttl_secs);
                        self.status.lease_renewed = Some(rfc3339(l.renewed));
                        self.status.lease_renewed_unix = l
                            .renewed
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs());
                        self.write_status_file();
                    }
                    Update::Healthy => {
                        self.store_trouble = None;
                        self.status.datastore = "connected".into();
                        self.status.last_error = None;
                        self.health.lock().expect("health").datastore_connected = true;
                        self.write_status_file();
                    }
                },
                _ = learnt_changed(&mut learnt) => {
                    tracing::debug!("learnt routes changed");
                    self.converge(&cfg, &local, &map).await?;
                    self.report_unreachable(&mut ds, &mut mine).await?;
                }
                _ = reprobe(self.reprobe_at) => {
                    self.converge(&cfg, &local, &map).await?;
                    self.report_unreachable(&mut ds, &mut mine).await?;
                }
                _ = resync.tick() => {
                    self.converge(&cfg, &local, &map).await?;
                    self.report_unreachable(&mut ds, &mut mine).await?;
                    if !table_present() {
                        tracing::warn!("the service table is gone; re-making it");
                        proxy.full_sync()?;
                    }
                }
                _ = full_tick.tick() => {
                    self.report(Some(proxy.full_sync()?));
                }
            }
            if self.ready && !announced {
                ds.network_ready().await?;
                announced = true;
            }
            self.beat();
        }
    }

    /// Plan and apply. A kernel error is logged and retried at the next
    /// resync rather than ending the session; file errors are fatal.
    async fn converge(
        &mut self,
        cfg: &ClusterConfig,
        local: &LocalNode,
        map: &BTreeMap<Ipv4Net, NodeRecord>,
    ) -> Result<(), AgentError> {
        let nodes: Vec<NodeRecord> = map.values().cloned().collect();
        let learnt = self.converge_bgp(cfg, local, &nodes).await;
        let facts = self.peer_facts(cfg, local, &nodes, &learnt).await;
        let probing = self
            .probe_misses
            .borrow()
            .values()
            .any(|m| crate::probe::reprobe_soon(*m));
        self.reprobe_at =
            (probing || self.bgp_settling).then(|| tokio::time::Instant::now() + REPROBE_AFTER);
        // Only probes decide `probing` (the lab waits for it to clear): a
        // BGP session that never comes up must not hold the lab.
        self.status.probing = probing;
        let plan = plan_node(cfg, local, &nodes, &facts);
        let modes: Vec<(String, tweed_plan::Mode)> = plan
            .peers
            .iter()
            .map(|p| (p.node.clone(), p.mode))
            .collect();
        if modes != self.modes {
            for p in &plan.peers {
                if p.mode == tweed_plan::Mode::Unreachable {
                    tracing::warn!(peer = %p.node, reason = %p.reason, "peer unreachable");
                } else {
                    tracing::info!(peer = %p.node, mode = %p.mode, reason = %p.reason, "peer path");
                }
            }
            for s in plan
                .skipped
                .iter()
                .filter(|s| !plan.peers.iter().any(|p| p.node == s.node))
            {
                tracing::warn!(peer = %s.node, reason = %s.reason, "peer skipped");
            }
            let mut by_mode: BTreeMap<String, u64> = BTreeMap::new();
            for (_, m) in &modes {
                *by_mode.entry(m.to_string()).or_default() += 1;
            }
            self.health.lock().expect("health").peers_by_mode = by_mode.into_iter().collect();
            self.modes = modes;
        }
        self.unreachable = plan
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.node, s.reason))
            .collect();
        // Pods shrink before a peer's route moves into a tunnel (a 192 KiB
        // packet must never reach it) and grow only once every route is direct.
        let underlay_gso = match self.nl.link(&local.underlay_dev).await {
            Ok(Some(l)) => l.gso_ipv4_max_size,
            _ => None,
        };
        let pod_gso = tweed_plan::pod_gso_max_size(underlay_gso, plan.peers.iter().map(|p| p.mode));
        let host_gso = tweed_plan::pod_gso_max_size(underlay_gso, []);
        let shrinking = pod_gso < self.pod_gso;
        if (pod_gso, host_gso) != (self.pod_gso, self.host_gso) {
            tracing::info!(
                from = self.pod_gso,
                to = pod_gso,
                host_end = host_gso,
                "pod veth GSO/GRO size"
            );
            self.pod_gso = pod_gso;
            self.host_gso = host_gso;
            self.status.pod_gso_max_size = pod_gso;
            if self.ready {
                self.write_node_state(local, self.mtu)?;
            }
        }
        if shrinking {
            self.converge_pod_sizes().await;
        }
        let err = match reconcile(&self.nl, &plan, &local.underlay_dev).await {
            Ok(rep) => {
                if rep.added + rep.removed > 0 {
                    tracing::info!(
                        added = rep.added,
                        removed = rep.removed,
                        peers = plan.routes.len(),
                        "reconciled"
                    );
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "reconcile failed; retrying at the next resync");
                self.health.lock().expect("health").reconcile_errors += 1;
                Some(e.to_string())
            }
        };
        if !shrinking {
            self.converge_pod_sizes().await;
        }
        self.mtu = cfg.effective_mtu(local.underlay_mtu);
        if let (None, Some(v)) = (&err, &plan.vxlan) {
            self.vxlan_checksum(&v.name);
        }
        self.dataplane_ok = err.is_none();
        if self.dataplane_ok && !self.ready && self.proxy_synced {
            self.publish_ready(local, self.mtu)?;
        }
        if let Err(e) = self.ensure_service_route(cfg).await {
            tracing::error!(error = %e, "cannot route the service CIDR");
        }
        let peers = nodes
            .iter()
            .filter(|n| n.name != local.record.name)
            .map(|n| {
                let p = plan.peers.iter().find(|p| p.node == n.name);
                PeerStatus {
                    name: n.name.clone(),
                    subnet: n.subnet.to_string(),
                    address: n.public_ip.to_string(),
                    mode: p
                        .map(|p| p.mode.to_string())
                        .unwrap_or_else(|| "skipped".into()),
                    reason: p.map(|p| p.reason.clone()).unwrap_or_default(),
                    problem: plan
                        .skipped
                        .iter()
                        .find(|s| s.node == n.name)
                        .map(|s| s.reason.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        self.write_status(Some((local, peers)), err);
        self.write_intent(cfg, local, &nodes, plan);
        Ok(())
    }

    /// Write what the node should be (RUN_DIR/plan.json) for `tweed doctor`
    /// and `tweed trace`; only when it changed, so a quiet resync writes nothing.
    fn write_intent(
        &mut self,
        cfg: &ClusterConfig,
        local: &LocalNode,
        nodes: &[NodeRecord],
        plan: tweed_plan::NodePlan,
    ) {
        let peers = nodes
            .iter()
            .filter(|n| n.name != local.record.name)
            .map(|n| {
                let p = plan.peers.iter().find(|p| p.node == n.name);
                tweed_plan::PeerIntent {
                    name: n.name.clone(),
                    subnet: n.subnet,
                    public_ip: n.public_ip,
                    vtep_ip: n.vtep_ip(),
                    vtep_mac: n.vtep_mac,
                    mode: p.map(|p| p.mode),
                    reason: p.map(|p| p.reason.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let intent = tweed_plan::NodeIntent {
            node: local.record.name.clone(),
            subnet: local.record.subnet,
            cluster_cidr: cfg.cluster_cidr.trunc(),
            service_cidr: cfg.service_cidr.trunc(),
            backend: cfg.backend,
            vxlan_port: cfg.port,
            underlay_dev: local.underlay_dev.clone(),
            bind_ip: local.bind_ip,
            public_ip: local.record.public_ip,
            underlay_mtu: local.underlay_mtu,
            pod_mtu: cfg.effective_mtu(local.underlay_mtu),
            cni_conf_dir: self.opts.cni_conf_dir.clone(),
            cni_bin_dir: self.opts.cni_bin_dir.clone(),
            resync_secs: self.opts.resync.as_secs(),
            peers,
            plan,
        };
        let body = serde_json::to_vec_pretty(&intent).expect("json");
        if self.intent_written.as_deref() == Some(&body[..]) {
            return;
        }
        let p = self.opts.run_dir.join("plan.json");
        match write_atomic(&p, &body) {
            Ok(()) => self.intent_written = Some(body),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot write the plan for tweed doctor")
            }
        }
    }

    /// Turn VXLAN TX checksum offload off where the kernel needs it (see
    /// [`tweed_plan::vxlan_checksum_workaround`]) or the operator asked.
    /// Equivalent: `ethtool -K tweed.1 tx-checksum-ip-generic off`.
    fn vxlan_checksum(&self, dev: &str) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let off = self
            .opts
            .vxlan_csum_off
            .unwrap_or_else(|| tweed_plan::vxlan_checksum_workaround(release.trim()));
        if !off {
            return;
        }
        let shown = std::process::Command::new("ethtool")
            .args(["-k", dev])
            .output();
        let already = shown.is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "tx-checksum-ip-generic: off")
        });
        if already {
            return;
        }
        match std::process::Command::new("ethtool")
            .args(["-K", dev, "tx-checksum-ip-generic", "off"])
            .output()
        {
            Ok(o) if o.status.success() => {
                tracing::info!(%dev, kernel = %release.trim(), "VXLAN TX checksum offload turned off")
            }
            Ok(o) => {
                tracing::warn!(%dev, error = %String::from_utf8_lossy(&o.stderr).trim(), "cannot turn VXLAN TX checksum offload off")
            }
            Err(e) => {
                tracing::warn!(%dev, error = %e, "cannot run ethtool to turn VXLAN TX checksum offload off")
            }
        }
    }

    /// Put the peers we cannot route to into our record, when that changed.
    async fn report_unreachable<D: Datastore>(
        &self,
        ds: &mut D,
        mine: &mut NodeRecord,
    ) -> Result<(), AgentError> {
        if mine.unreachable != self.unreachable {
            mine.unreachable = self.unreachable.clone();
            ds.publish(mine).await?;
        }
        Ok(())
    }

    /// Kubernetes: give each LoadBalancer Service without an address the
    /// first free one of `loadBalancerPools`, in its status. One agent does
    /// it, the one whose node name sorts first among the nodes it knows
    /// (every agent agrees while they see the same nodes; a moment of
    /// disagreement as nodes come and go can make two write, and the
    /// later write wins: the Service then has one address).
    async fn assign_load_balancers<D: Datastore>(
        &mut self,
        ds: &mut D,
        cfg: &ClusterConfig,
        map: &BTreeMap<Ipv4Net, NodeRecord>,
        proxy: &Proxy,
    ) {
        if !ds.assigns_load_balancer_ips() || cfg.load_balancer_pools.is_empty() {
            return;
        }
        let me = &self.opts.node_name;
        if map.values().any(|n| n.name < *me) {
            return;
        }
        let (pending, mut used) = proxy.load_balancers();
        self.lb_written.retain(|id, _| pending.contains(id));
        used.extend(self.lb_written.values().copied());
        for id in pending {
            if self.lb_written.contains_key(&id) {
                continue;
            }
            let Some(ip) = tweed_model::allocate_lb_ip(&cfg.load_balancer_pools, &used) else {
                tracing::warn!(service = %id, pools = ?cfg.load_balancer_pools, "no free load balancer address");
                continue;
            };
            match ds.set_load_balancer_ips(&id, &[ip]).await {
                Ok(()) => {
                    tracing::info!(service = %id, %ip, "load balancer address assigned");
                    used.insert(ip);
                    self.lb_written.insert(id, ip);
                }
                Err(e) => {
                    tracing::warn!(service = %id, error = %e, "cannot write the load balancer address")
                }
            }
        }
    }

    /// After Services or endpoints changed: serve the health check node
    /// ports, and (BGP) when the Service addresses this node should
    /// announce changed, tell the speaker (a Service's first ready local
    /// endpoint is what makes a policy-Local address appear).
    async fn after_services(
        &mut self,
        cfg: &ClusterConfig,
        local: &LocalNode,
        map: &BTreeMap<Ipv4Net, NodeRecord>,
        proxy: &Proxy,
    ) {
        self.hc.converge(proxy.health_checks()).await;
        if cfg.bgp.is_none() {
            return;
        }
        let ips = proxy.announced_ips();
        if ips == self.service_ips {
            return;
        }
        tracing::info!(
            count = ips.len(),
            "Service addresses announced by BGP changed"
        );
        self.service_ips = ips;
        let nodes: Vec<NodeRecord> = map.values().cloned().collect();
        self.converge_bgp(cfg, local, &nodes).await;
        self.write_status_file();
    }

    /// BGP: run the speaker on this node's plan (or stop it), hold the
    /// blackhole for the announced subnet, and read what was learnt: each
    /// peer's next hop through the fabric, by peer name.
    async fn converge_bgp(
        &mut self,
        cfg: &ClusterConfig,
        local: &LocalNode,
        nodes: &[NodeRecord],
    ) -> BTreeMap<String, Ipv4Addr> {
        let Some(bgp) = &cfg.bgp else {
            if self.speaker.pid().is_some() {
                let _ = self.speaker.converge(None);
            }
            // Once per agent start or BGP change: the subnet's blackhole
            // (a restarted agent does not know it held one) and what BIRD
            // learnt, which it leaves in the kernel when it stops
            // (`persist`, for its own restarts).
            if !self.bgp_cleared {
                self.blackhole = None;
                if let Err(e) = self.nl.del_blackhole(local.record.subnet).await {
                    tracing::warn!(error = %e, "cannot remove the subnet's blackhole route");
                }
                match self.nl.flush_table(crate::bgp::LEARNT_TABLE).await {
                    Ok(n) => {
                        // Again next time while BIRD is still exiting.
                        self.bgp_cleared = self.speaker.pid().is_none();
                        if n > 0 {
                            tracing::info!(
                                routes = n,
                                table = crate::bgp::LEARNT_TABLE,
                                "BGP is off; removed the learnt routes"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot flush the learnt-routes table"),
                }
            }
            self.status.bgp = None;
            self.bgp_settling = false;
            return BTreeMap::new();
        };
        self.bgp_cleared = false;
        let as_bgp = |n: &NodeRecord| {
            let o = n.bgp.clone().unwrap_or_default();
            tweed_bgp::BgpNode {
                name: n.name.clone(),
                address: if n.name == local.record.name {
                    local.bind_ip
                } else {
                    n.public_ip
                },
                subnet: n.subnet,
                asn: o.asn,
                labels: o.labels,
                peers: o.peers,
            }
        };
        // Our record as registered: the flags, and in Kubernetes the
        // Node's own labels and BGP annotations.
        let me = as_bgp(&local.record);
        let all: Vec<tweed_bgp::BgpNode> = nodes
            .iter()
            .filter(|n| n.name != me.name)
            .map(as_bgp)
            .collect();
        let mut plan = tweed_bgp::plan_bgp(bgp, cfg.cluster_cidr, cfg.node_subnet_len, &me, &all);
        plan.services = self
            .service_ips
            .iter()
            .map(|ip| Ipv4Net::from(*ip))
            .chain(bgp.advertise_cluster_ips.then(|| cfg.service_cidr.trunc()))
            .collect();
        let conf = tweed_bgp::bird::render(&me.name, &plan);
        let _ = self.speaker.converge(Some(&conf));
        if self.blackhole != Some(me.subnet) {
            match self.nl.add_blackhole(me.subnet).await {
                Ok(()) => self.blackhole = Some(me.subnet),
                Err(e) => tracing::warn!(error = %e, "cannot add the subnet's blackhole route"),
            }
        }
        let learnt: Vec<(Ipv4Net, Ipv4Addr)> = match self.nl.all_routes().await {
            Ok(rs) => rs
                .into_iter()
                .filter(|r| r.table == crate::bgp::LEARNT_TABLE && r.kind == "unicast")
                .filter_map(|r| Some((r.prefix, r.gateway?)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routes BGP learnt");
                Vec::new()
            }
        };
        let status = self.speaker.status(&plan, &learnt);
        let by_peer: BTreeMap<String, Ipv4Addr> = nodes
            .iter()
            .filter_map(|n| {
                let via = learnt.iter().find(|(net, _)| *net == n.subnet)?.1;
                Some((n.name.clone(), via))
            })
            .collect();
        // Sessions come up and routes arrive seconds after a change, with
        // nothing to wake the agent: look again soon, for two minutes.
        let key = format!(
            "{conf}{:?}",
            nodes.iter().map(|n| n.subnet).collect::<Vec<_>>()
        );
        if key != self.bgp_key {
            self.bgp_key = key;
            self.bgp_changed_at = std::time::Instant::now();
        }
        let incomplete = status
            .peers
            .iter()
            .any(|p| p.diagnosis != tweed_bgp::Diagnosis::Established)
            || nodes
                .iter()
                .any(|n| n.name != me.name && !by_peer.contains_key(&n.name));
        self.bgp_settling = incomplete && self.bgp_changed_at.elapsed() < Duration::from_secs(120);
        self.status.bgp = Some(status);
        by_peer
    }

    /// Which peers share a segment with our underlay device, and (backend
    /// auto) which of those pass pod-addressed traffic: probed at every
    /// resync, so the choice follows the network as it changes.
    async fn peer_facts(
        &self,
        cfg: &ClusterConfig,
        local: &LocalNode,
        nodes: &[NodeRecord],
        learnt: &BTreeMap<String, Ipv4Addr>,
    ) -> BTreeMap<String, tweed_plan::PeerFacts> {
        let nets: Vec<Ipv4Net> = match self.nl.link(&local.underlay_dev).await {
            Ok(Some(l)) => self
                .nl
                .ipv4_addrs(l.index)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.trunc())
                .collect(),
            _ => Vec::new(),
        };
        let mut facts: BTreeMap<String, tweed_plan::PeerFacts> = nodes
            .iter()
            .filter(|n| n.name != local.record.name)
            .map(|n| {
                (
                    n.name.clone(),
                    tweed_plan::PeerFacts {
                        connected: nets
                            .iter()
                            .any(|net| net.contains(&n.public_ip) && n.public_ip != local.bind_ip),
                        probe: None,
                        learnt: learnt.get(&n.name).copied(),
                    },
                )
            })
            .collect();
        if cfg.backend == tweed_model::Backend::Auto {
            if !self.probe_rule.get() {
                if let Err(e) = crate::probe::ensure_rule() {
                    tracing::warn!(error = %e, "cannot set up the probe rule; peers stay on VXLAN");
                    return facts;
                }
                self.probe_rule.set(true);
            }
            // Peers on our segment straight to their address; peers the
            // fabric routes (BGP) through the learnt next hop.
            let targets: Vec<(String, std::net::Ipv4Addr, std::net::Ipv4Addr)> = nodes
                .iter()
                .filter_map(|n| {
                    let f = facts.get(&n.name)?;
                    let via = if f.connected {
                        Some(n.public_ip)
                    } else {
                        f.learnt
                    }?;
                    Some((n.name.clone(), n.vtep_ip(), via))
                })
                .collect();
            let dev = local.underlay_dev.clone();
            let answers =
                tokio::task::spawn_blocking(move || crate::probe::probe_all(&targets, &dev))
                    .await
                    .unwrap_or_default();
            let mut misses = self.probe_misses.borrow_mut();
            misses.retain(|n, _| facts.contains_key(n));
            for (name, ok) in answers {
                let direct_now = self.modes.iter().any(|(n, m)| {
                    *n == name && matches!(m, tweed_plan::Mode::Direct | tweed_plan::Mode::Bgp)
                });
                let m = misses.entry(name.clone()).or_default();
                let verdict = crate::probe::judge(direct_now, ok, m);
                if !ok {
                    tracing::debug!(peer = %name, misses = *m, direct_now, "probe unanswered");
                }
                if let Some(f) = facts.get_mut(&name) {
                    f.probe = Some(verdict);
                }
            }
        }
        facts
    }

    /// Node processes need a route for the service CIDR to connect() at
    /// all before DNAT picks a pod (kube-proxy relies on a default route;
    /// a node may have none). Equivalent: `ip route replace SERVICE_CIDR dev
    /// UNDERLAY scope link proto 144`. Traffic that no service claims never
    /// leaves: the proxy rejects it.
    async fn ensure_service_route(&self, cfg: &ClusterConfig) -> Result<(), AgentError> {
        let Some(dev) = self.nl.link(&self.underlay.dev).await? else {
            return Ok(());
        };
        let cidr = cfg.service_cidr.trunc();
        if !self.nl.has_device_route(cidr, dev.index).await? {
            self.nl.add_device_route(cidr, dev.index).await?;
        }
        Ok(())
    }

    /// Tell the CNI plugin and the runtime that pods can be wired now: the
    /// node state first (the plugin reads it), then the conflist (its
    /// appearance is what clears a runtime's "cni plugin not initialized").
    fn publish_ready(&mut self, local: &LocalNode, mtu: u32) -> Result<(), AgentError> {
        self.write_node_state(local, mtu)?;
        if let Some(dir) = &self.opts.cni_bin_dir {
            install_plugin(dir)?;
        }
        let c = self.opts.cni_conf_dir.join("10-tweed.conflist");
        let body = serde_json::to_vec_pretty(&conflist(&self.opts.run_dir, &self.opts.ipam_dir()))
            .expect("json");
        write_atomic(&c, &body).map_err(|source| AgentError::File {
            path: c.clone(),
            source,
        })?;
        tracing::info!(conflist = %c.display(), "node ready for pods");
        self.ready = true;
        Ok(())
    }

    /// What the CNI plugin reads for each new pod (RUN_DIR/node.json).
    fn write_node_state(&self, local: &LocalNode, mtu: u32) -> Result<(), AgentError> {
        let state = NodeState {
            node: local.record.name.clone(),
            subnet: local.record.subnet,
            mtu,
            pod_gso_max_size: self.pod_gso,
            host_gso_max_size: self.host_gso,
        };
        let p = self.opts.run_dir.join("node.json");
        write_atomic(&p, &serde_json::to_vec(&state).expect("json"))
            .map_err(|source| AgentError::File { path: p, source })
    }

    /// Bring every existing pod veth to the current size (see `pods`).
    async fn converge_pod_sizes(&mut self) {
        let rep = crate::pods::converge_sizes(
            &self.nl,
            &self.opts.run_dir,
            self.host_gso,
            self.pod_gso,
            &mut self.pod_gso_known,
        )
        .await;
        if rep.changed > 0 {
            tracing::info!(
                pods = rep.changed,
                size = self.pod_gso,
                "pod veth GSO/GRO size set"
            );
        }
        if rep.failed != self.pod_gso_failed {
            for f in &rep.failed {
                tracing::warn!(pod = %f, size = self.pod_gso, "cannot set the pod veth's GSO/GRO size; retrying at the next resync");
            }
            self.pod_gso_failed = rep.failed;
        }
    }

    fn report(&mut self, r: Option<crate::proxy::SyncReport>) {
        if let Some(r) = r {
            tracing::info!(
                full = r.full,
                services = r.services,
                millis = format!("{:.2}", r.millis),
                "service proxy: applied"
            );
            self.record_sync(&r);
        }
    }

    fn record_sync(&mut self, r: &crate::proxy::SyncReport) {
        self.status.services = r.services as u64;
        // RFC 3339, UTC, to the second.
        self.status.last_sync = format!("{:.0}", k8s_openapi::jiff::Timestamp::now());
        let mut h = self.health.lock().expect("health");
        if r.full {
            h.full_syncs += 1;
        } else {
            h.delta_syncs += 1;
        }
        h.services = r.services as u64;
        h.last_sync_seconds = r.millis / 1000.0;
    }

    /// The loop is alive; readiness as it stands.
    fn beat(&self) {
        let mut h = self.health.lock().expect("health");
        h.heartbeat = std::time::Instant::now();
        h.not_ready = if !self.dataplane_ok {
            Some("the pod network is not programmed (see the log)".into())
        } else if !self.proxy_synced {
            Some("the Service proxy has not synced".into())
        } else if !self.ready {
            Some("the CNI config is not written yet".into())
        } else {
            None
        };
    }

    /// Update the status `tweed status` shows, and write it out. The agent
    /// keeps it in memory; the file is only ever written.
    fn write_status(
        &mut self,
        now: Option<(&LocalNode, Vec<PeerStatus>)>,
        last_error: Option<String>,
    ) {
        let st = &mut self.status;
        if let Some((local, peers)) = now {
            st.subnet = local.record.subnet.to_string();
            st.peers = peers;
            st.datastore = "connected".into();
        } else if self.store_trouble.is_none() {
            st.datastore = "disconnected".into();
        }
        st.last_error = last_error;
        if let Some(t) = &self.store_trouble {
            st.datastore = "retrying".into();
            st.last_error.get_or_insert_with(|| t.clone());
        }
        self.health.lock().expect("health").datastore_connected = st.datastore == "connected";
        self.write_status_file();
    }

    fn write_status_file(&self) {
        save_status(&self.opts.run_dir, &self.status);
    }
}

/// A time as RFC 3339 in UTC, to the second (status.json).
fn rfc3339(t: std::time::SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| format!("{t:.0}"))
        .unwrap_or_default()
}
