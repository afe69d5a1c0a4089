//! What the API shows: the stored objects joined with names, counts and endpoints.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use proto::agent::LbReport;
use proto::api::{
    IngressSbox, ManagerStatus, NetworkDetail, NetworkEndpoint, NetworkPeer, NodeInfo, NodeLb,
    PublishInfo, ServiceInfo, TaskEndpoint, TaskInfo, VirtualIp,
};
use proto::model::{Network, TaskState};

use crate::state::{State, Task};

/// The agents' latest load balancer reports, by node id (live state, kept in memory).
pub type LbReports = BTreeMap<String, LbReport>;

/// A manager node's status: who leads, and whether a manager runs there (see
/// [`crate::cluster::Cluster::manager_status`]).
pub type ManagerStatusOf<'a> = &'a dyn Fn(&proto::model::Node) -> Option<ManagerStatus>;

pub fn nodes(s: &State, status: ManagerStatusOf) -> Vec<NodeInfo> {
    let mut out: Vec<NodeInfo> = s.nodes.keys().map(|id| node(s, id, status)).collect();
    out.sort_by(|a, b| a.node.hostname.cmp(&b.node.hostname));
    out
}

pub fn node(s: &State, id: &str, status: ManagerStatusOf) -> NodeInfo {
    let record = &s.nodes[id];
    NodeInfo {
        manager_status: status(&record.node),
        node: record.node.clone(),
        tasks: record.assignment.tasks.len(),
        revision: record.assignment.revision,
        applied_revision: record.applied_revision,
        no_routing_mesh: s.no_routing_mesh(id),
    }
}

