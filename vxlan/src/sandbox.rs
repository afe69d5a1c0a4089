//! The kernel side: a per-network sandbox namespace and what lives in it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use netns::Netns;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkUnspec, LinkVeth, LinkVxlan};
use tracing::{debug, info};

use crate::nl::{self, Nl};
use crate::{
    host_ifname, plan_peers, Error, FdbEntry, FdbOwner, MacAddr, NeighEntry, PeerAction,
    RemotePeer, Result,
};

/// The IANA VXLAN port, Swarm's default `--data-path-port`.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// The bridge of one overlay subnet inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Usually `br0`.
    pub name: String,
    /// The subnet's gateway address and prefix, e.g. 10.0.0.1/24.
    pub gateway: Ipv4Net,
    /// The overlay MTU ([`crate::overlay_mtu`]).
    pub mtu: u32,
}

impl BridgeConfig {
    pub fn new(gateway: Ipv4Net, mtu: u32) -> BridgeConfig {
        BridgeConfig {
            name: "br0".into(),
            gateway,
            mtu,
        }
    }

    /// The bridge's own MAC: Swarm's endpoint form of its gateway address.
    pub fn mac(&self) -> MacAddr {
        MacAddr::from_ipv4(self.gateway.addr())
    }

    fn validate(&self) -> Result<()> {
        check_ifname(&self.name)?;
        check_mtu(self.mtu)
    }
}

/// The VXLAN device of one overlay subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// The name inside the sandbox, usually `vxlan0`.
    pub name: String,
    /// The bridge it becomes a port of.
    pub bridge: String,
    /// 24-bit VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port, [`DEFAULT_VXLAN_PORT`] unless configured.
    pub port: u16,
    pub mtu: u32,
}

impl VxlanConfig {
    /// `vxlan0` on `br0`, port 4789.
    pub fn new(vni: u32, mtu: u32) -> VxlanConfig {
        VxlanConfig {
            name: "vxlan0".into(),
            bridge: "br0".into(),
            vni,
            port: DEFAULT_VXLAN_PORT,
            mtu,
        }
    }

    fn validate(&self) -> Result<()> {
        check_ifname(&self.name)?;
        check_ifname(&self.bridge)?;
        check_mtu(self.mtu)?;
        if self.vni > 0xff_ffff {
            return Err(Error::Invalid(format!(
                "VNI {} does not fit in 24 bits",
                self.vni
            )));
        }
        if self.port == 0 {
            return Err(Error::Invalid("VXLAN port 0".into()));
        }
        Ok(())
    }

    fn matches(&self, s: &VxlanState) -> bool {
        s.vni == self.vni && s.port == self.port && !s.learning && s.proxy && s.underlay_elsewhere
    }
}

/// A task's leg on the overlay: a veth pair from the sandbox's bridge into the task's
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The bridge the sandbox end joins.
    pub bridge: String,
    /// The sandbox end's name ([`host_ifname`] of the task IP by default).
    pub host_ifname: String,
    /// The task end's name, e.g. `eth0`.
    pub ifname: String,
    /// The task's IP and the subnet prefix.
    pub addr: Ipv4Net,
    pub mac: MacAddr,
    pub mtu: u32,
    /// More addresses of the task end, besides `addr` (e.g. the /32 VIPs a load-balancer
    /// namespace answers for).
    pub aliases: Vec<Ipv4Net>,
}

impl EndpointConfig {
    /// An endpoint on `br0` named `ifname` in the task, with the Swarm MAC of its IP.
    pub fn new(ifname: &str, addr: Ipv4Net, mtu: u32) -> EndpointConfig {
        EndpointConfig {
            bridge: "br0".into(),
            host_ifname: host_ifname(addr.addr()),
            ifname: ifname.into(),
            addr,
            mac: MacAddr::from_ipv4(addr.addr()),
            mtu,
            aliases: Vec::new(),
        }
    }

    /// Every address of the task end, `addr` first.
    pub fn addrs(&self) -> Vec<Ipv4Net> {
        std::iter::once(self.addr)
            .chain(self.aliases.iter().copied())
            .collect()
    }

