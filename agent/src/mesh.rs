//! Routing-mesh planning, pure: gwbridge addresses, subnet clash checks, and the nftables state
//! each namespace gets from an assignment (reference/swarm-dataplane.md §2, §3, §5).
//!
//! - gwbridge `mesh_gwbridge` holds the subnet's first address; `ingress_sbox` always has the
//!   second; tasks get the lowest free one from the third on, kept (state dir) while they live.
//! - Node table: every ingress-mode port → ingress_sbox; host-mode ports → one local task of
//!   the service: the running task whose name sorts first (stable while it lives; when it
//!   goes, the next one takes over).
//! - ingress_sbox table: ingress-mode ports → the service's fwmark; backends = every running
//!   task's ingress IP cluster-wide, as the manager lists them.
//! - ingress_sbox also holds each ingress VIP (/32 on eth0) and marks it like the ports.
//! - IPVS: per network in use, `lb_<name>` with eth0 = the node's lb address and the VIPs
//!   (/32), each VIP marked with its service's fwmark, an FWM service over the tasks.
//! - Task table: ingress-mode published port → target, on the task's ingress IP; with the
//!   nftables load balancer, every VIP of a vip-mode service on the task's networks → that
//!   service's running tasks (round robin in the client's own namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use firewall::{
    Fwmark, NodeConfig, NodeState, PortKey, Proto, SboxConfig, SboxService, SboxState, TaskState,
};
use ipnet::Ipv4Net;
use proto::agent::{Assignment, NetworkSpec, PublishedService, TaskSpec};
use proto::model::{EndpointMode, LbKind, PortConfig, Protocol, PublishMode};

use crate::lb::DrainingBackends;
use crate::names::{sandbox_name, GWBRIDGE, INGRESS_SBOX, LB_IF, SBOX_INGRESS_IF};

/// The gwbridge as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gw {
    /// The bridge's address with the subnet's prefix (the first address).
    pub gateway: Ipv4Net,
    pub mtu: u32,
    /// Each leg's address, by task name (and [`INGRESS_SBOX`]).
    pub addrs: BTreeMap<String, Ipv4Addr>,
}

/// The n-th address of a subnet (1 = the first host address).
fn nth(subnet: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + n)
}

/// The gwbridge's own address, with the subnet's prefix.
pub fn gw_gateway(subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(nth(subnet, 1), subnet.prefix_len()).expect("prefix of a valid net")
}

/// ingress_sbox's address on the gwbridge: the DNAT target of ingress-mode ports.
pub fn sbox_gw_ip(subnet: Ipv4Net) -> Ipv4Addr {
    nth(subnet, 2)
}

/// A gwbridge subnet must hold the bridge, ingress_sbox and at least one task.
pub fn check_gw_subnet(subnet: Ipv4Net) -> Result<(), String> {
    if subnet.prefix_len() > 29 {
        return Err(format!(
            "gwbridge subnet {subnet} is too small: use a /29 or larger"
        ));
    }
    if subnet != subnet.trunc() {
        return Err(format!(
            "gwbridge subnet {subnet} has host bits set (did you mean {}?)",
            subnet.trunc()
        ));
    }
    Ok(())
}

/// The gwbridge subnet ran out of addresses: `name` got none.
#[derive(Debug, thiserror::Error)]
#[error("gwbridge subnet {subnet} has no free address for {name}")]
pub struct GwFull {
    subnet: Ipv4Net,
    name: String,
}

