//! The projection of the state to the agents: each node's [`Assignment`] (its tasks, the
//! networks they use with their peers on other nodes, the ingress network and its peers, every
//! published service, and the keys where a network is encrypted), which nodes carry the routing
//! mesh, and [`State::refresh_assignments`], which gives a node whose assignment changed the
//! next revision. Nothing here changes what should run, only what each node is told.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use proto::agent::{
    Assignment, DrainingBackend, IngressSpec, NetworkService, NetworkSpec, Peer, PublishedService,
    TaskSpec,
};
use proto::model::{endpoint_mac, Network};

use super::{NodeRecord, State, Task};

impl State {
    /// Why a node is not given the ingress network (the routing mesh): it is encrypted and the
    /// node cannot do IPsec ESP. Rather than carry the routing mesh's traffic in clear to and
    /// from such a node, the cluster leaves it out: its ingress-mode published ports do not
    /// answer, no other node balances to it, and no task with such a port is placed there.
    pub fn no_routing_mesh(&self, node_id: &str) -> Option<String> {
        let record = self.nodes.get(node_id)?;
        (!self.carries_ingress(record)).then(|| {
            "the ingress network is encrypted (mesh-manager --ingress-encrypted) and this node cannot do IPsec ESP (see no_encryption): it has no routing mesh, its ingress-mode published ports do not answer (host-mode ones do)".to_string()
        })
    }

    /// Whether a node gets the ingress network: every node, except, while it is encrypted,
    /// those that cannot do ESP (see [`State::no_routing_mesh`]).
    fn carries_ingress(&self, record: &NodeRecord) -> bool {
        record.node.no_encryption.is_none() || !self.ingress().is_some_and(|n| n.encrypted)
    }

    /// One node's assignment without what every node of a network shares (its peers and
    /// services, and the published services, all left empty) and without its revision: its
    /// tasks, the networks they use with the node's load-balancer address and the draining
    /// backends, the ingress network and the keys. Deterministic (sorted), so it can be
    /// compared.
    fn own_part(
        &self,
        node_id: &str,
        mine: &[&Task],
        draining: &BTreeMap<String, Vec<DrainingBackend>>,
    ) -> Assignment {
        let tasks = mine
            .iter()
            .map(|t| {
                let service = &self.services[&t.service_id];
                let runtime = t.runtime_in(service);
                TaskSpec {
                    id: t.id.clone(),
                    name: format!("{}.{}.{}", service.spec.name, t.slot, t.id),
                    service_id: service.id.clone(),
                    service_name: service.spec.name.clone(),
                    command: runtime.command,
                    attachments: t.attachments.clone(),
                    env: runtime.env,
                    stop_grace_ms: runtime.stop_grace_ms,
                    health: runtime.health,
                }
            })
            .collect();
        let network_ids: BTreeSet<&String> = mine
            .iter()
            .flat_map(|t| &t.attachments)
            .map(|a| &a.network_id)
            .collect();
        // Ingress is not among the lazily built networks: it has its own field, on every node.
        let networks: Vec<NetworkSpec> = network_ids
            .into_iter()
            .filter_map(|id| self.networks.get(id))
            .filter(|r| !r.network.ingress)
            .map(|r| {
                let mut spec = network_spec(&r.network, draining);
                spec.lb_addr = self.nodes.get(node_id).and_then(|n| {
                    let ip = *n.lb_addrs.get(&r.network.id)?;
                    Ipv4Net::new(ip, r.network.subnet.prefix_len()).ok()
                });
                spec
            })
            .collect();
        let sbox = self
            .nodes
            .get(node_id)
            .filter(|r| self.carries_ingress(r))
            .and_then(|r| r.ingress_addr);
        let ingress = self.ingress().zip(sbox).map(|(net, ip)| {
            Box::new(IngressSpec {
                network: network_spec(net, draining),
                sbox_addr: Ipv4Net::new(ip, net.subnet.prefix_len())
                    .expect("prefix of a valid subnet"),
            })
        });
        // Keys go only to nodes that carry an encrypted network (the ingress one included).
        let encryption = networks
            .iter()
            .chain(ingress.as_ref().map(|i| &i.network))
            .any(|n| n.encrypted)
            .then(|| self.esp_keys.for_agents())
            .flatten();
        Assignment {
            revision: 0,
            networks,
            tasks,
            ingress,
            published: Vec::new(),
            encryption,
        }
    }