    fn validate(&self) -> Result<()> {
        check_ifname(&self.bridge)?;
        check_ifname(&self.host_ifname)?;
        check_ifname(&self.ifname)?;
        check_mtu(self.mtu)
    }
}

/// One link in the sandbox, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<MacAddr>,
    /// The bridge this link is a port of.
    pub master: Option<String>,
    pub addrs: Vec<Ipv4Net>,
    pub kind: LinkKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan(VxlanState),
    /// `peer_index` is the other end's index in its own namespace.
    Veth {
        peer_index: Option<u32>,
    },
    /// Any other kind (`lo` has none: an empty string).
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanState {
    pub vni: u32,
    pub port: u16,
    pub learning: bool,
    pub proxy: bool,
    /// The device's UDP socket lives in another namespace (the node's underlay), as it
    /// must; false for a device created inside the sandbox.
    pub underlay_elsewhere: bool,
}

/// An IPv4 unicast route of the main table, as observed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteEntry {
    /// `0.0.0.0/0` for the default route.
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// The output link's name.
    pub dev: Option<String>,
}

/// What the sandbox holds, for reconciliation with [`plan_peers`] and for checks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub links: Vec<LinkState>,
    /// IPv4 neighbour entries on VXLAN devices.
    pub neighs: Vec<NeighEntry>,
    /// FDB entries on VXLAN devices (their own and their bridge's).
    pub fdb: Vec<FdbEntry>,
    /// IPv4 unicast routes of the main table.
    pub routes: Vec<RouteEntry>,
}

impl Observed {
    pub fn link(&self, name: &str) -> Option<&LinkState> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Veth ends in the sandbox: the overlay legs of local endpoints.
    pub fn endpoints(&self) -> impl Iterator<Item = &LinkState> {
        self.links
            .iter()
            .filter(|l| matches!(l.kind, LinkKind::Veth { .. }))
    }
}

/// A per-network sandbox namespace (`1-<netid[:10]>` in Swarm) holding the overlay's
/// bridge, VXLAN device and the sandbox ends of local endpoints.
///
/// Every method is synchronous and does its netlink work on a dedicated thread inside
/// the namespace concerned. Calls for one sandbox should be serialized by the caller.
#[derive(Debug)]
pub struct Sandbox {
    ns: Netns,
}

impl Sandbox {
    /// Opens the sandbox `dir/name`, creating the namespace (with `lo` up) if needed.
    pub fn open_or_create(dir: &Path, name: &str) -> Result<Sandbox> {
        Ok(Sandbox {
            ns: Netns::open_or_create(dir, name)?,
        })
    }

