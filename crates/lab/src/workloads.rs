//! The lab's small control plane: `apply`/`delete` of manifests, `scale`,
//! pod scheduling across nodes, and the endpoints controller that keeps
//! each Service's endpoints in the datastore following its pods.
//!
//! The lab process runs in the machine's own namespace and never routes to
//! the lab's etcd; it reaches it by running `tweed store ...` inside the
//! control-plane namespace.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;
use tweed_model::{Endpoint, Endpoints, Service};

use crate::lab::{run_stdin, Lab, LabError, LabState, NewPod};
use crate::manifest::{parse, Resource, Workload};

type Result<T, E = LabError> = std::result::Result<T, E>;

impl Lab {
    /// Run `tweed store CMD` inside the control-plane namespace with JSON in and out.
    fn store_call(&self, st: &LabState, cmd: &str, input: &Value) -> Result<Value> {
        if st.kube.is_some() {
            return self.kube_call(st, cmd, input);
        }
        let out = run_stdin(
            Command::new("ip")
                .args(["netns", "exec", &st.cp_ns])
                .arg(&self.exe)
                .args(["store", cmd, "--etcd-endpoints", &st.etcd_url()]),
            &input.to_string(),
        )?;
        serde_json::from_str(&out).map_err(|e| LabError::Invalid(format!("tweed store {cmd}: {e}")))
    }

    /// The same calls against the Kubernetes API (a `kubernetes: true` lab).
    fn kube_call(&self, st: &LabState, cmd: &str, input: &Value) -> Result<Value> {
        let bad = |e: serde_json::Error| LabError::Invalid(format!("{cmd}: {e}"));
        match cmd {
            "apply-services" => {
                let svcs: Vec<Service> = serde_json::from_value(input.clone()).map_err(bad)?;
                self.kube_apply_services(st, &svcs.iter().collect::<Vec<_>>())
            }
            "delete-services" => {
                let ids: Vec<String> = serde_json::from_value(input.clone()).map_err(bad)?;
                self.kube_delete_services(st, &ids).map(|_| Value::Null)
            }
            "put-endpoints" => {
                let eps: Vec<Endpoints> = serde_json::from_value(input.clone()).map_err(bad)?;
                self.kube_put_endpoints(st, &eps).map(|_| Value::Null)
            }
            other => Err(LabError::Invalid(format!("no Kubernetes call {other}"))),
        }
    }

    /// `kubectl apply -f`: every valid document is applied; invalid ones are
    /// reported (naming the field) and change nothing. Returns what was done.
    pub fn apply(&self, text: &str) -> Result<Vec<String>> {
        let (resources, bad) = parse(text);
        let _l = self.lock()?;
        let mut st = self.state()?;
        let mut done = Vec::new();
        let mut errors: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
        let services: Vec<&Service> = resources
            .iter()
            .filter_map(|r| {
                if let Resource::Service(s) = r {
                    Some(s)
                } else {
                    None
                }
            })
            .collect();
        if !services.is_empty() {
            let out = self.store_call(
                &st,
                "apply-services",
                &serde_json::to_value(&services).expect("json"),
            )?;
            for (svc, r) in services
                .iter()
                .zip(out.as_array().cloned().unwrap_or_default())
            {
                match serde_json::from_value::<Service>(r["ok"].clone()) {
                    Ok(stored) => {
                        let ports = stored.ports_text();
                        done.push(format!(
                            "service/{} {} {}",
                            stored.id(),
                            stored.cluster_ip.map(|i| i.to_string()).unwrap_or_default(),
                            ports
                        ));
                        st.services.insert(stored.id(), stored);
                    }
                    Err(_) => errors.push(format!(
                        "Service {}: {}",
                        svc.id(),
                        r["error"].as_str().unwrap_or("rejected")
                    )),
                }
            }
            self.save(&st)?;
        }
        for r in &resources {
            if let Resource::Workload(w) = r {
                if let Some(n) = &w.node_name {
                    if st.node(n).is_err() {
                        errors.push(format!(
                            "{} {}: spec.nodeName: no node {n:?} in lab {}",
                            w.kind, w.name, self.name
                        ));
                        continue;
                    }
                }
                st.workloads.insert(w.id(), w.clone());
                self.save(&st)?;
                match self.reconcile_workload(&mut st, &w.id()) {
                    Ok(()) => done.push(format!(
                        "{}/{} {} replica(s)",
                        w.kind.to_lowercase(),
                        w.name,
                        w.replicas
                    )),
                    Err(e) => errors.push(format!("{} {}: {e}", w.kind, w.name)),
                }
            }
        }
        self.sync_endpoints(&mut st)?;
        if errors.is_empty() {
            Ok(done)
        } else {
            Err(LabError::Manifest { done, errors })
        }
    }

