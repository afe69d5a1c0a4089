//! Orchestration: what a manager pass does with time. Agents' task reports come in
//! ([`State::task_status`]); [`State::reconcile_ms`] retires tasks that ended or whose node went
//! down or drained, fills and trims replicated services' slots, gives every eligible node its
//! global task, places pending tasks (restart delay, spread, constraints, addresses) and prunes
//! history; and the IPsec key rotation takes its steps as the nodes confirm them. Rolling
//! updates and drains, which the pass also advances, live in [`crate::rollout`].

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use proto::agent::{TaskStatus, ESP_KEY_BYTES};
use proto::excerpt;
use proto::model::{endpoint_mac, Attachment, Availability, Health, Node, NodeStatus, TaskState};

use super::{
    host_port, refuse, task_error, OpError, Reason, State, Task, RESTART_DELAY_SECS, TASK_HISTORY,
};
use crate::keys::StepKind;
use crate::sched::{self, Candidate, GlobalFit};

impl State {
    /// A task state reported by the agent of `node_id`. Reports about tasks the manager has
    /// already given up on are ignored: a retired task never comes back.
    pub fn task_status(
        &mut self,
        node_id: &str,
        status: &TaskStatus,
        now: u64,
    ) -> Result<(), OpError> {
        let op = || format!("record status of task {}", excerpt(&status.task_id));
        if matches!(
            status.state,
            TaskState::Pending | TaskState::Assigned | TaskState::Orphaned
        ) {
            return refuse(op(), Reason::ReportedState(status.state));
        }
        let Some(task) = self.tasks.get_mut(&status.task_id) else {
            return refuse(
                op(),
                Reason::NotFound {
                    kind: "task",
                    name: status.task_id.clone(),
                },
            );
        };
        if task.node_id.as_deref() != Some(node_id) {
            return refuse(op(), Reason::NotYourTask(status.task_id.clone()));
        }
        if task.is_stopping() && status.state.is_terminal() {
            tracing::info!(task = %task.id, "stopped task has ended");
            // Keeps its error: why it was stopped.
            task.retire(TaskState::Shutdown, None, now);
            return Ok(());
        }
        if !task.is_current() {
            return Ok(());
        }
        let error = status.error.as_deref().map(task_error);
        if task.state != status.state {
            tracing::info!(task = %task.id, node = %node_id, from = ?task.state, to = ?status.state, error, "task state");
            task.state = status.state;
            task.updated_at = now;
        }
        task.error = error;
        task.pid = status.pid;
        task.netns = status.netns.clone();
        task.health = status.health.filter(|_| status.state == TaskState::Running);
        if task.health == Some(Health::Unhealthy) {
            // It already gets no traffic (only healthy tasks do); its slot gets a new task.
            let log = status.health_log.as_deref().map(task_error);
            let error = match log {
                Some(log) => format!("unhealthy: {log}"),
                None => "unhealthy".to_string(),
            };
            tracing::info!(task = %task.id, %error, "replacing unhealthy task");
            task.retire(TaskState::Failed, Some(error), now);
        }
        Ok(())
    }

    /// Converges tasks to the specs and the nodes: retires tasks that ended or whose node went
    /// down or is drained, fills empty slots, removes slots above the replica count, gives every
    /// eligible node its task of each global service, then gives pending tasks addresses and
    /// nodes.
    #[cfg(test)]
    pub fn reconcile(&mut self, now: u64) {
        self.reconcile_ms(now * 1000);
    }

    /// [`State::reconcile`] at a time in milliseconds, which drains and rolling updates count
    /// in. First the draining tasks every node has stopped balancing to are stopped and the
    /// tasks that must go begin draining; rolling updates advance once the slots are filled,
    /// before pending tasks are placed.
    pub fn reconcile_ms(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        self.advance_keys(now_ms);
        self.end_stops(now_ms);
        self.release_drains(now_ms);
        self.finish_removals();
        self.retire_lost_tasks(now_ms);
        self.drain_misplaced(now_ms);
        self.fill_slots(now);
        self.reconcile_global(now);
        self.advance_rollouts(now_ms);
        self.place_pending(now);
        self.prune_history();
    }

    /// Deletes the services being removed whose tasks have all stopped draining.
    fn finish_removals(&mut self) {
        let done: Vec<String> = self
            .services
            .values()
            .filter(|s| s.removing)
            .filter(|s| {
                !self
                    .tasks
                    .values()
                    .any(|t| t.service_id == s.id && !t.is_history())
            })
            .map(|s| s.id.clone())
            .collect();
        for id in done {
            tracing::info!(service = %id, "removed service's tasks have stopped");
            self.services.remove(&id);
            self.tasks.retain(|_, t| t.service_id != id);
        }
    }

    fn retire_lost_tasks(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        for task in self.tasks.values_mut() {
            if task.desired_state != TaskState::Running {
                continue;
            }
            if task.state.is_terminal() {
                // The agent reported it finished: it becomes history and its slot is refilled.
                let state = task.state;
                task.retire(state, None, now);
                continue;
            }
            let Some(node) = task.node_id.as_ref().and_then(|id| self.nodes.get(id)) else {
                continue;
            };
            if node.node.status == NodeStatus::Down {
                let error = format!("node {} is down", node.node.hostname);
                tracing::info!(task = %task.id, node = %node.node.hostname, "orphaning task of down node");
                task.retire(TaskState::Orphaned, Some(error), now);
            } else if node.node.availability == Availability::Drain {
                let error = format!("node {} is drained", node.node.hostname);
                tracing::info!(task = %task.id, node = %node.node.hostname, "moving task off drained node");
                task.begin_drain(Some(error), false, now_ms);
            }
        }
    }

