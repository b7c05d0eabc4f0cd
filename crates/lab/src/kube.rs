//! A real Kubernetes control plane for the lab (`kubernetes: true`):
//! kube-apiserver on the lab's etcd, kube-controller-manager allocating
//! node CIDRs, kube-scheduler, all in the control-plane namespace, and the
//! agents on the Kubernetes datastore, each with the credentials of the
//! ServiceAccount that `deploy/tweed.yaml` creates, so its RBAC is tested
//! for real. Without kubelets, nodes are registered as Node objects, pods
//! are the lab's own (wired by the real CNI plugin) and the lab writes
//! their EndpointSlices, as the EndpointSlice controller would; with them
//! (`kubelet:`, see `kubelet.rs`) the kubelets register their Nodes and
//! run the pods kubectl creates.
//!
//! The binaries are Kubernetes 1.20.2 built from Debian's source package by
//! `scripts/install-kubernetes.sh` (no registry ships them); the version the
//! seeds' users run, serving EndpointSlices only as discovery.k8s.io/v1beta1.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tweed_model::{Endpoints, Service, ServiceType, TargetPort, TrafficPolicy};

pub use crate::kube_state::KubeState;
use crate::lab::{run, run_stdin, wait_for, Lab, LabError, LabState};

type Result<T, E = LabError> = std::result::Result<T, E>;

pub const K8S_VERSION: &str = "v1.20.2";
pub const APISERVER_PORT: u16 = 6443;
/// The manifest users apply, applied by the lab as it stands.
pub const DEPLOY_YAML: &str = include_str!("../../../deploy/tweed.yaml");
const LAB_MANAGER: &str = "lab.tweed.io";

/// Where `scripts/install-kubernetes.sh` caches the binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("TWEED_K8S_BIN").map_or_else(
        || PathBuf::from(format!("/var/cache/tweed/kubernetes/{K8S_VERSION}/bin")),
        PathBuf::from,
    )
}

fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(LabError::Invalid(format!(
            "kubernetes: true needs {} (run scripts/install-kubernetes.sh)",
            p.display()
        )))
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("openssl").current_dir(dir).args(args)).map(|_| ())
}

/// A key and a certificate signed by the lab's CA: `NAME.key`, `NAME.crt`.
fn issue(d: &Path, name: &str, subj: &str, ext: &str) -> Result<()> {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(d, &["genrsa", "-out", &key, "2048"])?;
    openssl(
        d,
        &["req", "-new", "-key", &key, "-subj", subj, "-out", &csr],
    )?;
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            &crt,
            "-extfile",
            ext,
        ],
    )
}

fn kubeconfig(server: &str, ca: &Path, user: Value) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "lab", "user": user}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
        "current-context": "lab",
    })
    .to_string()
}

impl Lab {
    pub fn kube_dir(&self) -> PathBuf {
        self.dir.join("kube")
    }