    /// `kubectl delete -f`: removes the documents' Services and workloads.
    pub fn delete(&self, text: &str) -> Result<Vec<String>> {
        let (resources, bad) = parse(text);
        let _l = self.lock()?;
        let mut st = self.state()?;
        let mut done = Vec::new();
        let errors: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
        let ids: Vec<String> = resources
            .iter()
            .filter_map(|r| {
                if let Resource::Service(s) = r {
                    Some(s.id())
                } else {
                    None
                }
            })
            .collect();
        if !ids.is_empty() {
            self.store_call(
                &st,
                "delete-services",
                &serde_json::to_value(&ids).expect("json"),
            )?;
            for id in ids {
                st.services.remove(&id);
                st.endpoints.remove(&id);
                done.push(format!("service/{id} deleted"));
            }
            self.save(&st)?;
        }
        for r in &resources {
            if let Resource::Workload(w) = r {
                if st.workloads.remove(&w.id()).is_some() {
                    self.save(&st)?;
                    self.reconcile_workload(&mut st, &w.id())?;
                    done.push(format!("{}/{} deleted", w.kind.to_lowercase(), w.name));
                }
            }
        }
        self.sync_endpoints(&mut st)?;
        if errors.is_empty() {
            Ok(done)
        } else {
            Err(LabError::Manifest { done, errors })
        }
    }

    /// `kubectl scale deployment NAME --replicas N` (namespace "default"
    /// unless given as NS/NAME).
    pub fn scale(&self, name: &str, replicas: u32) -> Result<()> {
        let (ns, name) = name.split_once('/').unwrap_or(("default", name));
        let id = format!("Deployment/{ns}/{name}");
        let _l = self.lock()?;
        let mut st = self.state()?;
        let w = st
            .workloads
            .get_mut(&id)
            .ok_or_else(|| LabError::Invalid(format!("no deployment {ns}/{name}")))?;
        w.replicas = replicas;
        self.save(&st)?;
        self.reconcile_workload(&mut st, &id)?;
        self.sync_endpoints(&mut st)
    }

    /// Make a workload's pods match its spec: create missing ones on the
    /// least loaded node (or its nodeName), remove extra ones newest first,
    /// and replace pods whose spec changed.
    fn reconcile_workload(&self, st: &mut LabState, id: &str) -> Result<()> {
        let want: Option<Workload> = st.workloads.get(id).cloned();
        let mut mine: Vec<_> = st
            .pods
            .values()
            .filter(|p| p.owner.as_deref() == Some(id))
            .cloned()
            .collect();
        mine.sort_by_key(|p| p.seq);
        // Pods from an older spec are replaced (the lab has no rolling update).
        if let Some(w) = &want {
            for p in mine.iter().filter(|p| {
                p.labels != w.labels
                    || p.ports != w.ports
                    || w.node_name.as_ref().is_some_and(|n| *n != p.node)
            }) {
                self.pod_del_locked(st, &p.name)?;
            }
            mine.retain(|p| st.pods.contains_key(&p.name));
        }
        let replicas = want.as_ref().map(|w| w.replicas as usize).unwrap_or(0);
        while mine.len() > replicas {
            let p = mine.pop().expect("non-empty");
            self.pod_del_locked(st, &p.name)?;
        }
        let Some(w) = want else { return Ok(()) };
        while mine.len() < replicas {
            let node = match &w.node_name {
                Some(n) => n.clone(),
                None => {
                    let mut load: BTreeMap<&str, usize> =
                        st.nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
                    for p in st.pods.values() {
                        *load.entry(p.node.as_str()).or_default() += 1;
                    }
                    st.nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .min_by_key(|n| load[n])
                        .expect("a lab has nodes")
                        .to_string()
                }
            };
            let name = if w.kind == "Pod" {
                w.name.clone()
            } else {
                format!("{}-{:05x}", w.name, st.seq + 1)
            };
            let p = self.pod_add_locked(
                st,
                NewPod {
                    name,
                    node,
                    namespace: w.namespace.clone(),
                    labels: w.labels.clone(),
                    ports: w.ports.clone(),
                    owner: Some(id.to_string()),
                },
            )?;
            mine.push(p);
        }
        Ok(())
    }

    /// The endpoints controller: every Service with a selector gets the
    /// ready pods of its namespace whose labels match; changed ones are
    /// written to the datastore.
    fn sync_endpoints(&self, st: &mut LabState) -> Result<()> {
        let mut changed = Vec::new();
        for (id, svc) in &st.services {
            if svc.selector.is_empty() {
                continue;
            }
            let mut eps = Endpoints {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                endpoints: Vec::new(),
            };
            for p in st.pods.values().filter(|p| {
                p.namespace == svc.namespace
                    && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            }) {
                let named: BTreeMap<String, u16> = p
                    .ports
                    .iter()
                    .filter(|c| !c.name.is_empty())
                    .map(|c| (c.name.clone(), c.port))
                    .collect();
                let ports: Vec<(String, u16)> = svc
                    .ports
                    .iter()
                    .filter_map(|sp| {
                        Service::resolve_target(sp, &named).map(|t| (sp.name.clone(), t))
                    })
                    .collect();
                eps.endpoints.push(Endpoint {
                    ip: p.ip,
                    node: p.node.clone(),
                    ports,
                    ready: true,
                    serving: true,
                    terminating: false,
                    pod: p.name.clone(),
                });
            }
            eps.endpoints.sort_by_key(|e| e.ip);
            if st.endpoints.get(id) != Some(&eps) {
                changed.push(eps);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.store_call(
            st,
            "put-endpoints",
            &serde_json::to_value(&changed).expect("json"),
        )?;
        for e in changed {
            st.endpoints
                .insert(format!("{}/{}", e.namespace, e.name), e);
        }
        self.save(st)
    }
}
