//! Endpoints as the service proxy keeps them between plans. An agent holds
//! every endpoint of every Service (300k at 30k Services × 10). As the
//! model has them each costs about 160 bytes and two small heap blocks (its
//! node's name, its ports); here one is 16 bytes and none: node names are
//! numbered once, the endpoints of one Service share their port lists, and
//! the pod name (for people, not for planning) is left out. Planning
//! unpacks one Service's endpoints at a time.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};

use tweed_model::{Endpoint, Endpoints};

/// (service port name, target port) pairs of one endpoint.
type PortList = Box<[(Box<str>, u16)]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedEndpoints {
    eps: Box<[PackedEndpoint]>,
    /// The distinct port lists; each endpoint names one by index.
    ports: Box<[PortList]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PackedEndpoint {
    ip: Ipv4Addr,
    /// See [`node_number`].
    node: u32,
    ports: u32,
    flags: u8,
}

const READY: u8 = 1;
const SERVING: u8 = 2;
const TERMINATING: u8 = 4;

/// Node names, numbered in the order they are first seen. The table only
/// grows, by the names of nodes the agent has seen endpoints on: a
/// cluster's nodes, not its endpoints.
#[derive(Default)]
struct Names {
    by_name: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

fn names() -> std::sync::MutexGuard<'static, Names> {
    static NAMES: OnceLock<Mutex<Names>> = OnceLock::new();
    NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn node_number(name: &str) -> u32 {
    let mut t = names();
    if let Some(n) = t.by_name.get(name) {
        return *n;
    }
    let n = t.names.len() as u32;
    let name: Arc<str> = Arc::from(name);
    t.names.push(name.clone());
    t.by_name.insert(name, n);
    n
}

impl From<Endpoints> for PackedEndpoints {
    fn from(e: Endpoints) -> Self {
        let mut lists: Vec<Vec<(String, u16)>> = Vec::new();
        let eps = e
            .endpoints
            .into_iter()
            .map(|ep| {
                let at = match lists.iter().position(|l| *l == ep.ports) {
                    Some(i) => i,
                    None => {
                        lists.push(ep.ports);
                        lists.len() - 1
                    }
                };
                let flags = (if ep.ready { READY } else { 0 })
                    | (if ep.serving { SERVING } else { 0 })
                    | (if ep.terminating { TERMINATING } else { 0 });
                PackedEndpoint {
                    ip: ep.ip,
                    node: node_number(&ep.node),
                    ports: at as u32,
                    flags,
                }
            })
            .collect();
        let ports = lists
            .into_iter()
            .map(|l| {
                l.into_iter()
                    .map(|(n, p)| (n.into_boxed_str(), p))
                    .collect()
            })
            .collect();
        PackedEndpoints { eps, ports }
    }
}

impl PackedEndpoints {
    /// The model's form, for planning (pods unnamed).
    pub fn unpack(&self, namespace: &str, name: &str) -> Endpoints {
        let t = names();
        Endpoints {
            namespace: namespace.to_string(),
            name: name.to_string(),
            endpoints: self
                .eps
                .iter()
                .map(|e| Endpoint {
                    ip: e.ip,
                    node: t
                        .names
                        .get(e.node as usize)
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    ports: self.ports[e.ports as usize]
                        .iter()
                        .map(|(n, p)| (n.to_string(), *p))
                        .collect(),
                    ready: e.flags & READY != 0,
                    serving: e.flags & SERVING != 0,
                    terminating: e.flags & TERMINATING != 0,
                    pod: String::new(),
                })
                .collect(),
        }
    }
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
        assert_eq!(packed.ports.len(), 2, "equal port lists are stored once");
        assert_eq!(packed.eps[0].node, packed.eps[2].node);
        assert_ne!(packed.eps[0].node, packed.eps[1].node);
        let mut want = e;
        for x in &mut want.endpoints {
            x.pod.clear();
        }
        assert_eq!(packed.unpack("default", "web"), want);
    }

    #[test]
    fn an_endpoint_is_small() {
        assert!(std::mem::size_of::<PackedEndpoint>() <= 16);
    }
}
