//! The pure planner: (desired assignment, task records, observed kernel state) → ordered actions.
//!
//! Rules (Swarm's overlay model, reference/swarm-dataplane.md §1):
//! - A task is *active* while it is in the assignment and not terminal. An active task has its
//!   namespace (named after the task), one veth endpoint per attachment (`eth0`, `eth1`, … in the
//!   task; `veth<7 hex>` on the sandbox's br0) and a process.
//! - A network's sandbox (`1-<netid[:10]>`) exists only while an active task uses it (lazy):
//!   `br0` with the gateway address, `vxlan0` (VNI, data-path port, no learning, proxy ARP, its
//!   socket in the node namespace) in br0, and a static neighbour + FDB entry for every remote
//!   endpoint (planned by [`vxlan::plan_peers`]).
//! - A task that left the assignment is stopped first; its namespace and the sandboxes it used
//!   stay untouched until its process is gone, then go like anything else not desired.
//! - Whatever the agent owns and the desired state does not name is removed; whatever is already
//!   right is left alone (no action), so adoption after a restart breaks nothing.
//! - Routing mesh (§2, §3): with a gwbridge, every active task (and `ingress_sbox`) gets one more
//!   leg, the next `ethN`, on the node's `mesh_gwbridge`, with the default route. With an
//!   ingress network, its sandbox exists even without tasks (not lazy), and so does
//!   `ingress_sbox` with `eth0` on it (holding the ingress VIPs as /32 aliases too).
//! - Service VIPs with IPVS (§4): every network in use with an lb address gets `lb_<name>`,
//!   like ingress_sbox but with no gwbridge leg: `eth0` on the network with the node's lb
//!   address and each VIP as a /32 alias, so tasks reach the VIPs by ARP on br0. vxlan0 never
//!   carries that ARP to other nodes: with `proxy` on, the driver answers ARP requests from
//!   its own neighbour table (remote endpoints only) and sends none over the wire, and no
//!   all-zeros FDB entry exists to flood to. Each node's own lb namespace answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::Ipv4Net;
use proto::agent::{Assignment, NetworkSpec, TaskSpec};
use vxlan::{LinkKind, LinkState, MacAddr, PeerAction, RemotePeer};

use proto::model::LbKind;

use crate::lifecycle::{Phase, TaskRecord};
use crate::mesh::{self, Gw};
use crate::names::{gw_veth_name, sandbox_name, veth_name, BRIDGE, GWBRIDGE, INGRESS_SBOX, VXLAN};
use crate::observe::{NsObs, Observed};

/// Node-wide settings the plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// MTU of every overlay link: vxlan0, br0 and both veth ends.
    pub mtu: u32,
    /// VXLAN UDP port.
    pub port: u16,
    /// This node's VTEP: peers behind it are local and never programmed.
    pub advertise_addr: IpAddr,
    /// IPVS balances VIPs: every network in use with an lb address gets its `lb_<name>`
    /// namespace. (The nftables balancer works in the tasks' own namespaces instead.)
    pub lb_namespaces: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGTERM, then SIGKILL after the grace period.
    StopTask {
        task: String,
    },
    /// Drop the record of a task that left the assignment and no longer runs.
    ForgetTask {
        task: String,
    },
    /// Kill whatever still runs inside, delete its VXLAN devices, unmount, remove the file.
    DeleteNetns {
        name: String,
    },
    DeleteLink {
        netns: String,
        link: String,
    },
    CreateNetns {
        name: String,
    },
    /// Bind the namespace of a running task's process to its file again (the file was removed
    /// or replaced while the process kept its namespace).
    RebindNetns {
        task: String,
        pid: u32,
    },
    /// br0 exists, is up, has the MTU and exactly the gateway address.
    EnsureBridge {
        sandbox: String,
        gateway: Ipv4Net,
        mtu: u32,
    },
    /// vxlan0 exists as configured (recreated if its VNI, port or flags differ), in br0, up.
    EnsureVxlan {
        sandbox: String,
        vni: u32,
        port: u16,
        mtu: u32,
    },
    /// Static neighbour and FDB changes on vxlan0, in order.
    Peers {
        sandbox: String,
        changes: Vec<PeerAction>,
    },
    /// A veth pair: `veth` in the sandbox on br0, `ifname` in the task with its MAC and
    /// exactly its address and aliases.
    EnsureEndpoint {
        sandbox: String,
        veth: String,
        task: String,
        ifname: String,
        mac: MacAddr,
        addr: Ipv4Net,
        mtu: u32,
        /// /32 VIPs a load-balancer namespace answers for (ARP on br0 reaches it).
        aliases: Vec<Ipv4Net>,
    },
    StartTask {
        task: String,
    },
    /// The node's gwbridge exists, is up, has the MTU and exactly the gateway address.
    EnsureGwBridge {
        gateway: Ipv4Net,
        mtu: u32,
    },
    /// A veth pair: `veth` in the node on the gwbridge, `ifname` in `task` with its address and
    /// a default route via the gwbridge.
    EnsureGwLeg {
        veth: String,
        task: String,
        ifname: String,
        addr: Ipv4Net,
        gateway: std::net::Ipv4Addr,
        mtu: u32,
    },
    /// The default route in `task` via the gwbridge on its leg `ifname` (the leg is right).
    EnsureDefaultRoute {
        task: String,
        ifname: String,
        gateway: std::net::Ipv4Addr,
    },
    /// Removes one of the agent's own links from the node namespace.
    DeleteNodeLink {
        link: String,
    },
}

impl Action {
    /// What kind of object the action makes right, for logs and the repair metric.
    pub fn kind(&self) -> &'static str {
        use Action::*;
        match self {
            StopTask { .. } | ForgetTask { .. } | StartTask { .. } => "task",
            DeleteNetns { .. } | CreateNetns { .. } | RebindNetns { .. } => "netns",
            DeleteLink { .. } | DeleteNodeLink { .. } => "link",
            EnsureBridge { .. } | EnsureGwBridge { .. } => "bridge",
            EnsureVxlan { .. } => "vxlan",
            Peers { .. } => "fdb_neigh",
            EnsureEndpoint { .. } | EnsureGwLeg { .. } => "veth",
            EnsureDefaultRoute { .. } => "route",
        }
    }

    /// The namespaces (or tasks) an action works on: when one fails, later actions on the same
    /// objects are skipped until the next pass.
    pub fn scopes(&self) -> Vec<&str> {
        use Action::*;
        match self {
            StopTask { task } | ForgetTask { task } | StartTask { task } => vec![task],
            RebindNetns { task, .. } => vec![task],
            DeleteNetns { name } | CreateNetns { name } => vec![name],
            DeleteLink { netns, .. } => vec![netns],
            EnsureBridge { sandbox, .. } | EnsureVxlan { sandbox, .. } | Peers { sandbox, .. } => {
                vec![sandbox]
            }
            EnsureEndpoint { sandbox, task, .. } => vec![sandbox, task],
            EnsureGwBridge { .. } | DeleteNodeLink { .. } => vec![GWBRIDGE],
            EnsureGwLeg { task, .. } => vec![GWBRIDGE, task],
            EnsureDefaultRoute { task, .. } => vec![task],
        }
    }
}