    /// Every service with published ports, by name, the same for every node. Backends are the
    /// ingress addresses of the service's running tasks, sorted; a service without an
    /// ingress-mode port has none and fwmark 0.
    pub fn published(&self) -> Vec<PublishedService> {
        let ingress = self.ingress().map(|n| n.id.as_str());
        let mut backends: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| self.serves(t)) {
            let addrs = t
                .attachments
                .iter()
                .filter(|a| Some(a.network_id.as_str()) == ingress)
                .map(|a| a.addr.addr());
            backends.entry(&t.service_id).or_default().extend(addrs);
        }
        let mut out: Vec<PublishedService> = self
            .services
            .values()
            .filter(|s| !s.spec.ports.is_empty())
            .map(|s| {
                let mut ips = backends.remove(s.id.as_str()).unwrap_or_default();
                ips.sort();
                let ingress_port = s.has_ingress_port();
                PublishedService {
                    service_id: s.id.clone(),
                    service_name: s.spec.name.clone(),
                    fwmark: s.fwmark.filter(|_| ingress_port).unwrap_or(0),
                    ports: s.spec.ports.clone(),
                    backends: ips,
                    vip: ingress.and_then(|n| s.vips.get(n)).copied(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        out
    }

    /// Every endpoint of every network, sorted, with the VTEP of its node: tasks (also those
    /// stopping, still reachable), the nodes' load balancers and, on the ingress network, the
    /// ingress sandboxes of the nodes that carry it. The same list goes to every node of a
    /// network; each agent skips the endpoints behind its own VTEP.
    fn endpoints(&self) -> BTreeMap<&str, Vec<Peer>> {
        let mut out: BTreeMap<&str, Vec<Peer>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_reachable()) {
            let Some(node) = t.node_id.as_deref().and_then(|n| self.nodes.get(n)) else {
                continue;
            };
            for a in &t.attachments {
                out.entry(&a.network_id).or_default().push(Peer {
                    ip: a.addr.addr(),
                    mac: a.mac.clone(),
                    vtep: node.node.addr,
                });
            }
        }
        let ingress = self.ingress().map(|n| n.id.as_str());
        for r in self.nodes.values() {
            for (network, &ip) in &r.lb_addrs {
                out.entry(network).or_default().push(Peer {
                    ip,
                    mac: endpoint_mac(ip),
                    vtep: r.node.addr,
                });
            }
            if let (Some(ingress), Some(ip)) = (ingress, r.ingress_addr) {
                if self.carries_ingress(r) {
                    out.entry(ingress).or_default().push(Peer {
                        ip,
                        mac: endpoint_mac(ip),
                        vtep: r.node.addr,
                    });
                }
            }
        }
        for peers in out.values_mut() {
            peers.sort_by_key(|p| (p.ip, p.vtep));
        }
        out
    }

    /// Whether every node's assignment would come out of `self` as it came out of `prev`, which
    /// was projected when it was committed: nothing the projection reads differs. Agents
    /// re-report running tasks (a new pid, a restart of their session) far more often than
    /// anything they are told changes, and such a batch then costs no projection. Records
    /// not written since `prev` are compared by pointer ([`super::ArcCow`]); listing every
    /// field makes a new one a compile error here, so none is left out by mistake.
    pub fn projects_as(&self, prev: &State) -> bool {
        let State {
            nodes,
            networks,
            services,
            tasks,
            // Written by the projection itself.
            revision: _,
            last_vni,
            last_fwmark,
            agent_port,
            api_port,
            cluster_id,
            join_secrets,
            revoked,
            last_subnet,
            esp_keys,
        } = self;
        *last_vni == prev.last_vni
            && *last_fwmark == prev.last_fwmark
            && *agent_port == prev.agent_port
            && *api_port == prev.api_port
            && *cluster_id == prev.cluster_id
            && *join_secrets == prev.join_secrets
            && *revoked == prev.revoked
            && *last_subnet == prev.last_subnet
            && *esp_keys == prev.esp_keys
            && *networks == prev.networks
            && *services == prev.services
            && nodes.len() == prev.nodes.len()
            && nodes
                .iter()
                .zip(&prev.nodes)
                .all(|((a, ra), (b, rb))| a == b && ra.projects_as(rb))
            && tasks.len() == prev.tasks.len()
            && tasks.iter().zip(&prev.tasks).all(|((a, ta), (b, tb))| {
                a == b && (super::ArcCow::same_record(ta, tb) || ta.projects_as(tb))
            })
    }

    /// Recomputes every node's assignment; a node whose assignment changed gets the next
    /// revision. Returns the ids of those nodes, to be pushed to their agents.
    ///
    /// Cost: what every node shares (each network's endpoints and services, the published
    /// services) is computed once, and a node is given a new assignment only if its own part or
    /// a shared list it uses changed; so a change that moves no endpoint costs O(tasks), not
    /// O(nodes × tasks).
    pub fn refresh_assignments(&mut self) -> Vec<String> {
        self.sync_lb_addrs();
        let published = self.published();
        let services = self.network_services();
        let draining = self.draining_backends();
        let endpoints = self.endpoints();
        let mut by_node: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_on_node()) {
            if let Some(node) = t.node_id.as_deref() {
                by_node.entry(node).or_default().push(t);
            }
        }
        let no_peers: Vec<Peer> = Vec::new();
        let peers_of = |n: &NetworkSpec| endpoints.get(n.id.as_str()).unwrap_or(&no_peers);
        let no_services: Vec<NetworkService> = Vec::new();
        // The ingress network's services are not given (its VIPs are in `published`).
        let ingress_id = self.ingress().map(|n| n.id.as_str());
        let services_of = |n: &NetworkSpec| {
            if Some(n.id.as_str()) == ingress_id {
                &no_services
            } else {
                services.get(&n.id).unwrap_or(&no_services)
            }
        };
        // Whether a network's endpoints and services are as the nodes have them. Every node
        // that has a network was given the same lists at the last refresh (a node never given
        // one has no network), so the first such node tells for all.
        let mut shared_same: BTreeMap<String, bool> = BTreeMap::new();
        let mut fresh: Vec<(String, Assignment)> = Vec::new();
        for (id, record) in &self.nodes {
            let mine = by_node.get(id.as_str()).map_or(&[][..], |v| v.as_slice());
            let own = self.own_part(id, mine, &draining);
            let current = &record.assignment;
            let nets_now: Vec<&NetworkSpec> = own
                .networks
                .iter()
                .chain(own.ingress.as_ref().map(|i| &i.network))
                .collect();
            let nets_then: Vec<&NetworkSpec> = current
                .networks
                .iter()
                .chain(current.ingress.as_ref().map(|i| &i.network))
                .collect();
            let same = own.tasks == current.tasks
                && own.encryption == current.encryption
                && own.ingress.as_ref().map(|i| i.sbox_addr)
                    == current.ingress.as_ref().map(|i| i.sbox_addr)
                && nets_now.len() == nets_then.len()
                && nets_now
                    .iter()
                    .zip(&nets_then)
                    .all(|(a, b)| same_but_peers(a, b))
                && current.published == published
                && nets_now.iter().zip(&nets_then).all(|(now, then)| {
                    *shared_same.entry(now.id.clone()).or_insert_with(|| {
                        then.peers == *peers_of(now) && then.services == *services_of(now)
                    })
                });
            if same {
                continue;
            }
            let mut a = own;
            for n in a.networks.iter_mut() {
                n.peers = peers_of(n).clone();
                n.services = services_of(n).clone();
            }
            if let Some(i) = a.ingress.as_mut() {
                i.network.peers = peers_of(&i.network).clone();
            }
            a.published = published.clone();
            fresh.push((id.clone(), a));
        }
        let mut changed = Vec::new();
        for (id, mut a) in fresh {
            a.revision = self.next_revision();
            self.nodes.get_mut(&id).expect("node exists").assignment = Arc::new(a);
            changed.push(id);
        }
        self.arm_drains();
        self.arm_keys();
        changed
    }
}

/// A network as a node is given it, without its peers (see [`State::endpoints`]) and without
/// the node's own parts (load-balancer address, services), which the caller fills in.
fn network_spec(
    network: &Network,
    draining: &BTreeMap<String, Vec<DrainingBackend>>,
) -> NetworkSpec {
    NetworkSpec {
        id: network.id.clone(),
        name: network.name.clone(),
        subnet: network.subnet,
        gateway: Ipv4Net::new(network.gateway, network.subnet.prefix_len())
            .expect("prefix of a valid subnet"),
        vni: network.vni,
        peers: Vec::new(),
        lb_addr: None,
        services: vec![],
        draining: draining.get(&network.id).cloned().unwrap_or_default(),
        encrypted: network.encrypted,
    }
}

/// Equal in all but the peers and services, which every node of the network shares. Listing
/// every field makes a new one a compile error here.
fn same_but_peers(a: &NetworkSpec, b: &NetworkSpec) -> bool {
    let NetworkSpec {
        id,
        name,
        subnet,
        gateway,
        vni,
        peers: _,
        lb_addr,
        services: _,
        draining,
        encrypted,
    } = a;
    *id == b.id
        && *name == b.name
        && *subnet == b.subnet
        && *gateway == b.gateway
        && *vni == b.vni
        && *lb_addr == b.lb_addr
        && *draining == b.draining
        && *encrypted == b.encrypted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{
        add_network, cluster, current, node_id, published_spec, report, run_all, settle, spec, web,
        MANAGER,
    };
    use proto::agent::{EspSupport, ESP_KEY_BYTES};
    use proto::model::TaskState;

    #[test]
    fn encrypted_networks_place_on_esp_nodes_and_carry_keys_there_only() {
        let mut s = cluster(3);
        let opts = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let ip = MANAGER.parse().unwrap();
        // Unknown options and odd values change nothing.
        let before = s.clone();
        let err = s
            .create_network("sec", "overlay", None, &opts("mtu", "1400"), ip, 1)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create network sec: unsupported network option mtu: only encrypted is supported"
        );
        let err = s
            .create_network("sec", "overlay", None, &opts("encrypted", "yes"), ip, 1)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid value yes for option encrypted"),
            "{err}"
        );
        assert_eq!(s, before);

