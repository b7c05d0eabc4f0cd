//! `tweed agent`: parse the flags, run the node agent.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tweed_agent::{DatastoreOpts, KubeOpts};
use tweed_model::ClusterConfig;

/// Where a pod's service account token is mounted: its presence means the
/// agent runs in a cluster.
const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(clap::Args)]
pub struct AgentArgs {
    /// This node's name (default: $NODE_NAME, as the DaemonSet sets it from
    /// the downward API, else the hostname).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// etcd (tweed's own keys; the lab's) or kubernetes (the API server).
    /// Default: kubernetes inside a pod with a service account, else etcd.
    #[arg(long, value_parser = ["etcd", "kubernetes"])]
    datastore: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    #[arg(long, default_value = "/tweed")]
    etcd_prefix: String,
    /// A kubeconfig (outside a cluster); in a pod the service account is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server as HOST:PORT, bypassing the `kubernetes` Service (tweed
    /// is the Service proxy, so the ClusterIP works only once tweed runs).
    #[arg(long, env = "TWEED_API_SERVER")]
    api_server: Option<String>,
    /// How to choose the underlay interface and address: first-found,
    /// interface=REGEX, can-reach=IP, cidr=CIDR or address=IP.
    #[arg(long, default_value = "first-found", env = "TWEED_UNDERLAY")]
    underlay: tweed_plan::UnderlaySelector,
    /// The underlay interface by name (short for --underlay interface=NAME).
    #[arg(long, conflicts_with = "underlay")]
    iface: Option<String>,
    /// VXLAN TX checksum offload: auto (off on kernels before 5.7, whose
    /// offload corrupts NATed VXLAN checksums: flannel's 63-second delays), on or off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    vxlan_checksum_offload: String,
    /// The address peers reach this node at, if not its own (1:1 NAT).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Install this binary there as the CNI plugin `tweed` before writing
    /// the conflist (in a cluster: the host's /opt/cni/bin).
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "/run/tweed")]
    run_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/tweed")]
    data_dir: PathBuf,
    /// Seconds the node's subnet lease lives without renewal (etcd).
    #[arg(long, default_value_t = 30)]
    lease_ttl: i64,
    /// Seconds between full resyncs of the data plane (at most 30).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=30))]
    resync: u64,
    /// Cluster config (JSON). etcd: written to the datastore if it holds
    /// none yet. Kubernetes: the config in force (the DaemonSet mounts its
    /// ConfigMap here).
    #[arg(long)]
    cluster_config: Option<PathBuf>,
    /// Seconds between full service-proxy syncs.
    #[arg(long, default_value_t = 600)]
    proxy_full_sync: u64,
    /// Serve /healthz, /readyz and /metrics here ("" for nowhere).
    #[arg(long, default_value = "0.0.0.0:9476")]
    health_listen: String,
    /// This node's own AS, when the cluster runs BGP (default: the
    /// cluster's `bgp.asn`), e.g. one AS per rack.
    #[arg(long, env = "TWEED_BGP_ASN")]
    bgp_asn: Option<u32>,
    /// A BGP peer of this node only, ADDRESS:ASN[:PASSWORD] (e.g. its
    /// rack's ToR); repeat or separate with commas.
    #[arg(long, env = "TWEED_BGP_PEERS", value_delimiter = ',')]
    bgp_peer: Vec<String>,
    /// A label the cluster's BGP peers' node selectors match, KEY=VALUE
    /// (in Kubernetes mode the Node's own labels count too).
    #[arg(long, env = "TWEED_BGP_LABELS", value_delimiter = ',')]
    bgp_label: Vec<String>,
}

/// The node's BGP overrides from its flags (`None`: none given).
fn bgp_node(a: &AgentArgs) -> Result<Option<tweed_model::NodeBgp>> {
    if a.bgp_asn.is_none() && a.bgp_peer.is_empty() && a.bgp_label.is_empty() {
        return Ok(None);
    }
    if let Some(n) = a.bgp_asn.filter(|n| !tweed_model::bgp::valid_asn(*n)) {
        bail!("--bgp-asn {n}: reserved (0, 23456 and 4294967295 cannot be used)");
    }
    let peers = a
        .bgp_peer
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| tweed_model::parse_bgp_peer(p).map_err(|e| anyhow::anyhow!("--bgp-peer {e}")))
        .collect::<Result<Vec<_>>>()?;
    let mut labels = std::collections::BTreeMap::new();
    for l in a.bgp_label.iter().filter(|l| !l.is_empty()) {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--bgp-label {l:?}: not KEY=VALUE");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(Some(tweed_model::NodeBgp {
        asn: a.bgp_asn,
        peers,
        labels,
    }))
}

pub fn run(a: AgentArgs) -> Result<()> {
    let bgp_node = bgp_node(&a)?;
    let node_name = match a.node_name {
        Some(n) if !n.is_empty() => n,
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string(),
    };
    let default_config = match &a.cluster_config {
        Some(p) => {
            ClusterConfig::from_json(&std::fs::read(p).with_context(|| p.display().to_string())?)
                .with_context(|| format!("cluster config {}", p.display()))?
        }
        None => ClusterConfig::default(),
    };
    if a.lease_ttl < 2 {
        bail!("--lease-ttl must be at least 2 seconds");
    }
    let in_cluster = Path::new(SA_TOKEN).exists();
    let datastore = match a.datastore.as_deref() {
        Some("kubernetes") => true,
        Some(_) => false,
        None => in_cluster,
    };
    let datastore = if datastore {
        DatastoreOpts::Kubernetes(KubeOpts {
            kubeconfig: a.kubeconfig,
            api_server: a.api_server.filter(|s| !s.is_empty()),
        })
    } else {
        DatastoreOpts::Etcd {
            endpoints: a.etcd_endpoints,
            prefix: a.etcd_prefix,
        }
    };
    let opts = tweed_agent::AgentOpts {
        bgp_node,
        node_name,
        datastore,
        underlay: match a.iface {
            Some(name) => format!("interface={}", regex_escape(&name))
                .parse()
                .map_err(anyhow::Error::msg)?,
            None => a.underlay,
        },
        vxlan_csum_off: match a.vxlan_checksum_offload.as_str() {
            "on" => Some(false),
            "off" => Some(true),
            _ => None,
        },
        public_ip: a.public_ip,
        cni_conf_dir: a.cni_conf_dir,
        cni_bin_dir: a.cni_bin_dir,
        run_dir: a.run_dir,
        data_dir: a.data_dir,
        lease_ttl: a.lease_ttl,
        resync: Duration::from_secs(a.resync),
        default_config,
        proxy_full_sync: Duration::from_secs(a.proxy_full_sync.max(1)),
        health_listen: match a.health_listen.as_str() {
            "" => None,
            s => Some(
                s.parse()
                    .with_context(|| format!("--health-listen {s:?}: not ADDRESS:PORT"))?,
            ),
        },
    };
    // One event loop is all the agent needs; one thread also keeps the
    // allocator to one arena, which matters for its memory at 10k Services.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(tweed_agent::run(opts))?;
    Ok(())
}

/// An interface name as a regex matching exactly it.
fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}
