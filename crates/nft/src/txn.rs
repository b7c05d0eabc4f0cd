//! The service ruleset's changes as the kernel takes them fastest: the
//! shape (sets, chains, rules) through `nft -f`, where it is small and
//! rarely changes, and the elements, which are what scale, as one raw
//! nf_tables netlink batch ([`crate::elements`]). See
//! [`tweed_plan::services::Txn`] for why the three steps are each safe.

use std::process::{Command, Stdio};

use tweed_plan::services::{Elem, Existing, Txn, TABLE};

use crate::elements::{self, Data, Field, Op};
use crate::NftError;

/// Apply a change: `pre`, the elements, `post`, each atomic.
pub fn apply_txn(t: &Txn<'_>) -> Result<(), NftError> {
    let start = std::time::Instant::now();
    crate::apply(&t.pre)?;
    let pre = start.elapsed();
    let ops = TxnOps(t);
    elements::apply_list(TABLE, &ops)?;
    let elems = start.elapsed();
    crate::apply(&t.post)?;
    tracing::debug!(
        pre_ms = pre.as_secs_f64() * 1000.0,
        elements_ms = (elems - pre).as_secs_f64() * 1000.0,
        post_ms = (start.elapsed() - elems).as_secs_f64() * 1000.0,
        ops = elements::OpList::len(&ops),
        "ruleset change applied"
    );
    Ok(())
}

/// A change's elements as netlink ops, each made when the encoder (or an
/// error message) asks for it: flushes, then deletions, then additions.
struct TxnOps<'a>(&'a Txn<'a>);

impl elements::OpList for TxnOps<'_> {
    fn len(&self) -> usize {
        self.0.flush.len() + self.0.dels.len() + self.0.additions()
    }
    fn op(&self, i: usize) -> std::borrow::Cow<'_, Op> {
        let t = self.0;
        let (f, d) = (t.flush.len(), t.dels.len());
        std::borrow::Cow::Owned(if i < f {
            Op::Flush {
                set: t.flush[i].clone(),
            }
        } else if i < f + d {
            op(&t.dels[i - f], false).expect("planned deletions have a set")
        } else if i < f + d + t.adds.len() {
            op(&t.adds[i - f - d], true).expect("planned additions have a set")
        } else {
            op(t.adds_borrowed[i - f - d - t.adds.len()], true)
                .expect("planned additions have a set")
        })
    }
}

/// One element as a netlink op: its set, its key's fields in the set's
/// type order, and for maps its value (see the set declarations in
/// `tweed_plan::services::render_full`).
pub fn op(e: &Elem, add: bool) -> Option<Op> {
    use Field::{Ipv4, Port, Proto, U32};
    let set = e.set_name()?;
    let (key, data) = match *e {
        Elem::Lb((ip, _, port), _) => (vec![Ipv4(ip), Port(port)], Data::None),
        Elem::LbAll((ip, p, port))
        | Elem::MasqLb((ip, p, port))
        | Elem::RejLb((ip, p, port))
        | Elem::DropLb((ip, p, port)) => {
            (vec![Ipv4(ip), Proto(p.number()), Port(port)], Data::None)
        }
        Elem::LbAffinity((ip, p, port), _) | Elem::Xlb((ip, p, port), _) => (
            vec![Ipv4(ip), Proto(p.number()), Port(port)],
            Data::Goto(e.goto_chain()?),
        ),
        Elem::Be((ip, _, port), _, slot, (bip, bport)) => (
            vec![Ipv4(ip), Port(port), U32(u32::from(slot))],
            Data::Value(vec![Ipv4(bip), Port(bport)]),
        ),
        Elem::Np((_, port), _) => (vec![Port(port)], Data::None),
        Elem::NpAll((p, port))
        | Elem::MasqNp((p, port))
        | Elem::RejNp((p, port))
        | Elem::DropNp((p, port)) => (vec![Proto(p.number()), Port(port)], Data::None),
        Elem::NpBe((_, port), _, slot, (bip, bport)) => (
            vec![Port(port), U32(u32::from(slot))],
            Data::Value(vec![Ipv4(bip), Port(bport)]),
        ),
        Elem::HostPort((p, port), (ip, cport)) => (
            vec![Proto(p.number()), Port(port)],
            Data::Value(vec![Ipv4(ip), Port(cport)]),
        ),
        Elem::Firewall((ip, p, port), _) => (
            vec![Ipv4(ip), Proto(p.number()), Port(port)],
            Data::Jump(e.jump_chain()?),
        ),
        Elem::NpXlb((p, port), _) => (
            vec![Proto(p.number()), Port(port)],
            Data::Goto(e.goto_chain()?),
        ),
        Elem::ChainBackend(..) | Elem::NpChainBackend(..) => return None,
    };
    Some(if add {
        Op::Add { set, key, data }
    } else {
        Op::Delete { set, key }
    })
}