        let sec = s
            .create_network(
                "sec",
                "overlay",
                Some("10.0.7.0/24"),
                &opts("encrypted", ""),
                ip,
                1,
            )
            .unwrap();
        assert!(s.networks[&sec].network.encrypted);
        add_network(&mut s, "plain", "10.0.8.0/24");
        let mut fresh = {
            let mut n = 0u8;
            move || {
                n += 1;
                [n; ESP_KEY_BYTES]
            }
        };
        s.rotate_keys(1000, 3600, &mut fresh);
        assert_eq!(s.esp_keys.keys.len(), 1);

        // Until their agents say so, nodes cannot encrypt: nothing is placed.
        s.create_service(&spec("secure", 2, &["sec"]), 1).unwrap();
        s.create_service(&spec("open", 1, &["plain"]), 1).unwrap();
        s.reconcile(1);
        assert!(current(&s, "secure").iter().all(|t| t.node_id.is_none()));
        let (n1, n2, n3) = (
            node_id(&s, "node1"),
            node_id(&s, "node2"),
            node_id(&s, "node3"),
        );
        assert!(s.nodes[&n1]
            .node
            .no_encryption
            .as_deref()
            .unwrap()
            .contains("has not reported"));
        s.set_node_esp(&n1, Some(&EspSupport::Supported));
        s.set_node_esp(&n2, Some(&EspSupport::Supported));
        let no_esp = EspSupport::Unsupported {
            reason: "add an ESP state: Function not implemented".into(),
        };
        s.set_node_esp(&n3, Some(&no_esp));
        assert_eq!(
            s.nodes[&n3].node.no_encryption.as_deref(),
            Some("its kernel cannot do IPsec ESP (add an ESP state: Function not implemented): tasks of encrypted networks are not placed here")
        );
        s.reconcile(2);
        let placed: BTreeSet<String> = current(&s, "secure")
            .iter()
            .map(|t| t.node_id.clone().unwrap())
            .collect();
        assert_eq!(placed, BTreeSet::from([n1.clone(), n2.clone()]));