    fn fill_slots(&mut self, now: u64) {
        for service in self
            .services
            .values()
            .filter(|s| !s.is_global() && !s.removing)
        {
            let replicas = service.spec.replicas;
            // A slot is filled by a current task, or by one draining for a stop-first update.
            let filled: BTreeSet<u64> = self
                .tasks
                .values()
                .filter(|t| t.service_id == service.id)
                .filter(|t| t.is_current() || t.drain.as_ref().is_some_and(|d| d.hold_slot))
                .map(|t| t.slot)
                .collect();
            // Slots above the replica count go, history included; the highest slots go first
            // because the count only keeps the low ones. Their running tasks drain and stop first.
            for t in self.tasks.values_mut() {
                if t.service_id == service.id && t.slot > replicas {
                    t.begin_drain(Some("scaled down".into()), false, now * 1000);
                }
            }
            self.tasks
                .retain(|_, t| t.service_id != service.id || t.slot <= replicas || !t.is_history());
            for slot in (1..=replicas).filter(|s| !filled.contains(s)) {
                let task = Task::pending(service, slot, now);
                tracing::info!(service = %service.spec.name, slot, task = %task.id, "new task");
                self.tasks.insert(task.id.clone(), task.into());
            }
        }
    }

    /// Global services: one current task on every eligible node (ready, active, within the
    /// constraints), each node's in its own stable slot; a task on a node that stopped being
    /// eligible is retired (a paused node keeps its task but gets no new one). Tasks are placed
    /// straight on their node, not through the spread scheduler; one that cannot start yet (its
    /// slot's restart delay, no free address) stays pending with the reason, and is retried.
    fn reconcile_global(&mut self, now: u64) {
        let globals: Vec<String> = self
            .services
            .values()
            .filter(|s| s.is_global() && !s.removing)
            .map(|s| s.id.clone())
            .collect();
        if globals.is_empty() {
            return;
        }
        let mut index = PlacementIndex::new(self);
        for service_id in globals {
            self.reconcile_global_service(&service_id, now, &mut index);
        }
    }

    fn reconcile_global_service(&mut self, service_id: &str, now: u64, index: &mut PlacementIndex) {
        let service = &self.services[service_id];
        let encrypted = self.needs_encryption(service);
        let fits: BTreeMap<String, GlobalFit> = self
            .nodes
            .values()
            .map(|r| {
                let fit = sched::global_fit(&r.node, &service.spec.constraints, encrypted);
                (r.node.id.clone(), fit)
            })
            .collect();
        // By hostname, so that nodes get their slots in a predictable order.
        let mut order: Vec<&Node> = self.nodes.values().map(|r| &r.node).collect();
        order.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        let order: Vec<String> = order.into_iter().map(|n| n.id.clone()).collect();
        let slot_nodes: BTreeMap<u64, String> = service
            .node_slots
            .iter()
            .map(|(node, slot)| (*slot, node.clone()))
            .collect();
        let name = service.spec.name.clone();
        // Current tasks that no longer belong where they are (or would go) become history.
        // A node whose task drains for a stop-first update gets its new one once it stopped.
        let mut placed: BTreeSet<String> = self
            .tasks
            .values()
            .filter(|t| t.service_id == service_id)
            .filter(|t| t.drain.as_ref().is_some_and(|d| d.hold_slot))
            .filter_map(|t| t.node_id.clone())
            .collect();
        let mut waiting: BTreeMap<String, String> = BTreeMap::new();
        for task in self
            .tasks
            .values_mut()
            .filter(|t| t.service_id == service_id && t.is_current())
        {
            let node = task
                .node_id
                .clone()
                .or_else(|| slot_nodes.get(&task.slot).cloned());
            let fit = node.as_ref().and_then(|n| fits.get(n));
            let why = match (fit, task.node_id.is_some()) {
                (Some(GlobalFit::Place), _) | (Some(GlobalFit::Keep), true) => None,
                (Some(GlobalFit::Keep), false) => {
                    let host = node.as_ref().and_then(|n| self.nodes.get(n));
                    let host = host.map_or("?", |r| r.node.hostname.as_str());
                    Some(format!("node {host} is paused"))
                }
                (Some(GlobalFit::Leave(why)), _) => Some(why.clone()),
                (None, _) => Some("node left the cluster".to_string()),
            };
            if let Some(why) = why {
                tracing::info!(task = %task.id, service = %name, %why, "retiring global task");
                task.retire(TaskState::Shutdown, Some(why), now);
                continue;
            }
            // A task with no reason to go has a node that fits.
            let Some(node) = node else { continue };
            if task.node_id.is_some() {
                placed.insert(node);
            } else {
                waiting.insert(node, task.id.clone());
            }
        }
        // Every eligible node without a task gets one: the pending one of its slot, or a new one.
        // A node with both a placed task and a waiting one gets the waiting one too: the new
        // task of a start-first update, which the old one makes way for once it serves.
        for node in &order {
            if fits.get(node) != Some(&GlobalFit::Place)
                || (placed.contains(node) && !waiting.contains_key(node))
            {
                continue;
            }
            let task_id = match waiting.get(node) {
                Some(id) => id.clone(),
                None => {
                    let service = self.services.get_mut(service_id).expect("service exists");
                    let next = service.node_slots.values().max().copied().unwrap_or(0) + 1;
                    let slot = *service.node_slots.entry(node.clone()).or_insert(next);
                    let task = Task::pending(service, slot, now);
                    tracing::info!(service = %name, slot, task = %task.id, %node, "new global task");
                    let id = task.id.clone();
                    self.tasks.insert(id.clone(), task.into());
                    id
                }
            };
            let placed = self
                .check_restart_delay(&task_id, now, index)
                .and_then(|()| self.assign(&task_id, node, now, index));
            if let Err(error) = placed {
                self.set_pending_error(&task_id, error);
            }
        }
    }