/// Addresses for `wanted` legs: ingress_sbox gets .2; everyone else keeps a previous address
/// that is still valid and unique, or gets the lowest free one from .3 on.
pub fn allocate_gw(
    subnet: Ipv4Net,
    prev: &BTreeMap<String, Ipv4Addr>,
    wanted: &BTreeSet<String>,
) -> Result<BTreeMap<String, Ipv4Addr>, GwFull> {
    let first = u32::from(subnet.network()) + 3;
    let last = u32::from(subnet.broadcast()) - 1;
    let usable = |ip: Ipv4Addr| (first..=last).contains(&u32::from(ip));
    let mut out = BTreeMap::new();
    let mut taken = BTreeSet::new();
    if wanted.contains(INGRESS_SBOX) {
        out.insert(INGRESS_SBOX.to_string(), sbox_gw_ip(subnet));
    }
    for name in wanted.iter().filter(|n| n.as_str() != INGRESS_SBOX) {
        if let Some(ip) = prev.get(name).filter(|ip| usable(**ip)) {
            if taken.insert(*ip) {
                out.insert(name.clone(), *ip);
            }
        }
    }
    let mut next = first;
    for name in wanted {
        if out.contains_key(name) {
            continue;
        }
        while taken.contains(&Ipv4Addr::from(next)) {
            next += 1;
        }
        if next > last {
            return Err(GwFull {
                subnet,
                name: name.clone(),
            });
        }
        taken.insert(Ipv4Addr::from(next));
        out.insert(name.clone(), Ipv4Addr::from(next));
    }
    Ok(out)
}

/// What a subnet of ours must not clash with: the node's addresses (but the gwbridge's) and the
/// destinations of its routes (but those through the gwbridge).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNets {
    pub addrs: Vec<(String, Ipv4Net)>,
    pub routes: Vec<Ipv4Net>,
}

impl NodeNets {
    pub fn new(seen: &vxlan::Observed) -> NodeNets {
        let ours = |dev: Option<&str>| dev == Some(GWBRIDGE);
        NodeNets {
            addrs: seen
                .links
                .iter()
                .filter(|l| !ours(Some(&l.name)))
                .flat_map(|l| l.addrs.iter().map(|a| (l.name.clone(), *a)))
                .collect(),
            routes: seen
                .routes
                .iter()
                .filter(|r| !ours(r.dev.as_deref()))
                .map(|r| r.dst)
                .collect(),
        }
    }

    /// Refuses a subnet that overlaps one of the node's addresses (their networks) or routes,
    /// or one of `more`. The default route overlaps everything and says nothing, so it is not
    /// counted.
    pub fn check_clash(&self, what: &str, subnet: Ipv4Net, more: &[Ipv4Net]) -> Result<(), String> {
        if let Some((dev, a)) = self
            .addrs
            .iter()
            .find(|(_, a)| proto::subnets_overlap(&subnet, &a.trunc()))
        {
            return Err(format!(
                "{what} subnet {subnet} clashes with the node's address {a} on {dev}: choose another subnet"
            ));
        }
        if let Some(r) = self
            .routes
            .iter()
            .chain(more)
            .find(|r| r.prefix_len() > 0 && proto::subnets_overlap(&subnet, r))
        {
            return Err(format!(
                "{what} subnet {subnet} clashes with the node's route to {r}: choose another subnet"
            ));
        }
        Ok(())
    }
}

fn port_key(p: &PortConfig) -> PortKey {
    PortKey {
        proto: match p.protocol {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
        },
        port: p.published,
    }
}

fn ports(svc: &PublishedService, mode: PublishMode) -> impl Iterator<Item = &PortConfig> {
    svc.ports.iter().filter(move |p| p.mode == mode)
}

/// The local task that answers a service's host-mode ports: the first by name.
pub fn host_target<'a>(service_id: &str, running: &[&'a TaskSpec]) -> Option<&'a TaskSpec> {
    running
        .iter()
        .copied()
        .filter(|t| t.service_id == service_id)
        .min_by(|a, b| a.name.cmp(&b.name))
}