    /// The cluster-admin kubeconfig (use it inside the control-plane
    /// namespace: the API server listens on the lab's underlay).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kube_dir().join("admin.kubeconfig")
    }

    fn server(st: &LabState) -> String {
        format!("https://{}:{APISERVER_PORT}", st.cp_ip)
    }

    /// CA, API server certificate, an admin client certificate
    /// (system:masters) and the service-account signing key, with openssl.
    fn make_pki(&self, st: &LabState) -> Result<()> {
        let d = self.kube_dir();
        std::fs::create_dir_all(&d)
            .map_err(|e| LabError::Invalid(format!("{}: {e}", d.display())))?;
        let svc_ip = Ipv4Addr::from(u32::from(st.topology.cluster.service_cidr.network()) + 1);
        let sans = format!(
            "subjectAltName=IP:{},IP:{svc_ip},IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n",
            st.cp_ip
        );
        std::fs::write(d.join("server.ext"), sans).map_err(|e| LabError::Invalid(e.to_string()))?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        let days = "3650";
        openssl(&d, &["genrsa", "-out", "ca.key", "2048"])?;
        openssl(
            &d,
            &[
                "req",
                "-x509",
                "-new",
                "-nodes",
                "-key",
                "ca.key",
                "-subj",
                "/CN=tweed-lab-ca",
                "-days",
                days,
                "-out",
                "ca.crt",
            ],
        )?;
        issue(&d, "apiserver", "/CN=kube-apiserver", "server.ext")?;
        issue(
            &d,
            "admin",
            "/O=system:masters/CN=kubernetes-admin",
            "client.ext",
        )?;
        // Each kubelet as the Node authorizer expects it.
        if st.topology.kubelet.is_some() {
            for n in &st.nodes {
                let name = format!("kubelet-{}", n.name);
                issue(
                    &d,
                    &name,
                    &format!("/O=system:nodes/CN=system:node:{}", n.name),
                    "client.ext",
                )?;
                let kc = kubeconfig(
                    &Self::server(st),
                    &d.join("ca.crt"),
                    json!({"client-certificate": d.join(format!("{name}.crt")), "client-key": d.join(format!("{name}.key"))}),
                );
                let p = self.kubelet_kubeconfig(&n.name);
                std::fs::create_dir_all(p.parent().expect("in a dir"))
                    .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))?;
                std::fs::write(&p, kc)
                    .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))?;
            }
        }
        openssl(&d, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let admin = kubeconfig(
            &Self::server(st),
            &d.join("ca.crt"),
            json!({"client-certificate": d.join("admin.crt"), "client-key": d.join("admin.key")}),
        );
        std::fs::write(self.admin_kubeconfig(), admin).map_err(|e| LabError::Invalid(e.to_string()))
    }

    pub(crate) fn spawn_apiserver(&self, st: &LabState) -> Result<u32> {
        let d = self.kube_dir();
        let p = |f: &str| d.join(f).display().to_string();
        let args: Vec<String> = vec![
            format!("--etcd-servers={}", st.etcd_url()),
            format!("--advertise-address={}", st.cp_ip),
            format!("--bind-address={}", st.cp_ip),
            format!("--secure-port={APISERVER_PORT}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!(
                "--service-cluster-ip-range={}",
                st.topology.cluster.service_cidr.trunc()
            ),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", p("certs")),
            // Objects in etcd as JSON, not protobuf: etcdctl can read and
            // edit them, e.g. to plant an object the API server's own
            // validation would refuse (a test of tweed's bad-input path).
            "--storage-media-type=application/json".into(),
            // kubectl logs/exec reach kubelets by the address they report.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-client-certificate={}", p("admin.crt")),
            format!("--kubelet-client-key={}", p("admin.key")),
            "--v=1".into(),
        ];
        self.spawn_in(
            &st.cp_ns,
            &bin("kube-apiserver")?,
            &args,
            &d.join("kube-apiserver.log"),
            &[],
        )
    }

    fn spawn_controllers(&self, st: &LabState) -> Result<(u32, u32)> {
        let d = self.kube_dir();
        let p = |f: &str| d.join(f).display().to_string();
        let kc = self.admin_kubeconfig().display().to_string();
        let cfg = &st.topology.cluster;
        let cm: Vec<String> = vec![
            format!("--kubeconfig={kc}"),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", cfg.cluster_cidr.trunc()),
            format!("--node-cidr-mask-size={}", cfg.node_subnet_len),
            format!("--service-cluster-ip-range={}", cfg.service_cidr.trunc()),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", p("cm-certs")),
            // By default it creates /usr/libexec/kubernetes/... on the machine.
            format!("--flex-volume-plugin-dir={}", p("flex")),
            "--v=1".into(),
        ];
        let cm_pid = self.spawn_in(
            &st.cp_ns,
            &bin("kube-controller-manager")?,
            &cm,
            &d.join("kube-controller-manager.log"),
            &[],
        )?;
        let sched: Vec<String> = vec![
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", p("sched-certs")),
            "--v=1".into(),
        ];
        let s_pid = self.spawn_in(
            &st.cp_ns,
            &bin("kube-scheduler")?,
            &sched,
            &d.join("kube-scheduler.log"),
            &[],
        )?;
        Ok((cm_pid, s_pid))
    }

    /// Real kubectl against the lab, as cluster admin, inside the lab's
    /// control-plane namespace (the API server listens on the underlay).
    pub fn kubectl_command(&self, st: &LabState) -> Result<Command> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &st.cp_ns])
            .arg(bin("kubectl")?)
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ));
        Ok(c)
    }

    /// Kubernetes labs: each Service's load balancer addresses as the API
    /// server holds them now. The agent writes `status.loadBalancer` after
    /// `lab apply` has stored what the API server first answered, so
    /// `lab status` asks again. Services the API server does not answer
    /// for keep what the lab stored.
    pub(crate) fn kube_refresh_load_balancers(&self, st: &mut LabState) {
        if st.kube.is_none() || st.services.is_empty() {
            return;
        }
        let Ok(out) = self.kubectl(st, &["get", "services", "-A", "-o", "json"], None) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
            return;
        };
        for item in v["items"].as_array().into_iter().flatten() {
            let id = format!(
                "{}/{}",
                item["metadata"]["namespace"].as_str().unwrap_or_default(),
                item["metadata"]["name"].as_str().unwrap_or_default()
            );
            if let Some(svc) = st.services.get_mut(&id) {
                svc.load_balancer_ips = item["status"]["loadBalancer"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["ip"].as_str()?.parse().ok())
                    .collect();
            }
        }
    }

    /// Run kubectl to completion; its output, or an error with its stderr.
    pub fn kubectl(&self, st: &LabState, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = self.kubectl_command(st)?;
        c.args(args);
        match stdin {
            Some(s) => run_stdin(&mut c, s),
            None => run(&mut c),
        }
    }

    pub(crate) fn wait_apiserver(&self, st: &LabState) -> Result<()> {
        let log = self.kube_dir().join("kube-apiserver.log");
        wait_for(
            "kube-apiserver ready",
            90,
            &format!("; see {}", log.display()),
            || {
                self.kubectl(st, &["get", "--raw", "/readyz"], None)
                    .is_ok_and(|o| o.trim() == "ok")
            },
        )
    }

    /// Bring the control plane up, install tweed's RBAC and config from
    /// `deploy/tweed.yaml`, register the nodes, and write each node's
    /// agent a kubeconfig holding the tweed ServiceAccount's token.
    pub(crate) fn kube_up(&self, st: &mut LabState) -> Result<()> {
        bin("kube-apiserver")?;
        self.make_pki(st)?;
        let mut ks = KubeState {
            apiserver_pid: Some(self.spawn_apiserver(st)?),
            ..Default::default()
        };
        st.kube = Some(ks.clone());
        self.save(st)?;
        self.wait_apiserver(st)?;
        let (cm, s) = self.spawn_controllers(st)?;
        ks.controller_manager_pid = Some(cm);
        ks.scheduler_pid = Some(s);
        let versions = self.kubectl(st, &["api-versions"], None)?;
        ks.slices_api = if versions.lines().any(|l| l.trim() == "discovery.k8s.io/v1") {
            "discovery.k8s.io/v1".into()
        } else {
            "discovery.k8s.io/v1beta1".into()
        };
        st.kube = Some(ks);
        self.save(st)?;

        // tweed's objects as users apply them, its ConfigMap holding this
        // lab's cluster config. The DaemonSet comes later, and only when
        // the agents are to run as its pods.
        self.kube_apply_deploy(st, false)?;

        // Kubelets register their own Nodes.
        for n in st.nodes.iter().filter(|_| st.topology.kubelet.is_none()) {
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux"}},
            });
            self.kubectl(st, &["apply", "-f", "-"], Some(&node.to_string()))?;
        }

        // The token controller (controller-manager) makes the
        // ServiceAccount's token Secret (Kubernetes 1.20 still does).
        let mut token = String::new();
        wait_for("the tweed ServiceAccount's token", 60, "", || {
            let Ok(out) = self.kubectl(
                st,
                &["-n", "tweed-system", "get", "secrets", "-o", "json"],
                None,
            ) else {
                return false;
            };
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            let found = v["items"].as_array().into_iter().flatten().find(|s| {
                s["type"] == "kubernetes.io/service-account-token"
                    && s["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "tweed"
            });
            if let Some(t) = found.and_then(|s| s["data"]["token"].as_str()) {
                token = decode_b64(t);
            }
            !token.is_empty()
        })?;
        let ca = self.kube_dir().join("ca.crt");
        for n in &st.nodes {
            let kc = kubeconfig(&Self::server(st), &ca, json!({ "token": token }));
            let p = self.node_dir(&n.name).join("kubeconfig");
            std::fs::write(&p, kc)
                .map_err(|e| LabError::Invalid(format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }

    /// `deploy/tweed.yaml` as users apply it, with the ConfigMap holding
    /// this lab's cluster config and, for the DaemonSet's agents, the API
    /// server's address (there is no kube-proxy to reach its ClusterIP)
    /// and the underlay interface. The DaemonSet only if `daemonset`.
    pub(crate) fn kube_apply_deploy(&self, st: &LabState, daemonset: bool) -> Result<()> {
        let mut docs = Vec::new();
        for mut d in serde_saphyr::from_multiple::<Value>(DEPLOY_YAML)
            .map_err(|e| LabError::Invalid(format!("deploy/tweed.yaml: {e}")))?
        {
            if d["kind"] == "DaemonSet" && !daemonset {
                continue;
            }
            if d["kind"] == "ConfigMap" {
                d["data"]["cluster-config.json"] = Value::String(
                    serde_json::to_string_pretty(&st.topology.cluster).expect("json"),
                );
                d["data"]["api-server"] = Value::String(format!("{}:{APISERVER_PORT}", st.cp_ip));
                d["data"]["underlay"] = Value::String("interface=eth0".into());
            }
            docs.push(d);
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        self.kubectl(st, &["apply", "-f", "-"], Some(&list.to_string()))?;
        Ok(())
    }

    /// The Services of a manifest, created through the API server (which
    /// allocates cluster IPs and node ports); one result per Service, as
    /// `tweed store apply-services` answers.
    pub(crate) fn kube_apply_services(&self, st: &LabState, svcs: &[&Service]) -> Result<Value> {
        let mut out = Vec::new();
        for s in svcs {
            let obj = service_object(s);
            match self.kubectl(
                st,
                &["apply", "-o", "json", "-f", "-"],
                Some(&obj.to_string()),
            ) {
                Ok(text) => {
                    let k: k8s_openapi::api::core::v1::Service = match serde_json::from_str(&text) {
                        Ok(k) => k,
                        Err(e) => {
                            out.push(json!({"error": format!("kubectl answered: {e}")}));
                            continue;
                        }
                    };
                    match tweed_k8s::service(&k, st.topology.cluster.service_cidr) {
                        Ok(Some(mut m)) => {
                            // The lab's endpoints controller keeps the selector.
                            m.selector = s.selector.clone();
                            out.push(json!({ "ok": m }));
                        }
                        Ok(None) => out.push(json!({"error": "not a Service tweed proxies"})),
                        Err(e) => out.push(json!({ "error": e.to_string() })),
                    }
                }
                Err(e) => out.push(json!({ "error": e.to_string() })),
            }
        }
        Ok(Value::Array(out))
    }

    pub(crate) fn kube_delete_services(&self, st: &LabState, ids: &[String]) -> Result<()> {
        for id in ids {
            let (ns, name) = id.split_once('/').unwrap_or(("default", id));
            self.kubectl(
                st,
                &["-n", ns, "delete", "service", name, "--ignore-not-found"],
                None,
            )?;
            self.kubectl(
                st,
                &[
                    "-n", ns, "delete", "endpointslices", "-l",
                    &format!("kubernetes.io/service-name={name},endpointslice.kubernetes.io/managed-by={LAB_MANAGER}"),
                ],
                None,
            )?;
        }
        Ok(())
    }

    /// Write each Service's endpoints as EndpointSlices (one per distinct
    /// port set, as the EndpointSlice controller groups them), removing the
    /// lab's slices that no longer apply.
    pub(crate) fn kube_put_endpoints(&self, st: &LabState, eps: &[Endpoints]) -> Result<()> {
        let api = st
            .kube
            .as_ref()
            .map(|k| k.slices_api.clone())
            .unwrap_or_else(|| "discovery.k8s.io/v1beta1".into());
        for e in eps {
            let id = format!("{}/{}", e.namespace, e.name);
            let protocol = |port: &str| {
                st.services
                    .get(&id)
                    .and_then(|s| s.ports.iter().find(|p| p.name == port))
                    .map_or("TCP".to_string(), |p| p.protocol.to_string())
            };
            let slices = slice_objects(e, &api, protocol);
            let keep: Vec<String> = slices
                .iter()
                .map(|s| {
                    s["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            if !slices.is_empty() {
                let list = json!({"apiVersion": "v1", "kind": "List", "items": slices});
                self.kubectl(st, &["apply", "-f", "-"], Some(&list.to_string()))?;
            }
            let sel = format!(
                "kubernetes.io/service-name={},endpointslice.kubernetes.io/managed-by={LAB_MANAGER}",
                e.name
            );
            let names = self.kubectl(
                st,
                &[
                    "-n",
                    &e.namespace,
                    "get",
                    "endpointslices",
                    "-l",
                    &sel,
                    "-o",
                    "name",
                ],
                None,
            )?;
            for n in names.lines() {
                let short = n.rsplit('/').next().unwrap_or(n);
                if !keep.iter().any(|k| k == short) {
                    self.kubectl(
                        st,
                        &["-n", &e.namespace, "delete", n, "--ignore-not-found"],
                        None,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Stop the API server (an outage; the rest keeps running).
    pub fn apiserver_stop(&self) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        let ks = st
            .kube
            .as_mut()
            .ok_or_else(|| LabError::Invalid(format!("lab {} has no Kubernetes", self.name)))?;
        if let Some(pid) = ks.apiserver_pid.take() {
            if let Some(e) = crate::lab::stop_pid(pid, &self.marker()) {
                return Err(LabError::Invalid(e));
            }
        }
        self.save(&st)
    }

    pub fn apiserver_start(&self) -> Result<()> {
        let _l = self.lock()?;
        let mut st = self.state()?;
        if st.kube.is_none() {
            return Err(LabError::Invalid(format!(
                "lab {} has no Kubernetes",
                self.name
            )));
        }
        let pid = self.spawn_apiserver(&st)?;
        st.kube.as_mut().expect("checked").apiserver_pid = Some(pid);
        self.save(&st)?;
        self.wait_apiserver(&st)
    }
}

/// A model Service as an API object. The selector is left out: the lab,
/// not the EndpointSlice controller, writes the slices of its own pods.
fn service_object(s: &Service) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"protocol": p.protocol.to_string(), "port": p.port});
            if !p.name.is_empty() {
                v["name"] = json!(p.name);
            }
            match &p.target_port {
                Some(TargetPort::Number(n)) => v["targetPort"] = json!(n),
                Some(TargetPort::Name(n)) => v["targetPort"] = json!(n),
                None => {}
            }
            if let Some(np) = p.node_port {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "type": match s.service_type {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        },
        "ports": ports,
    });
    if let Some(ip) = s.cluster_ip {
        spec["clusterIP"] = json!(ip.to_string());
    }
    if !s.external_ips.is_empty() {
        spec["externalIPs"] = json!(s.external_ips);
    }
    if let Some(t) = s.affinity_timeout {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    if s.external_traffic_policy == TrafficPolicy::Local {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    // Only then: Kubernetes 1.20 does not know the field.
    if s.internal_traffic_policy == TrafficPolicy::Local {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": spec,
    })
}

/// EndpointSlices for `e`, one per distinct port set.
fn slice_objects(e: &Endpoints, api: &str, protocol: impl Fn(&str) -> String) -> Vec<Value> {
    // (the port set, its endpoints)
    type Group<'a> = (Vec<(String, u16)>, Vec<&'a tweed_model::Endpoint>);
    let mut groups: Vec<Group> = Vec::new();
    for ep in &e.endpoints {
        let mut ports = ep.ports.clone();
        ports.sort();
        match groups.iter_mut().find(|(p, _)| *p == ports) {
            Some((_, v)) => v.push(ep),
            None => groups.push((ports, vec![ep])),
        }
    }
    let v1 = api.ends_with("/v1");
    groups
        .into_iter()
        .map(|(ports, eps)| {
            let key: String = ports.iter().map(|(n, p)| format!("{n}{p}")).collect();
            let name = format!("{}-lab-{:08x}", e.name, fnv(&key));
            let endpoints: Vec<Value> = eps
                .iter()
                .map(|ep| {
                    let mut v = json!({
                        "addresses": [ep.ip.to_string()],
                        "conditions": {"ready": ep.ready},
                        "targetRef": {"kind": "Pod", "namespace": e.namespace, "name": ep.pod},
                    });
                    if v1 {
                        v["nodeName"] = json!(ep.node);
                    } else {
                        v["topology"] = json!({"kubernetes.io/hostname": ep.node});
                    }
                    v
                })
                .collect();
            let ports: Vec<Value> = ports
                .iter()
                .map(|(n, p)| json!({"name": n, "protocol": protocol(n), "port": p}))
                .collect();
            json!({
                "apiVersion": api, "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": e.namespace, "labels": {
                    "kubernetes.io/service-name": e.name,
                    "endpointslice.kubernetes.io/managed-by": LAB_MANAGER,
                }},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            })
        })
        .collect()
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn decode_b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