/// Actions in a safe order: stops, then removals (so a reused VNI or name is free), then
/// creations (namespaces, sandboxes, endpoints), then process starts, then forgetting records.
#[derive(Default)]
struct Plan {
    stop: Vec<Action>,
    delete: Vec<Action>,
    create: Vec<Action>,
    start: Vec<Action>,
    /// Last: a task's record goes once its namespace is gone.
    forget: Vec<Action>,
}

pub fn plan(
    desired: &Assignment,
    records: &BTreeMap<String, TaskRecord>,
    observed: &Observed,
    settings: &Settings,
    gw: Option<&Gw>,
) -> Vec<Action> {
    let mut p = Plan::default();
    let empty = NsObs::default();
    let ingress = desired.ingress.as_ref();
    let networks: BTreeMap<&str, &NetworkSpec> = desired
        .networks
        .iter()
        .chain(ingress.map(|i| &i.network))
        .map(|n| (n.id.as_str(), n))
        .collect();
    let desired_tasks: BTreeSet<&str> = desired.tasks.iter().map(|t| t.name.as_str()).collect();

    let terminal = |name: &str| {
        matches!(
            records.get(name),
            Some(TaskRecord {
                phase: Phase::Exited { .. },
                ..
            })
        )
    };
    let active: Vec<&TaskSpec> = desired
        .tasks
        .iter()
        .filter(|t| !terminal(&t.name))
        .collect();

    // Tasks that left the assignment but whose process still runs: stop them, and keep their
    // namespace and sandboxes as they are until the process is gone.
    let mut kept_ns: BTreeSet<String> = BTreeSet::new();
    let mut draining_veths: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut draining_gw_legs: BTreeSet<String> = BTreeSet::new();
    for (name, rec) in records {
        if desired_tasks.contains(name.as_str()) {
            continue;
        }
        match rec.phase {
            Phase::Running { .. } => {
                p.stop.push(Action::StopTask { task: name.clone() });
                kept_ns.insert(name.clone());
                draining_gw_legs.insert(gw_veth_name(name));
                for att in &rec.spec.attachments {
                    let sb = sandbox_name(&att.network_id);
                    draining_veths
                        .entry(sb.clone())
                        .or_default()
                        .insert(veth_name(name, &att.network_id));
                    if !active.iter().any(|t| uses(t, &att.network_id)) {
                        kept_ns.insert(sb);
                    }
                }
            }
            Phase::Starting | Phase::Exited { .. } => {
                p.forget.push(Action::ForgetTask { task: name.clone() })
            }
        }
    }

    // Networks in use by an active task, by sandbox name; the ingress network always.
    let used = mesh::overlay_networks(desired, &active);

    let mut wanted_ns: BTreeSet<String> = used.keys().cloned().collect();
    wanted_ns.extend(active.iter().map(|t| t.name.clone()));
    // ingress_sbox: like a task with one attachment (eth0 on ingress), but no process; it
    // holds the ingress VIPs too.
    let sbox = ingress.map(|i| one_leg(INGRESS_SBOX, &i.network.id, i.sbox_addr));
    let sbox_aliases = mesh::sbox_state(desired, LbKind::Ipvs)
        .map(|st| mesh::vip_aliases(&st))
        .unwrap_or_default();
    wanted_ns.extend(sbox.iter().map(|s| s.name.clone()));
    // IPVS: `lb_<network>` for each network in use, alike, holding the network's VIPs.
    let lbs: Vec<(TaskSpec, Vec<Ipv4Net>)> = if settings.lb_namespaces {
        mesh::lb_networks(desired, &active)
            .into_iter()
            .filter_map(|(name, n)| {
                let st = mesh::lb_state(n)?;
                Some((one_leg(&name, &n.id, n.lb_addr?), mesh::vip_aliases(&st)))
            })
            .collect()
    } else {
        Vec::new()
    };
    wanted_ns.extend(lbs.iter().map(|(l, _)| l.name.clone()));
    for name in observed.namespaces.keys() {
        if !wanted_ns.contains(name) && !kept_ns.contains(name) {
            p.delete.push(Action::DeleteNetns { name: name.clone() });
        }
    }

    for (sb, net) in &used {
        let obs = match observed.namespaces.get(sb) {
            Some(o) => o,
            None => {
                p.create.push(Action::CreateNetns { name: sb.clone() });
                &empty
            }
        };
        let mut expected: BTreeSet<String> = [BRIDGE.to_string(), VXLAN.to_string()].into();
        expected.extend(draining_veths.get(sb).into_iter().flatten().cloned());
        let lb_legs = lbs.iter().map(|(l, _)| l);
        for t in active.iter().copied().chain(sbox.as_ref()).chain(lb_legs) {
            if uses(t, &net.id) {
                expected.insert(veth_name(&t.name, &net.id));
            }
        }
        plan_sandbox(&mut p, sb, net, obs, &expected, &active, settings);
    }

    if let Some(gw) = gw {
        plan_gwbridge(
            &mut p,
            gw,
            observed,
            &active,
            sbox.as_ref(),
            &draining_gw_legs,
        );
    }
    if let Some(sb) = &sbox {
        let obs = match observed.namespaces.get(INGRESS_SBOX) {
            Some(o) => o,
            None => {
                p.create.push(Action::CreateNetns {
                    name: INGRESS_SBOX.into(),
                });
                &empty
            }
        };
        plan_endpoints(
            &mut p,
            sb,
            obs,
            &networks,
            observed,
            settings,
            gw,
            &sbox_aliases,
        );
    }
    for (lb, aliases) in &lbs {
        let obs = match observed.namespaces.get(&lb.name) {
            Some(o) => o,
            None => {
                p.create.push(Action::CreateNetns {
                    name: lb.name.clone(),
                });
                &empty
            }
        };
        // No gwbridge leg: it only answers on its network.
        plan_endpoints(
            &mut p, lb, obs, &networks, observed, settings, None, aliases,
        );
    }

    // Task namespaces and endpoints, then the process.
    for t in &active {
        let running = match records.get(&t.name).map(|r| &r.phase) {
            Some(Phase::Running {
                pid, netns_inode, ..
            }) => Some((*pid, *netns_inode)),
            _ => None,
        };
        let obs = observed.namespaces.get(&t.name);
        if let Some((pid, inode)) = running {
            if obs.map(|o| o.inode) != Some(inode) {
                // The process keeps its namespace; bring back its file and check its links on
                // the next pass (what we observed under that name is not the task's namespace).
                p.create.push(Action::RebindNetns {
                    task: t.name.clone(),
                    pid,
                });
                continue;
            }
        }
        let obs = match obs {
            Some(o) => o,
            None => {
                p.create.push(Action::CreateNetns {
                    name: t.name.clone(),
                });
                &empty
            }
        };
        plan_endpoints(&mut p, t, obs, &networks, observed, settings, gw, &[]);
        if running.is_none() {
            p.start.push(Action::StartTask {
                task: t.name.clone(),
            });
        }
    }

    let Plan {
        stop,
        delete,
        create,
        start,
        forget,
    } = p;
    stop.into_iter()
        .chain(delete)
        .chain(create)
        .chain(start)
        .chain(forget)
        .collect()
}

