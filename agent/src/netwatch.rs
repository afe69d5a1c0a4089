//! Kernel notifications of change (rtnetlink: links, addresses, IPv4 routes, neighbour and FDB
//! entries; nf_tables: our `ip meshnet` table's chains, rules, sets and elements) in the node
//! namespace and in every namespace the agent owns, so that drift is repaired when it happens
//! instead of at the next timer pass (which stays as the backstop).
//!
//! Each namespace's socket is opened on a thread inside it (a socket stays in the namespace it
//! was made in) and then read from the runtime: no tokio worker changes namespace. A socket
//! keeps its namespace alive, so a watch ends before the agent deletes its namespace, and when
//! the namespace's file goes or names another namespace.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use firewall::nfnl::{our_table_changes, NFNLGRP_NFTABLES};
use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAttribute, RouteHeader};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{
    protocols::{NETLINK_NETFILTER, NETLINK_ROUTE},
    Socket, SocketAddr,
};
use netns::Netns;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::names::GWBRIDGE;

// rtnetlink multicast groups (linux/rtnetlink.h).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

/// A change the agent may have to repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The namespace's file name, or `node`.
    pub netns: String,
    /// What changed, for the log (e.g. `link veth1234567 deleted`).
    pub what: String,
    /// Our nftables table there changed: it must be compared with what it should be, which
    /// the passes otherwise do only every so often.
    pub nft: bool,
}

/// A namespace's sockets, each with what it carries.
type Sockets = Vec<(Socket, Source)>;

/// Which notifications a socket carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// rtnetlink; in the node namespace only some objects are ours.
    Route {
        node: bool,
    },
    Nft,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("subscribe to rtnetlink notifications in {netns}: {source}")]
    Subscribe {
        netns: String,
        #[source]
        source: io::Error,
    },
}

/// The watches of the node namespace and of the namespaces in the agent's dir.
pub struct Watcher {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Change>,
    node: Vec<JoinHandle<()>>,
    /// By namespace file name: the inode watched, and the tasks reading its sockets.
    watched: BTreeMap<String, (u64, Vec<JoinHandle<()>>)>,
}

