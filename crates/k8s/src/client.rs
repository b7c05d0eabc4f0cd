//! The Kubernetes API, as the agent uses it. Every call here is one the
//! DaemonSet's ClusterRole allows (`deploy/tweed.yaml`): read Nodes,
//! Services and EndpointSlices; patch its own Node's status (annotations
//! and the NetworkUnavailable condition); create Events. Nothing else.

use std::path::PathBuf;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Event as KEvent, Node, ObjectReference, Service as KService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ApiResource, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tweed_model::NodeRecord;

use crate::convert::{record_annotations, EndpointSlice, PROXY_LABEL_SELECTOR};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client config: {0}")]
    Config(String),
    /// An API call failed; `what` says which, so a missing RBAC verb is
    /// named (e.g. "patch nodes/status node1: 403 Forbidden").
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("watching {what}: {source}")]
    Watch {
        what: &'static str,
        #[source]
        source: watcher::Error,
    },
    #[error("Node {0} does not exist in the API")]
    NoNode(String),
}

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeOpts {
    /// A kubeconfig file (outside a cluster; the lab's tests use one).
    pub kubeconfig: Option<PathBuf>,
    /// `host:port` of the API server, bypassing the `kubernetes` Service's
    /// ClusterIP: tweed is the Service proxy, so that address only works
    /// once tweed runs (Calico's `kubernetes-services-endpoint`).
    pub api_server: Option<String>,
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let what = what.into();
    move |source| KubeError::Api { what, source }
}

/// Build a client: the kubeconfig if given, else the pod's service account,
/// with the API endpoint override applied to either.
pub async fn connect(opts: &KubeOpts) -> Result<(Client, String), KubeError> {
    let cfg_err = |e: &dyn std::fmt::Display| KubeError::Config(e.to_string());
    let mut cfg = match (&opts.kubeconfig, &opts.api_server) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
        // In a pod with an override: the service account, without needing
        // KUBERNETES_SERVICE_HOST (the ClusterIP we cannot use yet).
        (None, Some(_)) => kube::Config::incluster_dns().map_err(|e| cfg_err(&e))?,
        (None, None) => kube::Config::infer().await.map_err(|e| cfg_err(&e))?,
    };
    if let Some(ep) = &opts.api_server {
        let url = if ep.contains("://") {
            ep.clone()
        } else {
            format!("https://{ep}")
        };
        cfg.cluster_url = url
            .parse()
            .map_err(|e| KubeError::Config(format!("API server {ep:?}: {e}")))?;
    }
    cfg.connect_timeout = Some(Duration::from_secs(5));
    let url = cfg.cluster_url.to_string();
    Ok((Client::try_from(cfg).map_err(|e| cfg_err(&e))?, url))
}

/// Which EndpointSlice API the server serves: `discovery.k8s.io/v1` from
/// Kubernetes 1.21, only `v1beta1` before (the seeds' 1.20).
pub async fn endpointslice_version(client: &Client) -> Result<ApiResource, KubeError> {
    let mut last = None;
    for version in ["discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"] {
        match client.list_api_group_resources(version).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => {
                let v = version.rsplit('/').next().unwrap_or("v1");
                return Ok(ApiResource {
                    group: "discovery.k8s.io".into(),
                    version: v.into(),
                    api_version: version.into(),
                    kind: "EndpointSlice".into(),
                    plural: "endpointslices".into(),
                });
            }
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(source) => Err(KubeError::Api {
            what: "discover the EndpointSlice API (discovery.k8s.io v1 or v1beta1)".into(),
            source,
        }),
        None => Err(KubeError::Config(
            "the API server serves no EndpointSlices (discovery.k8s.io v1 or v1beta1)".into(),
        )),
    }
}

impl kube::Resource for EndpointSlice {
    type DynamicType = ApiResource;
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// How long a failed watch waits before it retries: doubling from 0.5 s to
/// at most 5 s (kube-rs's default grows to 30 s, which after an API server
/// restart would leave the data plane stale for up to half a minute).
#[derive(Debug, Clone)]
pub struct RetryBackoff(Duration);

impl Default for RetryBackoff {
    fn default() -> Self {
        Self(Duration::from_millis(500))
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for RetryBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Watches that restart themselves (with backoff) after errors, each
/// beginning with a complete list.
pub fn watch_nodes(client: &Client) -> impl Stream<Item = Result<watcher::Event<Node>, KubeError>> {
    watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .backoff(RetryBackoff::default())
        .map(|r| {
            r.map_err(|source| KubeError::Watch {
                what: "nodes",
                source,
            })
        })
}

pub fn watch_services(
    client: &Client,
) -> impl Stream<Item = Result<watcher::Event<KService>, KubeError>> {
    watcher(
        Api::<KService>::all(client.clone()),
        watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
    )
    .backoff(RetryBackoff::default())
    .map(|r| {
        r.map_err(|source| KubeError::Watch {
            what: "services",
            source,
        })
    })
}

pub fn watch_slices(
    client: &Client,
    api: &ApiResource,
) -> impl Stream<Item = Result<watcher::Event<EndpointSlice>, KubeError>> {
    watcher(
        Api::<EndpointSlice>::all_with(client.clone(), api),
        watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
    )
    .backoff(RetryBackoff::default())
    .map(|r| {
        r.map_err(|source| KubeError::Watch {
            what: "endpointslices",
            source,
        })
    })
}

/// The agent's own Node.
pub async fn get_node(client: &Client, name: &str) -> Result<Node, KubeError> {
    Api::<Node>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(api_err(format!("get node {name}")))?
        .ok_or_else(|| KubeError::NoNode(name.to_string()))
}

/// Publish the node's record as annotations, through `nodes/status` (as
/// flannel does), so the agent needs no write access to Node specs.
pub async fn publish_record(client: &Client, rec: &NodeRecord) -> Result<(), KubeError> {
    let patch = serde_json::json!({ "metadata": { "annotations": record_annotations(rec) } });
    Api::<Node>::all(client.clone())
        .patch_status(&rec.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_err(format!("patch nodes/status {}", rec.name)))?;
    Ok(())
}

/// A LoadBalancer Service's address: `status.loadBalancer.ingress`.
pub async fn set_lb_ingress(
    client: &Client,
    namespace: &str,
    name: &str,
    ips: &[std::net::Ipv4Addr],
) -> Result<(), KubeError> {
    let ingress: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip.to_string() }))
        .collect();
    let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": ingress } } });
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_err(format!("patch services/status {namespace}/{name}")))?;
    Ok(())
}

/// `NetworkUnavailable=False`: the node's pod network is up (cloud route
/// controllers and some schedulers wait for it).
pub async fn set_network_available(client: &Client, node: &str) -> Result<(), KubeError> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let patch = serde_json::json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "TweedIsUp",
        "message": "tweed's agent programmed this node's pod network",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}});
    Api::<Node>::all(client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map_err(api_err(format!("patch nodes/status {node}")))?;
    Ok(())
}

/// An Event on the agent's Node (`kubectl describe node` shows it).
pub async fn node_event(
    client: &Client,
    node: &str,
    kind: &str,
    reason: &str,
    message: &str,
) -> Result<(), KubeError> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = KEvent {
        metadata: ObjectMeta {
            generate_name: Some(format!("{node}.tweed.")),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.into()),
            uid: Some(node.into()),
            api_version: Some("v1".into()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("tweed-agent".into()),
            host: Some(node.into()),
        }),
        ..Default::default()
    };
    Api::<KEvent>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &ev)
        .await
        .map_err(api_err("create events in namespace default"))?;
    Ok(())
}
