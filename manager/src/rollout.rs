//! Replacing a service's tasks without losing a request: what a task runs (fixed when it is
//! created), the graceful stop of a task (it leaves every node's load balancers, and stops only
//! once every node has applied that), and the rolling update that replaces the tasks of a
//! changed spec slot by slot, or rolls back to the previous one.
//!
//! Swarm takes a task out of the balancers and sleeps 2 s for gossip before it stops it; here
//! the manager knows which assignment revision removed the task on each node and waits for each
//! node's applied revision instead, with [`DRAIN_TIMEOUT_MS`] as the bound for a node that
//! does not answer.

use std::collections::{BTreeMap, BTreeSet};

use proto::agent::DrainingBackend;
use proto::api::{ServiceSpec, SpecUpdate, MAX_COMMAND_BYTES, MAX_REPLICAS};
use proto::excerpt;
use proto::model::{
    Health, HealthCheck, HealthTest, NodeStatus, TaskState, UpdateConfig, UpdateOrder, UpdateState,
    UpdateStatus,
};
use serde::{Deserialize, Serialize};

use crate::state::{Reason, Service, State, Task};
use proto::model::Constraint;

/// A draining task stops at the latest this long after it left the balancers, when some node
/// that is not down has not confirmed it applied that (as long as an agent takes to be declared
/// down).
pub const DRAIN_TIMEOUT_MS: u64 = proto::agent::NODE_DOWN_SECS * 1000;
/// A stopping task is taken for ended this long after its grace period, if its agent has not
/// said so: the time for SIGKILL to land and the agent's report to arrive.
pub const STOP_MARGIN_MS: u64 = 2_000;
/// Variables in a service's environment.
pub const MAX_ENV: usize = 256;
/// The longest duration any update, health or stop setting may have.
pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;
/// The shortest health check interval and timeout.
pub const MIN_HEALTH_MS: u64 = 10;
/// Bytes of an HTTP health check's path.
pub const MAX_HEALTH_PATH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("environment variable name {:?} is invalid: it must be 1 to 256 bytes without = or NUL", excerpt(.0))]
    EnvKey(String),
    #[error("environment variable {} has a NUL byte in its value", excerpt(.0))]
    EnvValue(String),
    #[error("{0} environment variables is more than the limit of {MAX_ENV}")]
    TooManyEnv(usize),
    #[error("the environment has {0} bytes, more than the limit of {MAX_COMMAND_BYTES}")]
    EnvTooLong(usize),
    #[error("environment variable {} is both added and removed", excerpt(.0))]
    EnvAddedAndRemoved(String),
    #[error("constraint {} is not one of the service's", excerpt(.0))]
    NoSuchConstraint(String),
    #[error("{what} of {ms} ms is more than the limit of 24h")]
    TooLong { what: &'static str, ms: u64 },
    #[error("{what} must be at least {MIN_HEALTH_MS} ms")]
    TooShort { what: &'static str },
    #[error("health check retries must be between 1 and 1000")]
    Retries,
    #[error("the health check command is empty")]
    EmptyHealthCmd,
    #[error("the health check port must be between 1 and 65535")]
    HealthPort,
    #[error("the health check path {:?} must start with / and have at most {MAX_HEALTH_PATH} printable characters", excerpt(.0))]
    HealthPath(String),
    #[error("a health check is both given and removed")]
    HealthBoth,
    #[error("the update parallelism {0} is more than the limit of {MAX_REPLICAS}")]
    Parallelism(u64),
    #[error("the max failure ratio must be a number from 0 to 1")]
    Ratio,
    #[error("the command is replaced but empty")]
    EmptyCommand,
    #[error("service {0} has no previous spec to roll back to")]
    NoPrevious(String),
}

/// What a task runs: fixed when the task is created, so that it keeps running the spec it
/// started with while an update rolls out, and compared with its service's to tell whether it
/// must be replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRuntime {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub stop_grace_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// The service's `--force` count when the task was made.
    #[serde(default)]
    pub force: u64,
}

/// A task leaving the balancers before it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub since_ms: u64,
    /// Each node that was up when the task left the balancers → the revision of its assignment
    /// without it. Empty until the assignments are computed (`armed`).
    #[serde(default)]
    pub revisions: BTreeMap<String, u64>,
    #[serde(default)]
    pub armed: bool,
    /// A stop-first update: the slot gets its new task only once this one has stopped.
    #[serde(default)]
    pub hold_slot: bool,
}

/// A rolling update (or rollback) of one service in progress, or how the last one ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub status: UpdateStatus,
    /// Tasks to replace when it started: the base of the failure ratio.
    pub total: u64,
    pub failures: u64,
    /// Slots being replaced now.
    #[serde(default)]
    pub in_flight: BTreeMap<u64, SlotProgress>,
    /// No slot starts before this (the update delay after the last one finished).
    #[serde(default)]
    pub next_start_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlotProgress {
    /// The slot's new task, once it exists.
    pub task: Option<String>,
    /// Since when the new task has served (running, and healthy with a check).
    pub up_since_ms: Option<u64>,
}

impl Rollout {
    fn start(state: UpdateState, total: u64, now_ms: u64) -> Rollout {
        let message = match state {
            UpdateState::RollbackStarted => "rollback in progress",
            _ => "update in progress",
        };
        Rollout {
            status: UpdateStatus {
                state,
                started_at: now_ms / 1000,
                completed_at: None,
                message: message.into(),
            },
            total,
            failures: 0,
            in_flight: BTreeMap::new(),
            next_start_ms: 0,
        }
    }

    fn is_rollback(&self) -> bool {
        matches!(
            self.status.state,
            UpdateState::RollbackStarted
                | UpdateState::RollbackPaused
                | UpdateState::RollbackCompleted
        )
    }

    fn end(&mut self, state: UpdateState, message: String, now_ms: u64) {
        tracing::info!(state = state.as_str(), %message, "rollout ended");
        self.status.state = state;
        self.status.completed_at = Some(now_ms / 1000);
        self.status.message = message;
        self.in_flight.clear();
    }
}

impl Service {
    /// What a task of this service made now runs.
    pub fn runtime(&self) -> TaskRuntime {
        TaskRuntime {
            command: self.spec.command.clone(),
            env: self.spec.env.clone(),
            stop_grace_ms: self.spec.stop_grace_ms,
            health: self.spec.health.clone(),
            force: self.force,
        }
    }