/// A namespace with one leg (`eth0`) on a network and no process: ingress_sbox, `lb_<name>`.
fn one_leg(name: &str, network_id: &str, addr: Ipv4Net) -> TaskSpec {
    TaskSpec {
        id: name.into(),
        name: name.into(),
        service_id: String::new(),
        service_name: String::new(),
        command: vec![],
        attachments: vec![proto::model::Attachment {
            network_id: network_id.into(),
            addr,
            mac: String::new(),
        }],
        env: Default::default(),
        stop_grace_ms: 10_000,
        health: None,
    }
}

fn uses(t: &TaskSpec, network_id: &str) -> bool {
    t.attachments.iter().any(|a| a.network_id == network_id)
}

/// The MTU of a network's links: the overlay's, less ESP's overhead on an encrypted network,
/// so that its packets never need fragmenting (libnetwork #1309, moby #33133).
pub fn network_mtu(s: &Settings, net: &NetworkSpec) -> u32 {
    if net.encrypted {
        s.mtu.saturating_sub(crate::esp::ESP_OVERHEAD)
    } else {
        s.mtu
    }
}

/// Up, with the MTU, and (for a port) in br0.
fn link_ok(l: &LinkState, mtu: u32, port: bool) -> bool {
    l.up && l.mtu == mtu && (!port || l.master.as_deref() == Some(BRIDGE))
}

fn plan_sandbox(
    p: &mut Plan,
    sb: &str,
    net: &NetworkSpec,
    obs: &NsObs,
    expected: &BTreeSet<String>,
    active: &[&TaskSpec],
    s: &Settings,
) {
    let mtu = network_mtu(s, net);
    for name in obs.links.keys() {
        if !expected.contains(name) {
            p.delete.push(Action::DeleteLink {
                netns: sb.to_string(),
                link: name.clone(),
            });
        }
    }

    let bridge_ok = obs.links.get(BRIDGE).is_some_and(|l| {
        l.kind == LinkKind::Bridge
            && link_ok(l, mtu, false)
            && l.addrs == [net.gateway]
            && l.mac == Some(MacAddr::from_ipv4(net.gateway.addr()))
    });
    if !bridge_ok {
        p.create.push(Action::EnsureBridge {
            sandbox: sb.to_string(),
            gateway: net.gateway,
            mtu,
        });
    }

    // A device whose VNI, port or flags differ is recreated, and loses its peer entries.
    let vx = obs.links.get(VXLAN);
    let vx_kept = vx.is_some_and(|l| {
        matches!(l.kind, LinkKind::Vxlan(v)
            if v.vni == net.vni && v.port == s.port && !v.learning && v.proxy && v.underlay_elsewhere)
    });
    if !(vx_kept && vx.is_some_and(|l| link_ok(l, mtu, true))) {
        p.create.push(Action::EnsureVxlan {
            sandbox: sb.to_string(),
            vni: net.vni,
            port: s.port,
            mtu,
        });
    }

    // Peers: every remote endpoint, never a local one (nor one behind our own VTEP).
    let local: BTreeSet<_> = active
        .iter()
        .flat_map(|t| t.attachments.iter())
        .filter(|a| a.network_id == net.id)
        .map(|a| a.addr.addr())
        .collect();
    let peers: Vec<RemotePeer> = net
        .peers
        .iter()
        .filter(|peer| peer.vtep != s.advertise_addr && !local.contains(&peer.ip))
        .filter_map(|peer| {
            // The overlay runs on IPv4 underlays only; the manager sends no other VTEP.
            let IpAddr::V4(vtep) = peer.vtep else {
                return None;
            };
            Some(RemotePeer {
                ip: peer.ip,
                mac: mac_or_derived(&peer.mac, peer.ip),
                vtep,
            })
        })
        .collect();
    let (neighs, fdb) = if vx_kept {
        (obs.neighs.as_slice(), obs.fdb.as_slice())
    } else {
        (&[][..], &[][..])
    };
    let changes = vxlan::plan_peers(VXLAN, &peers, neighs, fdb);
    if !changes.is_empty() {
        p.create.push(Action::Peers {
            sandbox: sb.to_string(),
            changes,
        });
    }
}

/// The MAC the manager gave, or Swarm's derivation from the IP if it is malformed.
fn mac_or_derived(mac: &str, ip: std::net::Ipv4Addr) -> MacAddr {
    mac.parse().unwrap_or_else(|_| MacAddr::from_ipv4(ip))
}

/// `aliases`: more addresses of the first leg (`eth0`).
#[allow(clippy::too_many_arguments)]
fn plan_endpoints(
    p: &mut Plan,
    t: &TaskSpec,
    obs: &NsObs,
    networks: &BTreeMap<&str, &NetworkSpec>,
    observed: &Observed,
    s: &Settings,
    gw: Option<&Gw>,
    aliases: &[Ipv4Net],
) {
    let empty = NsObs::default();
    let mut expected: BTreeSet<String> = BTreeSet::new();
    // The gwbridge leg comes after the overlay legs: the next ethN.
    let gw_ifname = format!("eth{}", t.attachments.len());
    if gw.is_some() {
        expected.insert(gw_ifname.clone());
    }
    for (i, att) in t.attachments.iter().enumerate() {
        let ifname = format!("eth{i}");
        expected.insert(ifname.clone());
        let Some(net) = networks.get(att.network_id.as_str()) else {
            // The manager names no such network: nothing to attach this leg to.
            continue;
        };
        let mtu = network_mtu(s, net);
        let sb = sandbox_name(&att.network_id);
        let veth = veth_name(&t.name, &att.network_id);
        let mac = mac_or_derived(&att.mac, att.addr.addr());
        let aliases = if i == 0 { aliases.to_vec() } else { vec![] };
        let want: BTreeSet<Ipv4Net> = aliases.iter().copied().chain([att.addr]).collect();
        let sb_obs = observed.namespaces.get(&sb).unwrap_or(&empty);
        let ok = match (sb_obs.links.get(&veth), obs.links.get(&ifname)) {
            (Some(outer), Some(inner)) => {
                let paired = matches!(
                    (&outer.kind, &inner.kind),
                    (LinkKind::Veth { peer_index: Some(o) }, LinkKind::Veth { peer_index: Some(i) })
                        if *o == inner.index && *i == outer.index
                );
                paired
                    && link_ok(outer, mtu, true)
                    && link_ok(inner, mtu, false)
                    && inner.mac == Some(mac)
                    && inner.addrs.len() == want.len()
                    && inner.addrs.iter().all(|a| want.contains(a))
            }
            _ => false,
        };
        if !ok {
            p.create.push(Action::EnsureEndpoint {
                sandbox: sb,
                veth,
                task: t.name.clone(),
                ifname,
                mac,
                addr: att.addr,
                mtu,
                aliases,
            });
        }
    }
    if let Some(gw) = gw {
        plan_gw_leg(p, gw, t, obs, observed, gw_ifname);
    }
    for name in obs.links.keys() {
        if !expected.contains(name) {
            p.delete.push(Action::DeleteLink {
                netns: t.name.clone(),
                link: name.clone(),
            });
        }
    }
}