    /// Opens an existing sandbox.
    pub fn open(dir: &Path, name: &str) -> Result<Sandbox> {
        Ok(Sandbox {
            ns: Netns::open(&dir.join(name))?,
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn name(&self) -> String {
        self.ns.name()
    }

    /// Ensures the bridge exists, holds exactly the gateway address, has the MTU and is up.
    pub fn ensure_bridge(&self, cfg: &BridgeConfig) -> Result<()> {
        cfg.validate()?;
        nl::run(&self.ns, |nl| async move {
            let op = format!("ensure bridge {}", cfg.name);
            let index = match nl.link(&cfg.name).await? {
                Some(m) if nl::kind(&m) == Some(&InfoKind::Bridge) => m.header.index,
                Some(_) => {
                    return Err(nl.conflict(op, format!("{} exists and is not a bridge", cfg.name)))
                }
                None => {
                    let msg = LinkBridge::new(&cfg.name).mtu(cfg.mtu).build();
                    nl.add_link(msg, &format!("create bridge {}", cfg.name))
                        .await?;
                    info!(sandbox = nl.ns(), bridge = %cfg.name, "created bridge");
                    nl.require_link(&cfg.name, &op).await?.header.index
                }
            };
            // A bridge without an address of its own takes its lowest port's, which changes
            // as tasks come and go; every neighbour that cached the old one then sends its
            // traffic for the gateway into a task's veth until it re-resolves (seconds of
            // black-holed replies on the published path). A fixed one, derived from the
            // gateway, never moves, also across agent restarts.
            let mac = cfg.mac();
            let msg = LinkUnspec::new_with_index(index)
                .address(mac.0.to_vec())
                .mtu(cfg.mtu)
                .up()
                .build();
            nl.set_link(
                msg,
                &format!("set address {mac}, mtu {} and up on {}", cfg.mtu, cfg.name),
            )
            .await?;
            nl.set_addrs(index, &cfg.name, &[cfg.gateway]).await
        })
    }

    /// Ensures the VXLAN device exists in the sandbox with the configured VNI and port,
    /// learning off and ARP proxy on, its UDP socket in `node` (the underlay namespace),
    /// as a port of its bridge, with the MTU, up. A device that differs is recreated.
    ///
    /// The device is created in `node` under a temporary name (`vx-<vni hex>-<tag>`) and
    /// moved in. It fails with EEXIST ([`Error::raw_os_error`]) while another device in
    /// `node`'s namespace holds the same VNI and port, e.g. in a stale sandbox.
    pub fn ensure_vxlan(&self, node: &Netns, cfg: &VxlanConfig) -> Result<()> {
        cfg.validate()?;
        let op = format!("ensure vxlan {} (vni {})", cfg.name, cfg.vni);
        let op = op.as_str();
        let ready = nl::run(&self.ns, |nl| async move {
            let bridge = nl.require_bridge(&cfg.bridge, op).await?;
            let Some(m) = nl.link(&cfg.name).await? else {
                return Ok(false);
            };
            match vxlan_state(&m) {
                Some(s) if cfg.matches(&s) => {
                    nl.configure_port(m.header.index, &cfg.name, bridge, cfg.mtu)
                        .await?;
                    Ok(true)
                }
                other => {
                    info!(sandbox = nl.ns(), link = %cfg.name, found = ?other, "replacing link that is not the wanted vxlan");
                    nl.del_link(m.header.index, &cfg.name).await?;
                    Ok(false)
                }
            }
        })?;
        if ready {
            return Ok(());
        }

        let sandbox_file = nl::ns_file(&self.ns)?;
        let sandbox_fd = sandbox_file.as_raw_fd();
        let stale_prefix = format!("vx-{:06x}-", cfg.vni);
        let tmp = format!("{stale_prefix}{:04x}", unique_tag());
        let tmp = tmp.as_str();
        nl::run(node, |nl| async move {
            // A crash between creating and moving leaves such a device holding the VNI.
            for m in nl.links().await? {
                if let Some(name) = nl::name(&m).filter(|n| n.starts_with(&stale_prefix)) {
                    info!(
                        node = nl.ns(),
                        link = name,
                        "deleting stale temporary vxlan"
                    );
                    nl.del_link(m.header.index, name).await?;
                }
            }
            let msg = LinkVxlan::new(tmp, cfg.vni)
                .port(cfg.port)
                .learning(false)
                .proxy(true)
                .l2miss(false)
                .l3miss(false)
                .mtu(cfg.mtu)
                .build();
            nl.add_link(
                msg,
                &format!("create vxlan {tmp} (vni {} port {})", cfg.vni, cfg.port),
            )
            .await?;
            let index = nl.require_link(tmp, op).await?.header.index;
            let msg = LinkUnspec::new_with_index(index)
                .setns_by_fd(sandbox_fd)
                .build();
            if let Err(e) = nl
                .set_link(msg, &format!("move vxlan {tmp} into the sandbox"))
                .await
            {
                // Best effort: the move error is the one worth reporting.
                let _ = nl.del_link(index, tmp).await;
                return Err(e);
            }
            Ok(())
        })?;
        drop(sandbox_file);

        nl::run(&self.ns, |nl| async move {
            let index = nl.require_link(tmp, op).await?.header.index;
            let done = async {
                let rename = LinkUnspec::new_with_index(index)
                    .name(cfg.name.as_str())
                    .build();
                nl.set_link(rename, &format!("rename {tmp} to {}", cfg.name))
                    .await?;
                let bridge = nl.require_bridge(&cfg.bridge, op).await?;
                nl.configure_port(index, &cfg.name, bridge, cfg.mtu).await
            };
            if let Err(e) = done.await {
                // Best effort: a half-set device would hold the VNI until deleted.
                let _ = nl.del_link(index, tmp).await;
                return Err(e);
            }
            info!(sandbox = nl.ns(), link = %cfg.name, vni = cfg.vni, port = cfg.port, mtu = cfg.mtu, "created vxlan");
            Ok(())
        })
    }

    /// Ensures the endpoint: a veth pair whose sandbox end is a port of the bridge and
    /// whose task end, in `task`, has the name, MAC, MTU and exactly the address (and aliases), up.
    /// The pair is created in one request from inside the sandbox with the peer placed
    /// straight into `task`, so no name is ever taken in the node namespace. An existing
    /// pair is kept; ends that are not paired with each other are replaced.
    pub fn ensure_endpoint(&self, task: &Netns, cfg: &EndpointConfig) -> Result<()> {
        cfg.validate()?;
        let op = format!(
            "ensure endpoint {} ({} {})",
            cfg.host_ifname, cfg.ifname, cfg.addr
        );
        let op = op.as_str();
        let task_end = nl::run(task, |nl| async move {
            Ok(nl
                .link(&cfg.ifname)
                .await?
                .map(|m| (m.header.index, peer_index(&m))))
        })?;
        let host_end = nl::run(&self.ns, |nl| async move {
            Ok(nl
                .link(&cfg.host_ifname)
                .await?
                .map(|m| (m.header.index, peer_index(&m))))
        })?;
        let paired = matches!((task_end, host_end),
            (Some((t, Some(tp))), Some((h, Some(hp)))) if tp == h && hp == t);

        if !paired {
            if let Some((index, _)) = task_end {
                nl::run(
                    task,
                    |nl| async move { nl.del_link(index, &cfg.ifname).await },
                )?;
            }
            let task_file = nl::ns_file(task)?;
            let task_fd = task_file.as_raw_fd();
            nl::run(&self.ns, |nl| async move {
                if let Some((index, _)) = host_end {
                    nl.del_link(index, &cfg.host_ifname).await?;
                }
                let bridge = nl.require_bridge(&cfg.bridge, op).await?;
                let peer = LinkUnspec::new_with_name(&cfg.ifname)
                    .address(cfg.mac.0.to_vec())
                    .mtu(cfg.mtu)
                    .setns_by_fd(task_fd)
                    .build();
                let msg = LinkVeth::new(&cfg.host_ifname, &cfg.ifname)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .mtu(cfg.mtu)
                    .controller(bridge)
                    .up()
                    .build();
                nl.add_link(
                    msg,
                    &format!(
                        "create veth {} with peer {} in the task",
                        cfg.host_ifname, cfg.ifname
                    ),
                )
                .await?;
                debug!(sandbox = nl.ns(), link = %cfg.host_ifname, "created veth");
                Ok(())
            })?;
        }

        nl::run(task, |nl| async move {
            let index = nl.require_link(&cfg.ifname, op).await?.header.index;
            let msg = LinkUnspec::new_with_index(index)
                .address(cfg.mac.0.to_vec())
                .mtu(cfg.mtu)
                .up()
                .build();
            nl.set_link(
                msg,
                &format!(
                    "set address {}, mtu {} and up on {}",
                    cfg.mac, cfg.mtu, cfg.ifname
                ),
            )
            .await?;
            nl.set_addrs(index, &cfg.ifname, &cfg.addrs()).await
        })?;
        nl::run(&self.ns, |nl| async move {
            let index = nl.require_link(&cfg.host_ifname, op).await?.header.index;
            let bridge = nl.require_bridge(&cfg.bridge, op).await?;
            nl.configure_port(index, &cfg.host_ifname, bridge, cfg.mtu)
                .await
        })
    }

    /// Removes an endpoint by its sandbox end's name; deleting one end removes both.
    /// An endpoint that is already gone is fine.
    pub fn remove_endpoint(&self, host_ifname: &str) -> Result<()> {
        nl::run(&self.ns, |nl| async move {
            if let Some(m) = nl.link(host_ifname).await? {
                nl.del_link(m.header.index, host_ifname).await?;
            }
            Ok(())
        })
    }

    /// Makes the default route go via `gateway` on `ifname`, replacing any other one.
    pub fn ensure_default_route(&self, ifname: &str, gateway: Ipv4Addr) -> Result<()> {
        check_ifname(ifname)?;
        nl::run(&self.ns, |nl| async move {
            let op = format!("set the default route via {gateway}");
            let index = nl.require_link(ifname, &op).await?.header.index;
            nl.replace_default_route(index, ifname, gateway).await
        })
    }

    /// Lists the sandbox's links, its IPv4 main-table routes, and the neighbour and FDB
    /// entries of its VXLAN devices.
    pub fn observe(&self) -> Result<Observed> {
        nl::run(&self.ns, |nl| async move { observe(&nl).await })
    }

    /// Applies peer actions (from [`plan_peers`]) to VXLAN device `dev`, in order.
    pub fn apply_peers(&self, dev: &str, actions: &[PeerAction]) -> Result<()> {
        check_ifname(dev)?;
        nl::run(&self.ns, |nl| async move {
            let op = format!("program peers on {dev}");
            let m = nl.require_link(dev, &op).await?;
            if nl::kind(&m) != Some(&InfoKind::Vxlan) {
                return Err(nl.conflict(op, format!("{dev} is not a vxlan device")));
            }
            for &action in actions {
                nl.peer_action(m.header.index, dev, action).await?;
            }
            Ok(())
        })
    }

    /// Programs one remote peer: FDB entry to its VTEP, then its permanent neighbour entry.
    pub fn add_peer(&self, dev: &str, peer: &RemotePeer) -> Result<()> {
        self.apply_peers(
            dev,
            &[
                PeerAction::AddFdb {
                    mac: peer.mac,
                    vtep: peer.vtep,
                },
                PeerAction::AddNeigh {
                    ip: peer.ip,
                    mac: peer.mac,
                },
            ],
        )
    }

    /// Removes one remote peer's neighbour and FDB entries (and any bridge-learned entry
    /// for its MAC on the device).
    pub fn remove_peer(&self, dev: &str, peer: &RemotePeer) -> Result<()> {
        self.apply_peers(
            dev,
            &[
                PeerAction::DelNeigh { ip: peer.ip },
                PeerAction::DelFdb {
                    mac: peer.mac,
                    vtep: peer.vtep,
                },
                PeerAction::DelBridgeFdb { mac: peer.mac },
            ],
        )
    }

    /// Makes the peer entries on `dev` exactly `desired`: observes, plans, applies.
    /// Returns what it changed (empty when everything was already right).
    pub fn sync_peers(&self, dev: &str, desired: &[RemotePeer]) -> Result<Vec<PeerAction>> {
        let seen = self.observe()?;
        let actions = plan_peers(dev, desired, &seen.neighs, &seen.fdb);
        if !actions.is_empty() {
            debug!(sandbox = %self.name(), dev, changes = actions.len(), "syncing peers");
            self.apply_peers(dev, &actions)?;
        }
        Ok(actions)
    }

    /// Deletes the sandbox. Its VXLAN devices are deleted first: they would otherwise
    /// live on, holding their VNI in the node namespace, while anything still holds the
    /// namespace (a process, an open handle).
    pub fn delete(self) -> Result<()> {
        nl::run(&self.ns, |nl| async move {
            for m in nl.links().await? {
                if nl::kind(&m) == Some(&InfoKind::Vxlan) {
                    nl.del_link(m.header.index, nl::name(&m).unwrap_or("?"))
                        .await?;
                }
            }
            Ok(())
        })?;
        let path = self.ns.path().to_path_buf();
        drop(self);
        netns::delete(&path)?;
        Ok(())
    }
}

/// Deletes the sandbox `dir/name` ([`Sandbox::delete`]); one that is gone is fine.
pub fn delete_sandbox(dir: &Path, name: &str) -> Result<()> {
    match Sandbox::open(dir, name) {
        Ok(sandbox) => sandbox.delete(),
        // Nothing alive to empty; a leftover plain file is still removed.
        Err(_) => Ok(netns::delete(&dir.join(name))?),
    }
}

/// The MTU of the interface holding `ip` in `node` (the advertise address's interface).
pub fn underlay_mtu(node: &Netns, ip: IpAddr) -> Result<u32> {
    let IpAddr::V4(v4) = ip else {
        return Err(Error::Invalid(format!(
            "underlay address {ip}: only IPv4 underlays are supported"
        )));
    };
    nl::run(node, |nl| async move {
        let op = format!("find the MTU of the interface holding {ip}");
        let index = nl
            .addrs_v4()
            .await?
            .into_iter()
            .find(|(_, net)| net.addr() == v4)
            .map(|(index, _)| index)
            .ok_or_else(|| nl.missing(&op, format!("an interface with address {ip}")))?;
        nl.links()
            .await?
            .iter()
            .find(|m| m.header.index == index)
            .and_then(|m| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                })
            })
            .ok_or_else(|| nl.missing(&op, format!("the MTU of link {index}")))
    })
}

