//! Conntrack entries as `conntrack -L` prints them (read-only), shared by
//! doctor (stale entries) and trace (`--ct established`).

use std::net::Ipv4Addr;

use serde::Serialize;

/// One conntrack entry: the original direction and where replies come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CtEntry {
    pub proto: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub reply_src: Ipv4Addr,
    pub reply_sport: u16,
    /// Where replies go: not the original source when it was masqueraded.
    pub reply_dst: Ipv4Addr,
}

/// `conntrack -L` lines → entries (TCP, UDP and SCTP with ports).
pub fn parse_conntrack(text: &str) -> Vec<CtEntry> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let proto = w.next()?.to_string();
            let kv: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|t| t.split_once('='))
                .collect();
            let nth =
                |k: &str, n: usize| kv.iter().filter(|(a, _)| *a == k).nth(n).map(|(_, v)| *v);
            Some(CtEntry {
                proto,
                src: nth("src", 0)?.parse().ok()?,
                dst: nth("dst", 0)?.parse().ok()?,
                sport: nth("sport", 0)?.parse().ok()?,
                dport: nth("dport", 0)?.parse().ok()?,
                reply_src: nth("src", 1)?.parse().ok()?,
                reply_sport: nth("sport", 1)?.parse().ok()?,
                reply_dst: nth("dst", 1)?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines() {
        let t = "udp      17 25 src=10.244.0.5 dst=10.96.0.10 sport=40000 dport=53 src=10.244.2.7 dst=10.244.0.5 sport=53 dport=40000 mark=0 use=1\ntcp      6 431999 ESTABLISHED src=10.244.0.5 dst=10.96.0.1 sport=5000 dport=80 src=10.244.1.3 dst=10.244.0.5 sport=8080 dport=5000 [ASSURED] mark=0 use=1\nconntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n";
        let e = parse_conntrack(t);
        assert_eq!(e.len(), 2);
        assert_eq!(
            (
                e[0].proto.as_str(),
                e[0].dport,
                e[0].reply_src.to_string().as_str()
            ),
            ("udp", 53, "10.244.2.7")
        );
        assert_eq!((e[1].reply_sport, e[1].sport), (8080, 5000));
    }
}
