//! Endpoints as the service proxy keeps them between plans. An agent holds
//! every endpoint of every Service (300k at 30k Services × 10). As the
//! model has them each costs about 160 bytes and two small heap blocks (its
//! node's name, its ports); here one is 16 bytes and none: node names and
//! port lists are numbered once for the whole agent (a cluster has few of
//! either), and the pod name (for people, not for planning) is left out.
//! Planning unpacks one Service's endpoints at a time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tweed_model::{Endpoint, Endpoints, Service};

/// (service port name, target port) pairs of one endpoint.
type PortList = Vec<(String, u16)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedEndpoints {
    eps: Box<[PackedEndpoint]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PackedEndpoint {
    ip: Ipv4Addr,
    /// Numbers in [`NODES`] and [`PORTS`].
    node: u32,
    ports: u32,
    flags: u8,
}

const READY: u8 = 1;
const SERVING: u8 = 2;
const TERMINATING: u8 = 4;

/// Values numbered in the order they are first seen. A table only grows,
/// by the node names and port lists the agent has seen endpoints with:
/// a cluster's nodes and its Services' port shapes, not its endpoints.
struct Numbers<T> {
    by_value: HashMap<Arc<T>, u32>,
    values: Vec<Arc<T>>,
}

impl<T: Hash + Eq> Numbers<T> {
    fn number(&mut self, v: T) -> u32 {
        if let Some(n) = self.by_value.get(&v) {
            return *n;
        }
        let n = self.values.len() as u32;
        let v = Arc::new(v);
        self.values.push(v.clone());
        self.by_value.insert(v, n);
        n
    }

    fn get(&self, n: u32) -> Option<&T> {
        self.values.get(n as usize).map(|v| &**v)
    }
}

type Table<T> = OnceLock<Mutex<Numbers<T>>>;
static NODES: Table<String> = OnceLock::new();
static PORTS: Table<PortList> = OnceLock::new();

fn table<T>(t: &'static Table<T>) -> MutexGuard<'static, Numbers<T>> {
    t.get_or_init(|| {
        Mutex::new(Numbers {
            by_value: HashMap::new(),
            values: Vec::new(),
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

impl From<Endpoints> for PackedEndpoints {
    fn from(e: Endpoints) -> Self {
        let (mut nodes, mut ports) = (table(&NODES), table(&PORTS));
        let eps = e
            .endpoints
            .into_iter()
            .map(|ep| {
                let flags = (if ep.ready { READY } else { 0 })
                    | (if ep.serving { SERVING } else { 0 })
                    | (if ep.terminating { TERMINATING } else { 0 });
                PackedEndpoint {
                    ip: ep.ip,
                    node: nodes.number(ep.node),
                    ports: ports.number(ep.ports),
                    flags,
                }
            })
            .collect();
        PackedEndpoints { eps }
    }
}

impl PackedEndpoints {
    /// How many of these endpoints are ready on `node` (who may announce
    /// a policy-Local Service's address by BGP; its health check).
    pub fn ready_on(&self, node: &str) -> usize {
        let nodes = table(&NODES);
        let Some(n) = nodes.values.iter().position(|v| v.as_str() == node) else {
            return 0;
        };
        self.eps
            .iter()
            .filter(|e| e.node as usize == n && e.flags & READY != 0)
            .count()
    }

    /// The model's form, for planning (which reads neither the slice's
    /// name nor its pods').
    pub fn unpack(&self) -> Endpoints {
        let (nodes, ports) = (table(&NODES), table(&PORTS));
        Endpoints {
            namespace: String::new(),
            name: String::new(),
            endpoints: self
                .eps
                .iter()
                .map(|e| Endpoint {
                    ip: e.ip,
                    node: nodes.get(e.node).cloned().unwrap_or_default(),
                    ports: ports.get(e.ports).cloned().unwrap_or_default(),
                    ready: e.flags & READY != 0,
                    serving: e.flags & SERVING != 0,
                    terminating: e.flags & TERMINATING != 0,
                    pod: String::new(),
                })
                .collect(),
        }
    }
}

/// A Service as the proxy keeps it: what planning reads. Its id already
/// names it, and the selector is the endpoints controller's business; at
/// 30k Services their strings and maps would be several MiB.
pub(crate) fn for_planning(mut s: Service) -> Service {
    s.compact();
    s.namespace = String::new();
    s.name = String::new();
    s.selector = Default::default();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, node: &str, ports: &[(&str, u16)], ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            node: node.into(),
            ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            ready,
            serving: ready,
            terminating: !ready,
            pod: "web-1".into(),
        }
    }

    #[test]
    fn unpacking_gives_back_what_planning_reads() {
        let e = Endpoints {
            namespace: "default".into(),
            name: "web".into(),
            endpoints: vec![
                ep(
                    "10.244.1.2",
                    "n1",
                    &[("http", 8080), ("metrics", 9090)],
                    true,
                ),
                ep(
                    "10.244.2.2",
                    "n2",
                    &[("http", 8080), ("metrics", 9090)],
                    false,
                ),
                ep("10.244.3.2", "n1", &[("http", 8081)], true),
            ],
        };
        let packed = PackedEndpoints::from(e.clone());
        assert_eq!(
            packed.eps[0].ports, packed.eps[1].ports,
            "equal port lists are numbered once"
        );
        assert_ne!(packed.eps[0].ports, packed.eps[2].ports);
        assert_eq!(packed.eps[0].node, packed.eps[2].node);
        assert_ne!(packed.eps[0].node, packed.eps[1].node);
        let mut want = e;
        for x in &mut want.endpoints {
            x.pod.clear();
        }
        assert_eq!(packed.unpack().endpoints, want.endpoints);
    }

    #[test]
    fn an_endpoint_is_small() {
        assert!(std::mem::size_of::<PackedEndpoint>() <= 16);
    }
}