async fn observe(nl: &Nl) -> Result<Observed> {
    let msgs = nl.links().await?;
    let addrs = nl.addrs_v4().await?;
    let names: HashMap<u32, String> = msgs
        .iter()
        .filter_map(|m| Some((m.header.index, nl::name(m)?.to_string())))
        .collect();
    let mut links: Vec<LinkState> = msgs
        .iter()
        .filter_map(|m| link_state(m, &names, &addrs))
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    let vxlans: HashSet<u32> = links
        .iter()
        .filter(|l| matches!(l.kind, LinkKind::Vxlan(_)))
        .map(|l| l.index)
        .collect();

    let mut neighs: Vec<NeighEntry> = nl
        .neighbours(AddressFamily::Inet)
        .await?
        .iter()
        .filter(|m| vxlans.contains(&m.header.ifindex))
        .filter_map(|m| {
            let (mac, ip) = nl::neigh_fields(m);
            Some(NeighEntry {
                dev: names.get(&m.header.ifindex)?.clone(),
                ip: ip?,
                mac,
                permanent: m.header.state == NeighbourState::Permanent,
            })
        })
        .collect();
    neighs.sort();

    let mut fdb: Vec<FdbEntry> = nl
        .neighbours(AddressFamily::Bridge)
        .await?
        .iter()
        .filter(|m| vxlans.contains(&m.header.ifindex))
        .filter_map(|m| {
            let (mac, dst) = nl::neigh_fields(m);
            let owner = if m.header.flags.contains(NeighbourFlags::Own) {
                FdbOwner::Device
            } else if m.header.flags.contains(NeighbourFlags::Controller) {
                FdbOwner::Bridge
            } else {
                return None;
            };
            Some(FdbEntry {
                dev: names.get(&m.header.ifindex)?.clone(),
                mac: mac?,
                dst,
                owner,
                permanent: m.header.state == NeighbourState::Permanent,
            })
        })
        .collect();
    fdb.sort();

    let mut routes: Vec<RouteEntry> = nl
        .routes_v4()
        .await?
        .iter()
        .filter_map(|m| {
            let (dst, gateway, oif) = nl::route_fields(m);
            Some(RouteEntry {
                dst: dst?,
                gateway,
                dev: oif.and_then(|i| names.get(&i).cloned()),
            })
        })
        .collect();
    routes.sort();
    Ok(Observed {
        links,
        neighs,
        fdb,
        routes,
    })
}

