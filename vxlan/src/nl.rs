//! rtnetlink sessions inside a namespace, and the requests this crate makes.
//!
//! A netlink socket acts on the namespace it was created in, and `setns` applies to one
//! thread, so every session runs on a fresh thread inside the namespace
//! ([`Netns::run`]) with its own current-thread tokio runtime: no tokio worker thread
//! ever changes namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netns::Netns;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::{Error, MacAddr, PeerAction, Result};

const ENOENT: i32 = 2;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

/// How errors name a namespace: its file name, or `net:[inode]` for one opened
/// through /proc (such as [`Netns::current`]), whose path means another thing elsewhere.
pub(crate) fn label(ns: &Netns) -> String {
    if ns.path().starts_with("/proc") {
        match ns.inode() {
            Ok(ino) => format!("net:[{ino}]"),
            Err(_) => ns.path().display().to_string(),
        }
    } else {
        ns.name()
    }
}

/// A file descriptor on `ns`, for moving links into it. Opened from inside the namespace
/// because `Netns` does not lend its own descriptor and its path may be thread-relative.
pub(crate) fn ns_file(ns: &Netns) -> Result<File> {
    ns.run(|| File::open("/proc/thread-self/ns/net"))?
        .map_err(|source| Error::Kernel {
            op: "open a handle on the namespace".into(),
            ns: label(ns),
            source,
        })
}

/// Runs `f` with a netlink session inside `ns`, on a dedicated thread.
pub(crate) fn run<T, F, Fut>(ns: &Netns, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Nl) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    let ns_label = label(ns);
    ns.run(move || {
        let kernel = |op: &str, source| Error::Kernel {
            op: op.into(),
            ns: ns_label.clone(),
            source,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| kernel("start a netlink runtime", e))?;
        rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| kernel("open a netlink socket", e))?;
            let conn = tokio::spawn(conn);
            let out = f(Nl {
                h: handle,
                ns: ns_label.clone(),
            })
            .await;
            conn.abort();
            out
        })
    })?
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other),
    }
}

/// A netlink session in one namespace; errors carry the namespace's label.
pub(crate) struct Nl {
    h: Handle,
    ns: String,
}

impl Nl {
    /// The namespace's label, for logs.
    pub(crate) fn ns(&self) -> &str {
        &self.ns
    }

    pub(crate) fn fail(&self, op: impl Into<String>, e: rtnetlink::Error) -> Error {
        Error::Kernel {
            op: op.into(),
            ns: self.ns.clone(),
            source: to_io(e),
        }
    }

    pub(crate) fn missing(&self, op: impl Into<String>, what: impl Into<String>) -> Error {
        Error::Missing {
            op: op.into(),
            ns: self.ns.clone(),
            what: what.into(),
        }
    }

    pub(crate) fn conflict(&self, op: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Conflict {
            op: op.into(),
            ns: self.ns.clone(),
            reason: reason.into(),
        }
    }

    /// The link called `name`, if there is one.
    pub(crate) async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        let got: std::result::Result<Vec<_>, _> = self
            .h
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_collect()
            .await;
        match got {
            Ok(mut v) => Ok(v.pop()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(self.fail(format!("look up link {name}"), e)),
        }
    }

    /// The link called `name`, which `op` needs.
    pub(crate) async fn require_link(&self, name: &str, op: &str) -> Result<LinkMessage> {
        self.link(name)
            .await?
            .ok_or_else(|| self.missing(op, format!("link {name}")))
    }

    /// The bridge called `name`, which `op` needs.
    pub(crate) async fn require_bridge(&self, name: &str, op: &str) -> Result<u32> {
        let m = self.require_link(name, op).await?;
        if kind(&m) != Some(&InfoKind::Bridge) {
            return Err(self.conflict(op, format!("{name} is not a bridge")));
        }
        Ok(m.header.index)
    }

