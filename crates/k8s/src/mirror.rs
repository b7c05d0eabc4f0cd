//! Watch events → changes, level-triggered.
//!
//! A watch restarts with a complete list (after `410 Gone`, an API server
//! restart, or a lost connection): objects deleted meanwhile have no delete
//! event, so what matters is the difference between what we knew and the
//! new list. [`Mirror`] keeps what it knows per id and turns both kinds of
//! input (a list, or one watch event) into the changes since last time,
//! so the agent's service proxy stays incremental (one endpoint change is
//! one small transaction) while never drifting from the API's state.

use std::collections::{BTreeMap, BTreeSet};

use tweed_model::Endpoints;

use tweed_model::Endpoint;

use crate::convert::{merge_endpoints, slice_endpoints, EndpointSlice};

/// One id's change: what it was, what it is now (`None`: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<V> {
    pub id: String,
    pub old: Option<V>,
    pub new: Option<V>,
}

/// What is known of one kind of object, by id.
#[derive(Debug)]
pub struct Mirror<V> {
    known: BTreeMap<String, V>,
    /// A list in progress (between `Init` and `InitDone`).
    listing: Option<BTreeMap<String, V>>,
    /// Has a list completed at least once?
    listed: bool,
}

impl<V> Default for Mirror<V> {
    fn default() -> Self {
        Self {
            known: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

impl<V: Clone + PartialEq> Mirror<V> {
    pub fn known(&self) -> &BTreeMap<String, V> {
        &self.known
    }

    /// True once a complete list has been seen.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// A new list starts.
    pub fn init(&mut self) {
        self.listing = Some(BTreeMap::new());
    }

    /// One object of the list in progress (`None`: listed, but nothing to
    /// keep, e.g. a Service tweed does not proxy).
    pub fn init_apply(&mut self, id: String, v: Option<V>) {
        let l = self.listing.get_or_insert_with(BTreeMap::new);
        match v {
            Some(v) => l.insert(id, v),
            None => l.remove(&id),
        };
    }

    /// The list is complete: everything not in it is gone.
    pub fn init_done(&mut self) -> Vec<Change<V>> {
        let new = self.listing.take().unwrap_or_default();
        let old = std::mem::replace(&mut self.known, new);
        self.listed = true;
        let mut out = Vec::new();
        for (id, o) in &old {
            match self.known.get(id) {
                Some(n) if n == o => {}
                n => out.push(Change {
                    id: id.clone(),
                    old: Some(o.clone()),
                    new: n.cloned(),
                }),
            }
        }
        for (id, n) in &self.known {
            if !old.contains_key(id) {
                out.push(Change {
                    id: id.clone(),
                    old: None,
                    new: Some(n.clone()),
                });
            }
        }
        out
    }

    /// An object was added or changed (`None`: it is now one to ignore).
    pub fn apply(&mut self, id: String, v: Option<V>) -> Option<Change<V>> {
        let old = match &v {
            Some(v) => self.known.insert(id.clone(), v.clone()),
            None => self.known.remove(&id),
        };
        (old != v).then_some(Change { id, old, new: v })
    }

    pub fn delete(&mut self, id: &str) -> Option<Change<V>> {
        self.known.remove(id).map(|old| Change {
            id: id.to_string(),
            old: Some(old),
            new: None,
        })
    }
}

/// A slice as kept: which Service it belongs to, and its endpoints in the
/// model's compact form (the API object, its metadata above all, is many
/// times larger: at 10k Services that is the agent's memory).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptSlice {
    pub service: String,
    pub endpoints: Vec<Endpoint>,
}

impl KeptSlice {
    /// `None` for a slice kube-proxy ignores.
    pub fn new(slice: EndpointSlice) -> Option<Self> {
        Some(Self {
            service: slice.service_id()?,
            endpoints: slice_endpoints(&slice),
        })
    }
}

/// EndpointSlices, merged per Service.
#[derive(Debug, Default)]
pub struct Slices {
    pub mirror: Mirror<KeptSlice>,
    by_service: BTreeMap<String, BTreeSet<String>>,
}

impl Slices {
    /// Fold slice changes into the index; the Services whose endpoints
    /// changed, with their endpoints now (`None`: no slice left).
    pub fn absorb(&mut self, changes: Vec<Change<KeptSlice>>) -> Vec<(String, Option<Endpoints>)> {
        let mut touched = BTreeSet::new();
        for c in changes {
            if let Some(o) = &c.old {
                if let Some(s) = self.by_service.get_mut(&o.service) {
                    s.remove(&c.id);
                    if s.is_empty() {
                        self.by_service.remove(&o.service);
                    }
                }
                touched.insert(o.service.clone());
            }
            if let Some(n) = &c.new {
                self.by_service
                    .entry(n.service.clone())
                    .or_default()
                    .insert(c.id.clone());
                touched.insert(n.service.clone());
            }
        }
        touched
            .into_iter()
            .map(|svc| {
                let eps = self.endpoints(&svc);
                (svc, eps)
            })
            .collect()
    }

    /// A Service's endpoints from all its slices (`None`: it has none).
    pub fn endpoints(&self, service: &str) -> Option<Endpoints> {
        let names = self.by_service.get(service)?;
        let known = self.mirror.known();
        Some(merge_endpoints(
            service,
            names
                .iter()
                .filter_map(|n| known.get(n))
                .map(|k| k.endpoints.as_slice()),
        ))
    }

    /// Every Service's endpoints.
    pub fn all(&self) -> BTreeMap<String, Endpoints> {
        self.by_service
            .keys()
            .filter_map(|s| Some((s.clone(), self.endpoints(s)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relist_reports_what_vanished_without_a_delete_event() {
        let mut m: Mirror<u32> = Mirror::default();
        m.init();
        m.init_apply("a".into(), Some(1));
        m.init_apply("b".into(), Some(2));
        let first = m.init_done();
        assert_eq!(first.len(), 2);
        assert!(m.listed());
        assert_eq!(m.apply("a".into(), Some(1)), None, "no change, no event");
        let c = m.apply("a".into(), Some(5)).unwrap();
        assert_eq!((c.old, c.new), (Some(1), Some(5)));
        // The watch breaks; b is deleted and c created while it was down.
        m.init();
        m.init_apply("a".into(), Some(5));
        m.init_apply("c".into(), Some(3));
        let again = m.init_done();
        let ids: Vec<(&str, Option<u32>, Option<u32>)> = again
            .iter()
            .map(|c| (c.id.as_str(), c.old, c.new))
            .collect();
        assert_eq!(ids, vec![("b", Some(2), None), ("c", None, Some(3))]);
        assert_eq!(m.delete("a").unwrap().new, None);
        assert_eq!(m.delete("a"), None);
    }

    #[test]
    fn an_object_turning_ignorable_counts_as_removed() {
        let mut m: Mirror<u32> = Mirror::default();
        m.apply("a".into(), Some(1));
        let c = m.apply("a".into(), None).unwrap();
        assert_eq!((c.old, c.new), (Some(1), None));
        assert!(m.known().is_empty());
    }

    fn slice(svc: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{svc}-{ip}"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}],
            "ports": [{"port": 80}]
        }))
        .unwrap()
    }

    #[test]
    fn slices_merge_per_service_and_moves_touch_both() {
        let mut s = Slices::default();
        let apply = |s: &mut Slices, name: &str, sl: EndpointSlice| {
            let c = s.mirror.apply(name.into(), KeptSlice::new(sl));
            s.absorb(c.into_iter().collect())
        };
        let out = apply(&mut s, "default/web-1", slice("web", "10.244.1.2"));
        assert_eq!(out.len(), 1);
        let out = apply(&mut s, "default/web-2", slice("web", "10.244.1.3"));
        assert_eq!(out[0].1.as_ref().unwrap().endpoints.len(), 2);
        // A slice re-labelled to another Service changes both.
        let out = apply(&mut s, "default/web-2", slice("api", "10.244.1.3"));
        let ids: Vec<(&str, usize)> = out
            .iter()
            .map(|(id, e)| (id.as_str(), e.as_ref().map_or(0, |e| e.endpoints.len())))
            .collect();
        assert_eq!(ids, vec![("default/api", 1), ("default/web", 1)]);
        let gone = s.mirror.delete("default/web-1");
        let out = s.absorb(gone.into_iter().collect());
        assert_eq!(out, vec![("default/web".to_string(), None)]);
        assert_eq!(s.all().len(), 1);
    }
}