    fn place_pending(&mut self, now: u64) {
        let mut pending: Vec<(String, u64, String)> = self
            .tasks
            .values()
            .filter(|t| t.is_current() && t.node_id.is_none())
            .filter(|t| !self.services[&t.service_id].is_global())
            .map(|t| {
                (
                    self.services[&t.service_id].spec.name.clone(),
                    t.slot,
                    t.id.clone(),
                )
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort();
        let mut index = PlacementIndex::new(self);
        for (_, _, task_id) in pending {
            if let Err(error) = self.place(&task_id, now, &mut index) {
                self.set_pending_error(&task_id, error);
            }
        }
    }

    fn set_pending_error(&mut self, task_id: &str, error: String) {
        let task = self.tasks.get_mut(task_id).expect("pending task exists");
        if task.error.as_deref() != Some(error.as_str()) {
            tracing::debug!(task = %task_id, %error, "task stays pending");
            task.error = Some(error);
        }
    }

    /// A slot whose task failed or completed a moment ago waits before its next task starts.
    fn check_restart_delay(
        &self,
        task_id: &str,
        now: u64,
        index: &PlacementIndex,
    ) -> Result<(), String> {
        let task = &self.tasks[task_id];
        let history = index.history.get(&(task.service_id.clone(), task.slot));
        if history
            .and_then(|h| h.restart_at)
            .is_some_and(|at| now < at)
        {
            return Err(format!(
                "restart delayed: the previous task of this slot ended less than {RESTART_DELAY_SECS}s ago"
            ));
        }
        Ok(())
    }

    /// Gives one pending task a node and then its addresses (once), so a task no node can take
    /// holds no address.
    fn place(&mut self, task_id: &str, now: u64, index: &mut PlacementIndex) -> Result<(), String> {
        self.check_restart_delay(task_id, now, index)?;
        let task = &self.tasks[task_id];
        if let Some(why) = index.unplaceable.get(&task.service_id) {
            return Err(why.clone());
        }
        let history = index.history.get(&(task.service_id.clone(), task.slot));
        let service = &self.services[&task.service_id];
        let no_nodes = BTreeSet::new();
        let avoid = history.map_or(&no_nodes, |h| &h.nodes);
        let candidates: Vec<Candidate> = self
            .nodes
            .values()
            .map(|r| {
                let load = index.load.get(&r.node.id);
                Candidate {
                    node: &r.node,
                    service_tasks: load
                        .and_then(|l| l.per_service.get(&task.service_id))
                        .copied()
                        .unwrap_or(0),
                    total_tasks: load.map_or(0, |l| l.total),
                }
            })
            .collect();
        let picked = sched::pick_node(
            &candidates,
            &service.spec.constraints,
            avoid,
            host_port(&service.spec.ports),
            self.needs_encryption(service),
        );
        let node = match picked {
            Ok(node) => node.id.clone(),
            Err(e) => {
                let why = e.to_string();
                index
                    .unplaceable
                    .insert(task.service_id.clone(), why.clone());
                return Err(why);
            }
        };
        self.assign(task_id, &node, now, index)
    }

    /// Gives a pending task its addresses (once) and then `node`.
    fn assign(
        &mut self,
        task_id: &str,
        node: &str,
        now: u64,
        index: &mut PlacementIndex,
    ) -> Result<(), String> {
        let service = &self.services[&self.tasks[task_id].service_id];
        let networks = self.task_networks(service);
        if self.tasks[task_id].attachments.len() != networks.len() {
            let attachments = self.allocate_endpoints(&networks)?;
            self.tasks
                .get_mut(task_id)
                .expect("task exists")
                .attachments = attachments;
        }
        let task = self.tasks.get_mut(task_id).expect("task exists");
        let name = &self.services[&task.service_id].spec.name;
        tracing::info!(task = %task_id, service = %name, slot = task.slot, node = %node, "task assigned");
        let load = index.load.entry(node.to_string()).or_default();
        load.total += 1;
        *load.per_service.entry(task.service_id.clone()).or_default() += 1;
        task.node_id = Some(node.to_string());
        task.state = TaskState::Assigned;
        task.error = None;
        task.updated_at = now;
        Ok(())
    }

    /// One endpoint per network, all or none.
    fn allocate_endpoints(&mut self, networks: &[String]) -> Result<Vec<Attachment>, String> {
        let mut out = Vec::new();
        for network_id in networks {
            let ip = self.next_addr(network_id).map_err(|e| {
                let name = &self.networks[network_id].network.name;
                format!("allocate an address on network {name}: {e}")
            })?;
            let prefix = self.networks[network_id].network.subnet.prefix_len();
            out.push(Attachment {
                network_id: network_id.clone(),
                addr: Ipv4Net::new(ip, prefix).expect("prefix of a valid subnet"),
                mac: endpoint_mac(ip),
            });
        }
        Ok(out)
    }

    fn prune_history(&mut self) {
        let mut history: BTreeMap<(&str, u64), Vec<&Task>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_history()) {
            history.entry((&t.service_id, t.slot)).or_default().push(t);
        }
        let mut drop = Vec::new();
        for (_, mut old) in history {
            old.sort_by_key(|t| (t.updated_at, t.created_at));
            let excess = old.len().saturating_sub(TASK_HISTORY);
            drop.extend(old.into_iter().take(excess).map(|t| t.id.clone()));
        }
        for id in drop {
            self.tasks.remove(&id);
        }
    }

    /// Makes the key ring, or begins a rotation when one is due, while an encrypted network
    /// exists. The rotation's further steps follow the nodes' confirmations
    /// ([`State::advance_keys`]).
    pub fn rotate_keys(
        &mut self,
        now_ms: u64,
        interval_secs: u64,
        fresh: &mut impl FnMut() -> [u8; ESP_KEY_BYTES],
    ) {
        if self.has_encrypted_networks() {
            let step = self.esp_keys.step.is_some();
            self.esp_keys.rotate(now_ms, interval_secs, fresh);
            if !step && self.esp_keys.step.is_some() {
                tracing::info!(
                    key = self.esp_keys.last_tag,
                    "IPsec key rotation: a new key, for receiving only until every node has it"
                );
            }
        }
    }

    /// Of the nodes in `revisions` (node → the revision carrying a change: a drain, a key
    /// step), those that are ready and have not applied theirs: a node that is down or gone
    /// holds nothing back.
    pub(crate) fn unconfirmed(&self, revisions: &BTreeMap<String, u64>) -> Vec<String> {
        revisions
            .iter()
            .filter(|(node, rev)| {
                self.nodes.get(*node).is_some_and(|r| {
                    r.node.status == NodeStatus::Ready && r.applied_revision < **rev
                })
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Whether a step of the key rotation under way can be taken now: every node confirmed the
    /// one before, or it waited [`crate::keys::KEY_STEP_TIMEOUT_MS`].
    pub fn key_step_ready(&self, now_ms: u64) -> bool {
        self.esp_keys
            .ready(now_ms, |revisions| self.unconfirmed(revisions))
    }

    /// Takes the next step of a key rotation once the nodes applied the one before (see
    /// [`crate::keys`]).
    fn advance_keys(&mut self, now_ms: u64) {
        let mut ring = std::mem::take(&mut self.esp_keys);
        let done = ring.advance(now_ms, |revisions| self.unconfirmed(revisions));
        self.esp_keys = ring;
        let Some(done) = done else {
            return;
        };
        let hosts: Vec<&str> = done
            .unconfirmed
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|r| r.node.hostname.as_str())
            .collect();
        let next = match done.confirmed {
            StepKind::Added => "sending with the new key",
            StepKind::Switched => "dropping the oldest key",
        };
        if hosts.is_empty() {
            tracing::info!(
                send = self.esp_keys.send,
                keys = self.esp_keys.keys.len(),
                "IPsec key rotation: every node applied the last step, {next}"
            );
        } else {
            tracing::warn!(nodes = ?hosts, send = self.esp_keys.send, keys = self.esp_keys.keys.len(), "IPsec key rotation: {next} without these nodes' confirmation of the last step");
        }
    }

    /// Records the revision carrying a new key step to each ready node that carries keys:
    /// called once the assignments are computed.
    pub(super) fn arm_keys(&mut self) {
        let nodes = &self.nodes;
        self.esp_keys.arm(|| {
            nodes
                .values()
                .filter(|r| r.node.status == NodeStatus::Ready && r.assignment.encryption.is_some())
                .map(|r| (r.node.id.clone(), r.assignment.revision))
                .collect()
        });
    }
}

/// What placing tasks needs to know about the others, gathered once per scheduling pass rather
/// than by a scan of every task for each task placed (which made 10,000 unplaceable replicas
/// cost seconds per pass), and kept up to date as the pass places tasks.
struct PlacementIndex {
    /// Each (service, slot) with ended tasks: when it may start again (the last failed or
    /// completed task's end plus the restart delay), and the nodes where its tasks failed, which
    /// a replacement avoids if it can.
    history: BTreeMap<(String, u64), SlotHistory>,
    /// Current placed tasks per node.
    load: BTreeMap<String, NodeLoad>,
    /// Services no node can take, with why, found during this pass: the next pending task of
    /// such a service fails alike (constraints, ports and encryption are the service's, and
    /// nothing was placed for it since), so 10,000 unplaceable replicas cost one search, not
    /// 10,000 under the cluster's lock.
    unplaceable: BTreeMap<String, String>,
}

#[derive(Default)]
struct SlotHistory {
    restart_at: Option<u64>,
    nodes: BTreeSet<String>,
}

#[derive(Default)]
struct NodeLoad {
    total: usize,
    per_service: BTreeMap<String, usize>,
}

impl PlacementIndex {
    fn new(s: &State) -> PlacementIndex {
        let mut history: BTreeMap<(String, u64), SlotHistory> = BTreeMap::new();
        let mut load: BTreeMap<String, NodeLoad> = BTreeMap::new();
        for t in s.tasks.values() {
            // A draining task still holds its node (and any host-mode port there).
            if t.is_current() || t.is_draining() {
                if let Some(node) = t.node_id.clone() {
                    let l = load.entry(node).or_default();
                    l.total += 1;
                    *l.per_service.entry(t.service_id.clone()).or_default() += 1;
                }
                continue;
            }
            let h = history.entry((t.service_id.clone(), t.slot)).or_default();
            // Only where a task failed is avoided: a task replaced by an update may come back
            // to its node.
            if matches!(t.state, TaskState::Failed | TaskState::Complete) {
                h.restart_at = h.restart_at.max(Some(t.updated_at + RESTART_DELAY_SECS));
                h.nodes.extend(t.node_id.clone());
            }
        }
        PlacementIndex {
            history,
            load,
            unplaceable: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{
        add_network, apply_all, as_stored, cluster, current, global, ingress_id, node_id, per_node,
        port, published_spec, report, report_at, run_all, settle, spec, web, MANAGER,
    };
    use proto::agent::EspSupport;
    use proto::api::{ServiceSpec, SpecUpdate};
    use proto::model::{Protocol, PublishMode, Role};

    /// Three ESP nodes with tasks of an encrypted network, each told its assignment; returns
    /// the state and the node ids.
    fn encrypted_cluster() -> (State, Vec<String>) {
        let mut s = cluster(3);
        let ip = MANAGER.parse().unwrap();
        let opts = BTreeMap::from([("encrypted".to_string(), String::new())]);
        s.create_network("sec", "overlay", Some("10.0.7.0/24"), &opts, ip, 1)
            .unwrap();
        let ids: Vec<String> = ["node1", "node2", "node3"]
            .iter()
            .map(|n| node_id(&s, n))
            .collect();
        for id in &ids {
            s.set_node_esp(id, Some(&EspSupport::Supported));
        }
        let mut n = 0u8;
        s.rotate_keys(1000, 60, &mut || {
            n += 1;
            [n; ESP_KEY_BYTES]
        });
        s.create_service(&spec("secure", 3, &["sec"]), 1).unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        apply_all(&mut s);
        (s, ids)
    }

    /// (tags of the keys, send tag) as `node` was last told them.
    fn told(s: &State, node: &str) -> (Vec<u32>, u32) {
        let k = s.nodes[node].assignment.encryption.as_ref().unwrap();
        (k.keys.iter().map(|k| k.tag).collect(), k.send)
    }

    /// A pass of the manager at `now_ms`, as `Cluster::transact` makes one.
    fn pass(s: &mut State, now_ms: u64) {
        s.reconcile_ms(now_ms);
        s.refresh_assignments();
    }

    #[test]
    fn a_key_rotation_moves_on_as_every_ready_node_applies_each_step() {
        let (mut s, ids) = encrypted_cluster();
        let mut n = 10u8;
        let mut fresh = move || {
            n += 1;
            [n; ESP_KEY_BYTES]
        };
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1], 1));
        }
        // Not due: nothing.
        s.rotate_keys(60_999, 60, &mut fresh);
        assert_eq!(s.esp_keys.keys.len(), 1);
        // Due: a new key, receive-only, on every node.
        s.rotate_keys(61_000, 60, &mut fresh);
        pass(&mut s, 61_000);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 1));
        }
        // Two of three nodes applied it: nobody sends with it yet, however often the
        // manager passes.
        for id in &ids[..2] {
            let rev = s.nodes[id].assignment.revision;
            s.set_applied(id, rev);
        }
        assert!(!s.key_step_ready(62_000));
        pass(&mut s, 62_000);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 1));
        }
        // The third one did: every node sends with it.
        let rev = s.nodes[&ids[2]].assignment.revision;
        s.set_applied(&ids[2], rev);
        assert!(s.key_step_ready(62_500));
        pass(&mut s, 62_500);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 2));
        }
        // Node 3 goes down before it applies the switch: it does not hold the rotation.
        for id in &ids[..2] {
            let rev = s.nodes[id].assignment.revision;
            s.set_applied(id, rev);
        }
        assert!(s.esp_keys.step.is_some());
        s.set_node_status(&ids[2], NodeStatus::Down);
        pass(&mut s, 63_000);
        assert_eq!(s.esp_keys.step, None);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2], 2));

        // The next rotation: a node that is up but never answers (node 2) holds each step for
        // the timeout, no longer.
        s.set_node_status(&ids[2], NodeStatus::Ready);
        pass(&mut s, 64_000);
        apply_all(&mut s);
        s.rotate_keys(121_000, 60, &mut fresh);
        pass(&mut s, 121_000);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 2));
        let rev = s.nodes[&ids[0]].assignment.revision;
        s.set_applied(&ids[0], rev);
        let until = 121_000 + crate::keys::KEY_STEP_TIMEOUT_MS;
        pass(&mut s, until - 1);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 2));
        assert!(s.key_step_ready(until));
        pass(&mut s, until);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 3));
        let rev = s.nodes[&ids[0]].assignment.revision;
        s.set_applied(&ids[0], rev);
        pass(&mut s, until + 1);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 3));
        pass(&mut s, until + crate::keys::KEY_STEP_TIMEOUT_MS);
        for id in &ids[..2] {
            assert_eq!(told(&s, id), (vec![2, 3], 3));
        }
        assert_eq!(s.esp_keys.step, None);
    }

    #[test]
    fn a_host_mode_port_places_at_most_one_task_per_node() {
        let mut s = cluster(2);
        let host = port(8081, 8080, Protocol::Tcp, PublishMode::Host);
        s.create_service(&published_spec("web", 3, &[], &[host]), 1)
            .unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        assert_eq!(per_node(&s, "web").len(), 2);
        let pending: Vec<&Task> = current(&s, "web")
            .into_iter()
            .filter(|t| t.node_id.is_none())
            .collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].state, TaskState::Pending);
        assert_eq!(
            pending[0].error.as_deref(),
            Some("no suitable node (host-mode port 8081/tcp is taken on every eligible node)")
        );
        // The extra task is started nowhere: each node runs exactly one.
        for r in s.nodes.values() {
            assert_eq!(r.assignment.tasks.len(), 1, "{}", r.node.hostname);
        }
        // A third node takes it.
        s.register_node(
            "node3",
            "192.168.56.13".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(2);
        assert_eq!(
            per_node(&s, "web").values().copied().collect::<Vec<_>>(),
            [1, 1, 1]
        );

        // A service stacked on one node that gains a host-mode port keeps one task there; the
        // others move or wait.
        let mut s = cluster(1);
        s.create_service(&spec("api", 2, &[]), 1).unwrap();
        s.reconcile(1);
        assert_eq!(per_node(&s, "api"), [("node1".into(), 2)].into());
        s.update_service(
            "api",
            &[port(9000, 9000, Protocol::Udp, PublishMode::Host)],
            &[],
            None,
            &SpecUpdate::default(),
            2,
        )
        .unwrap();
        s.reconcile(2);
        assert_eq!(per_node(&s, "api"), [("node1".into(), 1)].into());
        let waiting = current(&s, "api")[1];
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (2, None));
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .contains("host-mode port 9000/udp is taken"));
    }

    #[test]
    fn a_task_no_node_can_take_holds_no_address() {
        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        // More replicas than the /24 has addresses, none placeable.
        let mut big = spec("big", 300, &["backend"]);
        big.constraints = vec![proto::model::Constraint::parse("node.labels.zone==a").unwrap()];
        s.create_service(&big, 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "big");
        assert_eq!(tasks.len(), 300);
        assert!(tasks
            .iter()
            .all(|t| t.node_id.is_none() && t.attachments.is_empty()));
        let why = tasks[0].error.as_deref().unwrap();
        assert!(why.contains("no suitable node"), "{why}");
        // The network's addresses stay free for tasks that can run.
        s.create_service(&spec("web", 1, &["backend"]), 2).unwrap();
        s.reconcile(2);
        let web = current(&s, "web");
        assert!(web[0].node_id.is_some());
        assert_eq!(web[0].attachments.len(), 1);
    }

    #[test]
    fn replicas_spread_and_get_addresses() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "web");
        assert_eq!(tasks.len(), 3);
        assert_eq!(
            per_node(&s, "web"),
            [
                ("node1".into(), 1),
                ("node2".into(), 1),
                ("node3".into(), 1)
            ]
            .into()
        );
        let ips: Vec<String> = tasks
            .iter()
            .map(|t| t.attachments[0].addr.to_string())
            .collect();
        // .2 is the service's VIP.
        assert_eq!(ips, ["10.0.9.3/24", "10.0.9.4/24", "10.0.9.5/24"]);
        assert_eq!(tasks[0].attachments[0].mac, "02:42:0a:00:09:03");
        assert!(tasks.iter().all(|t| t.state == TaskState::Assigned));
    }

    #[test]
    fn scale_up_then_down_removes_highest_slots_and_frees_addresses() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        s.scale_service("web", 6, 2).unwrap();
        s.reconcile(2);
        assert_eq!(current(&s, "web").len(), 6);
        assert!(per_node(&s, "web").values().all(|&n| n == 2));
        let kept: Vec<String> = current(&s, "web")[..2]
            .iter()
            .map(|t| t.id.clone())
            .collect();

        s.scale_service("web", 2, 3).unwrap();
        s.reconcile(3);
        let tasks = current(&s, "web");
        assert_eq!(tasks.iter().map(|t| t.slot).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), kept);
        // Slots 3..6 drain first: off the balancers, still on their nodes until every node
        // applied that.
        let draining = crate::state::tests::draining(&s);
        assert_eq!(draining.len(), 4);
        assert!(draining.iter().all(|t| t.slot > 2 && t.is_on_node()));
        let freed: Vec<Ipv4Net> = draining.iter().map(|t| t.attachments[0].addr).collect();
        // Then they are gone entirely; their addresses are free, but handed out again only
        // after the ones never used (serial allocation: no stale state for a reused address).
        let now = settle(&mut s, 3);
        assert_eq!(s.tasks.len(), 2);
        s.scale_service("web", 3, now).unwrap();
        s.reconcile(now);
        let fresh = current(&s, "web")[2].attachments[0].addr;
        assert!(!freed.contains(&fresh), "{fresh} was handed out before");
    }

    #[test]
    fn a_failed_task_is_replaced_in_its_slot_on_another_node() {
        let mut s = cluster(3);
        s.create_service(&spec("web", 2, &[]), 1).unwrap();
        s.reconcile(1);
        let failed = current(&s, "web")[0].clone();
        report(&mut s, &failed, TaskState::Running, None);
        report(&mut s, &failed, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);

        let old = &s.tasks[&failed.id];
        assert_eq!(old.desired_state, TaskState::Shutdown);
        assert_eq!(old.state, TaskState::Failed);
        assert_eq!(old.error.as_deref(), Some("exit status 1"));
        let tasks = current(&s, "web");
        assert_eq!(tasks.len(), 2);
        let replacement = tasks.iter().find(|t| t.slot == failed.slot).unwrap();
        assert_ne!(replacement.id, failed.id);
        assert_ne!(replacement.node_id, failed.node_id);
        // node1 had slot 1 and node2 slot 2: the replacement takes the empty node3.
        assert_eq!(
            replacement.node_id.as_deref(),
            Some(node_id(&s, "node3").as_str())
        );
    }

    #[test]
    fn a_down_node_orphans_its_tasks_and_they_move() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let n2 = node_id(&s, "node2");
        let lost: Task = current(&s, "web")
            .into_iter()
            .find(|t| t.node_id.as_deref() == Some(n2.as_str()))
            .unwrap()
            .clone();
        s.set_node_status(&n2, NodeStatus::Down);
        s.reconcile(5);
        let old = &s.tasks[&lost.id];
        assert_eq!(old.state, TaskState::Orphaned);
        assert_eq!(old.error.as_deref(), Some("node node2 is down"));
        assert!(old.attachments.is_empty());
        assert_eq!(current(&s, "web").len(), 3);
        assert_eq!(per_node(&s, "web").get("node2"), None);
        // The agent of the lost node reporting in late does not bring the task back.
        report(&mut s, &lost, TaskState::Running, None);
        assert_eq!(s.tasks[&lost.id].state, TaskState::Orphaned);
    }

    #[test]
    fn drain_moves_tasks_and_pause_only_stops_new_ones() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 2, &[]), 1).unwrap();
        s.reconcile(1);
        let none = BTreeMap::new();
        s.update_node("node2", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.scale_service("web", 3, 2).unwrap();
        s.reconcile(2);
        assert_eq!(
            per_node(&s, "web"),
            [("node1".into(), 2), ("node2".into(), 1)].into()
        );
        s.update_node("node2", Some(Availability::Drain), &none, &[])
            .unwrap();
        s.reconcile(3);
        assert_eq!(per_node(&s, "web"), [("node1".into(), 3)].into());
    }

    #[test]
    fn unplaceable_tasks_wait_until_a_node_fits() {
        let mut s = cluster(1);
        let mut sp = spec("web", 3, &[]);
        sp.constraints = vec![proto::model::Constraint::parse("node.role==worker").unwrap()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        // Each replica says why, though the pass searched the nodes once for the service.
        for task in current(&s, "web") {
            assert_eq!(task.state, TaskState::Pending);
            assert_eq!(
                task.error.as_deref(),
                Some("no suitable node (scheduling constraints not satisfied on 1 node)")
            );
        }
        let task = current(&s, "web")[0].clone();
        s.register_node(
            "node2",
            "192.168.56.12".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(2);
        let task = &s.tasks[&task.id];
        assert_eq!(task.state, TaskState::Assigned);
        assert_eq!(task.node_id.as_deref(), Some(node_id(&s, "node2").as_str()));
        assert_eq!(task.error, None);
        assert_eq!(per_node(&s, "web"), [("node2".into(), 3)].into());
    }

    #[test]
    fn label_constraints_follow_node_updates() {
        let mut s = cluster(3);
        let add: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        s.update_node("node3", None, &add, &[]).unwrap();
        let mut sp = spec("web", 2, &[]);
        sp.constraints = vec![proto::model::Constraint::parse("node.labels.zone==b").unwrap()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        assert_eq!(per_node(&s, "web"), [("node3".into(), 2)].into());
        let err = s
            .update_node(
                "node3",
                None,
                &[("a b".to_string(), "x".to_string())].into(),
                &[],
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("update node node3: invalid label key"),
            "{err}"
        );
    }

    /// Each node's current task of a service: hostname → (slot, state).
    fn by_node(s: &State, service: &str) -> BTreeMap<String, (u64, TaskState)> {
        current(s, service)
            .into_iter()
            .map(|t| {
                let node = t.node_id.as_ref().expect("a global task is on its node");
                (s.nodes[node].node.hostname.clone(), (t.slot, t.state))
            })
            .collect()
    }

    fn hosts(s: &State, service: &str) -> Vec<String> {
        by_node(s, service).into_keys().collect()
    }

    #[test]
    fn a_global_service_runs_one_task_on_every_node_and_on_nodes_that_join() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&global("agent", &["backend"]), 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "agent");
        assert_eq!(tasks.len(), 3);
        assert!(tasks
            .iter()
            .all(|t| t.state == TaskState::Assigned && t.attachments.len() == 1));
        assert_eq!(
            by_node(&s, "agent"),
            [
                ("node1".to_string(), (1, TaskState::Assigned)),
                ("node2".to_string(), (2, TaskState::Assigned)),
                ("node3".to_string(), (3, TaskState::Assigned)),
            ]
            .into()
        );
        s.refresh_assignments();
        for r in s.nodes.values() {
            assert_eq!(r.assignment.tasks.len(), 1, "{}", r.node.hostname);
        }
        // A replicated service beside it still spreads as before.
        s.create_service(&spec("web", 2, &[]), 2).unwrap();
        s.reconcile(2);
        assert_eq!(current(&s, "web").len(), 2);
        assert_eq!(current(&s, "agent").len(), 3);

        // A fourth node joins: it gets a task, in a slot of its own; the others are untouched.
        let before: Vec<String> = current(&s, "agent").iter().map(|t| t.id.clone()).collect();
        s.register_node(
            "node4",
            "192.168.56.14".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(3);
        let after = current(&s, "agent");
        assert_eq!(after.len(), 4);
        assert_eq!(by_node(&s, "agent")["node4"], (4, TaskState::Assigned));
        assert!(before.iter().all(|id| s.tasks[id].is_current()));
        run_all(&mut s, "agent");
        let info =
            crate::views::service(&s, &Default::default(), &s.find_service("agent").unwrap());
        assert_eq!((info.running, info.desired), (4, 4));
        let names: Vec<String> = crate::views::tasks(&s, &info.id)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(
            names.contains(&format!("agent.{}", node_id(&s, "node4"))),
            "{names:?}"
        );
        // The mode and the nodes' slots survive a manager restart.
        let mut back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        back.agent_port = s.agent_port;
        assert_eq!(back, as_stored(&s));
        back.reconcile(4);
        assert_eq!(by_node(&back, "agent"), by_node(&s, "agent"));
    }

    #[test]
    fn a_global_service_follows_drain_pause_and_down_nodes() {
        let mut s = cluster(3);
        s.create_service(&global("agent", &[]), 1).unwrap();
        s.reconcile(1);
        run_all(&mut s, "agent");
        let none = BTreeMap::new();
        let n2 = node_id(&s, "node2");
        let old = current(&s, "agent")[1].clone();
        assert_eq!(old.node_id.as_deref(), Some(n2.as_str()));

        // Drain: node2's task goes and is not replaced elsewhere.
        s.update_node("node2", Some(Availability::Drain), &none, &[])
            .unwrap();
        s.reconcile(2);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
        let gone = &s.tasks[&old.id];
        assert_eq!(
            (gone.desired_state, gone.error.as_deref()),
            (TaskState::Shutdown, Some("node node2 is drained"))
        );
        // Active again: a new task there, in node2's slot, so its history stays together.
        s.update_node("node2", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(3);
        assert_eq!(
            by_node(&s, "agent")["node2"],
            (old.slot, TaskState::Assigned)
        );
        assert_ne!(current(&s, "agent")[1].id, old.id);
        run_all(&mut s, "agent");

        // Pause keeps the task there, but places none: once it ends nothing replaces it.
        s.update_node("node3", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.reconcile(4);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2", "node3"]);
        let on3 = current(&s, "agent")[2].clone();
        report(&mut s, &on3, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2"]);
        s.update_node("node3", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(301);
        assert_eq!(by_node(&s, "agent")["node3"], (3, TaskState::Assigned));

        // A failed task comes back on its own node, in its slot, after the restart delay.
        let on1 = current(&s, "agent")[0].clone();
        report_at(&mut s, &on1, TaskState::Running, None, 400);
        report_at(&mut s, &on1, TaskState::Failed, Some("exit status 1"), 400);
        s.reconcile(401);
        let waiting = current(&s, "agent")[0].clone();
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (1, None));
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .starts_with("restart delayed"));
        s.reconcile(400 + RESTART_DELAY_SECS);
        assert_eq!(by_node(&s, "agent")["node1"], (1, TaskState::Assigned));
        // One waiting for its restart delay on a node that is paused meanwhile is not placed.
        let on3 = current(&s, "agent")[2].clone();
        report_at(&mut s, &on3, TaskState::Running, None, 410);
        report_at(&mut s, &on3, TaskState::Failed, Some("exit status 1"), 410);
        s.reconcile(411);
        let waiting = current(&s, "agent")[2].clone();
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (3, None));
        s.update_node("node3", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.reconcile(420);
        let gone = &s.tasks[&waiting.id];
        assert_eq!(
            (gone.desired_state, gone.error.as_deref()),
            (TaskState::Shutdown, Some("node node3 is paused"))
        );
        assert_eq!(hosts(&s, "agent"), ["node1", "node2"]);
        s.update_node("node3", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(421);
        assert_eq!(by_node(&s, "agent")["node3"], (3, TaskState::Assigned));

        // A node that goes down: its task is orphaned and not replaced elsewhere.
        s.set_node_status(&n2, NodeStatus::Down);
        s.reconcile(500);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
        assert_eq!(current(&s, "agent").len(), 2);
        s.set_node_status(&n2, NodeStatus::Ready);
        s.reconcile(501);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2", "node3"]);
        // A removed one loses its task for good.
        s.set_node_status(&n2, NodeStatus::Down);
        s.remove_node("node2", false, 502).unwrap();
        s.reconcile(502);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
    }

    #[test]
    fn a_global_service_follows_label_constraints() {
        let mut s = cluster(3);
        let mut sp = global("agent", &[]);
        sp.constraints = vec![proto::model::Constraint::parse("node.labels.zone==a").unwrap()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        assert!(current(&s, "agent").is_empty());
        let zone_a: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        s.update_node("node2", None, &zone_a, &[]).unwrap();
        s.update_node("node3", None, &zone_a, &[]).unwrap();
        s.reconcile(2);
        assert_eq!(hosts(&s, "agent"), ["node2", "node3"]);
        let on2 = current(&s, "agent")[0].clone();
        s.update_node("node2", None, &BTreeMap::new(), &["zone".to_string()])
            .unwrap();
        s.reconcile(3);
        assert_eq!(hosts(&s, "agent"), ["node3"]);
        assert_eq!(
            s.tasks[&on2.id].error.as_deref(),
            Some("node node2 does not satisfy constraint node.labels.zone==a")
        );
        // A paused node that stops matching loses its task too.
        s.update_node("node3", Some(Availability::Pause), &BTreeMap::new(), &[])
            .unwrap();
        let zone_b: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        s.update_node("node3", None, &zone_b, &[]).unwrap();
        s.reconcile(4);
        assert!(current(&s, "agent").is_empty());
    }

    #[test]
    fn a_global_service_with_a_host_mode_port_runs_on_every_node() {
        let mut s = cluster(3);
        let host = port(8081, 8080, Protocol::Tcp, PublishMode::Host);
        s.create_service(
            &ServiceSpec {
                ports: vec![host],
                ..global("web", &[])
            },
            1,
        )
        .unwrap();
        s.reconcile(1);
        assert_eq!(hosts(&s, "web"), ["node1", "node2", "node3"]);
        assert!(current(&s, "web").iter().all(|t| t.error.is_none()));
        // Ingress and host ports together: every task on ingress, one per node.
        s.update_service("web", &[web(80)], &[], None, &SpecUpdate::default(), 2)
            .unwrap();
        settle(&mut s, 2);
        assert_eq!(hosts(&s, "web"), ["node1", "node2", "node3"]);
        let ingress = ingress_id(&s);
        assert!(current(&s, "web")
            .iter()
            .all(|t| t.attachments.iter().any(|a| a.network_id == ingress)));
    }

    #[test]
    fn history_is_bounded_per_slot() {
        let mut s = cluster(1);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        for round in 0..10 {
            let at = 1000 + round * 10;
            let t = current(&s, "web")[0].clone();
            report_at(&mut s, &t, TaskState::Failed, Some("exit status 1"), at);
            s.reconcile(at + RESTART_DELAY_SECS);
        }
        assert_eq!(s.tasks.len(), 1 + TASK_HISTORY);
        assert_eq!(current(&s, "web").len(), 1);
    }

    #[test]
    fn a_failing_slot_restarts_only_after_the_delay() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        let t = current(&s, "web")[0].clone();
        report_at(&mut s, &t, TaskState::Complete, None, 50);
        s.reconcile(50 + RESTART_DELAY_SECS - 1);
        let waiting = current(&s, "web")[0].clone();
        assert_eq!(
            (waiting.state, waiting.node_id.as_ref()),
            (TaskState::Pending, None)
        );
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .starts_with("restart delayed"));
        s.reconcile(50 + RESTART_DELAY_SECS);
        let placed = &s.tasks[&waiting.id];
        assert_eq!(placed.state, TaskState::Assigned);
        assert_ne!(placed.node_id, t.node_id);
        assert_eq!(placed.error, None);
        // A task moved off a down node is not the task's fault: no delay.
        let node = placed.node_id.clone().unwrap();
        s.set_node_status(&node, NodeStatus::Down);
        s.reconcile(50 + RESTART_DELAY_SECS);
        assert_eq!(current(&s, "web")[0].state, TaskState::Assigned);
    }

    #[test]
    fn reports_are_checked_against_the_reporting_node() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        let t = current(&s, "web")[0].clone();
        let other = s
            .nodes
            .keys()
            .find(|id| Some(*id) != t.node_id.as_ref())
            .unwrap()
            .clone();
        let status = TaskStatus {
            task_id: t.id.clone(),
            state: TaskState::Running,
            error: None,
            pid: None,
            netns: None,
            health: None,
            health_log: None,
        };
        let err = s.task_status(&other, &status, 2).unwrap_err();
        assert!(
            err.to_string().contains("is not assigned to this node"),
            "{err}"
        );
        let bad = TaskStatus {
            state: TaskState::Pending,
            ..status
        };
        assert!(s.task_status(t.node_id.as_ref().unwrap(), &bad, 2).is_err());
        assert_eq!(s.tasks[&t.id].state, TaskState::Assigned);
        // An agent's error text is kept bounded: it may quote a long command.
        let long = TaskStatus {
            state: TaskState::Failed,
            error: Some(format!("spawn {}: No such file", "x".repeat(10_000))),
            ..bad
        };
        s.task_status(t.node_id.as_ref().unwrap(), &long, 3)
            .unwrap();
        let kept = s.tasks[&t.id].error.clone().unwrap();
        assert!(
            kept.len() < 300 && kept.ends_with("…(10020 bytes)"),
            "{kept}"
        );
    }
}