/// The node table. `running`: this node's tasks whose process runs.
pub fn node_state(
    desired: &Assignment,
    gw_subnet: Ipv4Net,
    gw_addrs: &BTreeMap<String, Ipv4Addr>,
    running: &[&TaskSpec],
) -> NodeState {
    let mut st = NodeState::new(NodeConfig {
        gwbridge: GWBRIDGE.into(),
        gwbridge_subnet: gw_subnet,
        ingress_sbox_ip: sbox_gw_ip(gw_subnet),
    });
    for svc in &desired.published {
        if desired.ingress.is_some() {
            st.ingress_ports
                .extend(ports(svc, PublishMode::Ingress).map(port_key));
        }
        let Some(task) = host_target(&svc.service_id, running) else {
            continue;
        };
        let Some(ip) = gw_addrs.get(&task.name) else {
            continue;
        };
        for p in ports(svc, PublishMode::Host) {
            st.host_ports
                .insert(port_key(p), SocketAddrV4::new(*ip, p.target));
        }
    }
    st
}

/// The ingress_sbox table (and the load balancer's desired state), when there is an ingress.
pub fn sbox_state(desired: &Assignment, lb: LbKind) -> Option<SboxState> {
    let ingress = desired.ingress.as_ref()?;
    let mut st = SboxState::new(SboxConfig {
        ingress_iface: SBOX_INGRESS_IF.into(),
        ingress_subnet: ingress.network.subnet,
        ingress_ip: ingress.sbox_addr.addr(),
        lb,
    });
    for svc in &desired.published {
        let ports: BTreeSet<PortKey> = ports(svc, PublishMode::Ingress).map(port_key).collect();
        // Mark 0 is "unmarked" to the kernel: such a service cannot be balanced.
        let (false, Ok(mark)) = (ports.is_empty(), Fwmark::new(svc.fwmark)) else {
            continue;
        };
        st.services.insert(
            mark,
            SboxService {
                ports,
                backends: svc.backends.iter().copied().collect(),
                vip: svc.vip,
            },
        );
    }
    Some(st)
}

/// The /32 addresses a sandbox's eth0 holds besides its own: the VIPs its table marks.
pub fn vip_aliases(st: &SboxState) -> Vec<Ipv4Net> {
    st.services
        .values()
        .filter_map(|s| s.vip)
        .map(Ipv4Net::from)
        .collect()
}

/// The overlay sandboxes (`1-<netid>`) by name, with their network: the ingress network's
/// always, and the sandbox of every network one of `tasks` is attached to. The planner makes
/// those of the active tasks; the pass writes the sysctls of those of the running ones.
pub fn overlay_networks<'a>(
    desired: &'a Assignment,
    tasks: &[&TaskSpec],
) -> BTreeMap<String, &'a NetworkSpec> {
    let ingress = desired.ingress.as_ref().map(|i| &i.network);
    let networks: BTreeMap<&str, &NetworkSpec> = desired
        .networks
        .iter()
        .chain(ingress)
        .map(|n| (n.id.as_str(), n))
        .collect();
    let attached = tasks
        .iter()
        .flat_map(|t| &t.attachments)
        .filter_map(|a| networks.get(a.network_id.as_str()).copied());
    ingress
        .into_iter()
        .chain(attached)
        .map(|n| (sandbox_name(&n.id), n))
        .collect()
}

/// The namespace of a network's IPVS load balancer, as Swarm names it.
pub fn lb_netns_name(network_name: &str) -> String {
    format!("lb_{network_name}")
}

/// The networks that get a load-balancer namespace (IPVS): those `tasks` use, with an lb
/// address, and a name a namespace file can carry.
pub fn lb_networks<'a>(
    desired: &'a Assignment,
    tasks: &[&TaskSpec],
) -> BTreeMap<String, &'a NetworkSpec> {
    desired
        .networks
        .iter()
        .filter(|n| n.lb_addr.is_some())
        .filter(|n| {
            tasks
                .iter()
                .any(|t| t.attachments.iter().any(|a| a.network_id == n.id))
        })
        .map(|n| (lb_netns_name(&n.name), n))
        .filter(|(name, _)| netns::validate_name(name).is_ok())
        .collect()
}