impl Watcher {
    /// Watches the node namespace now; the agent's own namespaces on [`Watcher::sync`].
    pub fn new(
        node: &Netns,
        dir: &Path,
    ) -> Result<(Watcher, mpsc::UnboundedReceiver<Change>), WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let node = subscribe(node, "node", true)?
            .into_iter()
            .map(|(sock, source)| tokio::spawn(read(sock, "node".into(), source, tx.clone())))
            .collect();
        let w = Watcher {
            dir: dir.to_path_buf(),
            tx,
            node,
            watched: BTreeMap::new(),
        };
        Ok((w, rx))
    }

    /// The namespaces watched now, name → inode.
    pub fn watched(&self) -> BTreeMap<String, u64> {
        self.watched
            .iter()
            .map(|(name, (inode, _))| (name.clone(), *inode))
            .collect()
    }

    /// Ends the watch of each namespace that is not in `current` (name → inode) as watched.
    pub async fn retain(&mut self, current: &BTreeMap<String, u64>) {
        let stale: Vec<String> = self
            .watched
            .iter()
            .filter(|(name, (inode, _))| current.get(*name) != Some(inode))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.forget(&name).await;
        }
    }

    /// Ends the watch of `name` and closes its socket before returning, so that the namespace
    /// can go.
    pub async fn forget(&mut self, name: &str) {
        if let Some((_, tasks)) = self.watched.remove(name) {
            for task in tasks {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Watches every namespace in the agent's dir not watched yet.
    pub async fn sync(&mut self) {
        let dir = self.dir.clone();
        let known = self.watched();
        let opened = tokio::task::spawn_blocking(move || open_new(&dir, &known)).await;
        let opened = match opened {
            Ok(v) => v,
            Err(panicked) => {
                warn!("watch the agent's namespaces: {panicked}");
                return;
            }
        };
        for (name, inode, socks) in opened {
            // A namespace replaced under the same name: the old watch goes.
            self.forget(&name).await;
            let tasks = socks
                .into_iter()
                .map(|(sock, source)| {
                    tokio::spawn(read(sock, name.clone(), source, self.tx.clone()))
                })
                .collect();
            self.watched.insert(name, (inode, tasks));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for task in self
            .node
            .iter()
            .chain(self.watched.values().flat_map(|(_, t)| t))
        {
            task.abort();
        }
    }
}

/// Sockets for the namespaces in `dir` that `known` lacks (or knows by another inode).
fn open_new(dir: &Path, known: &BTreeMap<String, u64>) -> Vec<(String, u64, Sockets)> {
    let paths = match netns::list(dir) {
        Ok(p) => p,
        Err(e) => {
            warn!("list the agent's namespaces to watch: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Gone since the listing: nothing to watch.
        let Ok(ns) = Netns::open(&path) else { continue };
        let Ok(inode) = ns.inode() else { continue };
        if known.get(&name) == Some(&inode) {
            continue;
        }
        match subscribe(&ns, &name, false) {
            Ok(socks) => out.push((name, inode, socks)),
            Err(e) => warn!("{e}; drift there is found by the timer pass"),
        }
    }
    out
}

/// Non-blocking sockets in `ns`, subscribed to the groups the agent's objects live in: one for
/// rtnetlink, one for nf_tables.
fn subscribe(ns: &Netns, label: &str, node: bool) -> Result<Sockets, WatchError> {
    let err = |source| WatchError::Subscribe {
        netns: label.to_string(),
        source,
    };
    ns.run(|| -> io::Result<Sockets> {
        let mut route = Socket::new(NETLINK_ROUTE)?;
        let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE;
        route.bind(&SocketAddr::new(0, groups))?;
        route.set_non_blocking(true)?;
        let mut nft = Socket::new(NETLINK_NETFILTER)?;
        nft.bind(&SocketAddr::new(0, 0))?;
        nft.add_membership(NFNLGRP_NFTABLES)?;
        nft.set_non_blocking(true)?;
        Ok(vec![(route, Source::Route { node }), (nft, Source::Nft)])
    })?
    .map_err(err)
}

async fn read(sock: Socket, netns: String, source: Source, tx: mpsc::UnboundedSender<Change>) {
    // SAFETY: the socket owns its descriptor, which stays open and the same until it drops.
    let fd = match unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(%netns, "watch for changes: {e}; drift there is found by the timer pass");
            return;
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                warn!(%netns, "watch for changes: {e}; drift there is found by the timer pass");
                return;
            }
        };
        buf.clear();
        let found = match guard.try_io(|s| s.get_ref().recv(&mut buf, 0)) {
            Err(_would_block) => continue,
            Ok(Ok(_)) => match source {
                Source::Route { node } => parse(&buf, node),
                Source::Nft => our_table_changes(&buf),
            },
            // The socket overflowed: something changed, we do not know what.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                vec!["notifications lost".into()]
            }
            Ok(Err(e)) => {
                warn!(%netns, "watch for changes: {e}; drift there is found by the timer pass");
                return;
            }
        };
        for what in found {
            debug!(%netns, %what, "kernel change");
            let change = Change {
                netns: netns.clone(),
                what,
                nft: source == Source::Nft,
            };
            if tx.send(change).is_err() {
                return;
            }
        }
    }
}

/// The changes in one datagram of notifications that may concern the agent's objects.
fn parse(datagram: &[u8], node: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while let Ok(buf) = NetlinkBuffer::new_checked(rest) {
        let len = buf.length() as usize;
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                out.extend(relevant(&m, node));
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        if next == 0 || next >= rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    out
}

/// Whether a notification may concern the agent. In its own namespaces every link, address and
/// main-table route is the agent's, and so is every permanent neighbour or FDB entry (the ones
/// learnt from traffic come and go by themselves). In the node namespace only its own links
/// are, plus the addresses and routes its subnets must not clash with.
fn relevant(m: &RouteNetlinkMessage, node: bool) -> Option<String> {
    use RouteNetlinkMessage::*;
    let (verb, what) = match m {
        NewLink(l) | DelLink(l) => {
            let name = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.as_str()),
                _ => None,
            })?;
            if node && name != GWBRIDGE && !name.starts_with("mgw") {
                return None;
            }
            (matches!(m, NewLink(_)), format!("link {name}"))
        }
        NewAddress(a) | DelAddress(a) => (
            matches!(m, NewAddress(_)),
            format!("address on link {}", a.header.index),
        ),
        NewRoute(r) | DelRoute(r) => {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                return None;
            }
            (
                matches!(m, NewRoute(_)),
                format!("route to prefix /{}", r.header.destination_prefix_length),
            )
        }
        NewNeighbour(n) | DelNeighbour(n) => {
            if node || n.header.state != NeighbourState::Permanent {
                return None;
            }
            (
                matches!(m, NewNeighbour(_)),
                format!("neighbour/fdb entry on link {}", n.header.ifindex),
            )
        }
        _ => return None,
    };
    Some(format!(
        "{what} {}",
        if verb { "added or changed" } else { "deleted" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::neighbour::NeighbourMessage;
    use netlink_packet_route::route::RouteMessage;

    fn link(name: &str) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l
    }

    fn neigh(state: NeighbourState) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.state = state;
        n.header.ifindex = 7;
        n
    }

    fn route(table: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.table = table;
        r
    }

    #[test]
    fn in_the_node_namespace_only_our_links_and_the_addresses_and_routes_count() {
        use RouteNetlinkMessage::*;
        assert_eq!(
            relevant(&DelLink(link("mgw1234567")), true).as_deref(),
            Some("link mgw1234567 deleted")
        );
        assert!(relevant(&NewLink(link(GWBRIDGE)), true).is_some());
        assert_eq!(relevant(&NewLink(link("docker0")), true), None);
        assert!(relevant(&NewAddress(Default::default()), true).is_some());
        assert!(relevant(&DelRoute(route(RouteHeader::RT_TABLE_MAIN)), true).is_some());
        assert_eq!(relevant(&NewRoute(route(255)), true), None, "local table");
        assert_eq!(
            relevant(&DelNeighbour(neigh(NeighbourState::Permanent)), true),
            None
        );
    }

    #[test]
    fn in_our_namespaces_every_link_and_permanent_entry_counts() {
        use RouteNetlinkMessage::*;
        assert!(relevant(&DelLink(link("veth1234567")), false).is_some());
        assert_eq!(
            relevant(&DelNeighbour(neigh(NeighbourState::Permanent)), false).as_deref(),
            Some("neighbour/fdb entry on link 7 deleted")
        );
        // Learnt from traffic: ARP and bridge learning churn by themselves.
        assert_eq!(
            relevant(&NewNeighbour(neigh(NeighbourState::Reachable)), false),
            None
        );
        assert_eq!(
            relevant(&DelNeighbour(neigh(NeighbourState::Stale)), false),
            None
        );
    }

    #[test]
    fn every_message_of_a_datagram_is_read() {
        let mut datagram = Vec::new();
        for m in [
            RouteNetlinkMessage::DelLink(link("eth1")),
            RouteNetlinkMessage::NewNeighbour(neigh(NeighbourState::Reachable)),
            RouteNetlinkMessage::DelRoute(route(RouteHeader::RT_TABLE_MAIN)),
        ] {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
            msg.finalize();
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            datagram.extend(buf);
        }
        assert_eq!(
            parse(&datagram, false),
            ["link eth1 deleted", "route to prefix /0 deleted"]
        );
        assert!(parse(&[1, 2, 3], false).is_empty(), "garbage is ignored");
    }
}
