//! How large a packet a pod may hand to its veth: IPv4 BIG TCP for pods,
//! only where every path their traffic takes carries it.
//!
//! A TCP socket builds GSO packets as large as its route's device allows
//! (`gso_ipv4_max_size`), and on a direct route those packets cross the
//! pod's veth, the node and its underlay NIC whole. A device on the way
//! that allows less makes the kernel cut them into wire-sized segments in
//! software (measured in the lab: the sending node's NIC at 64 KiB under
//! 192 KiB pods, 3.3 Gbit/s; the bridge's ports, 4.2–4.5; against ~20 with
//! every device at 192 KiB). A tunnel cannot carry them at all: a stream of
//! 192 KiB packets routed into the VXLAN device fell to 0.1–0.3 Gbit/s
//! with 8,000–25,000 retransmits a second.
//!
//! A pod's veth is one device for every destination, and its sockets keep
//! the size they read until their route is looked up again, so the pod's
//! end takes one size per node: the underlay device's own while every peer
//! is reached directly, 64 KiB as soon as any peer is encapsulated. The
//! host's end only limits what the node hands the pod, and a large packet
//! only arrives from a peer that sends it directly, so it keeps the
//! underlay's size whatever the paths (`pod_gso_max_size(underlay, [])`):
//! a node need not know what its peers decided.

use tweed_model::DEFAULT_GSO_MAX_SIZE;

use crate::Mode;

/// The GSO/GRO IPv4 max size for this node's pod veths: `underlay_gso`
/// (the underlay device's `gso_ipv4_max_size`, if the kernel reports one)
/// when it is above 64 KiB and every peer's mode is direct (no peers at all
/// counts as all direct; an unreachable peer carries no traffic), else
/// 65536.
pub fn pod_gso_max_size(underlay_gso: Option<u32>, modes: impl IntoIterator<Item = Mode>) -> u32 {
    let Some(size) = underlay_gso.filter(|s| *s > DEFAULT_GSO_MAX_SIZE) else {
        return DEFAULT_GSO_MAX_SIZE;
    };
    let all_direct = modes
        .into_iter()
        .all(|m| matches!(m, Mode::Direct | Mode::Bgp | Mode::Unreachable));
    if all_direct {
        size
    } else {
        DEFAULT_GSO_MAX_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Option<u32> = Some(196_608);

    #[test]
    fn big_only_while_every_peer_is_direct() {
        assert_eq!(pod_gso_max_size(BIG, []), 196_608, "no peers");
        assert_eq!(pod_gso_max_size(BIG, [Mode::Direct, Mode::Direct]), 196_608);
        assert_eq!(
            pod_gso_max_size(BIG, [Mode::Direct, Mode::Unreachable]),
            196_608
        );
        for encap in [Mode::Vxlan, Mode::Ipip] {
            assert_eq!(pod_gso_max_size(BIG, [Mode::Direct, encap]), 65_536);
            assert_eq!(pod_gso_max_size(BIG, [encap]), 65_536);
        }
    }

    #[test]
    fn never_above_the_underlay_and_never_below_64k() {
        assert_eq!(pod_gso_max_size(Some(65_536), [Mode::Direct]), 65_536);
        assert_eq!(pod_gso_max_size(None, [Mode::Direct]), 65_536);
        // A NIC allowing less than the default does not shrink pods below
        // it: the kernel segments for that NIC as it does for the node's own sockets.
        assert_eq!(pod_gso_max_size(Some(16_384), []), 65_536);
        assert_eq!(pod_gso_max_size(Some(131_072), []), 131_072);
    }
}