pub fn networks(s: &State) -> Vec<Network> {
    let mut out: Vec<Network> = s.networks.values().map(|r| r.network.clone()).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn network(s: &State, lb: &LbReports, id: &str) -> NetworkDetail {
    let record = &s.networks[id];
    let mut endpoints = Vec::new();
    let mut peers: BTreeMap<String, NetworkPeer> = BTreeMap::new();
    for task in s.tasks.values().filter(|t| t.is_current()) {
        for a in task.attachments.iter().filter(|a| a.network_id == id) {
            let node = task.node_id.as_ref().and_then(|n| s.nodes.get(n));
            if let Some(n) = node {
                peers.insert(
                    n.node.id.clone(),
                    NetworkPeer {
                        node_id: n.node.id.clone(),
                        name: n.node.hostname.clone(),
                        ip: n.node.addr,
                    },
                );
            }
            let service = &s.services[&task.service_id].spec.name;
            endpoints.push(NetworkEndpoint {
                task_id: task.id.clone(),
                task_name: format!("{service}.{}.{}", task.slot, task.id),
                service: service.clone(),
                addr: a.addr,
                mac: a.mac.clone(),
                node_id: task.node_id.clone(),
                node: node.map(|n| n.node.hostname.clone()),
            });
        }
    }
    endpoints.sort_by_key(|e| e.addr);
    let mut peers: Vec<NetworkPeer> = peers.into_values().collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let (sboxes, lb) = if record.network.ingress {
        let mut sboxes: Vec<IngressSbox> = s
            .nodes
            .values()
            .filter_map(|r| {
                Some(IngressSbox {
                    node_id: r.node.id.clone(),
                    hostname: r.node.hostname.clone(),
                    addr: Ipv4Net::new(r.ingress_addr?, record.network.subnet.prefix_len()).ok()?,
                })
            })
            .collect();
        sboxes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        (sboxes, node_lbs(s, lb, None))
    } else {
        (Vec::new(), Vec::new())
    };
    NetworkDetail {
        network: record.network.clone(),
        created_at: record.created_at,
        endpoints,
        peers,
        sboxes,
        lb,
    }
}

/// Each reporting node's load balancer, by hostname; only `fwmark`'s entry when given.
fn node_lbs(s: &State, lb: &LbReports, fwmark: Option<u32>) -> Vec<NodeLb> {
    let mut out: Vec<NodeLb> = lb
        .iter()
        .filter_map(|(id, report)| {
            let node = s.nodes.get(id)?;
            Some(NodeLb {
                node_id: id.clone(),
                hostname: node.node.hostname.clone(),
                backend: report.backend,
                services: report
                    .services
                    .iter()
                    .filter(|svc| fwmark.is_none_or(|m| svc.fwmark == m))
                    .cloned()
                    .collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    out
}

/// Every published port, by port then service.
pub fn published(s: &State) -> Vec<PublishInfo> {
    let mut out: Vec<PublishInfo> = s
        .services
        .values()
        .flat_map(|svc| {
            svc.spec.ports.iter().map(|p| PublishInfo {
                service: svc.spec.name.clone(),
                service_id: svc.id.clone(),
                port: *p,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        (a.port.published, a.port.protocol, &a.service).cmp(&(
            b.port.published,
            b.port.protocol,
            &b.service,
        ))
    });
    out
}

pub fn services(s: &State, lb: &LbReports) -> Vec<ServiceInfo> {
    // Counted in one walk over the tasks, not one per service.
    let mut counts: BTreeMap<&str, TaskCounts> = BTreeMap::new();
    for t in s.tasks.values() {
        counts.entry(&t.service_id).or_default().add(t);
    }
    let mut out: Vec<ServiceInfo> = s
        .services
        .values()
        .filter(|v| !v.removing)
        .map(|v| {
            let counts = counts.get(v.id.as_str()).copied().unwrap_or_default();
            service_counted(s, lb, &v.id, counts)
        })
        .collect();
    out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    out
}

/// A service's current tasks, and how many of them run.
#[derive(Debug, Default, Clone, Copy)]
struct TaskCounts {
    current: u64,
    running: usize,
}

impl TaskCounts {
    fn add(&mut self, t: &Task) {
        if t.is_current() {
            self.current += 1;
            if t.state == TaskState::Running {
                self.running += 1;
            }
        }
    }
}

pub fn service(s: &State, lb: &LbReports, id: &str) -> ServiceInfo {
    let mut counts = TaskCounts::default();
    for t in s.tasks.values().filter(|t| t.service_id == id) {
        counts.add(t);
    }
    service_counted(s, lb, id, counts)
}

fn service_counted(s: &State, lb: &LbReports, id: &str, counts: TaskCounts) -> ServiceInfo {
    let svc = &s.services[id];
    let running = counts.running;
    let desired = if svc.is_global() {
        counts.current
    } else {
        svc.spec.replicas
    };
    ServiceInfo {
        id: svc.id.clone(),
        spec: svc.spec.clone(),
        network_names: svc
            .spec
            .networks
            .iter()
            .map(|n| {
                s.networks
                    .get(n)
                    .map_or_else(|| n.clone(), |r| r.network.name.clone())
            })
            .collect(),
        running,
        desired,
        created_at: svc.created_at,
        updated_at: svc.updated_at,
        fwmark: svc.fwmark,
        // What the nodes report is the routing mesh's balancer (ingress_sbox).
        lb: svc
            .fwmark
            .filter(|_| svc.has_ingress_port())
            .map(|m| node_lbs(s, lb, Some(m)))
            .unwrap_or_default(),
        virtual_ips: svc
            .vips
            .iter()
            .filter_map(|(network_id, ip)| {
                let net = &s.networks.get(network_id)?.network;
                Some(VirtualIp {
                    network_id: network_id.clone(),
                    network: net.name.clone(),
                    addr: Ipv4Net::new(*ip, net.subnet.prefix_len()).ok()?,
                })
            })
            .collect(),
        version: svc.version,
        previous_spec: svc.previous_spec.clone().map(Box::new),
        update_status: svc.update_status().cloned(),
    }
}

/// The service's tasks by slot; in each slot the current task first, then history, newest first.
pub fn tasks(s: &State, service_id: &str) -> Vec<TaskInfo> {
    let mut tasks: Vec<&Task> = s
        .tasks
        .values()
        .filter(|t| t.service_id == service_id)
        .map(|t| &**t)
        .collect();
    tasks.sort_by_key(|t| {
        (
            t.slot,
            !t.is_current(),
            std::cmp::Reverse((t.updated_at, t.created_at)),
        )
    });
    tasks.into_iter().map(|t| task(s, t)).collect()
}

fn task(s: &State, t: &Task) -> TaskInfo {
    let svc = &s.services[&t.service_id];
    let service = &svc.spec.name;
    // As Docker names them: a global service's tasks by node, a replicated one's by slot.
    let global_node = svc
        .is_global()
        .then(|| svc.node_slots.iter().find(|(_, slot)| **slot == t.slot))
        .flatten();
    let name = match global_node {
        Some((node, _)) => format!("{service}.{node}"),
        None => format!("{service}.{}", t.slot),
    };
    TaskInfo {
        id: t.id.clone(),
        name,
        service_id: t.service_id.clone(),
        service_name: service.clone(),
        slot: t.slot,
        node_id: t.node_id.clone(),
        node: t
            .node_id
            .as_ref()
            .and_then(|n| s.nodes.get(n))
            .map(|r| r.node.hostname.clone()),
        desired_state: t.desired_state,
        state: t.state,
        error: t.error.clone(),
        pid: t.pid,
        netns: t.netns.clone(),
        endpoints: t
            .attachments
            .iter()
            .map(|a| TaskEndpoint {
                network_id: a.network_id.clone(),
                network: s
                    .networks
                    .get(&a.network_id)
                    .map_or_else(|| a.network_id.clone(), |r| r.network.name.clone()),
                addr: a.addr,
                mac: a.mac.clone(),
            })
            .collect(),
        created_at: t.created_at,
        updated_at: t.updated_at,
        spec_version: t.spec_version,
        health: t.health,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, spec, MANAGER};

    #[test]
    fn network_view_lists_endpoints_and_peers() {
        let mut s = cluster(3);
        let net = s
            .create_network(
                "backend",
                "overlay",
                Some("10.0.9.0/24"),
                &Default::default(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        s.create_service(&spec("web", 2, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let d = network(&s, &LbReports::new(), &net);
        assert_eq!(d.network.vni, 4097);
        assert!(d.sboxes.is_empty() && d.lb.is_empty());
        let addrs: Vec<String> = d.endpoints.iter().map(|e| e.addr.to_string()).collect();
        // .2 is the service's VIP.
        assert_eq!(addrs, ["10.0.9.3/24", "10.0.9.4/24"]);
        assert_eq!(d.endpoints[0].mac, "02:42:0a:00:09:03");
        assert!(d.endpoints[0].task_name.starts_with("web."));
        let peers: Vec<(String, String)> = d
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.ip.to_string()))
            .collect();
        assert_eq!(
            peers,
            [
                ("node1".to_string(), "192.168.56.11".to_string()),
                ("node2".to_string(), "192.168.56.12".to_string())
            ]
        );
    }

    #[test]
    fn task_view_orders_slots_with_history_after_the_current_task() {
        let mut s = cluster(2);
        let id = s.create_service(&spec("web", 2, &[]), 1).unwrap();
        s.reconcile(1);
        let first = s.tasks.values().find(|t| t.slot == 1).unwrap().clone();
        s.tasks.get_mut(&first.id).unwrap().state = TaskState::Failed;
        s.reconcile(2 + crate::state::RESTART_DELAY_SECS);
        let ts = tasks(&s, &id);
        let rows: Vec<(String, TaskState)> = ts
            .iter()
            .map(|t| (t.name.clone(), t.desired_state))
            .collect();
        assert_eq!(
            rows,
            [
                ("web.1".to_string(), TaskState::Running),
                ("web.1".to_string(), TaskState::Shutdown),
                ("web.2".to_string(), TaskState::Running)
            ]
        );
        assert_eq!(ts[1].id, first.id);
        assert!(ts[0].node.is_some());
        assert_eq!(service(&s, &LbReports::new(), &id).running, 0);
    }

    #[test]
    fn service_list_counts_as_each_service_alone() {
        let mut s = cluster(3);
        s.create_service(&spec("web", 2, &[]), 1).unwrap();
        let mut agent = spec("agent", 0, &[]);
        agent.mode = proto::model::ServiceMode::Global;
        s.create_service(&agent, 1).unwrap();
        s.create_service(&spec("idle", 3, &[]), 1).unwrap();
        s.reconcile(1);
        crate::state::tests::run_placed(&mut s, 2);
        let web = s.find_service("web").unwrap();
        let one = s
            .tasks
            .values()
            .find(|t| t.service_id == web)
            .unwrap()
            .id
            .clone();
        s.tasks.get_mut(&one).unwrap().state = TaskState::Failed;
        let lb = LbReports::new();
        let listed = services(&s, &lb);
        assert_eq!(listed.len(), 3);
        for info in &listed {
            let alone = service(&s, &lb, &info.id);
            assert_eq!((info.running, info.desired), (alone.running, alone.desired));
        }
        let by_name = |n: &str| listed.iter().find(|i| i.spec.name == n).unwrap();
        assert_eq!((by_name("web").running, by_name("web").desired), (1, 2));
        assert_eq!((by_name("agent").running, by_name("agent").desired), (3, 3));
        assert_eq!((by_name("idle").running, by_name("idle").desired), (3, 3));
    }
}