        s.refresh_assignments();
        for id in [&n1, &n2] {
            let a = &s.nodes[id].assignment;
            let net = a.networks.iter().find(|n| n.id == sec).unwrap();
            assert!(net.encrypted);
            let keys = a.encryption.as_ref().unwrap();
            assert_eq!(keys.keys.len(), 1);
            assert_eq!(keys.send, keys.keys[0].tag);
        }
        // The node with only the plain network's task gets no keys.
        let open_node = current(&s, "open")[0].node_id.clone().unwrap();
        let plain_only = [&n1, &n2, &n3]
            .into_iter()
            .find(|id| **id == open_node && !placed.contains(*id));
        if let Some(id) = plain_only {
            assert!(s.nodes[id].assignment.encryption.is_none());
        }
        assert!(s.nodes[&n3].assignment.encryption.is_none());
        assert!(s.nodes[&n3]
            .assignment
            .networks
            .iter()
            .all(|n| !n.encrypted));
    }

    #[test]
    fn an_encrypted_ingress_leaves_out_the_nodes_without_esp() {
        let mut s = cluster(3);
        let (n1, n2, n3) = (
            node_id(&s, "node1"),
            node_id(&s, "node2"),
            node_id(&s, "node3"),
        );
        for id in [&n1, &n2, &n3] {
            s.set_node_esp(id, Some(&EspSupport::Supported));
        }
        // A task with an ingress port on every node, while the ingress is plain.
        s.create_service(&published_spec("web", 3, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        run_all(&mut s, "web");
        let on = |s: &State| -> BTreeSet<String> {
            current(s, "web")
                .iter()
                .filter(|t| s.serves(t))
                .map(|t| t.node_id.clone().unwrap())
                .collect()
        };
        assert_eq!(on(&s), BTreeSet::from([n1.clone(), n2.clone(), n3.clone()]));
        assert!(!s.set_ingress_encrypted(false));
        assert_eq!(s.no_routing_mesh(&n3), None);

        // The manager restarts with --ingress-encrypted; node 3 reports it cannot do ESP.
        assert!(s.set_ingress_encrypted(true));
        assert!(!s.set_ingress_encrypted(true));
        assert!(s.ingress().unwrap().encrypted);
        assert!(s.has_encrypted_networks());
        let no_esp = EspSupport::Unsupported {
            reason: "add an ESP state: Function not implemented".into(),
        };
        s.set_node_esp(&n3, Some(&no_esp));
        let mut n = 0u8;
        s.rotate_keys(2000, 3600, &mut || {
            n += 1;
            [n; ESP_KEY_BYTES]
        });
        // Its task moves off node 3 (drains, then stops) to a node that can encrypt.
        let now = settle(&mut s, 2);
        assert_eq!(current(&s, "web").len(), 3);
        assert!(!on(&s).contains(&n3), "{:?}", on(&s));
        let history = s
            .tasks
            .values()
            .find(|t| t.node_id.as_ref() == Some(&n3) && t.is_history())
            .unwrap();
        assert!(
            history
                .error
                .as_deref()
                .unwrap()
                .contains("node node3 cannot do IPsec ESP"),
            "{:?}",
            history.error
        );
        s.reconcile(now);
        s.refresh_assignments();

        // Node 3: no ingress network, no keys; node inspect says why.
        let a3 = &s.nodes[&n3].assignment;
        assert!(a3.ingress.is_none());
        assert!(a3.encryption.is_none());
        let why = s.no_routing_mesh(&n3).unwrap();
        assert!(why.contains("the ingress network is encrypted"), "{why}");
        assert_eq!(
            crate::views::node(&s, &n3, &|_| None)
                .no_routing_mesh
                .as_deref(),
            Some(why.as_str())
        );
        // Nodes 1 and 2: an encrypted ingress whose peers are on each other only, and the keys,
        // without any encrypted user network.
        let ip3 = s.nodes[&n3].node.addr;
        for id in [&n1, &n2] {
            let a = &s.nodes[id].assignment;
            let ingress = a.ingress.as_ref().unwrap();
            assert!(ingress.network.encrypted);
            assert!(!ingress.network.peers.is_empty());
            assert!(ingress.network.peers.iter().all(|p| p.vtep != ip3));
            assert!(a.encryption.is_some());
            assert_eq!(s.no_routing_mesh(id), None);
            assert_eq!(crate::views::node(&s, id, &|_| None).no_routing_mesh, None);
        }
        // The balancers list the tasks on nodes 1 and 2 only.
        let backends = &s.published()[0].backends;
        assert_eq!(backends.len(), 3);
        for ip in backends {
            let t = s
                .tasks
                .values()
                .find(|t| s.serves(t) && t.attachments.iter().any(|a| a.addr.addr() == *ip))
                .unwrap();
            assert_ne!(t.node_id.as_ref(), Some(&n3));
        }

        // Back to a plain ingress: node 3 carries the routing mesh again.
        assert!(s.set_ingress_encrypted(false));
        s.refresh_assignments();
        assert!(s.nodes[&n3].assignment.ingress.is_some());
        assert_eq!(s.no_routing_mesh(&n3), None);
    }

    #[test]
    fn published_backends_follow_running_tasks_on_every_node() {
        let mut s = cluster(3);
        s.create_service(&published_spec("web", 2, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        let ids: Vec<String> = s.nodes.keys().cloned().collect();
        let revisions = |s: &State| -> Vec<u64> {
            ids.iter()
                .map(|id| s.nodes[id].assignment.revision)
                .collect()
        };
        // Every node, with or without tasks, has the ingress network, its sbox and the service;
        // no backend runs yet.
        for id in &ids {
            let a = &s.nodes[id].assignment;
            let ingress = a.ingress.as_ref().unwrap();
            assert_eq!(ingress.sbox_addr.addr(), s.nodes[id].ingress_addr.unwrap());
            assert_eq!(ingress.network.vni, 4096);
            assert!(a.networks.is_empty(), "ingress is not a lazy network");
            assert_eq!(a.published.len(), 1);
            assert_eq!(a.published[0].fwmark, 256);
            assert_eq!(a.published[0].ports, [web(80)]);
            assert!(a.published[0].backends.is_empty());
        }
        // Peers: every node's sbox and every task's ingress endpoint, each with its node's VTEP
        // (each agent skips those behind its own).
        let n3 = node_id(&s, "node3");
        let peers: Vec<(String, String)> = s.nodes[&n3]
            .assignment
            .ingress
            .as_ref()
            .unwrap()
            .network
            .peers
            .iter()
            .map(|p| {
                assert_eq!(p.mac, endpoint_mac(p.ip));
                (p.ip.to_string(), p.vtep.to_string())
            })
            .collect();
        let tasks = current(&s, "web");
        let mut expected = vec![
            ("10.255.0.2".to_string(), "192.168.56.11".to_string()),
            ("10.255.0.3".to_string(), "192.168.56.12".to_string()),
            ("10.255.0.4".to_string(), "192.168.56.13".to_string()),
        ];
        for t in &tasks {
            let vtep = s.nodes[t.node_id.as_ref().unwrap()].node.addr.to_string();
            expected.push((t.attachments[0].addr.addr().to_string(), vtep));
        }
        expected.sort();
        assert_eq!(peers, expected);

        let before = revisions(&s);
        let first = tasks[0].clone();
        report(&mut s, &first, TaskState::Running, None);
        s.reconcile(2);
        assert_eq!(
            s.refresh_assignments().len(),
            3,
            "every node follows the backends"
        );
        assert!(revisions(&s).iter().zip(&before).all(|(a, b)| a > b));
        for id in &ids {
            assert_eq!(
                s.nodes[id].assignment.published[0].backends,
                [first.attachments[0].addr.addr()]
            );
        }
        run_all(&mut s, "web");
        s.reconcile(3);
        s.refresh_assignments();
        let mut all: Vec<Ipv4Addr> = current(&s, "web")
            .iter()
            .map(|t| t.attachments[0].addr.addr())
            .collect();
        all.sort();
        assert_eq!(s.nodes[&ids[0]].assignment.published[0].backends, all);

        // A dying task leaves the backends everywhere; its replacement joins once it runs.
        report(&mut s, &first, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);
        assert_eq!(s.refresh_assignments().len(), 3);
        let left = &s.nodes[&ids[1]].assignment.published[0].backends;
        assert_eq!(left.len(), 1);
        assert!(!left.contains(&first.attachments[0].addr.addr()));
        // Scaling to zero empties the backends but the service stays published.
        s.scale_service("web", 0, 301).unwrap();
        s.reconcile(301);
        s.refresh_assignments();
        assert!(s.nodes[&ids[2]].assignment.published[0].backends.is_empty());
        assert!(s.nodes[&ids[2]].assignment.ingress.is_some());
    }

    #[test]
    fn assignments_name_own_tasks_and_every_endpoint_of_their_networks_as_peers() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        add_network(&mut s, "other", "10.0.10.0/24");
        s.create_service(&spec("web", 4, &["backend"]), 1).unwrap();
        s.create_service(&spec("db", 1, &["other"]), 1).unwrap();
        s.reconcile(1);
        let changed = s.refresh_assignments();
        assert_eq!(changed.len(), 3);

        let n1 = node_id(&s, "node1");
        let a = &s.nodes[&n1].assignment;
        assert!(a.revision > 0);
        // Placement runs by service name: db.1 takes node1, web.1 and web.2 the empty node2 and
        // node3, web.3 node1 (no web task yet), web.4 node2 (fewest tasks overall).
        let mut names: Vec<String> = a
            .tasks
            .iter()
            .map(|t| t.name.rsplit_once('.').unwrap().0.to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["db.1", "web.3"]);
        let backend = a.networks.iter().find(|n| n.name == "backend").unwrap();
        assert_eq!(backend.gateway.to_string(), "10.0.9.1/24");
        let own: BTreeSet<Ipv4Addr> = a
            .tasks
            .iter()
            .flat_map(|t| &t.attachments)
            .map(|x| x.addr.addr())
            .collect();
        // Every endpoint on backend: every task's there, and the three nodes' load balancers,
        // each with its node's VTEP.
        let on_backend = s
            .tasks
            .values()
            .flat_map(|t| &t.attachments)
            .filter(|x| x.network_id == backend.id)
            .count();
        assert_eq!(backend.peers.len(), on_backend + 3);
        let lb = |n: &str| s.nodes[&node_id(&s, n)].lb_addrs[&backend.id];
        for node in ["node1", "node2", "node3"] {
            assert!(backend.peers.iter().any(|p| p.ip == lb(node)), "{node}");
        }
        assert_eq!(backend.lb_addr.map(|a| a.addr()), Some(lb("node1")));
        let web = &backend.services[0];
        let web_id = s.find_service("web").unwrap();
        assert_eq!(
            (web.name.as_str(), web.vip, web.fwmark),
            (
                "web",
                Some(s.services[&web_id].vips[&backend.id]),
                s.services[&web_id].fwmark.unwrap()
            )
        );
        assert_eq!(backend.services.len(), 1);
        for peer in &backend.peers {
            // The node's own endpoints come with its own VTEP, which its agent skips.
            assert_eq!(
                own.contains(&peer.ip) || peer.ip == lb("node1"),
                peer.vtep.to_string() == "192.168.56.11",
                "{peer:?}"
            );
            assert_eq!(peer.mac, endpoint_mac(peer.ip));
        }
        // The same list goes to every node of the network.
        let n2 = node_id(&s, "node2");
        let backend2 = s.nodes[&n2]
            .assignment
            .networks
            .iter()
            .find(|n| n.name == "backend")
            .unwrap();
        assert_eq!(backend2.peers, backend.peers);
        let other = a.networks.iter().find(|n| n.name == "other").unwrap();
        // Only node1 is on it: its endpoints only, which its agent skips.
        assert!(other
            .peers
            .iter()
            .all(|p| p.vtep.to_string() == "192.168.56.11"));

        // Nothing changed: no new revision. A task on node2 ending changes node1's peers.
        assert!(s.refresh_assignments().is_empty());
        assert!(s.clone().projects_as(&s));
        // A task re-reported with another pid changes nothing a node is told: a transaction
        // may skip the projection, which would give no new revision anyway.
        let mut pid_only = s.clone();
        let running = pid_only
            .tasks
            .values_mut()
            .find(|t| t.is_on_node())
            .unwrap();
        running.pid = Some(4242);
        running.updated_at += 1;
        assert!(pid_only.projects_as(&s));
        assert!(pid_only.refresh_assignments().is_empty());
        let projected = s.clone();
        let t2 = s
            .tasks
            .values()
            .find(|t| t.node_id.as_deref() == Some(n2.as_str()) && t.is_current())
            .unwrap()
            .clone();
        let before = s.nodes[&n1].assignment.revision;
        report(&mut s, &t2, TaskState::Failed, Some("exit status 2"));
        s.reconcile(5);
        assert!(!s.projects_as(&projected));
        let changed = s.refresh_assignments();
        assert!(changed.contains(&n1));
        assert!(s.nodes[&n1].assignment.revision > before);
        // A node without tasks has no networks: overlays are built lazily.
        s.scale_service("web", 0, 6).unwrap();
        s.remove_service("db", 6).unwrap();
        settle(&mut s, 6);
        assert_eq!(s.nodes[&n1].assignment.networks, vec![]);
        assert_eq!(s.nodes[&n1].assignment.tasks, vec![]);
    }
}