/// The table and IPVS services of a network's `lb_<name>` namespace: each VIP marked with its
/// service's fwmark, the service's running tasks as backends, SNAT to the lb address (so
/// replies come back through this node), as Swarm does.
pub fn lb_state(net: &NetworkSpec) -> Option<SboxState> {
    let lb_addr = net.lb_addr?;
    let mut st = SboxState::new(SboxConfig {
        ingress_iface: LB_IF.into(),
        ingress_subnet: net.subnet,
        ingress_ip: lb_addr.addr(),
        lb: LbKind::Ipvs,
    });
    for svc in net
        .services
        .iter()
        .filter(|s| s.endpoint_mode == EndpointMode::Vip)
    {
        let (Some(vip), Ok(mark)) = (svc.vip, Fwmark::new(svc.fwmark)) else {
            continue;
        };
        st.services.insert(
            mark,
            SboxService {
                ports: BTreeSet::new(),
                backends: svc.tasks.iter().map(|t| t.addr).collect(),
                vip: Some(vip),
            },
        );
    }
    Some(st)
}

/// The network's tasks that left the balancers but may still run, by their service's mark.
pub fn draining(net: &NetworkSpec) -> DrainingBackends {
    let mut out = DrainingBackends::new();
    for d in &net.draining {
        out.entry(d.fwmark).or_default().insert(d.addr);
    }
    out
}

/// The VIPs of a network's vip-mode services → their running tasks' addresses. dnsrr services
/// have no VIP and are not balanced.
pub fn network_vips(net: &NetworkSpec) -> BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> {
    net.services
        .iter()
        .filter(|s| s.endpoint_mode == EndpointMode::Vip)
        .filter_map(|s| Some((s.vip?, s.tasks.iter().map(|t| t.addr).collect())))
        .collect()
}

