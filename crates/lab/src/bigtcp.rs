//! IPv4 BIG TCP on lab links: a segment can model a NIC whose GSO and GRO
//! IPv4 limits are 192 KiB (as many 100G NICs ship), which Debian 12's
//! iproute2 6.1 cannot set, so the lab sets them over netlink.

use std::path::Path;

use tweed_netlink::{Netlink, NetlinkError};

/// The size a `bigTcp` segment's links get (what the kernel's BIG TCP
/// documentation and the measurements in BENCHMARKS.md use).
pub const BIG_TCP_SIZE: u32 = 196_608;

/// A link's (gso_ipv4_max_size, gro_ipv4_max_size), read over netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ipv4MaxSizes {
    pub gso_ipv4_max_size: u32,
    pub gro_ipv4_max_size: u32,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

async fn sizes_of(nl: &Netlink, dev: &str) -> Result<Ipv4MaxSizes, NetlinkError> {
    let l = nl
        .link(dev)
        .await?
        .ok_or_else(|| NetlinkError::NoLink(dev.into()))?;
    Ok(Ipv4MaxSizes {
        gso_ipv4_max_size: l.gso_ipv4_max_size.unwrap_or(65_536),
        gro_ipv4_max_size: l.gro_ipv4_max_size.unwrap_or(65_536),
    })
}

/// Read (and with `set`, first set) a link's IPv4 GSO/GRO max sizes in
/// the calling thread's namespace (`tweed probe gso DEV [--set N]`).
pub fn link_sizes(dev: &str, set: Option<u32>) -> Result<Ipv4MaxSizes, NetlinkError> {
    runtime().block_on(async {
        let nl = Netlink::open()?;
        if let Some(size) = set {
            let l = nl
                .link(dev)
                .await?
                .ok_or_else(|| NetlinkError::NoLink(dev.into()))?;
            nl.set_ipv4_max_sizes(l.index, size).await?;
        }
        sizes_of(&nl, dev).await
    })
}

/// Set `size` on each of `devs` inside the namespace at `netns`.
pub fn set_sizes_in(netns: &Path, devs: &[String], size: u32) -> Result<(), NetlinkError> {
    runtime().block_on(async {
        let nl = Netlink::open_in(netns)?;
        for dev in devs {
            let l = nl
                .link(dev)
                .await?
                .ok_or_else(|| NetlinkError::NoLink(dev.clone()))?;
            nl.set_ipv4_max_sizes(l.index, size).await?;
        }
        Ok(())
    })
}