/// The gwbridge itself, and the removal of legs of tasks that are gone.
fn plan_gwbridge(
    p: &mut Plan,
    gw: &Gw,
    observed: &Observed,
    active: &[&TaskSpec],
    sbox: Option<&TaskSpec>,
    draining: &BTreeSet<String>,
) {
    let node = &observed.node;
    let ok = node.links.get(GWBRIDGE).is_some_and(|l| {
        l.kind == LinkKind::Bridge
            && link_ok(l, gw.mtu, false)
            && l.addrs == [gw.gateway]
            && l.mac == Some(MacAddr::from_ipv4(gw.gateway.addr()))
    });
    if !ok {
        p.create.push(Action::EnsureGwBridge {
            gateway: gw.gateway,
            mtu: gw.mtu,
        });
    }
    let mut expected: BTreeSet<String> = draining.clone();
    expected.extend(
        active
            .iter()
            .copied()
            .chain(sbox)
            .map(|t| gw_veth_name(&t.name)),
    );
    expected.insert(GWBRIDGE.to_string());
    for name in node.links.keys() {
        if !expected.contains(name) {
            p.delete.push(Action::DeleteNodeLink { link: name.clone() });
        }
    }
}

/// A task's (or ingress_sbox's) leg on the gwbridge, if it lacks one that is right.
fn plan_gw_leg(
    p: &mut Plan,
    gw: &Gw,
    t: &TaskSpec,
    obs: &NsObs,
    observed: &Observed,
    ifname: String,
) {
    // The address is allocated before planning; a task without one gets no leg yet.
    let Some(ip) = gw.addrs.get(&t.name) else {
        return;
    };
    let addr = Ipv4Net::new(*ip, gw.gateway.prefix_len()).expect("prefix of a valid net");
    let veth = gw_veth_name(&t.name);
    let ok = match (observed.node.links.get(&veth), obs.links.get(&ifname)) {
        (Some(outer), Some(inner)) => {
            matches!(
                (&outer.kind, &inner.kind),
                (LinkKind::Veth { peer_index: Some(o) }, LinkKind::Veth { peer_index: Some(i) })
                    if *o == inner.index && *i == outer.index
            ) && outer.up
                && outer.mtu == gw.mtu
                && outer.master.as_deref() == Some(GWBRIDGE)
                && link_ok(inner, gw.mtu, false)
                && inner.addrs == [addr]
        }
        _ => false,
    };
    let gateway = gw.gateway.addr();
    if !ok {
        p.create.push(Action::EnsureGwLeg {
            veth,
            task: t.name.clone(),
            ifname,
            addr,
            gateway,
            mtu: gw.mtu,
        });
    } else if !default_route_ok(obs, &ifname, gateway) {
        p.create.push(Action::EnsureDefaultRoute {
            task: t.name.clone(),
            ifname,
            gateway,
        });
    }
}