    pub fn update_status(&self) -> Option<&UpdateStatus> {
        self.rollout.as_ref().map(|r| &r.status)
    }
}

impl Task {
    /// What the task runs: its own runtime, or its service's for a task made before tasks
    /// kept one.
    pub fn runtime_in(&self, service: &Service) -> TaskRuntime {
        self.runtime.clone().unwrap_or_else(|| service.runtime())
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Takes a current task out of every balancer; it stops once every node has applied that
    /// (see [`State::release_drains`]). Its slot is refilled at once unless `hold_slot`.
    pub fn begin_drain(&mut self, reason: Option<String>, hold_slot: bool, now_ms: u64) {
        if !self.is_current() {
            return;
        }
        self.desired_state = TaskState::Shutdown;
        self.updated_at = now_ms / 1000;
        if reason.is_some() {
            self.error = reason;
        }
        self.drain = Some(Drain {
            since_ms: now_ms,
            revisions: BTreeMap::new(),
            armed: false,
            hold_slot,
        });
    }
}

/// Checks the runtime part of a spec: environment and health check. The command is checked by
/// the caller, as for `service create`.
pub fn check_runtime(spec: &ServiceSpec) -> Result<(), SpecError> {
    if spec.env.len() > MAX_ENV {
        return Err(SpecError::TooManyEnv(spec.env.len()));
    }
    let mut bytes = 0;
    for (k, v) in &spec.env {
        if k.is_empty() || k.len() > 256 || k.contains('=') || k.contains('\0') {
            return Err(SpecError::EnvKey(k.clone()));
        }
        if v.contains('\0') {
            return Err(SpecError::EnvValue(k.clone()));
        }
        bytes += k.len() + v.len() + 2;
    }
    if bytes > MAX_COMMAND_BYTES {
        return Err(SpecError::EnvTooLong(bytes));
    }
    check_duration("the stop grace period", spec.stop_grace_ms)?;
    check_update_config(&spec.update_config)?;
    if let Some(h) = &spec.health {
        check_health(h)?;
    }
    Ok(())
}

fn check_duration(what: &'static str, ms: u64) -> Result<(), SpecError> {
    if ms > MAX_DURATION_MS {
        return Err(SpecError::TooLong { what, ms });
    }
    Ok(())
}

fn check_update_config(c: &UpdateConfig) -> Result<(), SpecError> {
    if c.parallelism > MAX_REPLICAS {
        return Err(SpecError::Parallelism(c.parallelism));
    }
    check_duration("the update delay", c.delay_ms)?;
    check_duration("the update monitor period", c.monitor_ms)?;
    let r = c.max_failure_ratio.0;
    if !r.is_finite() || !(0.0..=1.0).contains(&r) {
        return Err(SpecError::Ratio);
    }
    Ok(())
}

fn check_health(h: &HealthCheck) -> Result<(), SpecError> {
    match &h.test {
        HealthTest::Cmd { argv } => {
            if argv.first().is_none_or(String::is_empty) {
                return Err(SpecError::EmptyHealthCmd);
            }
        }
        HealthTest::Http { port, path } => {
            if *port == 0 {
                return Err(SpecError::HealthPort);
            }
            if !path.starts_with('/')
                || path.len() > MAX_HEALTH_PATH
                || path.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(SpecError::HealthPath(path.clone()));
            }
        }
    }
    for (what, ms) in [
        ("the health check interval", h.interval_ms),
        ("the health check timeout", h.timeout_ms),
    ] {
        if ms < MIN_HEALTH_MS {
            return Err(SpecError::TooShort { what });
        }
        check_duration(what, ms)?;
    }
    check_duration("the health check start period", h.start_period_ms)?;
    if h.retries == 0 || h.retries > 1000 {
        return Err(SpecError::Retries);
    }
    Ok(())
}

/// `spec` with the task-spec part of `meshctl service update` applied; constraints are
/// returned as given (the caller parses them).
pub fn apply_spec_update(spec: &ServiceSpec, u: &SpecUpdate) -> Result<ServiceSpec, SpecError> {
    let mut next = spec.clone();
    if let Some(command) = &u.command {
        next.command = command.clone();
    }
    if let Some(args) = &u.args {
        let program = next
            .command
            .first()
            .cloned()
            .ok_or(SpecError::EmptyCommand)?;
        next.command = std::iter::once(program)
            .chain(args.iter().cloned())
            .collect();
    }
    if next.command.first().is_none_or(String::is_empty) {
        return Err(SpecError::EmptyCommand);
    }
    for key in &u.env_rm {
        if u.env_add.contains_key(key) {
            return Err(SpecError::EnvAddedAndRemoved(key.clone()));
        }
        next.env.remove(key);
    }
    next.env
        .extend(u.env_add.iter().map(|(k, v)| (k.clone(), v.clone())));
    for c in &u.constraint_rm {
        let Some(at) = next.constraints.iter().position(|x| x == c) else {
            return Err(SpecError::NoSuchConstraint(c.to_string()));
        };
        next.constraints.remove(at);
    }
    next.constraints.extend(u.constraint_add.iter().cloned());
    if let Some(c) = &u.update_config {
        next.update_config = c.clone();
    }
    if let Some(ms) = u.stop_grace_ms {
        next.stop_grace_ms = ms;
    }
    match (&u.health, u.health_none) {
        (Some(_), true) => return Err(SpecError::HealthBoth),
        (Some(h), false) => next.health = Some(h.clone()),
        (None, true) => next.health = None,
        (None, false) => {}
    }
    Ok(next)
}

impl State {
    /// Starts replacing the tasks of a service whose runtime or placement changed (or a
    /// forced update): the version goes up and a rolling update begins.
    pub(crate) fn start_rollout(&mut self, service_id: &str, rollback: bool, now_ms: u64) {
        let outdated = self.outdated_slots(service_id).len() as u64;
        let service = self.services.get_mut(service_id).expect("service exists");
        service.version += 1;
        let state = if rollback {
            UpdateState::RollbackStarted
        } else {
            UpdateState::Updating
        };
        tracing::info!(service = %service.spec.name, version = service.version, tasks = outdated, state = state.as_str(), "rollout started");
        service.rollout = Some(Rollout::start(state, outdated, now_ms));
    }