/// The sets, maps and chains of tweed's table in the kernel (none when it
/// is absent). Equivalent: `nft -t -j list sets ip`, `… list maps ip`,
/// `… list chains ip`: `-t` leaves the elements out, and these, unlike
/// `list table`, do not fetch them either (2.5 s at 10k Services).
pub fn existing() -> Result<Existing, NftError> {
    let mut e = Existing::default();
    for what in ["sets", "maps", "chains"] {
        let out = Command::new("nft")
            .args(["-t", "-j", "list", what, "ip"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| NftError::Spawn {
                tool: "nft",
                source,
            })?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let one = parse_existing(&String::from_utf8_lossy(&out.stdout));
        e.sets.extend(one.sets);
        e.chains.extend(one.chains);
    }
    Ok(e)
}

/// The set, map and chain names of tweed's table in an `nft -j list …`
/// document.
pub fn parse_existing(json: &str) -> Existing {
    let mut e = Existing::default();
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for kind in ["set", "map", "chain"] {
            let o = &item[kind];
            if o["table"] != TABLE || o["family"] != "ip" {
                continue;
            }
            if let Some(n) = o["name"].as_str() {
                if kind == "chain" {
                    e.chains.insert(n.to_string());
                } else {
                    e.sets.insert(n.to_string());
                }
            }
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use tweed_model::Protocol;

    #[test]
    fn elements_become_ops_in_their_sets_type_order() {
        let k = ("10.96.0.10".parse().unwrap(), Protocol::UDP, 53);
        let b = ("10.244.1.2".parse().unwrap(), 5353);
        assert_eq!(
            op(&Elem::Be(k, 3, 2, b), true),
            Some(Op::Add {
                set: "be-udp-3".into(),
                key: vec![Field::Ipv4(k.0), Field::Port(53), Field::U32(2)],
                data: Data::Value(vec![Field::Ipv4(b.0), Field::Port(5353)]),
            })
        );
        assert_eq!(
            op(&Elem::RejNp((Protocol::TCP, 30080)), false),
            Some(Op::Delete {
                set: "rej-np".into(),
                key: vec![Field::Proto(6), Field::Port(30080)],
            })
        );
        let Some(Op::Add { set, data, .. }) = op(&Elem::LbAffinity(k, 60), true) else {
            panic!()
        };
        assert_eq!(set, "lb");
        assert!(matches!(data, Data::Goto(c) if c.starts_with("aff-")));
        assert_eq!(op(&Elem::ChainBackend(k, b), true), None);
    }

    #[test]
    fn existing_objects_are_read_from_nft_json() {
        let j = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "tweed"}},
            {"set": {"family": "ip", "name": "lb-all", "table": "tweed"}},
            {"map": {"family": "ip", "name": "be-tcp", "table": "tweed"}},
            {"set": {"family": "ip", "name": "other", "table": "filter"}},
            {"chain": {"family": "ip", "table": "tweed", "name": "services"}}]}"#;
        let e = parse_existing(j);
        assert_eq!(e.sets.iter().collect::<Vec<_>>(), ["be-tcp", "lb-all"]);
        assert_eq!(e.chains.iter().collect::<Vec<_>>(), ["services"]);
    }
}
