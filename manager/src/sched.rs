//! Pure placement: the choice of a node for one task (constraints are `proto::model::Constraint`).

use std::collections::BTreeSet;

use proto::api::PublishedPort;
use proto::model::{Availability, Constraint, Node, NodeStatus};

/// A node as the scheduler sees it: the node and how loaded it is.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub node: &'a Node,
    /// Current tasks of the service being placed on this node.
    pub service_tasks: usize,
    /// Current tasks of all services on this node.
    pub total_tasks: usize,
}

/// Why a task could not be placed; the text is what `service ps` shows as the task's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no suitable node ({0})")]
pub struct NoSuitableNode(String);

/// Picks the node for one task: among ready, active nodes that satisfy every constraint, prefer
/// one not in `avoid` (where this slot just failed), then the fewest tasks of this service, then
/// the fewest tasks overall, then the hostname, so that equal clusters fill up predictably.
/// With `host_port` (a host-mode port of the service) only nodes without a task of the service
/// qualify, as in Swarm: only one task per node can own the port. With `encrypted` (the service
/// is on an encrypted network) only nodes that can do IPsec ESP qualify.
pub fn pick_node<'a>(
    candidates: &[Candidate<'a>],
    constraints: &[Constraint],
    avoid: &BTreeSet<String>,
    host_port: Option<PublishedPort>,
    encrypted: bool,
) -> Result<&'a Node, NoSuitableNode> {
    if candidates.is_empty() {
        return Err(NoSuitableNode("no nodes have joined".into()));
    }
    let available: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            c.node.status == NodeStatus::Ready && c.node.availability == Availability::Active
        })
        .collect();
    let fitting: Vec<&Candidate> = available
        .iter()
        .copied()
        .filter(|c| constraints.iter().all(|k| k.matches(c.node)))
        .collect();
    let capable: Vec<&Candidate> = fitting
        .iter()
        .copied()
        .filter(|c| !encrypted || c.node.no_encryption.is_none())
        .collect();
    let open: Vec<&Candidate> = capable
        .iter()
        .copied()
        .filter(|c| host_port.is_none() || c.service_tasks == 0)
        .collect();
    let best = open.iter().min_by(|a, b| {
        let key = |c: &Candidate| {
            (
                avoid.contains(&c.node.id),
                c.service_tasks,
                c.total_tasks,
                c.node.hostname.clone(),
                c.node.id.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    match best {
        Some(c) => Ok(c.node),
        None => {
            let mut reasons = Vec::new();
            let unavailable = candidates.len() - available.len();
            if unavailable > 0 {
                reasons.push(format!(
                    "{} not ready or not active",
                    plural(unavailable, "node")
                ));
            }
            let unfit = available.len() - fitting.len();
            if unfit > 0 {
                reasons.push(format!(
                    "scheduling constraints not satisfied on {}",
                    plural(unfit, "node")
                ));
            }
            let incapable = fitting.len() - capable.len();
            if incapable > 0 {
                reasons.push(format!(
                    "the service is on an encrypted network and {} cannot do IPsec ESP",
                    plural(incapable, "node")
                ));
            }
            if let (Some(port), false) = (host_port, capable.is_empty()) {
                reasons.push(format!(
                    "host-mode port {port} is taken on every eligible node"
                ));
            }
            Err(NoSuitableNode(reasons.join("; ")))
        }
    }
}

/// What a global service does on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalFit {
    /// Ready, active and within the constraints: the node gets a task.
    Place,
    /// Paused: a task already there stays, no new one is placed.
    Keep,
    /// Down, drained or outside the constraints: no task belongs there; why, for `service ps`.
    Leave(String),
}

/// Whether a global service wants a task on `node`, as Swarm's global orchestrator decides it;
/// `encrypted`: the service is on an encrypted network, which needs IPsec ESP on the node.
pub fn global_fit(node: &Node, constraints: &[Constraint], encrypted: bool) -> GlobalFit {
    let host = &node.hostname;
    if node.status == NodeStatus::Down {
        return GlobalFit::Leave(format!("node {host} is down"));
    }
    if node.availability == Availability::Drain {
        return GlobalFit::Leave(format!("node {host} is drained"));
    }
    if let Some(unmet) = constraints.iter().find(|k| !k.matches(node)) {
        return GlobalFit::Leave(format!("node {host} does not satisfy constraint {unmet}"));
    }
    if encrypted && node.no_encryption.is_some() {
        return GlobalFit::Leave(format!(
            "node {host} cannot do IPsec ESP, which the service's encrypted network needs"
        ));
    }
    match node.availability {
        Availability::Pause => GlobalFit::Keep,
        _ => GlobalFit::Place,
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::Role;
    use std::collections::BTreeMap;

    fn node(id: &str, role: Role) -> Node {
        Node {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: "192.168.56.11".parse().unwrap(),
            role,
            availability: Availability::Active,
            status: NodeStatus::Ready,
            labels: BTreeMap::new(),
            no_encryption: None,
        }
    }

    #[test]
    fn encrypted_networks_place_only_on_nodes_with_esp() {
        let mut nodes = vec![node("a", Role::Worker), node("b", Role::Worker)];
        nodes[0].no_encryption = Some("no ESP".into());
        let none = BTreeSet::new();
        let load = [(0, 0), (0, 0)];
        // a comes first by name, but cannot encrypt.
        let c = cands(&nodes, &load);
        assert_eq!(pick_node(&c, &[], &none, None, true).unwrap().id, "b");
        assert_eq!(pick_node(&c, &[], &none, None, false).unwrap().id, "a");
        nodes[1].no_encryption = Some("no ESP".into());
        let err = pick_node(&cands(&nodes, &load), &[], &none, None, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no suitable node (the service is on an encrypted network and 2 nodes cannot do IPsec ESP)"
        );
        assert_eq!(
            global_fit(&nodes[0], &[], true),
            GlobalFit::Leave(
                "node host-a cannot do IPsec ESP, which the service's encrypted network needs"
                    .into()
            )
        );
        assert_eq!(global_fit(&nodes[0], &[], false), GlobalFit::Place);
    }

    fn cands<'a>(nodes: &'a [Node], load: &[(usize, usize)]) -> Vec<Candidate<'a>> {
        nodes
            .iter()
            .zip(load)
            .map(|(node, &(service_tasks, total_tasks))| Candidate {
                node,
                service_tasks,
                total_tasks,
            })
            .collect()
    }

    #[test]
    fn a_global_service_fits_ready_active_matching_nodes() {
        let mut n = node("a", Role::Worker);
        let zone = [Constraint::parse("node.labels.zone==a").unwrap()];
        assert_eq!(global_fit(&n, &[], false), GlobalFit::Place);
        assert_eq!(
            global_fit(&n, &zone, false),
            GlobalFit::Leave("node host-a does not satisfy constraint node.labels.zone==a".into())
        );
        n.labels.insert("zone".into(), "a".into());
        assert_eq!(global_fit(&n, &zone, false), GlobalFit::Place);
        n.availability = Availability::Pause;
        assert_eq!(global_fit(&n, &zone, false), GlobalFit::Keep);
        n.availability = Availability::Drain;
        assert_eq!(
            global_fit(&n, &zone, false),
            GlobalFit::Leave("node host-a is drained".into())
        );
        n.availability = Availability::Active;
        n.status = NodeStatus::Down;
        assert_eq!(
            global_fit(&n, &zone, false),
            GlobalFit::Leave("node host-a is down".into())
        );
    }

    #[test]
    fn a_host_mode_port_allows_one_task_of_the_service_per_node() {
        let nodes = [
            node("a", Role::Manager),
            node("b", Role::Worker),
            node("c", Role::Worker),
        ];
        let none = BTreeSet::new();
        let port = PublishedPort {
            protocol: proto::model::Protocol::Tcp,
            published: 8081,
        };
        // b has far fewer tasks overall, but already one of this service: c it is.
        let load = [(1, 1), (1, 1), (0, 9)];
        let pick = pick_node(&cands(&nodes, &load), &[], &none, Some(port), false);
        assert_eq!(pick.unwrap().id, "c");
        let full = [(1, 1), (1, 1), (1, 9)];
        assert_eq!(
            pick_node(&cands(&nodes, &full), &[], &none, Some(port), false)
                .unwrap_err()
                .to_string(),
            "no suitable node (host-mode port 8081/tcp is taken on every eligible node)"
        );
        let worker = [Constraint::parse("node.role==worker").unwrap()];
        let only_a_free = [(0, 0), (1, 1), (1, 1)];
        assert_eq!(
            pick_node(&cands(&nodes, &only_a_free), &worker, &none, Some(port), false)
                .unwrap_err()
                .to_string(),
            "no suitable node (scheduling constraints not satisfied on 1 node; host-mode port 8081/tcp is taken on every eligible node)"
        );
        // Without a host-mode port tasks stack up as usual.
        assert!(pick_node(&cands(&nodes, &full), &[], &none, None, false).is_ok());
    }

    #[test]
    fn constraints_match_nodes() {
        let mut n = node("a", Role::Worker);
        n.labels.insert("zone".into(), "a".into());
        let m = |s: &str| Constraint::parse(s).unwrap().matches(&n);
        assert!(m("node.role==worker"));
        assert!(!m("node.role==manager"));
        assert!(m("node.role!=manager"));
        assert!(m("node.hostname==host-a"));
        assert!(!m("node.hostname!=host-a"));
        assert!(m("node.labels.zone==a"));
        assert!(!m("node.labels.zone==b"));
        assert!(!m("node.labels.rack==1"));
        assert!(m("node.labels.rack!=1"));
    }

    #[test]
    fn spreads_by_service_then_total_then_hostname() {
        let nodes = [
            node("a", Role::Manager),
            node("b", Role::Worker),
            node("c", Role::Worker),
        ];
        let none = BTreeSet::new();
        let pick = |load: &[(usize, usize)]| {
            pick_node(&cands(&nodes, load), &[], &none, None, false)
                .unwrap()
                .id
                .clone()
        };
        assert_eq!(pick(&[(0, 0), (0, 0), (0, 0)]), "a");
        assert_eq!(pick(&[(1, 1), (0, 0), (0, 0)]), "b");
        assert_eq!(pick(&[(1, 1), (0, 5), (0, 2)]), "c");
        assert_eq!(pick(&[(0, 9), (1, 1), (1, 1)]), "a");
    }

    #[test]
    fn honours_constraints_availability_and_avoidance() {
        let mut nodes = vec![
            node("a", Role::Manager),
            node("b", Role::Worker),
            node("c", Role::Worker),
        ];
        let worker = [Constraint::parse("node.role==worker").unwrap()];
        let none = BTreeSet::new();
        let load = [(0, 0), (1, 1), (1, 1)];
        assert_eq!(
            pick_node(&cands(&nodes, &load), &worker, &none, None, false)
                .unwrap()
                .id,
            "b"
        );
        let avoid_b: BTreeSet<String> = ["b".to_string()].into();
        assert_eq!(
            pick_node(&cands(&nodes, &load), &worker, &avoid_b, None, false)
                .unwrap()
                .id,
            "c"
        );
        // Avoidance is a preference: the only fitting node is still used.
        let only_b = [Constraint::parse("node.hostname==host-b").unwrap()];
        assert_eq!(
            pick_node(&cands(&nodes, &load), &only_b, &avoid_b, None, false)
                .unwrap()
                .id,
            "b"
        );

        nodes[1].availability = Availability::Drain;
        nodes[2].status = NodeStatus::Down;
        let err = pick_node(&cands(&nodes, &load), &worker, &none, None, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no suitable node (2 nodes not ready or not active; scheduling constraints not satisfied on 1 node)"
        );
        nodes[1].availability = Availability::Pause;
        assert!(pick_node(&cands(&nodes, &load), &worker, &none, None, false).is_err());
        assert_eq!(
            pick_node(&[], &[], &none, None, false)
                .unwrap_err()
                .to_string(),
            "no suitable node (no nodes have joined)"
        );
    }
}