/// Exactly one default route, via the gwbridge's gateway on the leg.
fn default_route_ok(obs: &NsObs, ifname: &str, gateway: std::net::Ipv4Addr) -> bool {
    let mut defaults = obs.routes.iter().filter(|r| r.dst.prefix_len() == 0);
    matches!(
        (defaults.next(), defaults.next()),
        (Some(r), None) if r.gateway == Some(gateway) && r.dev.as_deref() == Some(ifname)
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::apply::fake::FakeKernel;
    use crate::apply::Kernel;
    use proto::agent::Peer;
    use proto::model::{endpoint_mac, Attachment, TaskState};

    const NET: &str = "n0123456789abcdef";
    const SB: &str = "1-n012345678";

    fn settings() -> Settings {
        Settings {
            mtu: 1450,
            port: 4789,
            advertise_addr: "192.168.56.11".parse().unwrap(),
            lb_namespaces: false,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> MacAddr {
        MacAddr::from_ipv4(ip(s))
    }

    fn peer(addr: &str, vtep: &str) -> Peer {
        Peer {
            ip: ip(addr),
            mac: endpoint_mac(ip(addr)),
            vtep: vtep.parse().unwrap(),
        }
    }

    fn task(name: &str, addr: &str) -> TaskSpec {
        let addr: Ipv4Net = format!("{addr}/24").parse().unwrap();
        TaskSpec {
            id: name.rsplit('.').next().unwrap().into(),
            name: name.into(),
            service_id: "svc".into(),
            service_name: "web".into(),
            command: vec!["hello-server".into()],
            attachments: vec![Attachment {
                network_id: NET.into(),
                addr,
                mac: endpoint_mac(addr.addr()),
            }],
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    fn assignment(tasks: Vec<TaskSpec>, peers: Vec<Peer>) -> Assignment {
        Assignment {
            revision: 1,
            networks: vec![NetworkSpec {
                id: NET.into(),
                name: "backend".into(),
                subnet: "10.0.9.0/24".parse().unwrap(),
                gateway: "10.0.9.1/24".parse().unwrap(),
                vni: 4096,
                peers,
                lb_addr: None,
                draining: vec![],
                services: vec![],
                encrypted: false,
            }],
            tasks,
            ..Assignment::default()
        }
    }

    /// A node whose kernel and processes follow the plan, as a real one would.
    #[derive(Default)]
    struct Node {
        kernel: FakeKernel,
        records: BTreeMap<String, TaskRecord>,
        gw: Option<Gw>,
        /// IPVS: `lb_` namespaces.
        lb_namespaces: bool,
    }

    impl Node {
        fn plan(&self, a: &Assignment) -> Vec<Action> {
            plan(
                a,
                &self.records,
                &self.kernel.observe().unwrap(),
                &Settings {
                    lb_namespaces: self.lb_namespaces,
                    ..settings()
                },
                self.gw.as_ref(),
            )
        }

        /// Plans and applies once; returns what was done.
        fn step(&mut self, a: &Assignment) -> Vec<Action> {
            let actions = self.plan(a);
            for act in &actions {
                match act {
                    Action::StartTask { task } => {
                        let spec = a.tasks.iter().find(|t| &t.name == task).unwrap().clone();
                        let inode = self.kernel.observe().unwrap().namespaces[task].inode;
                        let phase = Phase::Running {
                            pid: 100,
                            start_time: 1,
                            netns_inode: inode,
                        };
                        self.records.insert(
                            task.clone(),
                            TaskRecord {
                                spec,
                                phase,
                                health: None,
                            },
                        );
                    }
                    Action::ForgetTask { task } => {
                        self.records.remove(task);
                    }
                    Action::StopTask { .. } => {}
                    other => self.kernel.apply(other).unwrap(),
                }
            }
            actions
        }

        fn exit(&mut self, task: &str, state: TaskState) {
            self.records.get_mut(task).unwrap().phase = Phase::Exited { state, error: None };
        }

        fn ns(&self, name: &str) -> Option<NsObs> {
            self.kernel.observe().unwrap().namespaces.get(name).cloned()
        }

        fn edit(&self, ns: &str, f: impl FnOnce(&mut NsObs)) {
            f(self
                .kernel
                .state
                .lock()
                .unwrap()
                .namespaces
                .get_mut(ns)
                .unwrap())
        }
    }

    fn fresh_node(a: &Assignment) -> Node {
        let mut node = Node::default();
        node.step(a);
        assert_eq!(node.plan(a), [], "one pass converges");
        node
    }

    fn endpoint(task: &str, addr: &str) -> Action {
        Action::EnsureEndpoint {
            sandbox: SB.into(),
            veth: veth_name(task, NET),
            task: task.into(),
            ifname: "eth0".into(),
            mac: mac(addr),
            addr: format!("{addr}/24").parse().unwrap(),
            mtu: 1450,
            aliases: vec![],
        }
    }

    fn vxlan(vni: u32) -> Action {
        Action::EnsureVxlan {
            sandbox: SB.into(),
            vni,
            port: 4789,
            mtu: 1450,
        }
    }

    #[test]
    fn names_follow_docker_and_fit_ifnamsiz() {
        assert_eq!(sandbox_name("0123456789abcdef"), "1-0123456789");
        assert_eq!(sandbox_name("short"), "1-short");
        let v = veth_name("web.1.abc", "net1");
        assert_eq!(v, veth_name("web.1.abc", "net1"));
        assert_ne!(v, veth_name("web.2.abd", "net1"));
        assert_ne!(v, veth_name("web.1.abc", "net2"));
        assert!(v.starts_with("veth") && v.len() == 11, "{v}");
    }

    #[test]
    fn fresh_node_builds_sandbox_endpoints_then_starts_tasks() {
        let a = assignment(
            vec![task("web.1.t1", "10.0.9.2"), task("web.2.t2", "10.0.9.3")],
            vec![peer("10.0.9.4", "192.168.56.12")],
        );
        let mut node = Node::default();
        assert_eq!(
            node.step(&a),
            [
                Action::CreateNetns { name: SB.into() },
                Action::EnsureBridge {
                    sandbox: SB.into(),
                    gateway: "10.0.9.1/24".parse().unwrap(),
                    mtu: 1450
                },
                vxlan(4096),
                Action::Peers {
                    sandbox: SB.into(),
                    changes: vec![
                        PeerAction::AddFdb {
                            mac: mac("10.0.9.4"),
                            vtep: ip("192.168.56.12")
                        },
                        PeerAction::AddNeigh {
                            ip: ip("10.0.9.4"),
                            mac: mac("10.0.9.4")
                        },
                    ]
                },
                Action::CreateNetns {
                    name: "web.1.t1".into()
                },
                endpoint("web.1.t1", "10.0.9.2"),
                Action::CreateNetns {
                    name: "web.2.t2".into()
                },
                endpoint("web.2.t2", "10.0.9.3"),
                Action::StartTask {
                    task: "web.1.t1".into()
                },
                Action::StartTask {
                    task: "web.2.t2".into()
                },
            ]
        );
        // Adoption: the same node, observed again with everything right, needs nothing.
        assert_eq!(node.plan(&a), []);
    }

    #[test]
    fn an_encrypted_network_gets_an_mtu_with_room_for_esp_and_a_change_rebuilds_its_links() {
        let mut a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = fresh_node(&a);
        a.networks[0].encrypted = true;
        // 1450 - 37: the ESP header, IV, worst-case padding, trailer and a 128-bit ICV.
        let mtu = 1413;
        let acts = node.step(&a);
        assert!(acts.contains(&Action::EnsureBridge {
            sandbox: SB.into(),
            gateway: "10.0.9.1/24".parse().unwrap(),
            mtu,
        }));
        assert!(acts.contains(&Action::EnsureVxlan {
            sandbox: SB.into(),
            vni: 4096,
            port: 4789,
            mtu,
        }));
        assert!(acts.iter().any(|x| matches!(x,
            Action::EnsureEndpoint { task, mtu: m, .. } if task == "web.1.t1" && *m == mtu)));
        assert_eq!(node.plan(&a), []);
    }

    #[test]
    fn deleted_links_and_entries_come_back_and_nothing_else_moves() {
        let a = assignment(
            vec![task("web.1.t1", "10.0.9.2")],
            vec![peer("10.0.9.4", "192.168.56.12")],
        );
        let mut node = fresh_node(&a);
        node.kernel.remove_link(SB, VXLAN);
        let acts = node.step(&a);
        assert_eq!(acts[0], vxlan(4096));
        assert!(matches!(&acts[1], Action::Peers { changes, .. } if changes.len() == 2));
        assert_eq!(acts.len(), 2);

        // The task's eth0 goes (its sandbox end with it): only the endpoint is rebuilt; the
        // running process is not restarted.
        node.kernel.remove_link("web.1.t1", "eth0");
        assert_eq!(node.step(&a), [endpoint("web.1.t1", "10.0.9.2")]);

        // A lost gateway address or a downed bridge is repaired in place.
        node.edit(SB, |n| n.links.get_mut(BRIDGE).unwrap().addrs.clear());
        assert!(matches!(node.step(&a)[..], [Action::EnsureBridge { .. }]));
        node.edit(SB, |n| n.links.get_mut(BRIDGE).unwrap().up = false);
        assert!(matches!(node.step(&a)[..], [Action::EnsureBridge { .. }]));
        // So is a bridge MAC that moved (as one without its own follows its lowest port's).
        node.edit(SB, |n| {
            n.links.get_mut(BRIDGE).unwrap().mac = Some(mac("10.0.9.200"))
        });
        assert!(matches!(node.step(&a)[..], [Action::EnsureBridge { .. }]));

        // A deleted bridge comes back, and its ports go back in.
        node.kernel.remove_link(SB, BRIDGE);
        let acts = node.step(&a);
        assert!(
            matches!(
                acts[..],
                [
                    Action::EnsureBridge { .. },
                    Action::EnsureVxlan { .. },
                    Action::EnsureEndpoint { .. }
                ]
            ),
            "{acts:?}"
        );

        // One peer entry removed by hand comes back alone.
        node.edit(SB, |n| n.fdb.clear());
        assert_eq!(
            node.step(&a),
            [Action::Peers {
                sandbox: SB.into(),
                changes: vec![PeerAction::AddFdb {
                    mac: mac("10.0.9.4"),
                    vtep: ip("192.168.56.12")
                }]
            }]
        );
        assert_eq!(node.plan(&a), []);
    }

    #[test]
    fn a_wrong_vni_recreates_the_vxlan_and_reprograms_its_peers() {
        let a = assignment(
            vec![task("web.1.t1", "10.0.9.2")],
            vec![peer("10.0.9.4", "192.168.56.12")],
        );
        let mut node = fresh_node(&a);
        let mut b = a.clone();
        b.networks[0].vni = 4097;
        let acts = node.step(&b);
        assert_eq!(acts[0], vxlan(4097));
        assert!(matches!(&acts[1], Action::Peers { changes, .. } if changes.len() == 2));
        assert_eq!(node.plan(&b), []);
    }

    #[test]
    fn peers_are_added_removed_and_moved() {
        let a = assignment(
            vec![task("web.1.t1", "10.0.9.2")],
            vec![
                peer("10.0.9.4", "192.168.56.12"),
                peer("10.0.9.5", "192.168.56.12"),
            ],
        );
        let mut node = fresh_node(&a);
        // 10.0.9.5 leaves, 10.0.9.4 moves to node3, 10.0.9.6 arrives.
        let b = assignment(
            vec![task("web.1.t1", "10.0.9.2")],
            vec![
                peer("10.0.9.4", "192.168.56.13"),
                peer("10.0.9.6", "192.168.56.12"),
            ],
        );
        let acts = node.step(&b);
        let [Action::Peers { changes, .. }] = &acts[..] else {
            panic!("{acts:?}")
        };
        for c in [
            PeerAction::DelNeigh { ip: ip("10.0.9.5") },
            PeerAction::DelFdb {
                mac: mac("10.0.9.5"),
                vtep: ip("192.168.56.12"),
            },
            PeerAction::AddFdb {
                mac: mac("10.0.9.4"),
                vtep: ip("192.168.56.13"),
            },
            PeerAction::AddFdb {
                mac: mac("10.0.9.6"),
                vtep: ip("192.168.56.12"),
            },
            PeerAction::AddNeigh {
                ip: ip("10.0.9.6"),
                mac: mac("10.0.9.6"),
            },
        ] {
            assert!(changes.contains(&c), "{c} missing from {changes:?}");
        }
        assert_eq!(node.plan(&b), []);
        let fdb = node.ns(SB).unwrap().fdb;
        assert_eq!(fdb.len(), 2);
        assert!(fdb
            .iter()
            .any(|e| e.mac == mac("10.0.9.4") && e.dst == Some(ip("192.168.56.13"))));
    }

    #[test]
    fn local_endpoints_and_our_own_vtep_are_never_programmed() {
        let a = assignment(
            vec![task("web.1.t1", "10.0.9.2")],
            vec![
                peer("10.0.9.2", "192.168.56.12"),
                peer("10.0.9.7", "192.168.56.11"),
            ],
        );
        let node = fresh_node(&a);
        let sb = node.ns(SB).unwrap();
        assert!(sb.neighs.is_empty() && sb.fdb.is_empty());
    }

    #[test]
    fn stale_namespaces_and_links_go() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = fresh_node(&a);
        {
            let mut st = node.kernel.state.lock().unwrap();
            st.namespaces.insert("web.3.gone".into(), NsObs::default());
            st.namespaces
                .insert("1-oldnet0000".into(), NsObs::default());
            let mut extra = st.namespaces[SB].links[BRIDGE].clone();
            extra.name = "vethdead000".into();
            extra.index = 9999;
            st.namespaces
                .get_mut(SB)
                .unwrap()
                .links
                .insert("vethdead000".into(), extra);
        }
        let mut acts = node.step(&a);
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            acts,
            [
                Action::DeleteLink {
                    netns: SB.into(),
                    link: "vethdead000".into()
                },
                Action::DeleteNetns {
                    name: "1-oldnet0000".into()
                },
                Action::DeleteNetns {
                    name: "web.3.gone".into()
                },
            ]
        );
        assert_eq!(node.plan(&a), []);
    }

    #[test]
    fn a_removed_task_is_stopped_first_then_the_last_one_takes_its_network_along() {
        let t1 = task("web.1.t1", "10.0.9.2");
        let t2 = task("web.2.t2", "10.0.9.3");
        let both = assignment(vec![t1.clone(), t2.clone()], vec![]);
        let mut node = fresh_node(&both);

        // t2 leaves: stopped, its namespace and endpoint untouched while it drains.
        let one = assignment(vec![t1.clone()], vec![]);
        assert_eq!(
            node.step(&one),
            [Action::StopTask {
                task: "web.2.t2".into()
            }]
        );
        node.exit("web.2.t2", TaskState::Shutdown);
        assert_eq!(
            node.step(&one),
            [
                Action::DeleteNetns {
                    name: "web.2.t2".into()
                },
                // Gone with the namespace already, unless something still holds that.
                Action::DeleteLink {
                    netns: SB.into(),
                    link: veth_name("web.2.t2", NET)
                },
                Action::ForgetTask {
                    task: "web.2.t2".into()
                },
            ]
        );
        assert_eq!(node.plan(&one), []);
        assert_eq!(node.ns(SB).unwrap().links.len(), 3);

        // The last task leaves: while it drains the sandbox stays, then both go.
        let none = Assignment {
            revision: 3,
            ..Default::default()
        };
        assert_eq!(
            node.step(&none),
            [Action::StopTask {
                task: "web.1.t1".into()
            }]
        );
        assert!(node.ns(SB).is_some());
        node.exit("web.1.t1", TaskState::Shutdown);
        let mut acts = node.step(&none);
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            acts,
            [
                Action::DeleteNetns { name: SB.into() },
                Action::DeleteNetns {
                    name: "web.1.t1".into()
                },
                Action::ForgetTask {
                    task: "web.1.t1".into()
                },
            ]
        );
        assert!(node.kernel.observe().unwrap().namespaces.is_empty());
    }

    #[test]
    fn a_terminal_task_is_not_restarted_and_releases_its_network() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = fresh_node(&a);
        node.exit("web.1.t1", TaskState::Failed);
        let mut acts = node.step(&a);
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            acts,
            [
                Action::DeleteNetns { name: SB.into() },
                Action::DeleteNetns {
                    name: "web.1.t1".into()
                },
            ]
        );
        assert_eq!(
            node.plan(&a),
            [],
            "a failed task stays failed; the manager replaces it"
        );
    }

    #[test]
    fn a_running_task_whose_namespace_file_went_is_rebound_not_restarted() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let node = fresh_node(&a);
        let rebind = [Action::RebindNetns {
            task: "web.1.t1".into(),
            pid: 100,
        }];
        node.kernel
            .state
            .lock()
            .unwrap()
            .namespaces
            .remove("web.1.t1");
        assert_eq!(node.plan(&a), rebind);
        // A namespace recreated under its name (another inode) is not the task's either.
        node.kernel.state.lock().unwrap().namespaces.insert(
            "web.1.t1".into(),
            NsObs {
                inode: 4242,
                ..Default::default()
            },
        );
        assert_eq!(node.plan(&a), rebind);
    }

    #[test]
    fn a_wrong_mac_or_address_or_unpaired_end_is_repaired() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = fresh_node(&a);
        let t = "web.1.t1";
        node.edit(t, |n| {
            n.links.get_mut("eth0").unwrap().addrs = vec!["10.0.9.99/24".parse().unwrap()]
        });
        assert_eq!(node.step(&a), [endpoint(t, "10.0.9.2")]);
        node.edit(t, |n| {
            n.links.get_mut("eth0").unwrap().mac = Some(mac("10.0.9.99"))
        });
        assert_eq!(node.step(&a), [endpoint(t, "10.0.9.2")]);
        // An eth0 whose peer is not our sandbox end (e.g. left from an older sandbox).
        node.edit(t, |n| {
            n.links.get_mut("eth0").unwrap().kind = LinkKind::Veth {
                peer_index: Some(1),
            }
        });
        assert_eq!(node.step(&a), [endpoint(t, "10.0.9.2")]);
        // An interface the agent did not make goes.
        node.edit(t, |n| {
            let mut extra = n.links["eth0"].clone();
            extra.name = "eth7".into();
            extra.kind = LinkKind::Other("dummy".into());
            n.links.insert("eth7".into(), extra);
        });
        assert_eq!(
            node.step(&a),
            [Action::DeleteLink {
                netns: t.into(),
                link: "eth7".into()
            }]
        );
        assert_eq!(node.plan(&a), []);
    }

    const ING: &str = "ingress0123456789";
    const ING_SB: &str = "1-ingress012";

    fn gw(names: &[(&str, &str)]) -> Gw {
        Gw {
            gateway: "172.18.0.1/16".parse().unwrap(),
            mtu: 1500,
            addrs: names.iter().map(|(n, a)| (n.to_string(), ip(a))).collect(),
        }
    }

    fn with_ingress(mut a: Assignment) -> Assignment {
        a.ingress = Some(Box::new(proto::agent::IngressSpec {
            network: NetworkSpec {
                id: ING.into(),
                name: "ingress".into(),
                subnet: "10.255.0.0/16".parse().unwrap(),
                gateway: "10.255.0.1/16".parse().unwrap(),
                vni: 4097,
                peers: vec![peer("10.255.0.3", "192.168.56.12")],
                lb_addr: None,
                draining: vec![],
                encrypted: false,
                services: vec![],
            },
            sbox_addr: "10.255.0.2/16".parse().unwrap(),
        }));
        a
    }

    fn gw_leg(task: &str, ifname: &str, addr: &str) -> Action {
        Action::EnsureGwLeg {
            veth: gw_veth_name(task),
            task: task.into(),
            ifname: ifname.into(),
            addr: format!("{addr}/16").parse().unwrap(),
            gateway: ip("172.18.0.1"),
            mtu: 1500,
        }
    }

    #[test]
    fn ingress_and_gwbridge_exist_on_a_node_without_tasks() {
        let a = with_ingress(Assignment {
            revision: 1,
            ..Default::default()
        });
        let mut node = Node {
            gw: Some(gw(&[(INGRESS_SBOX, "172.18.0.2")])),
            ..Default::default()
        };
        let acts = node.step(&a);
        assert_eq!(
            acts[0],
            Action::CreateNetns {
                name: ING_SB.into()
            }
        );
        assert!(acts.contains(&Action::EnsureGwBridge {
            gateway: "172.18.0.1/16".parse().unwrap(),
            mtu: 1500
        }));
        assert!(acts.contains(&Action::EnsureEndpoint {
            sandbox: ING_SB.into(),
            veth: veth_name(INGRESS_SBOX, ING),
            task: INGRESS_SBOX.into(),
            ifname: "eth0".into(),
            mac: mac("10.255.0.2"),
            addr: "10.255.0.2/16".parse().unwrap(),
            mtu: 1450,
            aliases: vec![],
        }));
        assert!(acts.contains(&gw_leg(INGRESS_SBOX, "eth1", "172.18.0.2")));
        assert!(acts.contains(&Action::Peers {
            sandbox: ING_SB.into(),
            changes: vec![
                PeerAction::AddFdb {
                    mac: mac("10.255.0.3"),
                    vtep: ip("192.168.56.12")
                },
                PeerAction::AddNeigh {
                    ip: ip("10.255.0.3"),
                    mac: mac("10.255.0.3")
                },
            ]
        }));
        assert!(
            !acts.iter().any(|a| matches!(a, Action::StartTask { .. })),
            "ingress_sbox runs no process"
        );
        assert_eq!(node.plan(&a), [], "adoption: nothing to redo");

        // Without ingress, its sandbox and ingress_sbox go; the gwbridge stays.
        let none = Assignment {
            revision: 2,
            ..Default::default()
        };
        node.gw = Some(gw(&[]));
        let mut acts = node.step(&none);
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            acts,
            [
                Action::DeleteNetns {
                    name: ING_SB.into()
                },
                Action::DeleteNetns {
                    name: INGRESS_SBOX.into()
                },
                Action::DeleteNodeLink {
                    link: gw_veth_name(INGRESS_SBOX)
                },
            ]
        );
        assert_eq!(node.plan(&none), []);
    }

    #[test]
    fn every_task_gets_a_gwbridge_leg_after_its_overlay_legs() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = Node {
            gw: Some(gw(&[("web.1.t1", "172.18.0.3")])),
            ..Default::default()
        };
        let acts = node.step(&a);
        let leg = gw_leg("web.1.t1", "eth1", "172.18.0.3");
        let at = |x: &Action| acts.iter().position(|y| y == x).unwrap();
        assert!(at(&endpoint("web.1.t1", "10.0.9.2")) < at(&leg));
        assert!(
            at(&leg)
                < at(&Action::StartTask {
                    task: "web.1.t1".into()
                })
        );
        assert_eq!(node.plan(&a), []);

        // The node end deleted by hand comes back alone; a stale leg of ours goes; a link
        // that is not ours (no `mgw` prefix) is never observed, so never touched.
        node.kernel.remove_node_link(&gw_veth_name("web.1.t1"));
        assert_eq!(node.step(&a), std::slice::from_ref(&leg));
        {
            let mut st = node.kernel.state.lock().unwrap();
            let mut stale = st.node.links[GWBRIDGE].clone();
            stale.name = "mgwdead000".into();
            st.node.links.insert("mgwdead000".into(), stale);
        }
        assert_eq!(
            node.step(&a),
            [Action::DeleteNodeLink {
                link: "mgwdead000".into()
            }]
        );
        // A leg with a wrong address is rebuilt.
        node.edit("web.1.t1", |n| {
            n.links.get_mut("eth1").unwrap().addrs = vec!["172.18.0.9/16".parse().unwrap()]
        });
        assert_eq!(node.step(&a), [leg]);
        assert_eq!(node.plan(&a), []);
    }

    #[test]
    fn a_task_default_route_that_went_or_changed_comes_back_alone() {
        let a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        let mut node = Node {
            gw: Some(gw(&[("web.1.t1", "172.18.0.3")])),
            ..Default::default()
        };
        node.step(&a);
        let t = "web.1.t1";
        let default = |gateway: &str, dev: &str| vxlan::RouteEntry {
            dst: Ipv4Net::default(),
            gateway: Some(ip(gateway)),
            dev: Some(dev.into()),
        };
        assert_eq!(node.ns(t).unwrap().routes, [default("172.18.0.1", "eth1")]);
        assert_eq!(node.plan(&a), [], "a right default route: nothing to do");

        let route = Action::EnsureDefaultRoute {
            task: t.into(),
            ifname: "eth1".into(),
            gateway: ip("172.18.0.1"),
        };
        // Deleted: only the route comes back, the leg (and its connections) stays.
        node.edit(t, |n| n.routes.clear());
        assert_eq!(node.step(&a), std::slice::from_ref(&route));
        assert_eq!(node.plan(&a), []);
        // Through another gateway or link, or a second default next to ours.
        node.edit(t, |n| n.routes = vec![default("172.18.0.9", "eth1")]);
        assert_eq!(node.step(&a), std::slice::from_ref(&route));
        node.edit(t, |n| n.routes = vec![default("172.18.0.1", "eth0")]);
        assert_eq!(node.step(&a), std::slice::from_ref(&route));
        node.edit(t, |n| n.routes.push(default("10.0.9.1", "eth0")));
        assert_eq!(node.step(&a), std::slice::from_ref(&route));
        // Other routes (the kernel's subnet routes) are not the agent's.
        node.edit(t, |n| {
            n.routes.push(vxlan::RouteEntry {
                dst: "10.0.9.0/24".parse().unwrap(),
                gateway: None,
                dev: Some("eth0".into()),
            })
        });
        assert_eq!(node.plan(&a), []);
        // A leg rebuilt brings its route with it: no separate route action.
        node.kernel.remove_node_link(&gw_veth_name(t));
        assert_eq!(node.step(&a), [gw_leg(t, "eth1", "172.18.0.3")]);
        assert_eq!(node.plan(&a), []);
    }

    fn vip_service(name: &str, vip: Option<&str>, mark: u32) -> proto::agent::NetworkService {
        proto::agent::NetworkService {
            service_id: name.into(),
            name: name.into(),
            aliases: vec![],
            endpoint_mode: if vip.is_some() {
                proto::model::EndpointMode::Vip
            } else {
                proto::model::EndpointMode::Dnsrr
            },
            vip: vip.map(ip),
            fwmark: mark,
            tasks: vec![proto::agent::ServiceTask {
                task_id: "t1".into(),
                slot: 1,
                addr: ip("10.0.9.2"),
            }],
        }
    }

    fn lb_endpoint(aliases: &[&str]) -> Action {
        Action::EnsureEndpoint {
            sandbox: SB.into(),
            veth: veth_name("lb_backend", NET),
            task: "lb_backend".into(),
            ifname: "eth0".into(),
            mac: mac("10.0.9.250"),
            addr: "10.0.9.250/24".parse().unwrap(),
            mtu: 1450,
            aliases: aliases
                .iter()
                .map(|a| format!("{a}/32").parse().unwrap())
                .collect(),
        }
    }

    #[test]
    fn with_ipvs_each_network_in_use_gets_an_lb_namespace_holding_its_vips() {
        let mut a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        a.networks[0].lb_addr = Some("10.0.9.250/24".parse().unwrap());
        a.networks[0].services = vec![
            vip_service("api", Some("10.0.9.100"), 300),
            vip_service("db", None, 0),
        ];
        let mut node = Node {
            lb_namespaces: true,
            ..Default::default()
        };
        let acts = node.step(&a);
        assert!(acts.contains(&Action::CreateNetns {
            name: "lb_backend".into()
        }));
        assert!(acts.contains(&lb_endpoint(&["10.0.9.100"])), "{acts:?}");
        assert_eq!(node.plan(&a), [], "adoption: nothing to redo");
        assert_eq!(
            node.ns("lb_backend")
                .unwrap()
                .links
                .keys()
                .collect::<Vec<_>>(),
            ["eth0"],
            "no gwbridge leg, no process"
        );

        // A VIP deleted by hand comes back; a second service adds its VIP.
        node.edit("lb_backend", |n| {
            n.links.get_mut("eth0").unwrap().addrs.pop();
        });
        assert_eq!(node.step(&a), [lb_endpoint(&["10.0.9.100"])]);
        a.networks[0]
            .services
            .push(vip_service("web", Some("10.0.9.101"), 301));
        assert_eq!(node.step(&a), [lb_endpoint(&["10.0.9.100", "10.0.9.101"])]);
        assert_eq!(node.plan(&a), []);

        // The network leaves the node: its lb namespace goes with its sandbox.
        node.exit("web.1.t1", TaskState::Shutdown);
        let mut acts = node.step(&a);
        acts.sort_by_key(|a| format!("{a:?}"));
        assert!(acts.contains(&Action::DeleteNetns {
            name: "lb_backend".into()
        }));
        assert!(node.ns("lb_backend").is_none());
    }

    #[test]
    fn without_ipvs_or_lb_address_there_is_no_lb_namespace() {
        let mut a = assignment(vec![task("web.1.t1", "10.0.9.2")], vec![]);
        a.networks[0].services = vec![vip_service("api", Some("10.0.9.100"), 300)];
        let ipvs = Node {
            lb_namespaces: true,
            ..Default::default()
        };
        assert!(ipvs
            .plan(&a)
            .iter()
            .all(|x| !format!("{x:?}").contains("lb_")));
        a.networks[0].lb_addr = Some("10.0.9.250/24".parse().unwrap());
        let nft = Node::default();
        assert!(nft
            .plan(&a)
            .iter()
            .all(|x| !format!("{x:?}").contains("lb_")));
    }

    #[test]
    fn ingress_sbox_holds_the_ingress_vips() {
        let mut a = with_ingress(Assignment {
            revision: 1,
            ..Default::default()
        });
        a.published = vec![proto::agent::PublishedService {
            service_id: "web".into(),
            service_name: "web".into(),
            fwmark: 256,
            ports: vec![proto::model::PortConfig {
                protocol: proto::model::Protocol::Tcp,
                published: 80,
                target: 8080,
                mode: proto::model::PublishMode::Ingress,
            }],
            backends: vec![],
            vip: Some(ip("10.255.0.4")),
        }];
        let mut node = Node::default();
        let acts = node.step(&a);
        assert!(acts.iter().any(|x| matches!(x,
            Action::EnsureEndpoint { task, aliases, .. }
                if task == INGRESS_SBOX && *aliases == ["10.255.0.4/32".parse::<Ipv4Net>().unwrap()])));
        assert_eq!(node.plan(&a), []);
    }
}
