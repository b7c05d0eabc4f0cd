//! Kernel I/O over rtnetlink. Every public call names the `ip`/`bridge`
//! command it is equivalent to. Calls are idempotent: adding what exists
//! (as desired) or deleting what is gone succeeds.
//!
//! A netlink socket belongs to the network namespace it was opened in, so
//! working on another namespace means opening a [`Netlink`] while the
//! thread is inside it ([`Netlink::open_in`]), not switching later.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};
use tweed_model::MacAddr;
use tweed_plan::{Fdb, IpipLink, Neigh, Route, VxlanLink};

/// Routes tweed installs carry this protocol number (`ip route ... proto
/// 144`), so reconciling never touches routes someone else made.
pub const TWEED_RTPROTO: u8 = 144;

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: cannot open a socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{op}: {source}")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no link named {0}")]
    NoLink(String),
    #[error("this kernel has no IP-in-IP support (no {0} device: the ipip module is not built in or loadable); use backend vxlan or auto")]
    NoIpip(String),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl NetlinkError {
    /// The errno of a failed request, if it was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(-m.raw_code()),
            _ => None,
        }
    }
}

type Result<T, E = NetlinkError> = std::result::Result<T, E>;

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

fn errno_of(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
        _ => 0,
    }
}

/// The kernel's answer to one route lookup (see [`Netlink::route_lookup`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteLookup {
    /// The prefix of the route that matched.
    pub prefix: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub table: u32,
    /// 2 kernel, 3 boot, 4 static, 144 tweed, ...
    pub protocol: u8,
    /// unicast, blackhole, unreachable, local, ...
    pub kind: String,
    pub onlink: bool,
    /// The source address the node would use.
    pub src: Option<Ipv4Addr>,
    pub metric: u32,
}

fn route_lookup_of(m: &RouteMessage) -> RouteLookup {
    let len = m.header.destination_prefix_length;
    let mut r = RouteLookup {
        prefix: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, len).unwrap_or_default(),
        gateway: None,
        oif: None,
        table: u32::from(m.header.table),
        protocol: u8::from(m.header.protocol),
        kind: format!("{:?}", m.header.kind).to_lowercase(),
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        src: None,
        metric: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                r.prefix = Ipv4Net::new(*ip, len).unwrap_or_default()
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => r.src = Some(*ip),
            _ => {}
        }
    }
    r
}

/// What tweed needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub kind: Option<String>,
    pub vxlan: Option<VxlanParams>,
    /// The largest IPv4 GSO packet the stack builds for this link
    /// (`gso_ipv4_max_size`; above 65536 is IPv4 BIG TCP).
    pub gso_ipv4_max_size: Option<u32>,
    /// The largest IPv4 packet GRO assembles on this link (`gro_ipv4_max_size`).
    pub gro_ipv4_max_size: Option<u32>,
}

/// The parameters of an existing VXLAN device that decide whether it can
/// be kept as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanParams {
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub link: Option<u32>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
}

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut s = LinkState {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
        gso_ipv4_max_size: None,
        gro_ipv4_max_size: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => s.name = n.clone(),
            LinkAttribute::Mtu(m) => s.mtu = *m,
            LinkAttribute::GsoIpv4MaxSize(v) => s.gso_ipv4_max_size = Some(*v),
            LinkAttribute::GroIpv4MaxSize(v) => s.gro_ipv4_max_size = Some(*v),
            LinkAttribute::Address(b) if b.len() == 6 => {
                s.mac = Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => s.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut p = VxlanParams::default();
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => p.vni = Some(*id),
                                    InfoVxlan::Local(ip) => p.local = Some(*ip),
                                    InfoVxlan::Link(l) => p.link = Some(*l),
                                    InfoVxlan::Port(port) => p.port = Some(*port),
                                    InfoVxlan::Learning(l) => p.learning = Some(*l),
                                    _ => {}
                                }
                            }
                            s.vxlan = Some(p);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    s
}

/// A route as tweed plans it, read back from the kernel.
fn route_of(msg: &RouteMessage, dev: &str) -> Option<Route> {
    let mut dst = None;
    let mut via = None;
    let mut src = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(*ip),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => src = Some(*ip),
            _ => {}
        }
    }
    Some(Route {
        dst: Ipv4Net::new(dst?, msg.header.destination_prefix_length).ok()?,
        via: via?,
        dev: dev.to_string(),
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        src,
    })
}