fn link_state(
    m: &LinkMessage,
    names: &HashMap<u32, String>,
    addrs: &[(u32, Ipv4Net)],
) -> Option<LinkState> {
    let mut mtu = 0;
    let mut mac = None;
    let mut master = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::Address(b) => mac = MacAddr::from_slice(b),
            LinkAttribute::Controller(i) => master = names.get(i).cloned(),
            _ => {}
        }
    }
    let kind = match nl::kind(m) {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Vxlan) => LinkKind::Vxlan(vxlan_state(m)?),
        Some(InfoKind::Veth) => LinkKind::Veth {
            peer_index: peer_index(m),
        },
        Some(other) => LinkKind::Other(other.to_string()),
        None => LinkKind::Other(String::new()),
    };
    Some(LinkState {
        name: nl::name(m)?.to_string(),
        index: m.header.index,
        mtu,
        up: m.header.flags.contains(LinkFlags::Up),
        mac,
        master,
        addrs: addrs
            .iter()
            .filter(|(i, _)| *i == m.header.index)
            .map(|(_, net)| *net)
            .collect(),
        kind,
    })
}

fn vxlan_state(m: &LinkMessage) -> Option<VxlanState> {
    if nl::kind(m) != Some(&InfoKind::Vxlan) {
        return None;
    }
    let mut s = VxlanState {
        vni: 0,
        port: 0,
        learning: true,
        proxy: false,
        underlay_elsewhere: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::LinkNetNsId(_) => s.underlay_elsewhere = true,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    let LinkInfo::Data(InfoData::Vxlan(data)) = info else {
                        continue;
                    };
                    for d in data {
                        match d {
                            InfoVxlan::Id(v) => s.vni = *v,
                            InfoVxlan::Port(p) => s.port = *p,
                            InfoVxlan::Learning(b) => s.learning = *b,
                            InfoVxlan::Proxy(b) => s.proxy = *b,
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(s)
}

fn peer_index(m: &LinkMessage) -> Option<u32> {
    if nl::kind(m) != Some(&InfoKind::Veth) {
        return None;
    }
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// A tag for temporary names that differs between calls and processes, so two
/// creations never race for one name in the node namespace.
fn unique_tag() -> u16 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = nanos
        ^ std::process::id().rotate_left(16)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9);
    (mixed ^ (mixed >> 16)) as u16
}

/// Interface names: 1–15 bytes (IFNAMSIZ − 1), no '/', ':' or whitespace.
fn check_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid interface name {name:?}")))
    }
}

