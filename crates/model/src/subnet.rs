use std::collections::BTreeSet;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetError {
    #[error("every /{len} subnet of {cidr} is taken ({count} nodes)")]
    Exhausted {
        cidr: Ipv4Net,
        len: u8,
        count: usize,
    },
    #[error("{0:?} is not a subnet key (expected like 10.244.1.0-24)")]
    BadKey(String),
}

/// How many node subnets fit in the cluster CIDR.
pub fn subnet_count(cluster: Ipv4Net, len: u8) -> u64 {
    1u64 << (len.saturating_sub(cluster.prefix_len()))
}

/// The datastore key of a subnet, flannel-style: `10.244.1.0-24`.
pub fn subnet_key(net: Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

pub fn subnet_from_key(key: &str) -> Result<Ipv4Net, SubnetError> {
    let bad = || SubnetError::BadKey(key.to_string());
    let (ip, len) = key.rsplit_once('-').ok_or_else(bad)?;
    let net = Ipv4Net::new(
        ip.parse().map_err(|_| bad())?,
        len.parse().map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    if net.trunc() != net {
        return Err(bad());
    }
    Ok(net)
}

/// Pick a node subnet: `preferred` when it is a subnet of the cluster CIDR
/// of the right size and not taken, else the first free one in address
/// order. The datastore's compare-and-swap decides races; this only
/// proposes.
pub fn first_free_subnet(
    cluster: Ipv4Net,
    len: u8,
    taken: &BTreeSet<Ipv4Net>,
    preferred: Option<Ipv4Net>,
) -> Result<Ipv4Net, SubnetError> {
    let cluster = cluster.trunc();
    if let Some(p) = preferred {
        if p.prefix_len() == len && p.trunc() == p && cluster.contains(&p) && !taken.contains(&p) {
            return Ok(p);
        }
    }
    let exhausted = || SubnetError::Exhausted {
        cidr: cluster,
        len,
        count: taken.len(),
    };
    let subnets = cluster.subnets(len).map_err(|_| exhausted())?;
    subnets
        .into_iter()
        .find(|s| !taken.contains(s))
        .ok_or_else(exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        assert_eq!(subnet_key(net("10.244.7.0/24")), "10.244.7.0-24");
        assert_eq!(
            subnet_from_key("10.244.7.0-24").unwrap(),
            net("10.244.7.0/24")
        );
        for bad in ["10.244.7.0", "10.244.7.1-24", "x-24", "10.244.7.0-33", ""] {
            assert!(subnet_from_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn preferred_is_used_only_when_valid_and_free() {
        let c = net("10.244.0.0/16");
        let mut taken = BTreeSet::new();
        assert_eq!(
            first_free_subnet(c, 24, &taken, Some(net("10.244.9.0/24"))).unwrap(),
            net("10.244.9.0/24")
        );
        taken.insert(net("10.244.9.0/24"));
        assert_eq!(
            first_free_subnet(c, 24, &taken, Some(net("10.244.9.0/24"))).unwrap(),
            net("10.244.0.0/24")
        );
        // Outside the cluster or of the wrong size: ignored.
        assert_eq!(
            first_free_subnet(c, 24, &taken, Some(net("10.9.0.0/24"))).unwrap(),
            net("10.244.0.0/24")
        );
        assert_eq!(
            first_free_subnet(c, 24, &taken, Some(net("10.244.0.0/25"))).unwrap(),
            net("10.244.0.0/24")
        );
    }

    #[test]
    fn exhaustion_is_an_error_naming_the_cidr() {
        let c = net("10.244.0.0/23");
        let taken: BTreeSet<_> = [net("10.244.0.0/24"), net("10.244.1.0/24")].into();
        let e = first_free_subnet(c, 24, &taken, None).unwrap_err();
        assert!(e.to_string().contains("10.244.0.0/23"), "{e}");
        assert_eq!(subnet_count(c, 24), 2);
    }

    proptest! {
        /// Allocating node after node never hands out overlapping subnets,
        /// never leaves the cluster CIDR, and fills it exactly.
        #[test]
        fn allocation_never_overlaps_or_escapes(
            a in any::<u8>(), b in any::<u8>(), plen in 16u8..=22, extra in 1u8..=4,
            prefs in proptest::collection::vec(any::<u32>(), 0..40),
        ) {
            let cluster = Ipv4Net::new([10, a, b, 0].into(), plen).unwrap().trunc();
            let len = plen + extra;
            let total = subnet_count(cluster, len) as usize;
            let mut taken = BTreeSet::new();
            for i in 0..total.min(64) {
                let pref = prefs.get(i).map(|p| Ipv4Net::new((*p).into(), len).unwrap().trunc());
                let s = first_free_subnet(cluster, len, &taken, pref).unwrap();
                prop_assert!(cluster.contains(&s));
                prop_assert_eq!(s.prefix_len(), len);
                for t in &taken {
                    prop_assert!(!t.contains(&s.network()) && !s.contains(&t.network()));
                }
                taken.insert(s);
            }
            if total <= 64 {
                prop_assert!(first_free_subnet(cluster, len, &taken, None).is_err());
            }
        }
    }
}