/// Each local task's table: its ingress-mode published ports redirected to their targets
/// and, when the nftables load balancer balances VIPs in the client's namespace, the VIPs of
/// the services on its networks. Every running task has one, so a change (a service that
/// goes, a task that leaves it) always reaches the tables that held it.
pub fn task_states(
    desired: &Assignment,
    running: &[&TaskSpec],
    lb: LbKind,
) -> BTreeMap<String, TaskState> {
    let ingress = desired.ingress.as_ref().map(|i| &i.network);
    // Once per network, not per task: every local task's table changes with a service.
    let vips: BTreeMap<&str, BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>> = match lb {
        LbKind::Nftables => desired
            .networks
            .iter()
            .map(|n| (n.id.as_str(), network_vips(n)))
            .collect(),
        LbKind::Ipvs => BTreeMap::new(),
    };
    let mut out = BTreeMap::new();
    for t in running {
        let on_ingress =
            ingress.and_then(|net| t.attachments.iter().find(|a| a.network_id == net.id));
        let redirects = match on_ingress {
            Some(_) => desired
                .published
                .iter()
                .filter(|s| s.service_id == t.service_id)
                .flat_map(|s| ports(s, PublishMode::Ingress))
                .map(|p| (port_key(p), p.target))
                .collect(),
            None => BTreeMap::new(),
        };
        let task_vips = t
            .attachments
            .iter()
            .filter_map(|a| vips.get(a.network_id.as_str()))
            .flat_map(|v| v.iter().map(|(vip, b)| (*vip, b.clone())))
            .collect();
        out.insert(
            t.name.clone(),
            TaskState {
                ingress_ip: on_ingress.map(|a| a.addr.addr()),
                redirects,
                vips: task_vips,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::{IngressSpec, NetworkService, ServiceTask};
    use proto::model::{endpoint_mac, Attachment};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn gw_addresses_are_stable_reused_and_sbox_is_second() {
        let sub = net("172.18.0.0/16");
        assert_eq!(gw_gateway(sub), net("172.18.0.1/16"));
        let a = allocate_gw(
            sub,
            &BTreeMap::new(),
            &names(&[INGRESS_SBOX, "web.1.a", "web.2.b"]),
        )
        .unwrap();
        assert_eq!(a[INGRESS_SBOX], ip("172.18.0.2"));
        assert_eq!(a["web.1.a"], ip("172.18.0.3"));
        assert_eq!(a["web.2.b"], ip("172.18.0.4"));
        // web.1.a leaves, web.3.c arrives: web.2.b keeps .4, the newcomer takes the freed .3.
        let b = allocate_gw(sub, &a, &names(&[INGRESS_SBOX, "web.2.b", "web.3.c"])).unwrap();
        assert_eq!(b["web.2.b"], ip("172.18.0.4"));
        assert_eq!(b["web.3.c"], ip("172.18.0.3"));
        assert!(!b.contains_key("web.1.a"));
        // A persisted address outside the (changed) subnet is replaced.
        let c = allocate_gw(net("10.99.0.0/24"), &b, &names(&["web.2.b"])).unwrap();
        assert_eq!(c["web.2.b"], ip("10.99.0.3"));
        // Exhaustion is an error naming the subnet.
        let tiny = net("10.0.0.0/29");
        let err = allocate_gw(
            tiny,
            &BTreeMap::new(),
            &names(&["a", "b", "c", "d", "e", "f"]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("10.0.0.0/29"), "{err}");
    }

    #[test]
    fn subnets_that_clash_with_the_node_are_refused() {
        let route = |dst: &str, dev: &str| vxlan::RouteEntry {
            dst: net(dst),
            gateway: None,
            dev: Some(dev.into()),
        };
        let link = |name: &str, addr: &str| vxlan::LinkState {
            name: name.into(),
            index: 1,
            mtu: 1500,
            up: true,
            mac: None,
            master: None,
            addrs: vec![net(addr)],
            kind: vxlan::LinkKind::Bridge,
        };
        let node = NodeNets::new(&vxlan::Observed {
            links: vec![
                link("eth0", "192.168.56.11/24"),
                link(GWBRIDGE, "172.18.0.1/16"),
            ],
            routes: vec![
                route("0.0.0.0/0", "eth0"),
                route("192.168.56.0/24", "eth0"),
                route("10.20.0.0/16", "eth0"),
                route("172.18.0.0/16", GWBRIDGE),
                route("10.30.0.7/32", "eth0"),
            ],
            ..Default::default()
        });
        assert_eq!(node.addrs, [("eth0".into(), net("192.168.56.11/24"))]);
        assert_eq!(
            node.routes,
            [
                net("0.0.0.0/0"),
                net("192.168.56.0/24"),
                net("10.20.0.0/16"),
                net("10.30.0.7/32")
            ]
        );
        let ok = |s: &str| node.check_clash("gwbridge", net(s), &[]);
        assert!(ok("172.18.0.0/16").is_ok());
        let err = ok("192.168.0.0/16").unwrap_err();
        assert!(err.contains("192.168.56.11/24 on eth0"), "{err}");
        assert!(ok("192.168.56.128/25").is_err());
        assert!(ok("10.20.5.0/24")
            .unwrap_err()
            .contains("route to 10.20.0.0/16"));
        assert!(ok("10.30.0.0/24").is_err());
        assert!(node
            .check_clash("ingress", net("172.18.5.0/24"), &[net("172.18.0.0/16")])
            .is_err());
        assert!(check_gw_subnet(net("172.18.0.0/30")).is_err());
        assert!(check_gw_subnet(net("172.18.0.1/16")).is_err());
        assert!(check_gw_subnet(net("172.18.0.0/16")).is_ok());
    }

    fn task(name: &str, svc: &str, ingress_ip: Option<&str>) -> TaskSpec {
        TaskSpec {
            id: name.into(),
            name: name.into(),
            service_id: svc.into(),
            service_name: svc.into(),
            command: vec![],
            attachments: ingress_ip
                .map(|a| Attachment {
                    network_id: "ing".into(),
                    addr: format!("{a}/16").parse().unwrap(),
                    mac: endpoint_mac(ip(a)),
                })
                .into_iter()
                .collect(),
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    fn port(published: u16, target: u16, protocol: Protocol, mode: PublishMode) -> PortConfig {
        PortConfig {
            protocol,
            published,
            target,
            mode,
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            revision: 1,
            ingress: Some(Box::new(IngressSpec {
                network: NetworkSpec {
                    id: "ing".into(),
                    name: "ingress".into(),
                    subnet: net("10.255.0.0/16"),
                    gateway: net("10.255.0.1/16"),
                    vni: 4096,
                    peers: vec![],
                    lb_addr: None,
                    draining: vec![],
                    services: vec![],
                    encrypted: false,
                },
                sbox_addr: net("10.255.0.2/16"),
            })),
            published: vec![
                PublishedService {
                    service_id: "web".into(),
                    service_name: "web".into(),
                    fwmark: 256,
                    ports: vec![
                        port(80, 8080, Protocol::Tcp, PublishMode::Ingress),
                        port(53, 5353, Protocol::Udp, PublishMode::Ingress),
                    ],
                    backends: vec![ip("10.255.0.10"), ip("10.255.0.11")],
                    vip: None,
                },
                PublishedService {
                    service_id: "edge".into(),
                    service_name: "edge".into(),
                    fwmark: 257,
                    ports: vec![port(81, 8080, Protocol::Tcp, PublishMode::Host)],
                    backends: vec![],
                    vip: None,
                },
            ],
            ..Assignment::default()
        }
    }

    #[test]
    fn every_node_balances_ingress_ports_over_all_backends() {
        let a = assignment();
        // A node without any task programs the same ingress ports and services.
        let sbox = sbox_state(&a, LbKind::Ipvs).unwrap();
        assert_eq!(sbox.config.ingress_ip, ip("10.255.0.2"));
        assert_eq!(
            sbox.services.len(),
            1,
            "host-only services are not balanced"
        );
        let web = &sbox.services[&Fwmark::new(256).unwrap()];
        assert_eq!(
            web.ports,
            [PortKey::tcp(80), PortKey::udp(53)].into_iter().collect()
        );
        assert_eq!(
            web.backends,
            [ip("10.255.0.10"), ip("10.255.0.11")].into_iter().collect()
        );
        let node = node_state(&a, net("172.18.0.0/16"), &BTreeMap::new(), &[]);
        assert_eq!(node.config.ingress_sbox_ip, ip("172.18.0.2"));
        assert_eq!(node.ingress_ports.len(), 2);
        assert!(node.host_ports.is_empty(), "no local task, no host port");
        assert!(task_states(&a, &[], LbKind::Nftables).is_empty());

        // Without an ingress network nothing is published in ingress mode.
        let none = Assignment {
            ingress: None,
            ..a.clone()
        };
        assert!(sbox_state(&none, LbKind::Nftables).is_none());
        assert!(
            node_state(&none, net("172.18.0.0/16"), &BTreeMap::new(), &[])
                .ingress_ports
                .is_empty()
        );
    }

    #[test]
    fn local_tasks_redirect_and_host_ports_go_to_the_first_local_task() {
        let a = assignment();
        let w = task("web.1.x", "web", Some("10.255.0.10"));
        let e2 = task("edge.2.b", "edge", None);
        let e1 = task("edge.1.c", "edge", None);
        let gw: BTreeMap<String, Ipv4Addr> = [
            ("edge.2.b".to_string(), ip("172.18.0.3")),
            ("edge.1.c".to_string(), ip("172.18.0.4")),
        ]
        .into();
        let running = [&w, &e2, &e1];
        assert_eq!(host_target("edge", &running).unwrap().name, "edge.1.c");
        let node = node_state(&a, net("172.18.0.0/16"), &gw, &running);
        assert_eq!(
            node.host_ports,
            [(PortKey::tcp(81), "172.18.0.4:8080".parse().unwrap())].into()
        );
        let tasks = task_states(&a, &running, LbKind::Nftables);
        assert_eq!(tasks.len(), 3, "every running task has a table");
        let t = &tasks["web.1.x"];
        assert_eq!(t.ingress_ip, Some(ip("10.255.0.10")));
        assert_eq!(
            t.redirects,
            [(PortKey::tcp(80), 8080), (PortKey::udp(53), 5353)].into()
        );
        let off = &tasks["edge.1.c"];
        assert!(off.ingress_ip.is_none() && off.redirects.is_empty() && off.vips.is_empty());
    }

    fn service(
        name: &str,
        mode: EndpointMode,
        vip: Option<&str>,
        tasks: &[&str],
    ) -> NetworkService {
        NetworkService {
            service_id: name.into(),
            name: name.into(),
            aliases: vec![],
            endpoint_mode: mode,
            vip: vip.map(ip),
            fwmark: if mode == EndpointMode::Vip { 300 } else { 0 },
            tasks: tasks
                .iter()
                .enumerate()
                .map(|(i, a)| ServiceTask {
                    task_id: format!("{name}{i}"),
                    slot: i as u64 + 1,
                    addr: ip(a),
                })
                .collect(),
        }
    }

    fn user_net(id: &str, subnet: &str, services: Vec<NetworkService>) -> NetworkSpec {
        let subnet = net(subnet);
        NetworkSpec {
            id: id.into(),
            name: id.into(),
            subnet,
            gateway: Ipv4Net::new(nth(subnet, 1), subnet.prefix_len()).unwrap(),
            vni: 4100,
            peers: vec![],
            lb_addr: None,
            draining: vec![],
            encrypted: false,
            services,
        }
    }

    fn on(name: &str, svc: &str, nets: &[(&str, &str)]) -> TaskSpec {
        TaskSpec {
            attachments: nets
                .iter()
                .map(|(n, a)| Attachment {
                    network_id: n.to_string(),
                    addr: format!("{a}/24").parse().unwrap(),
                    mac: endpoint_mac(ip(a)),
                })
                .collect(),
            ..task(name, svc, None)
        }
    }

    #[test]
    fn tasks_balance_the_vips_of_their_networks_with_nftables_only() {
        let mut a = assignment();
        a.networks = vec![
            user_net(
                "back",
                "10.0.9.0/24",
                vec![
                    service(
                        "api",
                        EndpointMode::Vip,
                        Some("10.0.9.2"),
                        &["10.0.9.5", "10.0.9.6"],
                    ),
                    service("db", EndpointMode::Dnsrr, None, &["10.0.9.7"]),
                    service("idle", EndpointMode::Vip, Some("10.0.9.3"), &[]),
                ],
            ),
            user_net(
                "front",
                "10.0.8.0/24",
                vec![service(
                    "web",
                    EndpointMode::Vip,
                    Some("10.0.8.2"),
                    &["10.0.8.5"],
                )],
            ),
        ];
        let client = on("cli.1.c", "cli", &[("back", "10.0.9.10")]);
        let both = on(
            "gw.1.g",
            "gw",
            &[("front", "10.0.8.10"), ("back", "10.0.9.11")],
        );
        let tasks = task_states(&a, &[&client, &both], LbKind::Nftables);
        let want_back: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = [
            (ip("10.0.9.2"), [ip("10.0.9.5"), ip("10.0.9.6")].into()),
            (ip("10.0.9.3"), BTreeSet::new()),
        ]
        .into();
        assert_eq!(tasks["cli.1.c"].vips, want_back, "dnsrr has no VIP");
        let mut want_both = want_back.clone();
        want_both.insert(ip("10.0.8.2"), [ip("10.0.8.5")].into());
        assert_eq!(tasks["gw.1.g"].vips, want_both);
        // With IPVS the VIPs live in lb_<network>: the tasks' tables hold none.
        let ipvs = task_states(&a, &[&client, &both], LbKind::Ipvs);
        assert!(ipvs.values().all(|t| t.vips.is_empty()));
    }

    #[test]
    fn overlay_sandboxes_are_ingress_and_the_networks_tasks_use() {
        let mut a = assignment();
        a.networks = vec![
            user_net("back", "10.0.9.0/24", vec![]),
            user_net("front", "10.0.8.0/24", vec![]),
            user_net("idle", "10.0.7.0/24", vec![]),
        ];
        let names = |a: &Assignment, tasks: &[&TaskSpec]| -> Vec<(String, String)> {
            overlay_networks(a, tasks)
                .into_iter()
                .map(|(sb, n)| (sb, n.id.clone()))
                .collect()
        };
        let pair = |sb: &str, id: &str| (sb.to_string(), id.to_string());
        // A node without tasks still has the ingress network's sandbox.
        assert_eq!(names(&a, &[]), [pair("1-ing", "ing")]);
        let web = on(
            "web.1.a",
            "web",
            &[("ing", "10.255.0.5"), ("back", "10.0.9.5")],
        );
        let gw = on(
            "gw.1.b",
            "gw",
            &[("back", "10.0.9.6"), ("front", "10.0.8.6")],
        );
        // A network no listed task uses has none; one named by no network is skipped.
        let lost = on("lost.1.c", "lost", &[("gone", "10.0.6.5")]);
        assert_eq!(
            names(&a, &[&web, &gw, &lost]),
            [
                pair("1-back", "back"),
                pair("1-front", "front"),
                pair("1-ing", "ing")
            ]
        );
        a.ingress = None;
        assert_eq!(names(&a, &[&web]), [pair("1-back", "back")]);
    }

    #[test]
    fn lb_namespaces_mark_each_vip_for_its_service_and_snat_to_the_lb_address() {
        let mut back = user_net(
            "back",
            "10.0.9.0/24",
            vec![
                service(
                    "api",
                    EndpointMode::Vip,
                    Some("10.0.9.2"),
                    &["10.0.9.5", "10.0.9.6"],
                ),
                service("db", EndpointMode::Dnsrr, None, &["10.0.9.7"]),
            ],
        );
        assert!(lb_state(&back).is_none(), "no lb address, no lb namespace");
        back.lb_addr = Some(net("10.0.9.250/24"));
        let st = lb_state(&back).unwrap();
        assert_eq!(st.config.ingress_ip, ip("10.0.9.250"));
        assert_eq!(st.config.ingress_subnet, net("10.0.9.0/24"));
        assert_eq!(st.config.lb, LbKind::Ipvs);
        assert_eq!(
            st.services.keys().map(|m| m.get()).collect::<Vec<_>>(),
            [300],
            "dnsrr is not balanced"
        );
        let api = &st.services[&Fwmark::new(300).unwrap()];
        assert_eq!(api.vip, Some(ip("10.0.9.2")));
        assert!(api.ports.is_empty());
        assert_eq!(api.backends, [ip("10.0.9.5"), ip("10.0.9.6")].into());
        assert_eq!(vip_aliases(&st), [net("10.0.9.2/32")]);

        let mut a = assignment();
        a.networks = vec![back, user_net("idle", "10.0.8.0/24", vec![])];
        a.networks[1].lb_addr = Some(net("10.0.8.250/24"));
        let t = on("cli.1.c", "cli", &[("back", "10.0.9.10")]);
        let lbs = lb_networks(&a, &[&t]);
        assert_eq!(
            lbs.keys().collect::<Vec<_>>(),
            ["lb_back"],
            "only networks in use"
        );
        a.networks[0].name = "a/b".into();
        assert!(lb_networks(&a, &[&t]).is_empty(), "no such namespace name");
    }
}