fn check_mtu(mtu: u32) -> Result<()> {
    if (68..=65535).contains(&mtu) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("MTU {mtu} is outside 68..=65535")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_validated_before_any_change() {
        let net: Ipv4Net = "10.0.0.5/24".parse().unwrap();
        assert!(EndpointConfig::new("eth0", net, 1450).validate().is_ok());
        assert!(EndpointConfig::new("eth0:1", net, 1450).validate().is_err());
        assert!(EndpointConfig::new("averyveryverylongname", net, 1450)
            .validate()
            .is_err());
        assert!(BridgeConfig::new(net, 40).validate().is_err());
        assert!(VxlanConfig::new(4096, 1450).validate().is_ok());
        assert!(VxlanConfig::new(1 << 24, 1450).validate().is_err());
        let mut zero_port = VxlanConfig::new(4096, 1450);
        zero_port.port = 0;
        assert!(zero_port.validate().is_err());
    }

    #[test]
    fn endpoint_defaults_follow_the_ip() {
        let cfg = EndpointConfig::new("eth0", "10.0.0.5/24".parse().unwrap(), 1450);
        assert_eq!(cfg.host_ifname, "veth0a000005");
        assert_eq!(cfg.mac.to_string(), "02:42:0a:00:00:05");
        assert_eq!(cfg.bridge, "br0");
    }

    #[test]
    fn temporary_names_fit_and_differ() {
        let a = format!("vx-{:06x}-{:04x}", 0xff_ffff, unique_tag());
        assert!(a.len() < 16);
        let tags: HashSet<u16> = (0..64).map(|_| unique_tag()).collect();
        assert!(tags.len() > 60);
    }

    #[test]
    fn an_existing_vxlan_is_kept_only_if_it_matches() {
        let cfg = VxlanConfig::new(4096, 1450);
        let good = VxlanState {
            vni: 4096,
            port: 4789,
            learning: false,
            proxy: true,
            underlay_elsewhere: true,
        };
        assert!(cfg.matches(&good));
        for bad in [
            VxlanState { vni: 4097, ..good },
            VxlanState { port: 8472, ..good },
            VxlanState {
                learning: true,
                ..good
            },
            VxlanState {
                proxy: false,
                ..good
            },
            VxlanState {
                underlay_elsewhere: false,
                ..good
            },
        ] {
            assert!(!cfg.matches(&bad), "{bad:?}");
        }
    }
}
