//! The manager's metrics, served on `--metrics-listen` (prefix `meshnet_manager_`): whether
//! this manager leads, and the cluster's nodes, services and tasks, read from the state at
//! each scrape (a follower, which keeps no state of its own, reports only `leader 0`).

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use proto::model::{NodeStatus, TaskState};

use crate::cluster::Cluster;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

const NODE_STATUSES: [NodeStatus; 2] = [NodeStatus::Ready, NodeStatus::Down];
const TASK_STATES: [TaskState; 8] = [
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Starting,
    TaskState::Running,
    TaskState::Complete,
    TaskState::Failed,
    TaskState::Shutdown,
    TaskState::Orphaned,
];

/// Lower-case names, as `meshctl` shows them.
fn name<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

#[derive(Clone, Default)]
pub struct ManagerMetrics {
    nodes: Family<StatusLabel, Gauge>,
    agents: Gauge,
    services: Gauge,
    tasks: Family<StateLabel, Gauge>,
    revision: Gauge,
    leader: Gauge,
}

impl ManagerMetrics {
    pub fn register(&self, registry: &mut mesh_metrics::Registry) {
        registry.register("nodes", "Nodes by status", self.nodes.clone());
        registry.register(
            "agents_connected",
            "Agents with an open connection",
            self.agents.clone(),
        );
        registry.register("services", "Services", self.services.clone());
        registry.register(
            "tasks",
            "Tasks the manager wants running, by current state",
            self.tasks.clone(),
        );
        registry.register(
            "revision",
            "The last assignment revision handed out",
            self.revision.clone(),
        );
        registry.register(
            "leader",
            "1 while this manager is the leader (with several managers on etcd), else 0",
            self.leader.clone(),
        );
    }

    pub fn update(&self, cluster: &Cluster) {
        self.leader.set(i64::from(cluster.leading()));
        if !cluster.leading() {
            return;
        }
        let state = cluster.state();
        for status in NODE_STATUSES {
            let n = state
                .nodes
                .values()
                .filter(|r| r.node.status == status)
                .count();
            self.nodes
                .get_or_create(&StatusLabel {
                    status: name(status),
                })
                .set(n as i64);
        }
        self.agents.set(cluster.connected_agents() as i64);
        self.services.set(state.services.len() as i64);
        let mut by_state: BTreeMap<TaskState, i64> = BTreeMap::new();
        for t in state
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Running)
        {
            *by_state.entry(t.state).or_default() += 1;
        }
        for s in TASK_STATES {
            self.tasks
                .get_or_create(&StateLabel { state: name(s) })
                .set(by_state.get(&s).copied().unwrap_or(0));
        }
        self.revision
            .set(i64::try_from(state.revision).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{cluster, join_and_connect};
    use crate::state::tests::{spec, MANAGER};
    use crate::store::tests::TempDir;

    #[test]
    fn nodes_services_and_tasks_are_counted() {
        let tmp = TempDir::new("metrics");
        let mut c = cluster(&tmp);
        let (tx, _rx) = crate::outbox::outbox();
        join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx);
        c.transact(|s, now| s.create_service(&spec("web", 2, &[]), now))
            .unwrap();
        let m = ManagerMetrics::default();
        let mut registry = mesh_metrics::Registry::with_prefix("meshnet_manager");
        m.register(&mut registry);
        m.update(&c);
        let text = mesh_metrics::render(&registry);
        for line in [
            "meshnet_manager_nodes{status=\"ready\"} 1",
            "meshnet_manager_nodes{status=\"down\"} 0",
            "meshnet_manager_agents_connected 1",
            "meshnet_manager_services 1",
            "meshnet_manager_leader 1",
            "meshnet_manager_tasks{state=\"running\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        let assigned: i64 = text
            .lines()
            .filter(|l| l.starts_with("meshnet_manager_tasks{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum();
        assert_eq!(assigned, 2, "both tasks counted once:\n{text}");
    }
}