    /// `meshctl service rollback`: the previous spec's tasks come back the way an update
    /// replaces them, and the spec rolled back from becomes the previous one.
    pub(crate) fn rollback_to_previous(
        &mut self,
        key: &str,
        now_ms: u64,
    ) -> Result<String, Reason> {
        let id = self.find_service(key)?;
        let service = self.services.get_mut(&id).expect("id was just resolved");
        let Some(previous) = service.previous_spec.take() else {
            return Err(SpecError::NoPrevious(service.spec.name.clone()).into());
        };
        let mut back = service.spec.clone();
        back.command = previous.command;
        back.env = previous.env;
        back.constraints = previous.constraints;
        back.stop_grace_ms = previous.stop_grace_ms;
        back.health = previous.health;
        back.update_config = previous.update_config;
        service.previous_spec = Some(std::mem::replace(&mut service.spec, back));
        service.updated_at = now_ms / 1000;
        self.start_rollout(&id, true, now_ms);
        Ok(id)
    }

    /// Whether a current task must be replaced to match its service: another runtime, other
    /// networks (the routing mesh joined or left), or a node its constraints no longer allow.
    fn is_outdated(&self, task: &Task, constraints: &[Constraint]) -> bool {
        let service = &self.services[&task.service_id];
        if task.runtime_in(service) != service.runtime() {
            return true;
        }
        if task.node_id.is_some() {
            let nets: Vec<&String> = task.attachments.iter().map(|a| &a.network_id).collect();
            if nets != self.task_networks(service).iter().collect::<Vec<_>>() {
                return true;
            }
        }
        let node = task.node_id.as_ref().and_then(|n| self.nodes.get(n));
        node.is_some_and(|r| !constraints.iter().all(|c| c.matches(&r.node)))
    }

    /// Slots of a service whose current task is outdated, lowest first.
    fn outdated_slots(&self, service_id: &str) -> BTreeSet<u64> {
        let constraints = self.services[service_id].spec.constraints.clone();
        self.tasks
            .values()
            .filter(|t| t.service_id == service_id && t.is_current())
            .filter(|t| self.is_outdated(t, &constraints))
            .map(|t| t.slot)
            .collect()
    }

    /// One step of every rollout in progress: checks the slots being replaced, applies the
    /// failure action, and starts the next slots.
    pub(crate) fn advance_rollouts(&mut self, now_ms: u64) {
        let active: Vec<String> = self
            .services
            .values()
            .filter(|s| {
                s.rollout
                    .as_ref()
                    .is_some_and(|r| r.status.state.is_active())
            })
            .map(|s| s.id.clone())
            .collect();
        for id in active {
            self.advance_rollout(&id, now_ms);
        }
    }