/// Changes to the IPv4 routes of kernel table `table`, as they happen:
/// one `()` per route added or removed there (RTNLGRP_IPV4_ROUTE,
/// filtered). Opened in the calling thread's network namespace, inside a
/// tokio runtime. Equivalent: `ip -4 monitor route table TABLE`.
///
/// The agent watches BIRD's table of learnt routes with it: a peer's route
/// withdrawn by BGP (BFD, a lost session) must move its traffic back to
/// VXLAN at once, not at the next resync.
pub fn watch_table(table: u32) -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use futures::StreamExt;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_IPV4_ROUTE))
        .map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The connection lives while its handle or its message stream does.
        let _handle = handle;
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
            ) = msg.payload
            else {
                continue;
            };
            if route_lookup_of(&r).table == table && tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// An open rtnetlink connection in one network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open a connection in the calling thread's network namespace. Must be
    /// called inside a tokio runtime (the connection task is spawned on it).
    pub fn open() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Open a connection inside the namespace at `netns` (e.g.
    /// `/run/netns/pod1`) and return to the original namespace.
    /// Equivalent: `ip -n NETNS ...`.
    pub fn open_in(netns: &Path) -> Result<Self> {
        let ns_err = |source| NetlinkError::Netns {
            path: netns.display().to_string(),
            source,
        };
        let target = std::fs::File::open(netns).map_err(ns_err)?;
        let home = std::fs::File::open("/proc/thread-self/ns/net").map_err(ns_err)?;
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ns_err(e.into()))?;
        let opened = Self::open();
        // Going home must not fail silently: a thread left in the pod's
        // namespace would wire the next thing in the wrong place.
        nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("cannot return to the original network namespace");
        opened
    }

    /// `ip link show NAME`
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(link_state(&m))),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno_of(&e), ENODEV | ENOENT) => Ok(None),
            Err(e) => Err(req(format!("ip link show {name}"))(e)),
        }
    }

    async fn need_link(&self, name: &str) -> Result<LinkState> {
        self.link(name)
            .await?
            .ok_or_else(|| NetlinkError::NoLink(name.to_string()))
    }

    /// `ip link show` (every link)
    pub async fn links(&self) -> Result<Vec<LinkState>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("ip link show"))?;
        Ok(msgs.iter().map(link_state).collect())
    }

    /// `ip link set NAME up`
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(req(format!("ip link set {index} up")))
    }

    /// `ip link set dev NAME mtu MTU`
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(req(format!("ip link set {index} mtu {mtu}")))
    }

    /// Set the largest IPv4 packet the stack builds (GSO) and assembles
    /// (GRO) for a link: above 65536 is IPv4 BIG TCP. Sockets read the GSO
    /// size when they look up their route, so ones already connected keep
    /// the old size until their namespace's route cache is flushed (see
    /// [`flush_route_cache`]). Equivalent (iproute2 ≥ 6.3; Debian 12's 6.1
    /// cannot): `ip link set dev INDEX gso_ipv4_max_size SIZE gro_ipv4_max_size SIZE`.
    pub async fn set_ipv4_max_sizes(&self, index: u32, size: u32) -> Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::GsoIpv4MaxSize(size))
                    .append_extra_attribute(LinkAttribute::GroIpv4MaxSize(size))
                    .build(),
            )
            .execute()
            .await
            .map_err(req(format!(
                "ip link set dev {index} gso_ipv4_max_size {size} gro_ipv4_max_size {size}"
            )))
    }

    /// Give link `ifname` inside the namespace at `netns` (a pod's end of
    /// its veth) the IPv4 GSO/GRO max size `size`, then flush that
    /// namespace's route cache so its connected sockets take the new size
    /// at once: they keep the one they read otherwise, and a 192 KiB packet
    /// routed into a tunnel collapses the stream. Nothing is done if the
    /// link is at `size` already; returns whether it changed.
    /// Equivalent: `ip netns exec NETNS sh -c 'ip link set IFNAME
    /// gso_ipv4_max_size SIZE gro_ipv4_max_size SIZE && ip route flush cache'`.
    pub async fn set_ipv4_max_sizes_in(netns: &Path, ifname: &str, size: u32) -> Result<bool> {
        let pod = Netlink::open_in(netns)?;
        let p = pod
            .link(ifname)
            .await?
            .ok_or_else(|| NetlinkError::NoLink(format!("{ifname} in {}", netns.display())))?;
        if p.gso_ipv4_max_size == Some(size) && p.gro_ipv4_max_size == Some(size) {
            return Ok(false);
        }
        pod.set_ipv4_max_sizes(p.index, size).await?;
        in_netns(netns, flush_route_cache)?.map_err(|source| NetlinkError::Netns {
            path: netns.display().to_string(),
            source,
        })?;
        Ok(true)
    }

    /// `ip link del NAME`; a link that is already gone is fine.
    pub async fn del_link(&self, name: &str) -> Result<()> {
        let Some(l) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(l.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), ENODEV | ENOENT) => Ok(()),
            Err(e) => Err(req(format!("ip link del {name}"))(e)),
        }
    }

    /// `ip -4 addr show dev INDEX`
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req("ip addr show"))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    if let Ok(n) = Ipv4Net::new(*ip, m.header.prefix_len) {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `ip addr replace ADDR/LEN dev INDEX`
    pub async fn add_addr(&self, index: u32, addr: Ipv4Net) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(req(format!("ip addr replace {addr} dev {index}")))
    }

    /// `ip addr del ADDR/LEN dev INDEX`; an address already gone is fine.
    pub async fn del_addr(&self, index: u32, addr: Ipv4Net) -> Result<()> {
        let mut msgs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(addr.addr()))
            .set_prefix_length_filter(addr.prefix_len())
            .execute();
        while let Some(m) = msgs.try_next().await.map_err(req("ip addr show"))? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == EADDRNOTAVAIL => {}
                Err(e) => return Err(req(format!("ip addr del {addr} dev {index}"))(e)),
            }
        }
        Ok(())
    }

    /// Make the VXLAN device match `spec`, re-creating it when a parameter
    /// that cannot be changed in place differs.
    /// Equivalent: `ip link add NAME type vxlan id VNI local LOCAL dev UNDERLAY
    /// dstport PORT nolearning && ip link set NAME address MAC mtu MTU up &&
    /// ip addr replace ADDR/32 dev NAME`.
    pub async fn ensure_vxlan(&self, spec: &VxlanLink) -> Result<u32> {
        let underlay = self.need_link(&spec.underlay_dev).await?;
        if let Some(cur) = self.link(&spec.name).await? {
            let p = cur.vxlan.clone().unwrap_or_default();
            let same = cur.kind.as_deref() == Some("vxlan")
                && p.vni == Some(spec.vni)
                && p.local == Some(spec.local)
                && p.link == Some(underlay.index)
                && p.port == Some(spec.port)
                && p.learning == Some(false)
                && cur.mac == Some(spec.mac);
            if !same {
                self.del_link(&spec.name).await?;
            }
        }
        let cur = match self.link(&spec.name).await? {
            Some(l) => l,
            None => {
                let msg = LinkVxlan::new(&spec.name, spec.vni)
                    .dev(underlay.index)
                    .local(spec.local)
                    .port(spec.port)
                    .learning(false)
                    .mtu(spec.mtu)
                    .address(spec.mac.0.to_vec())
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(req(format!(
                        "ip link add {} type vxlan id {}",
                        spec.name, spec.vni
                    )))?;
                self.need_link(&spec.name).await?
            }
        };
        self.tunnel_settings(&cur, spec.mtu, spec.address).await
    }

    /// A tunnel device's MTU, its one /32 address, and up.
    /// Equivalent: `ip link set DEV mtu MTU up && ip addr replace ADDR/32 dev DEV` (other addresses removed).
    async fn tunnel_settings(&self, cur: &LinkState, mtu: u32, address: Ipv4Addr) -> Result<u32> {
        if cur.mtu != mtu {
            self.set_mtu(cur.index, mtu).await?;
        }
        let want = Ipv4Net::new(address, 32).expect("/32");
        for a in self.ipv4_addrs(cur.index).await? {
            if a != want {
                self.del_addr(cur.index, a).await?;
            }
        }
        self.add_addr(cur.index, want).await?;
        if !cur.up {
            self.set_up(cur.index).await?;
        }
        Ok(cur.index)
    }

    /// Set up the kernel's fallback IP-in-IP device. It exists in every
    /// network namespace once the ipip module is loaded, so its absence
    /// means the kernel cannot do IP-in-IP.
    /// Equivalent: `ip link set tunl0 mtu MTU up && ip addr replace ADDR/32 dev tunl0`.
    pub async fn ensure_ipip(&self, spec: &IpipLink) -> Result<u32> {
        let cur = self
            .link(&spec.name)
            .await?
            .ok_or_else(|| NetlinkError::NoIpip(spec.name.clone()))?;
        self.tunnel_settings(&cur, spec.mtu, spec.address).await
    }

    /// Every IPv4 route message, all tables (`op` names it in errors).
    async fn route_dump(&self, op: &str) -> Result<Vec<RouteMessage>> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req(op))
    }

    /// `ip -4 route show dev DEV proto 144`: the routes tweed owns on a device.
    pub async fn owned_routes(&self, dev: &str) -> Result<BTreeSet<Route>> {
        let Some(link) = self.link(dev).await? else {
            return Ok(BTreeSet::new());
        };
        let msgs = self.route_dump("ip route show").await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Other(TWEED_RTPROTO))
            .filter(|m| m.attributes.contains(&RouteAttribute::Oif(link.index)))
            .filter_map(|m| route_of(m, dev))
            .collect())
    }

    fn route_msg(&self, r: &Route, index: u32) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst.network(), r.dst.prefix_len())
            .gateway(r.via)
            .output_interface(index)
            .protocol(RouteProtocol::Other(TWEED_RTPROTO));
        if r.onlink {
            b = b.onlink();
        }
        if let Some(src) = r.src {
            b = b.pref_source(src);
        }
        b.build()
    }

    /// `ip route replace DST via VIA dev DEV onlink proto 144`
    pub async fn add_route(&self, r: &Route) -> Result<()> {
        let link = self.need_link(&r.dev).await?;
        self.handle
            .route()
            .add(self.route_msg(r, link.index))
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "ip route replace {} via {} dev {} onlink",
                r.dst, r.via, r.dev
            )))
    }

    /// `ip route del DST via VIA dev DEV`; a route already gone is fine.
    pub async fn del_route(&self, r: &Route) -> Result<()> {
        let Some(link) = self.link(&r.dev).await? else {
            return Ok(());
        };
        match self
            .handle
            .route()
            .del(self.route_msg(r, link.index))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), ESRCH | ENOENT) => Ok(()),
            Err(e) => Err(req(format!("ip route del {} dev {}", r.dst, r.dev))(e)),
        }
    }

    /// `ip route replace DST/32 dev DEV scope link proto 144` (a pod's host route).
    pub async fn add_device_route(&self, dst: Ipv4Net, index: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(TWEED_RTPROTO))
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "ip route replace {dst} dev {index} scope link"
            )))
    }

    fn blackhole_msg(dst: Ipv4Net) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Other(TWEED_RTPROTO))
            .build()
    }

    /// `ip route replace blackhole DST proto 144`: the node's own pod subnet
    /// when it announces it by BGP, so traffic to an unused address in it
    /// stops here instead of looping back to the fabric (pods' /32 routes
    /// are more specific).
    pub async fn add_blackhole(&self, dst: Ipv4Net) -> Result<()> {
        self.handle
            .route()
            .add(Self::blackhole_msg(dst))
            .replace()
            .execute()
            .await
            .map_err(req(format!("ip route replace blackhole {dst}")))
    }

    /// `ip route del blackhole DST proto 144`; already gone is fine.
    pub async fn del_blackhole(&self, dst: Ipv4Net) -> Result<()> {
        match self
            .handle
            .route()
            .del(Self::blackhole_msg(dst))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), ESRCH | ENOENT) => Ok(()),
            Err(e) => Err(req(format!("ip route del blackhole {dst}"))(e)),
        }
    }

    /// Delete every IPv4 route in kernel table `table`; how many went.
    /// Equivalent: `ip -4 route flush table TABLE`.
    pub async fn flush_table(&self, table: u32) -> Result<usize> {
        let op = format!("ip -4 route flush table {table}");
        let msgs = self.route_dump(&op).await?;
        let mut n = 0;
        for m in msgs
            .into_iter()
            .filter(|m| route_lookup_of(m).table == table)
        {
            match self.handle.route().del(m).execute().await {
                Ok(()) => n += 1,
                Err(e) if matches!(errno_of(&e), ESRCH | ENOENT) => {}
                Err(e) => return Err(req(op)(e)),
            }
        }
        Ok(n)
    }

    /// `ip route replace default via GW dev DEV onlink` (inside a pod).
    pub async fn add_default_route(&self, gw: Ipv4Addr, index: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .onlink()
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "ip route replace default via {gw} dev {index} onlink"
            )))
    }

    /// The interface index and preferred source address the kernel would
    /// use to reach `dst`. Equivalent: `ip route get DST`.
    pub async fn route_get(&self, dst: Ipv4Addr) -> Result<Option<(u32, Option<Ipv4Addr>)>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut s = self.handle.route().get(msg).execute();
        match s.try_next().await {
            Ok(Some(m)) => {
                let oif = m.attributes.iter().find_map(|a| {
                    if let RouteAttribute::Oif(i) = a {
                        Some(*i)
                    } else {
                        None
                    }
                });
                let src = m.attributes.iter().find_map(|a| {
                    if let RouteAttribute::PrefSource(RouteAddress::Inet(ip)) = a {
                        Some(*ip)
                    } else {
                        None
                    }
                });
                Ok(oif.map(|o| (o, src)))
            }
            Ok(None) => Ok(None),
            Err(e) if matches!(errno_of(&e), 101 | 113 | ESRCH) => Ok(None),
            Err(e) => Err(req(format!("ip route get {dst}"))(e)),
        }
    }

    /// What the kernel decides for a packet to `dst`: the route that
    /// matched (prefix, table, protocol, type), its gateway and device, and
    /// the source address the node would use. With `iif` it is an input
    /// lookup (a packet arriving from `src` on that link: forwarding,
    /// rp_filter and policy rules apply); without, an output lookup.
    /// Equivalent: `ip route get fibmatch DST [from SRC iif DEV] [mark M]`
    /// plus `ip route get DST ...` for the source address. A lookup the
    /// kernel refuses is `Ok(Err(errno))` (e.g. 101 unreachable, 113 no
    /// route to host when forwarding is off, 22 rp_filter or blackhole).
    pub async fn route_lookup(
        &self,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        iif: Option<u32>,
        mark: Option<u32>,
    ) -> Result<std::result::Result<RouteLookup, i32>> {
        self.lookup(dst, src, iif, None, mark).await
    }

    /// An output lookup bound to link `oif`, as a socket bound to a device
    /// (or a VXLAN device with `dev`) asks: only routes through that link
    /// match. Equivalent: `ip route get [fibmatch] DST [from SRC] oif DEV`.
    pub async fn route_lookup_oif(
        &self,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<std::result::Result<RouteLookup, i32>> {
        self.lookup(dst, src, None, Some(oif), None).await
    }

    async fn lookup(
        &self,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        iif: Option<u32>,
        oif: Option<u32>,
        mark: Option<u32>,
    ) -> Result<std::result::Result<RouteLookup, i32>> {
        let request = |fib_match: bool| {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32);
            if let Some(s) = src {
                b = b.source_prefix(s, 32);
            }
            let mut m = b.build();
            if let Some(i) = iif {
                m.attributes.push(RouteAttribute::Iif(i));
            }
            if let Some(o) = oif {
                m.attributes.push(RouteAttribute::Oif(o));
            }
            if let Some(k) = mark {
                m.attributes.push(RouteAttribute::Mark(k));
            }
            if fib_match {
                m.header.flags |= RouteFlags::FibMatch;
            }
            m
        };
        let one = |m: RouteMessage| async move {
            let mut s = self.handle.route().get(m).execute();
            match s.try_next().await {
                Ok(Some(m)) => Ok(Ok(m)),
                Ok(None) => Ok(Err(ENOENT)),
                Err(e) if errno_of(&e) != 0 => Ok(Err(errno_of(&e))),
                Err(e) => Err(req(format!("ip route get {dst}"))(e)),
            }
        };
        let matched = match one(request(true)).await? {
            Ok(m) => m,
            Err(errno) => return Ok(Err(errno)),
        };
        // The source address only comes with the full (non-fibmatch) answer.
        let pref = match one(request(false)).await? {
            Ok(m) => m.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            }),
            Err(_) => None,
        };
        let mut out = route_lookup_of(&matched);
        // The source the kernel would pick comes with the full answer; the
        // fib-match one only carries the route's own `src`, if any.
        out.src = pref.or(out.src);
        Ok(Ok(out))
    }

    /// Every IPv4 route in every table. Equivalent: `ip -4 route show table all`.
    pub async fn all_routes(&self) -> Result<Vec<RouteLookup>> {
        let msgs = self.route_dump("ip -4 route show table all").await?;
        Ok(msgs.iter().map(route_lookup_of).collect())
    }

    /// The MAC a neighbour entry for `ip` on link `index` resolves to, if
    /// any (entries still resolving have none). Equivalent: `ip neigh show IP dev DEV`.
    pub async fn neigh_mac(&self, index: u32, ip: Ipv4Addr) -> Result<Option<MacAddr>> {
        for m in self.neigh_dump(AddressFamily::Inet, index).await? {
            let hit = m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip)
            });
            if !hit {
                continue;
            }
            return Ok(m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                    Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
                }
                _ => None,
            }));
        }
        Ok(None)
    }

    /// Where a VXLAN device sends frames for `mac`. Equivalent:
    /// `bridge fdb show dev DEV | grep MAC` (its `dst`).
    pub async fn fdb_dst(&self, dev: &str, mac: MacAddr) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .fdb(dev)
            .await?
            .into_iter()
            .find(|f| f.mac == mac)
            .map(|f| f.dst))
    }

    /// The state of the neighbour entry for `ip` on link `index` (e.g.
    /// "reachable", "incomplete", "failed", "permanent"), if there is one.
    /// Equivalent: `ip neigh show IP dev DEV`.
    pub async fn neigh_state(&self, index: u32, ip: Ipv4Addr) -> Result<Option<String>> {
        for m in self.neigh_dump(AddressFamily::Inet, index).await? {
            let hit = m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip)
            });
            if hit {
                return Ok(Some(format!("{:?}", m.header.state).to_lowercase()));
            }
        }
        Ok(None)
    }

    /// Does `ip route show DST dev DEV` find the host route?
    pub async fn has_device_route(&self, dst: Ipv4Net, index: u32) -> Result<bool> {
        let msgs = self.route_dump("ip route show").await?;
        Ok(msgs.iter().any(|m| {
            m.header.destination_prefix_length == dst.prefix_len()
                && m.attributes
                    .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                        dst.network(),
                    )))
                && m.attributes.contains(&RouteAttribute::Oif(index))
        }))
    }

    async fn neigh_dump(&self, family: AddressFamily, index: u32) -> Result<Vec<NeighbourMessage>> {
        let mut get = self.handle.neighbours().get();
        get = get.set_address_family(family);
        let msgs: Vec<NeighbourMessage> = get
            .execute()
            .try_collect()
            .await
            .map_err(req("ip neigh show"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .collect())
    }

    /// `ip neigh show dev DEV nud permanent`
    pub async fn permanent_neighs(&self, dev: &str) -> Result<BTreeSet<Neigh>> {
        let Some(link) = self.link(dev).await? else {
            return Ok(BTreeSet::new());
        };
        let mut out = BTreeSet::new();
        for m in self.neigh_dump(AddressFamily::Inet, link.index).await? {
            if m.header.state != NeighbourState::Permanent {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                    NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                        mac = Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.insert(Neigh {
                    ip,
                    mac,
                    dev: dev.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// `ip neigh replace IP lladdr MAC dev DEV nud permanent`
    pub async fn add_neigh(&self, n: &Neigh) -> Result<()> {
        let link = self.need_link(&n.dev).await?;
        self.add_neigh_on(link.index, n.ip, n.mac).await
    }

    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`
    pub async fn add_neigh_on(&self, index: u32, ip: Ipv4Addr, mac: MacAddr) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "ip neigh replace {ip} lladdr {mac} dev {index}"
            )))
    }

    /// `ip neigh del IP dev DEV`; an entry already gone is fine.
    pub async fn del_neigh(&self, n: &Neigh) -> Result<()> {
        let Some(link) = self.link(&n.dev).await? else {
            return Ok(());
        };
        for m in self.neigh_dump(AddressFamily::Inet, link.index).await? {
            if m.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    n.ip,
                )))
            {
                match self.handle.neighbours().del(m).execute().await {
                    Ok(()) => {}
                    Err(e) if matches!(errno_of(&e), ENOENT | ESRCH) => {}
                    Err(e) => return Err(req(format!("ip neigh del {} dev {}", n.ip, n.dev))(e)),
                }
            }
        }
        Ok(())
    }

    /// `bridge fdb show dev DEV` (the permanent unicast entries with a dst)
    pub async fn fdb(&self, dev: &str) -> Result<BTreeSet<Fdb>> {
        let Some(link) = self.link(dev).await? else {
            return Ok(BTreeSet::new());
        };
        let mut out = BTreeSet::new();
        for m in self.neigh_dump(AddressFamily::Bridge, link.index).await? {
            let (mut dst, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => dst = Some(*i),
                    // In a bridge-family dump the decoder cannot know NDA_DST's
                    // family and hands over raw bytes; 4 of them are IPv4.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                    }
                    NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                        mac = Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
                    }
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                if mac.0 != [0; 6] {
                    out.insert(Fdb {
                        mac,
                        dst,
                        dev: dev.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// `bridge fdb replace MAC dev DEV dst DST self permanent`
    pub async fn add_fdb(&self, f: &Fdb) -> Result<()> {
        let link = self.need_link(&f.dev).await?;
        let mut r = self
            .handle
            .neighbours()
            .add_bridge(link.index, &f.mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace();
        r.message_mut()
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                f.dst,
            )));
        r.execute().await.map_err(req(format!(
            "bridge fdb replace {} dev {} dst {}",
            f.mac, f.dev, f.dst
        )))
    }

    /// `bridge fdb del MAC dev DEV dst DST self`; an entry already gone is fine.
    pub async fn del_fdb(&self, f: &Fdb) -> Result<()> {
        let Some(link) = self.link(&f.dev).await? else {
            return Ok(());
        };
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = link.index;
        m.header.flags = NeighbourFlags::Own;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                f.dst,
            )));
        match self.handle.neighbours().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), ENOENT | ESRCH) => Ok(()),
            Err(e) => Err(req(format!("bridge fdb del {} dev {}", f.mac, f.dev))(e)),
        }
    }

    /// Create a veth pair whose peer is born inside another namespace, so
    /// the peer's name (usually `eth0`) never clashes with this one's links.
    /// Equivalent: `ip link add HOST mtu MTU type veth peer name PEER netns NETNS mtu MTU`.
    pub async fn add_veth_into(
        &self,
        host: &str,
        peer: &str,
        netns: &std::fs::File,
        mtu: u32,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let what = if errno_of(&e) == EEXIST {
                    " (a link of that name exists)"
                } else {
                    ""
                };
                Err(NetlinkError::Request {
                    op: format!("ip link add {host} type veth peer name {peer} netns ...{what}"),
                    source: e,
                })
            }
        }
    }
}

/// Make every socket in the calling thread's network namespace look its
/// route up again on its next packet, and so take up a link's new GSO size
/// (see [`Netlink::set_ipv4_max_sizes`]); routes themselves are untouched.
/// Equivalent: `ip -4 route flush cache` (the file is per namespace).
pub fn flush_route_cache() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/route/flush", "1")
}

/// Run `f` on a thread inside the network namespace at `netns` (e.g. a
/// pod's `/run/netns/NAME`). Equivalent: `ip netns exec NETNS ...`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns_err = |source| NetlinkError::Netns {
        path: netns.display().to_string(),
        source,
    };
    let target = std::fs::File::open(netns).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(e.into()))?;
            // The thread ends here, so it never needs to go back.
            Ok(f())
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}

/// Enable IPv4 forwarding in the calling thread's network namespace.
/// Equivalent: `sysctl -w net.ipv4.ip_forward=1` (the file is per namespace).
pub fn enable_ip_forwarding() -> std::io::Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(p, "1")
}