    pub(crate) async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.fail("list links", e))
    }

    pub(crate) async fn add_link(&self, msg: LinkMessage, op: &str) -> Result<()> {
        self.h
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.fail(op, e))
    }

    pub(crate) async fn set_link(&self, msg: LinkMessage, op: &str) -> Result<()> {
        self.h
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| self.fail(op, e))
    }

    /// Deletes a link; one that is already gone is fine.
    pub(crate) async fn del_link(&self, index: u32, name: &str) -> Result<()> {
        match self.h.link().del(index).execute().await {
            Err(e) if errno(&e) != Some(ENODEV) => Err(self.fail(format!("delete link {name}"), e)),
            _ => Ok(()),
        }
    }

    /// Sets MTU, master and up on a bridge port.
    pub(crate) async fn configure_port(
        &self,
        index: u32,
        name: &str,
        bridge: u32,
        mtu: u32,
    ) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .mtu(mtu)
            .controller(bridge)
            .up()
            .build();
        self.set_link(msg, &format!("set mtu {mtu}, master and up on {name}"))
            .await
    }

    /// Every IPv4 address in the namespace, with its link index.
    pub(crate) async fn addrs_v4(&self) -> Result<Vec<(u32, Ipv4Net)>> {
        Ok(self
            .addr_messages()
            .await?
            .iter()
            .filter_map(addr_v4)
            .collect())
    }

    async fn addr_messages(&self) -> Result<Vec<AddressMessage>> {
        self.h
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.fail("list addresses", e))
    }

    /// Makes `nets` exactly the IPv4 addresses on the link, the first added first (it is the
    /// primary one of its subnet).
    pub(crate) async fn set_addrs(&self, index: u32, name: &str, nets: &[Ipv4Net]) -> Result<()> {
        for m in self.addr_messages().await? {
            let Some((i, other)) = addr_v4(&m) else {
                continue;
            };
            if i != index || nets.contains(&other) {
                continue;
            }
            match self.h.address().del(m).execute().await {
                Err(e) if !matches!(errno(&e), Some(ENODEV | EADDRNOTAVAIL)) => {
                    return Err(self.fail(format!("delete address {other} from {name}"), e))
                }
                _ => {}
            }
        }
        for net in nets {
            self.h
                .address()
                .add(index, IpAddr::V4(net.addr()), net.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(|e| self.fail(format!("add address {net} to {name}"), e))?;
        }
        Ok(())
    }

    /// The IPv4 routes of the main table.
    pub(crate) async fn routes_v4(&self) -> Result<Vec<RouteMessage>> {
        let msgs: Vec<RouteMessage> = self
            .h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.fail("list routes", e))?;
        // Without strict checking the kernel dumps every table: keep main's unicast routes.
        Ok(msgs
            .into_iter()
            .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .filter(|m| m.header.kind == RouteType::Unicast)
            .collect())
    }

    /// Makes the default route go via `gateway` on link `index` (`ip route replace default`).
    pub(crate) async fn replace_default_route(
        &self,
        index: u32,
        name: &str,
        gateway: Ipv4Addr,
    ) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .gateway(gateway)
            .build();
        self.h
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| self.fail(format!("set the default route via {gateway} on {name}"), e))
    }

    pub(crate) async fn neighbours(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
        let what = if family == AddressFamily::Bridge {
            "list fdb entries"
        } else {
            "list neighbours"
        };
        self.h
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.fail(what, e))
    }

    /// Applies one peer action to VXLAN device `dev` (index `index`). Adds replace what
    /// is there and deletes accept a missing entry, so applying twice changes nothing.
    pub(crate) async fn peer_action(
        &self,
        index: u32,
        dev: &str,
        action: PeerAction,
    ) -> Result<()> {
        let neigh = self.h.neighbours();
        let res = match action {
            PeerAction::AddNeigh { ip, mac } => {
                neigh
                    .add(index, IpAddr::V4(ip))
                    .link_layer_address(&mac.0)
                    .replace()
                    .execute()
                    .await
            }
            PeerAction::AddFdb { mac, vtep } => {
                neigh
                    .add_bridge(index, &mac.0)
                    .flags(NeighbourFlags::Own)
                    .destination(IpAddr::V4(vtep))
                    .replace()
                    .execute()
                    .await
            }
            PeerAction::DelNeigh { ip } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
                neigh.del(m).execute().await
            }
            PeerAction::DelFdb { mac, vtep } => {
                let mut m = fdb_message(index, mac, NeighbourFlags::Own);
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        vtep,
                    )));
                neigh.del(m).execute().await
            }
            PeerAction::DelBridgeFdb { mac } => {
                neigh
                    .del(fdb_message(index, mac, NeighbourFlags::Controller))
                    .execute()
                    .await
            }
        };
        match res {
            Err(e) if errno(&e) != Some(ENOENT) => Err(self.fail(format!("{action} on {dev}"), e)),
            _ => Ok(()),
        }
    }
}

/// The link index and IPv4 address of an address message (IFA_LOCAL: our own address,
/// also on point-to-point links where IFA_ADDRESS is the peer's).
fn addr_v4(m: &AddressMessage) -> Option<(u32, Ipv4Net)> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    })?;
    Some((m.header.index, Ipv4Net::new(ip, m.header.prefix_len).ok()?))
}

/// A route's table: RTA_TABLE when present (ids above 255 live only there), else the header's.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// The destination, gateway and output link index of an IPv4 route.
pub(crate) fn route_fields(m: &RouteMessage) -> (Option<Ipv4Net>, Option<Ipv4Addr>, Option<u32>) {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst, m.header.destination_prefix_length).ok();
    (dst, gateway, oif)
}

fn fdb_message(index: u32, mac: MacAddr, flags: NeighbourFlags) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.flags = flags;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m
}

pub(crate) fn name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) fn kind(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The MAC and VTEP of a neighbour message, parsed as IPv4 where the family leaves the
/// destination raw (AF_BRIDGE FDB entries).
pub(crate) fn neigh_fields(m: &NeighbourMessage) -> (Option<MacAddr>, Option<Ipv4Addr>) {
    let mut mac = None;
    let mut dst = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(b) => mac = MacAddr::from_slice(b),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            _ => {}
        }
    }
    (mac, dst)
}