    fn advance_rollout(&mut self, service_id: &str, now_ms: u64) {
        let service = &self.services[service_id];
        let config = service.spec.update_config.clone();
        let version = service.version;
        let name = service.spec.name.clone();
        let constraints = service.spec.constraints.clone();
        // Tasks that already run this version's spec (a rollback to what they run) say so.
        let current: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.service_id == service_id && t.is_current() && t.spec_version != version)
            .filter(|t| !self.is_outdated(t, &constraints))
            .map(|t| t.id.clone())
            .collect();
        for id in current {
            self.tasks.get_mut(&id).expect("task exists").spec_version = version;
        }
        let mut rollout = self.services[service_id]
            .rollout
            .clone()
            .expect("an active rollout");
        let outdated = self.outdated_slots(service_id);
        let monitor = config.monitor_ms;
        let mut failed_task = None;
        let slots: Vec<u64> = rollout.in_flight.keys().copied().collect();
        for slot in slots {
            let progress = rollout.in_flight.get_mut(&slot).expect("slot in flight");
            // The slot's new task: the current one running this version.
            let fresh = self
                .tasks
                .values()
                .filter(|t| t.service_id == service_id && t.slot == slot && t.is_current())
                .find(|t| t.spec_version == version && !self.is_outdated(t, &constraints))
                .map(|t| t.id.clone());
            if let Some(old) = progress.task.clone().filter(|t| Some(t) != fresh.as_ref()) {
                // The new task ended before its slot counted as updated.
                let ended = self.tasks.get(&old).map(|t| t.state);
                if matches!(ended, Some(TaskState::Failed | TaskState::Complete) | None) {
                    rollout.failures += 1;
                    failed_task = Some(old.clone());
                    tracing::warn!(service = %name, slot, task = %old, "new task failed during the update");
                }
                progress.task = None;
                progress.up_since_ms = None;
            }
            // A slot that no longer exists (scaled down, a global service's node gone).
            let occupied = self.tasks.values().any(|t| {
                t.service_id == service_id
                    && t.slot == slot
                    && (t.is_current() || t.drain.as_ref().is_some_and(|d| d.hold_slot))
            });
            if !occupied {
                rollout.in_flight.remove(&slot);
                continue;
            }
            let Some(fresh) = fresh else { continue };
            progress.task = Some(fresh.clone());
            if self.serves(&self.tasks[&fresh]) {
                let since = *progress.up_since_ms.get_or_insert(now_ms);
                // Start-first: the old task goes once the new one serves.
                self.drain_outdated_in_slot(service_id, slot, &constraints, false, now_ms);
                if now_ms.saturating_sub(since) >= monitor {
                    rollout.in_flight.remove(&slot);
                    rollout.next_start_ms = now_ms + config.delay_ms;
                    tracing::info!(service = %name, slot, "slot updated");
                }
            } else {
                progress.up_since_ms = None;
            }
        }
        // The failure action, once failures exceed the ratio of the tasks being replaced.
        let tolerated = (config.max_failure_ratio.0 * rollout.total.max(1) as f64).floor() as u64;
        if rollout.failures > tolerated {
            let task = failed_task.unwrap_or_default();
            let reason = format!(
                "{} of {} new tasks failed (task {task})",
                rollout.failures, rollout.total
            );
            let action = if rollout.is_rollback() {
                proto::model::FailureAction::Pause
            } else {
                config.failure_action
            };
            match action {
                proto::model::FailureAction::Pause => {
                    let state = if rollout.is_rollback() {
                        UpdateState::RollbackPaused
                    } else {
                        UpdateState::Paused
                    };
                    let verb = if rollout.is_rollback() {
                        "rollback"
                    } else {
                        "update"
                    };
                    rollout.end(state, format!("{verb} paused: {reason}"), now_ms);
                    self.services.get_mut(service_id).expect("service").rollout = Some(rollout);
                    return;
                }
                proto::model::FailureAction::Rollback => {
                    self.services.get_mut(service_id).expect("service").rollout = Some(rollout);
                    if self.services[service_id].previous_spec.is_some() {
                        self.rollback_to_previous(service_id, now_ms)
                            .expect("the service has a previous spec");
                        let r = self.services.get_mut(service_id).expect("service");
                        if let Some(r) = r.rollout.as_mut() {
                            r.status.message = format!("rollback started: {reason}");
                        }
                    }
                    return;
                }
                proto::model::FailureAction::Continue => {}
            }
        }
        // The next slots, up to the parallelism, once the delay after the last one is over.
        let width = match config.parallelism {
            0 => usize::MAX,
            n => n as usize,
        };
        if now_ms >= rollout.next_start_ms {
            let waiting: Vec<u64> = outdated
                .iter()
                .copied()
                .filter(|s| !rollout.in_flight.contains_key(s))
                .collect();
            for slot in waiting {
                if rollout.in_flight.len() >= width {
                    break;
                }
                tracing::info!(service = %name, slot, order = config.order.as_str(), "updating slot");
                match config.order {
                    UpdateOrder::StopFirst => {
                        self.drain_outdated_in_slot(service_id, slot, &constraints, true, now_ms)
                    }
                    UpdateOrder::StartFirst => self.start_replacement(service_id, slot, now_ms),
                }
                rollout.in_flight.insert(slot, SlotProgress::default());
            }
        }
        if rollout.in_flight.is_empty() && outdated.is_empty() {
            let (state, message) = if rollout.is_rollback() {
                (UpdateState::RollbackCompleted, "rollback completed")
            } else {
                (UpdateState::Completed, "update completed")
            };
            rollout.end(state, message.into(), now_ms);
        }
        self.services.get_mut(service_id).expect("service").rollout = Some(rollout);
    }

    fn drain_outdated_in_slot(
        &mut self,
        service_id: &str,
        slot: u64,
        constraints: &[Constraint],
        hold_slot: bool,
        now_ms: u64,
    ) {
        let old: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.service_id == service_id && t.slot == slot && t.is_current())
            .filter(|t| self.is_outdated(t, constraints))
            .map(|t| t.id.clone())
            .collect();
        for id in old {
            let task = self.tasks.get_mut(&id).expect("task exists");
            task.begin_drain(Some("replaced by an update".into()), hold_slot, now_ms);
        }
    }

    /// Start-first: a new task in the slot beside the old one.
    fn start_replacement(&mut self, service_id: &str, slot: u64, now_ms: u64) {
        let service = &self.services[service_id];
        let task = Task::pending(service, slot, now_ms / 1000);
        tracing::info!(service = %service.spec.name, slot, task = %task.id, "new task beside the one it replaces");
        self.tasks.insert(task.id.clone(), task.into());
    }

    /// Stops draining tasks that every node has stopped balancing to (or that waited
    /// [`DRAIN_TIMEOUT_MS`]): they leave their node's assignment, and its agent stops them.
    pub(crate) fn release_drains(&mut self, now_ms: u64) {
        let mut done = Vec::new();
        for task in self.tasks.values().filter(|t| t.is_draining()) {
            let drain = task.drain.as_ref().expect("draining");
            let pending = self.unconfirmed(&drain.revisions);
            let on_node = task.node_id.is_some();
            if !on_node || (drain.armed && pending.is_empty()) {
                done.push(task.id.clone());
            } else if now_ms >= drain.since_ms + DRAIN_TIMEOUT_MS {
                tracing::warn!(task = %task.id, nodes = ?pending, "stopping a draining task without every node's confirmation");
                done.push(task.id.clone());
            }
        }
        for id in done {
            let task = &self.tasks[&id];
            let grace = task
                .runtime_in(&self.services[&task.service_id])
                .stop_grace_ms;
            let task = self.tasks.get_mut(&id).expect("task exists");
            tracing::info!(task = %id, waited_ms = now_ms.saturating_sub(task.drain.as_ref().map_or(now_ms, |d| d.since_ms)), "task left every balancer: stopping it");
            if task.node_id.is_some() {
                // Its node stops it; it stays reachable until it has ended (`end_stops`).
                task.drain = None;
                task.desired_state = TaskState::Shutdown;
                task.stopping_until_ms = Some(now_ms + grace + STOP_MARGIN_MS);
            } else {
                // Keeps its error: why it was stopped.
                task.retire(TaskState::Shutdown, None, now_ms / 1000);
            }
        }
    }

    /// Retires stopping tasks whose process cannot be running any more although no report
    /// said so: their grace period and the margin have passed, or their node is down or gone.
    /// (A report that one ended retires it at once: see `task_status`.)
    pub(crate) fn end_stops(&mut self, now_ms: u64) {
        for task in self.tasks.values_mut() {
            let Some(until) = task.stopping_until_ms else {
                continue;
            };
            let node_up = task
                .node_id
                .as_ref()
                .and_then(|id| self.nodes.get(id))
                .is_some_and(|r| r.node.status != NodeStatus::Down);
            if now_ms >= until || !node_up {
                tracing::info!(task = %task.id, node_up, "stopping task given up on");
                // Keeps its error: why it was stopped.
                task.retire(TaskState::Shutdown, None, now_ms / 1000);
            }
        }
    }

    /// The next time after `now_ms` at which a drain or a rolling update moves on by the clock
    /// alone (a monitor period or an update delay ends, a drain times out), if any; everything
    /// else moves on an agent's word.
    pub fn next_deadline_ms(&self, now_ms: u64) -> Option<u64> {
        let drains = self
            .tasks
            .values()
            .filter_map(|t| t.drain.as_ref())
            .map(|d| d.since_ms + DRAIN_TIMEOUT_MS)
            .chain(self.tasks.values().filter_map(|t| t.stopping_until_ms));
        let rollouts = self.services.values().flat_map(|s| {
            let monitor = s.spec.update_config.monitor_ms;
            let r = s.rollout.as_ref().filter(|r| r.status.state.is_active());
            r.into_iter().flat_map(move |r| {
                let monitors = r
                    .in_flight
                    .values()
                    .filter_map(move |p| p.up_since_ms.map(|u| u + monitor));
                monitors.chain([r.next_start_ms])
            })
        });
        drains.chain(rollouts).filter(|&d| d > now_ms).min()
    }

    /// Records, for each task that began draining, the revision that removed it from each
    /// ready node's balancers: called once the assignments are computed.
    pub(crate) fn arm_drains(&mut self) {
        let revisions: BTreeMap<String, u64> = self
            .nodes
            .values()
            .filter(|r| r.node.status == NodeStatus::Ready)
            .map(|r| (r.node.id.clone(), r.assignment.revision))
            .collect();
        // Tested before written: a write copies the shared record.
        for task in self.tasks.values_mut() {
            if task.drain.as_ref().is_some_and(|d| !d.armed) {
                let drain = task.drain.as_mut().expect("tested above");
                drain.revisions = revisions.clone();
                drain.armed = true;
            }
        }
    }

    /// A task that gets new connections: running, not draining, and healthy if it has a check.
    pub fn serves(&self, task: &Task) -> bool {
        if !(task.is_placed() && task.state == TaskState::Running) {
            return false;
        }
        let checked = match &task.runtime {
            Some(r) => r.health.is_some(),
            None => self.services[&task.service_id].spec.health.is_some(),
        };
        !checked || task.health == Some(Health::Healthy)
    }

    /// Per network, the addresses of tasks that left the balancers but may still run (draining
    /// or stopping), under their service's mark: balancers keep their open connections. Tasks
    /// of services without a mark (dnsrr, or nothing balanced) are not listed.
    pub(crate) fn draining_backends(&self) -> BTreeMap<String, Vec<DrainingBackend>> {
        let mut out: BTreeMap<String, Vec<DrainingBackend>> = BTreeMap::new();
        for t in self
            .tasks
            .values()
            .filter(|t| t.is_draining() || t.is_stopping())
        {
            let Some(fwmark) = self.services.get(&t.service_id).and_then(|s| s.fwmark) else {
                continue;
            };
            for a in &t.attachments {
                out.entry(a.network_id.clone())
                    .or_default()
                    .push(DrainingBackend {
                        fwmark,
                        addr: a.addr.addr(),
                    });
            }
        }
        for list in out.values_mut() {
            list.sort();
        }
        out
    }

    /// Replicated tasks on nodes their service's constraints no longer allow (labels changed),
    /// or that cannot do IPsec ESP for an encrypted network the service is on (the ingress
    /// network became encrypted), leave them, draining, and are placed again where they fit.
    /// Global services have their own rule (see `reconcile_global`).
    pub(crate) fn drain_misplaced(&mut self, now_ms: u64) {
        let mut misplaced = Vec::new();
        for service in self
            .services
            .values()
            .filter(|s| !s.is_global() && !s.removing)
        {
            // A rolling update moves them itself, at its pace.
            let rolling = service
                .rollout
                .as_ref()
                .is_some_and(|r| r.status.state.is_active());
            let encrypted = self.needs_encryption(service);
            if (service.spec.constraints.is_empty() && !encrypted) || rolling {
                continue;
            }
            let constraints = service.spec.constraints.clone();
            for t in self
                .tasks
                .values()
                .filter(|t| t.service_id == service.id && t.is_placed())
            {
                let node = &self.nodes[t.node_id.as_ref().expect("placed")].node;
                let why = if !constraints.iter().all(|c| c.matches(node)) {
                    "no longer satisfies the constraints"
                } else if encrypted && node.no_encryption.is_some() {
                    "cannot do IPsec ESP, which an encrypted network of the service needs"
                } else {
                    continue;
                };
                misplaced.push((t.id.clone(), node.hostname.clone(), why));
            }
        }
        for (id, host, why) in misplaced {
            tracing::info!(task = %id, node = %host, "moving task off a node that {why}");
            let task = self.tasks.get_mut(&id).expect("task exists");
            task.begin_drain(Some(format!("node {host} {why}")), false, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proto::model::{Availability, FailureAction, Ratio};

    use super::*;
    use crate::state::tests::{
        apply_all, cluster, current, published_spec, report_at, run_placed, settle, spec, step, web,
    };

    fn args(a: &[&str]) -> SpecUpdate {
        SpecUpdate {
            args: Some(a.iter().map(|s| s.to_string()).collect()),
            ..SpecUpdate::default()
        }
    }

    fn backends(s: &State) -> Vec<std::net::Ipv4Addr> {
        s.published().into_iter().flat_map(|p| p.backends).collect()
    }

    fn status(s: &State, service: &str) -> UpdateStatus {
        let id = s.find_service(service).unwrap();
        s.services[&id].update_status().cloned().unwrap()
    }

    fn web3(config: UpdateConfig) -> State {
        let mut s = cluster(3);
        let mut spec = published_spec("web", 3, &[], &[web(80)]);
        spec.update_config = config;
        s.create_service(&spec, 1).unwrap();
        settle(&mut s, 1);
        s
    }

    #[test]
    fn a_stop_first_update_replaces_one_slot_at_a_time_and_never_empties_the_balancers() {
        let mut s = web3(UpdateConfig {
            monitor_ms: 2000,
            ..UpdateConfig::default()
        });
        let old: Vec<String> = current(&s, "web").iter().map(|t| t.id.clone()).collect();
        s.update_service("web", &[], &[], None, &args(&["--v2"]), 10)
            .unwrap();
        assert_eq!(status(&s, "web").state, UpdateState::Updating);
        let mut now = 10;
        let mut most_draining = 0;
        while status(&s, "web").state == UpdateState::Updating {
            s.reconcile(now);
            s.refresh_assignments();
            let draining = crate::state::tests::draining(&s);
            most_draining = most_draining.max(draining.len());
            for t in &draining {
                // Out of every balancer, still running on its node until every node applied.
                let ip = t.attachments[0].addr.addr();
                assert!(!backends(&s).contains(&ip));
                let node = &s.nodes[t.node_id.as_ref().unwrap()];
                assert!(node.assignment.tasks.iter().any(|spec| spec.id == t.id));
            }
            assert!(backends(&s).len() >= 2, "at {now}: {:?}", backends(&s));
            apply_all(&mut s);
            run_placed(&mut s, now);
            now += 1;
            assert!(now < 200, "the update did not complete");
        }
        assert_eq!(most_draining, 1);
        let st = status(&s, "web");
        assert_eq!(
            (st.state, st.message.as_str()),
            (UpdateState::Completed, "update completed")
        );
        let id = s.find_service("web").unwrap();
        assert_eq!(s.services[&id].version, 2);
        let tasks = current(&s, "web");
        assert_eq!(tasks.len(), 3);
        for t in &tasks {
            assert!(!old.contains(&t.id));
            assert_eq!(t.spec_version, 2);
            assert_eq!(t.runtime.as_ref().unwrap().command[1], "--v2");
        }
        // The old tasks are history once their agents said they ended, as `service ps` shows.
        settle(&mut s, now);
        assert!(old.iter().all(|o| s.tasks[o].state == TaskState::Shutdown));
        // Each slot waited its monitor period: 3 slots × 2 s at least.
        assert!(now - 10 >= 6, "{now}");
    }

    #[test]
    fn the_clock_is_asked_back_when_a_monitor_period_or_a_drain_ends() {
        let mut s = web3(UpdateConfig {
            monitor_ms: 2000,
            delay_ms: 500,
            ..UpdateConfig::default()
        });
        assert_eq!(
            s.next_deadline_ms(0),
            None,
            "nothing timed without a rollout"
        );
        s.update_service("web", &[], &[], None, &args(&["--v2"]), 10)
            .unwrap();
        s.reconcile_ms(10_000);
        s.refresh_assignments();
        // A draining task: its timeout.
        assert_eq!(s.next_deadline_ms(10_000), Some(10_000 + DRAIN_TIMEOUT_MS));
        apply_all(&mut s);
        s.reconcile_ms(10_100);
        s.refresh_assignments();
        apply_all(&mut s);
        run_placed(&mut s, 10);
        s.reconcile_ms(10_200);
        // The new task serves from 10.2 s: its slot is done 2 s later.
        assert_eq!(s.next_deadline_ms(10_200), Some(12_200));
        s.reconcile_ms(12_200);
        // Then the update delay before the next slot.
        assert_eq!(s.next_deadline_ms(12_200), Some(12_700));
    }

    #[test]
    fn a_removed_service_is_gone_at_once_and_its_tasks_drain_before_they_stop() {
        let mut s = web3(UpdateConfig::default());
        let old: Vec<Task> = current(&s, "web").into_iter().cloned().collect();
        s.remove_service("web", 20).unwrap();
        // Gone for users at once: its name and port can be taken again.
        assert!(s.find_service("web").is_err());
        assert!(s.services.values().all(|v| v.removing));
        s.create_service(&published_spec("web", 1, &[], &[web(80)]), 20)
            .unwrap();
        s.reconcile_ms(20_000);
        s.refresh_assignments();
        // Its tasks are out of every balancer but still run until every node applied that.
        let balanced = backends(&s);
        for t in &old {
            assert!(s.tasks[&t.id].is_draining());
            assert!(!balanced.contains(&t.attachments[0].addr.addr()));
            let node = &s.nodes[t.node_id.as_ref().unwrap()];
            assert!(node.assignment.tasks.iter().any(|spec| spec.id == t.id));
        }
        settle(&mut s, 20);
        assert!(old.iter().all(|t| !s.tasks.contains_key(&t.id)));
        assert_eq!(
            s.services.len(),
            1,
            "the removed service is deleted once drained"
        );
        assert_eq!(backends(&s).len(), 1);
    }

    #[test]
    fn a_start_first_update_drains_the_old_task_once_the_new_one_serves() {
        let mut s = web3(UpdateConfig {
            order: UpdateOrder::StartFirst,
            monitor_ms: 1000,
            ..UpdateConfig::default()
        });
        s.update_service("web", &[], &[], None, &args(&["--v2"]), 10)
            .unwrap();
        s.reconcile(10);
        // The new task runs beside the three old ones, which all still serve.
        assert_eq!(current(&s, "web").len(), 4);
        assert!(!s.tasks.values().any(|t| t.is_draining()));
        let mut now = 10;
        while status(&s, "web").state == UpdateState::Updating {
            step(&mut s, now, |_| None);
            assert!(backends(&s).len() >= 3, "at {now}");
            now += 1;
            assert!(now < 200);
        }
        settle(&mut s, now);
        assert!(current(&s, "web").iter().all(|t| t.spec_version == 2));
        assert_eq!(backends(&s).len(), 3);
    }

    /// Three running replicas scaled to two at 10 s, its assignments computed: the state and
    /// the task that drains.
    fn scaled_down() -> (State, String) {
        let mut s = web3(UpdateConfig::default());
        s.scale_service("web", 2, 10).unwrap();
        s.reconcile_ms(10_000);
        s.refresh_assignments();
        let gone = s.tasks.values().find(|t| t.is_draining()).unwrap();
        let gone = gone.id.clone();
        (s, gone)
    }

    #[test]
    fn a_drain_waits_for_every_ready_node_and_no_longer_than_the_timeout() {
        let (mut s, gone) = scaled_down();
        let id = s.find_service("web").unwrap();
        // Two nodes applied, one did not: the task keeps running.
        let ids: Vec<String> = s.nodes.keys().cloned().collect();
        for n in &ids[..2] {
            let rev = s.nodes[n].assignment.revision;
            s.set_applied(n, rev);
        }
        s.reconcile_ms(10_500);
        assert!(s.tasks[&gone].is_draining());
        // That node going down does not hold it any more.
        s.set_node_status(&ids[2], NodeStatus::Down);
        s.reconcile_ms(10_600);
        assert!(!s.tasks.contains_key(&gone) || !s.tasks[&gone].is_draining());
        assert!(s.services.contains_key(&id));

        // A node that neither applies nor goes down is waited for DRAIN_TIMEOUT_MS.
        let (mut s, gone) = scaled_down();
        s.reconcile_ms(10_000 + DRAIN_TIMEOUT_MS - 1);
        assert!(s.tasks[&gone].is_draining());
        s.reconcile_ms(10_000 + DRAIN_TIMEOUT_MS);
        assert!(!s.tasks.get(&gone).is_some_and(|t| t.is_draining()));
    }

    /// Where a task's address is seen from the nodes: (nodes whose ingress peers list it,
    /// nodes whose ingress balancer keeps it as draining).
    fn seen(s: &State, addr: std::net::Ipv4Addr) -> (usize, usize) {
        let ingress = s
            .nodes
            .values()
            .filter_map(|r| r.assignment.ingress.as_ref());
        let peers = ingress
            .clone()
            .filter(|i| i.network.peers.iter().any(|p| p.ip == addr))
            .count();
        let draining = ingress
            .filter(|i| i.network.draining.iter().any(|d| d.addr == addr))
            .count();
        (peers, draining)
    }

    #[test]
    fn a_stopped_task_stays_reachable_and_draining_until_its_agent_says_it_ended() {
        let (mut s, gone) = scaled_down();
        let addr = s.tasks[&gone].attachments[0].addr.addr();
        // Draining: out of the balancers, kept by them for its open connections.
        // Every node lists it among the ingress endpoints (its own node's agent skips it).
        assert_eq!(seen(&s, addr), (3, 3));
        apply_all(&mut s);
        s.reconcile_ms(10_100);
        s.refresh_assignments();
        let t = s.tasks[&gone].clone();
        assert!(t.is_stopping() && !t.is_draining());
        let node = &s.nodes[t.node_id.as_ref().unwrap()];
        assert!(
            !node.assignment.tasks.iter().any(|spec| spec.id == gone),
            "its node is told to stop it"
        );
        assert_eq!(seen(&s, addr), (3, 3), "still reachable while it stops");
        assert!(s.next_deadline_ms(10_100) <= Some(10_100 + 10_000 + STOP_MARGIN_MS));

        report_at(&mut s, &t, TaskState::Shutdown, None, 12);
        s.refresh_assignments();
        assert!(s.tasks[&gone].is_history());
        assert_eq!(s.tasks[&gone].state, TaskState::Shutdown);
        assert_eq!(s.tasks[&gone].error.as_deref(), Some("scaled down"));
        assert_eq!(seen(&s, addr), (0, 0), "gone once it ended");
    }

    #[test]
    fn a_stopping_task_is_given_up_after_its_grace_or_when_its_node_goes_down() {
        let (mut s, gone) = scaled_down();
        apply_all(&mut s);
        s.reconcile_ms(10_100);
        let until = s.tasks[&gone].stopping_until_ms.unwrap();
        assert_eq!(until, 10_100 + 10_000 + STOP_MARGIN_MS, "grace 10 s");
        s.reconcile_ms(until - 1);
        assert!(s.tasks[&gone].is_stopping());
        s.reconcile_ms(until);
        assert!(!s.tasks.contains_key(&gone));

        let (mut s, gone) = scaled_down();
        apply_all(&mut s);
        s.reconcile_ms(10_100);
        let node = s.tasks[&gone].node_id.clone().unwrap();
        s.set_node_status(&node, NodeStatus::Down);
        s.reconcile_ms(10_200);
        // Retired, and as a slot above the replica count, forgotten.
        assert!(!s.tasks.contains_key(&gone));
    }

    #[test]
    fn a_task_with_a_health_check_serves_only_while_healthy_and_is_replaced_when_not() {
        let mut s = cluster(2);
        let mut spec = published_spec("web", 2, &[], &[web(80)]);
        spec.health = Some(HealthCheck::new(HealthTest::Http {
            port: 8080,
            path: "/".into(),
        }));
        s.create_service(&spec, 1).unwrap();
        step(&mut s, 1, |_| Some(Health::Starting));
        step(&mut s, 2, |_| Some(Health::Starting));
        assert!(backends(&s).is_empty(), "starting tasks get no traffic");
        step(&mut s, 3, |_| Some(Health::Healthy));
        assert_eq!(backends(&s).len(), 2);
        let sick = current(&s, "web")[0].id.clone();
        step(&mut s, 4, |t| {
            Some(if t.id == sick {
                Health::Unhealthy
            } else {
                Health::Healthy
            })
        });
        let t = &s.tasks[&sick];
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.error.as_deref(), Some("unhealthy: connection refused"));
        assert_eq!(backends(&s).len(), 1);
        // Its slot gets a new task (after the restart delay), which serves once healthy.
        for now in 5..15 {
            step(&mut s, now, |_| Some(Health::Healthy));
        }
        assert_eq!(backends(&s).len(), 2);
        assert!(!current(&s, "web").iter().any(|t| t.id == sick));
    }

    #[test]
    fn an_update_whose_tasks_never_get_healthy_pauses_or_rolls_back() {
        for action in [FailureAction::Pause, FailureAction::Rollback] {
            let mut s = web3(UpdateConfig {
                failure_action: action,
                monitor_ms: 1000,
                ..UpdateConfig::default()
            });
            let check = HealthCheck {
                retries: 1,
                ..HealthCheck::new(HealthTest::Cmd {
                    argv: vec!["false".into()],
                })
            };
            let update = SpecUpdate {
                health: Some(check),
                ..args(&["--broken"])
            };
            s.update_service("web", &[], &[], None, &update, 10)
                .unwrap();
            let mut now = 10;
            while status(&s, "web").state == UpdateState::Updating {
                // New tasks (with the check) fail it; old ones have none.
                step(&mut s, now, |t| {
                    t.runtime
                        .as_ref()
                        .unwrap()
                        .health
                        .as_ref()
                        .map(|_| Health::Unhealthy)
                });
                // Two old tasks keep serving all along.
                assert!(backends(&s).len() >= 2, "{action:?} at {now}");
                now += 1;
                assert!(now < 100);
            }
            let st = status(&s, "web");
            match action {
                FailureAction::Pause => {
                    assert_eq!(st.state, UpdateState::Paused);
                    assert!(
                        st.message
                            .starts_with("update paused: 1 of 3 new tasks failed"),
                        "{}",
                        st.message
                    );
                }
                _ => {
                    assert_eq!(st.state, UpdateState::RollbackStarted);
                    assert!(
                        st.message.starts_with("rollback started: 1 of 3"),
                        "{}",
                        st.message
                    );
                    let now = settle(&mut s, now);
                    let st = status(&s, "web");
                    assert_eq!(st.state, UpdateState::RollbackCompleted);
                    let id = s.find_service("web").unwrap();
                    assert_eq!(
                        s.services[&id].spec.command,
                        ["hello-server", "--port", "8080"]
                    );
                    assert_eq!(s.services[&id].version, 3);
                    // The tasks never replaced were kept and now run the version rolled back to.
                    assert!(current(&s, "web").iter().all(|t| t.spec_version == 3));
                    assert_eq!(backends(&s).len(), 3, "at {now}");
                }
            }
        }
    }

    #[test]
    fn rollback_returns_to_the_previous_spec_and_force_replaces_everything() {
        let mut s = web3(UpdateConfig {
            parallelism: 0,
            monitor_ms: 0,
            ..UpdateConfig::default()
        });
        assert!(s
            .rollback_service("web", 5)
            .unwrap_err()
            .to_string()
            .contains("no previous spec"));
        let env = SpecUpdate {
            env_add: [("MODE".to_string(), "blue".to_string())].into(),
            ..SpecUpdate::default()
        };
        s.update_service("web", &[], &[], None, &env, 10).unwrap();
        // Parallelism 0: every slot at once.
        s.reconcile(10);
        assert_eq!(s.tasks.values().filter(|t| t.is_draining()).count(), 3);
        let now = settle(&mut s, 10);
        let envs = |s: &State| -> Vec<BTreeMap<String, String>> {
            current(s, "web")
                .iter()
                .map(|t| t.runtime.clone().unwrap().env)
                .collect()
        };
        assert!(envs(&s)
            .iter()
            .all(|e| e.get("MODE").map(String::as_str) == Some("blue")));
        s.rollback_service("web", now).unwrap();
        assert_eq!(status(&s, "web").state, UpdateState::RollbackStarted);
        let now = settle(&mut s, now);
        assert_eq!(status(&s, "web").state, UpdateState::RollbackCompleted);
        assert!(envs(&s).iter().all(BTreeMap::is_empty));
        // The spec rolled back from is the previous one now: rolling back again returns to it.
        let id = s.find_service("web").unwrap();
        assert_eq!(s.services[&id].previous_spec.as_ref().unwrap().env.len(), 1);

        // --force: the same spec, new tasks.
        let before: Vec<String> = current(&s, "web").iter().map(|t| t.id.clone()).collect();
        let force = SpecUpdate {
            force: true,
            ..SpecUpdate::default()
        };
        s.update_service("web", &[], &[], None, &force, now)
            .unwrap();
        settle(&mut s, now);
        assert!(current(&s, "web").iter().all(|t| !before.contains(&t.id)));
        // A change that replaces nothing starts no update.
        let version = s.services[&id].version;
        let ratio = SpecUpdate {
            update_config: Some(UpdateConfig {
                max_failure_ratio: Ratio(0.5),
                ..UpdateConfig::default()
            }),
            ..SpecUpdate::default()
        };
        s.update_service("web", &[], &[], None, &ratio, now + 100)
            .unwrap();
        assert_eq!(s.services[&id].version, version);
    }

    #[test]
    fn bad_spec_updates_are_refused_and_change_nothing() {
        let mut s = web3(UpdateConfig::default());
        let before = s.clone();
        let bad = [
            SpecUpdate {
                env_add: [("A=B".to_string(), "x".to_string())].into(),
                ..SpecUpdate::default()
            },
            SpecUpdate {
                env_add: [("A".to_string(), "x".to_string())].into(),
                env_rm: vec!["A".into()],
                ..SpecUpdate::default()
            },
            SpecUpdate {
                constraint_rm: vec![Constraint::parse("node.role==worker").unwrap()],
                ..SpecUpdate::default()
            },
            SpecUpdate {
                constraint_add: vec![Constraint::parse("node.role==worker").unwrap(); 2],
                ..SpecUpdate::default()
            },
            SpecUpdate {
                command: Some(vec![]),
                ..SpecUpdate::default()
            },
            SpecUpdate {
                update_config: Some(UpdateConfig {
                    max_failure_ratio: Ratio(1.5),
                    ..UpdateConfig::default()
                }),
                ..SpecUpdate::default()
            },
            SpecUpdate {
                health: Some(HealthCheck::new(HealthTest::Http {
                    port: 80,
                    path: "no-slash".into(),
                })),
                ..SpecUpdate::default()
            },
            SpecUpdate {
                health: Some(HealthCheck {
                    interval_ms: 1,
                    ..HealthCheck::new(HealthTest::Cmd {
                        argv: vec!["true".into()],
                    })
                }),
                ..SpecUpdate::default()
            },
            SpecUpdate {
                stop_grace_ms: Some(MAX_DURATION_MS + 1),
                ..SpecUpdate::default()
            },
        ];
        for update in bad {
            let err = s
                .update_service("web", &[], &[], None, &update, 10)
                .unwrap_err();
            assert!(err.to_string().starts_with("update service web: "), "{err}");
            assert_eq!(s, before, "{err}");
        }
    }

    #[test]
    fn replicated_tasks_leave_nodes_their_constraints_no_longer_allow() {
        let mut s = cluster(3);
        let blue: BTreeMap<String, String> = [("color".to_string(), "blue".to_string())].into();
        for n in ["node1", "node2"] {
            s.update_node(n, None, &blue, &[]).unwrap();
        }
        let mut spec = spec("api", 2, &[]);
        spec.constraints = vec![Constraint::parse("node.labels.color==blue").unwrap()];
        s.create_service(&spec, 1).unwrap();
        let now = settle(&mut s, 1);
        s.update_node("node2", None, &BTreeMap::new(), &["color".into()])
            .unwrap();
        s.update_node("node3", None, &blue, &[]).unwrap();
        settle(&mut s, now);
        let mut hosts: Vec<String> = current(&s, "api")
            .iter()
            .map(|t| s.nodes[t.node_id.as_ref().unwrap()].node.hostname.clone())
            .collect();
        hosts.sort();
        assert_eq!(hosts, ["node1", "node3"]);
        // A drained node's tasks drain too: they leave the balancers before they stop.
        s.update_node("node3", Some(Availability::Drain), &BTreeMap::new(), &[])
            .unwrap();
        s.reconcile(now + 100);
        assert_eq!(s.tasks.values().filter(|t| t.is_draining()).count(), 1);
    }
}
