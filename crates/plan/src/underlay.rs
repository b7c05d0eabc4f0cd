//! Which interface and address a node uses on the underlay: the address it
//! binds its tunnels to and (unless a public address overrides it) the one
//! peers reach it at. Calico's autodetection methods, so multi-NIC nodes
//! (seed 002) pick the address their peers know.

use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// How to choose the underlay address (`--underlay METHOD`).
#[derive(Debug, Clone)]
pub enum UnderlaySelector {
    /// The first interface (in kernel order) with an IPv4 address.
    FirstFound,
    /// The first interface whose name matches the regex (anchored).
    Interface(regex::Regex),
    /// The interface and source address the kernel would use to reach this IP.
    CanReach(Ipv4Addr),
    /// The first address inside this CIDR.
    Cidr(Ipv4Net),
    /// Exactly this address.
    Address(Ipv4Addr),
}

impl FromStr for UnderlaySelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!("--underlay {s:?}: {why} (methods: first-found, interface=REGEX, can-reach=IP, cidr=CIDR, address=IP)")
        };
        match s.split_once('=') {
            None if s == "first-found" => Ok(UnderlaySelector::FirstFound),
            Some(("interface", re)) => regex::Regex::new(&format!("^(?:{re})$"))
                .map(UnderlaySelector::Interface)
                .map_err(|e| bad(e.to_string())),
            Some(("can-reach", ip)) => ip
                .parse()
                .map(UnderlaySelector::CanReach)
                .map_err(|_| bad(format!("{ip:?} is not an IPv4 address"))),
            Some(("cidr", c)) => c
                .parse::<Ipv4Net>()
                .map(|n| UnderlaySelector::Cidr(n.trunc()))
                .map_err(|_| bad(format!("{c:?} is not an IPv4 CIDR"))),
            Some(("address", ip)) => ip
                .parse()
                .map(UnderlaySelector::Address)
                .map_err(|_| bad(format!("{ip:?} is not an IPv4 address"))),
            _ => Err(bad("unknown method".into())),
        }
    }
}

/// A link's name, MTU and IPv4 addresses.
pub type LinkAddrs = (String, u32, Vec<Ipv4Net>);

/// Links tweed makes itself are never the underlay.
fn candidate(name: &str) -> bool {
    name != "lo"
        && !name.starts_with("tweed.")
        && name != "tunl0"
        && !(name.starts_with("tw") && name.len() == 13)
}

/// Pick (interface, address, MTU). `route` answers a can-reach lookup: the
/// interface and source address the kernel would use for an IP.
pub fn select_underlay(
    links: &[LinkAddrs],
    sel: &UnderlaySelector,
    route: impl Fn(Ipv4Addr) -> Option<(String, Option<Ipv4Addr>)>,
) -> Result<(String, Ipv4Addr, u32), String> {
    let usable = || links.iter().filter(|(n, _, _)| candidate(n));
    let first_addr = |(n, mtu, addrs): &LinkAddrs, want: &dyn Fn(&Ipv4Net) -> bool| {
        addrs
            .iter()
            .find(|a| want(a))
            .map(|a| (n.clone(), a.addr(), *mtu))
    };
    let found = match sel {
        UnderlaySelector::FirstFound => usable().find_map(|l| first_addr(l, &|_| true)),
        UnderlaySelector::Interface(re) => usable()
            .filter(|(n, _, _)| re.is_match(n))
            .find_map(|l| first_addr(l, &|_| true)),
        UnderlaySelector::Cidr(c) => {
            usable().find_map(|l| first_addr(l, &|a| c.contains(&a.addr())))
        }
        UnderlaySelector::Address(ip) => usable().find_map(|l| first_addr(l, &|a| a.addr() == *ip)),
        UnderlaySelector::CanReach(dst) => route(*dst).and_then(|(dev, src)| {
            let l = usable().find(|(n, _, _)| *n == dev)?;
            match src {
                Some(s) => first_addr(l, &|a| a.addr() == s),
                None => first_addr(l, &|_| true),
            }
        }),
    };
    found.ok_or_else(|| match sel {
        UnderlaySelector::FirstFound => "no interface other than lo has an IPv4 address".into(),
        UnderlaySelector::Interface(re) => {
            format!("no interface matching {} has an IPv4 address", re.as_str())
        }
        UnderlaySelector::Cidr(c) => format!("no interface has an address in {c}"),
        UnderlaySelector::Address(ip) => format!("no interface has the address {ip}"),
        UnderlaySelector::CanReach(ip) => {
            format!("no route to {ip} from an interface tweed can use")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<LinkAddrs> {
        vec![
            ("lo".into(), 65536, vec!["127.0.0.1/8".parse().unwrap()]),
            (
                "eth0".into(),
                1500,
                vec!["198.51.100.10/26".parse().unwrap()],
            ),
            (
                "eth1".into(),
                9000,
                vec!["198.51.100.70/26".parse().unwrap()],
            ),
            (
                "tweed.1".into(),
                1450,
                vec!["10.244.1.0/32".parse().unwrap()],
            ),
        ]
    }

    fn no_route(_: Ipv4Addr) -> Option<(String, Option<Ipv4Addr>)> {
        None
    }

    #[test]
    fn each_method_picks_the_nic_operators_expect() {
        let pick = |s: &str| {
            select_underlay(&links(), &s.parse().unwrap(), no_route)
                .map(|(n, a, m)| (n, a.to_string(), m))
        };
        assert_eq!(
            pick("first-found").unwrap(),
            ("eth0".into(), "198.51.100.10".into(), 1500)
        );
        assert_eq!(pick("interface=eth1").unwrap().0, "eth1");
        assert_eq!(pick("interface=eth[0-9]+").unwrap().0, "eth0");
        assert_eq!(
            pick("cidr=198.51.100.64/26").unwrap(),
            ("eth1".into(), "198.51.100.70".into(), 9000)
        );
        assert_eq!(pick("address=198.51.100.70").unwrap().0, "eth1");
        let via = select_underlay(
            &links(),
            &"can-reach=198.51.100.99".parse().unwrap(),
            |_| Some(("eth1".into(), Some("198.51.100.70".parse().unwrap()))),
        )
        .unwrap();
        assert_eq!(via.0, "eth1");
        // tweed's own links never count, and misses say what was looked for.
        assert!(pick("interface=tweed.*")
            .unwrap_err()
            .contains("no interface matching"));
        assert!(pick("cidr=203.0.113.0/24")
            .unwrap_err()
            .contains("203.0.113.0/24"));
        assert!(
            select_underlay(&links(), &"can-reach=8.8.8.8".parse().unwrap(), no_route)
                .unwrap_err()
                .contains("no route to 8.8.8.8")
        );
    }

    #[test]
    fn bad_methods_are_refused_with_the_list() {
        for s in [
            "magic",
            "interface=(",
            "can-reach=x",
            "cidr=1.2.3.4/40",
            "address=",
        ] {
            let e = s.parse::<UnderlaySelector>().unwrap_err();
            assert!(e.contains("methods: first-found"), "{e}");
        }
    }
}
