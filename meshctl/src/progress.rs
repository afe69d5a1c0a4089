//! Waiting for a service to converge, with docker's progress lines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::api::{Request, Response, ServiceInfo, TaskInfo};
use proto::model::{Health, ServiceMode, TaskState, UpdateState, UpdateStatus};

use crate::client::Client;

/// What a wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Every slot runs (create, scale, publish): whatever version its task has.
    Running,
    /// `service update`: also every slot on the service's new version and the rollout done.
    Update,
    /// `service rollback`: the same, for the rollout back.
    Rollback,
}

/// Where a service stands: per slot, what its current task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub desired: u64,
    /// Slots whose task is up: running, healthy with a health check, and on the service's
    /// version when waiting for an update.
    pub running: usize,
    /// Slot → "running", "assigned", "updating", "starting (health: starting)", "pending: no
    /// suitable node (...)", ...
    pub slots: BTreeMap<u64, String>,
    /// The slots counted in `running`.
    ready: BTreeSet<u64>,
    /// A global service: slot → its node, which names the slot in the lines shown (as docker
    /// shows a global service's progress by node); empty for a replicated one.
    pub nodes: BTreeMap<u64, String>,
    /// The rollout this wait follows, while waiting for an update or rollback.
    rollout: Option<UpdateStatus>,
}

impl Progress {
    /// `rollout` is the service's update status when it concerns this wait (see [`wait`]).
    pub fn of(
        tasks: &[TaskInfo],
        info: &ServiceInfo,
        goal: Goal,
        rollout: Option<&UpdateStatus>,
    ) -> Progress {
        let version = (goal != Goal::Running).then_some(info.version);
        let checked = info.spec.health.is_some();
        // With start-first a slot has two current tasks for a while: the replacement is the one
        // the slot waits for.
        let mut current: BTreeMap<u64, &TaskInfo> = BTreeMap::new();
        for t in tasks
            .iter()
            .filter(|t| t.desired_state == TaskState::Running)
        {
            let newer = current
                .get(&t.slot)
                .is_none_or(|c| (t.spec_version, t.created_at) > (c.spec_version, c.created_at));
            if newer {
                current.insert(t.slot, t);
            }
        }
        let (mut slots, mut ready, mut nodes) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
        for (&slot, t) in &current {
            let (text, up) = slot_text(t, checked, version);
            if up {
                ready.insert(slot);
            }
            slots.insert(slot, text);
            if info.spec.mode == ServiceMode::Global {
                // A task waiting to start has no node yet, but its name `<service>.<node id>`
                // says where it goes.
                let node = t.node.clone().unwrap_or_else(|| {
                    let id = t.name.rsplit_once('.').map_or("", |(_, id)| id);
                    id.chars().take(12).collect()
                });
                nodes.insert(slot, node);
            }
        }
        Progress {
            desired: info.desired_tasks(),
            running: ready.len(),
            slots,
            ready,
            nodes,
            rollout: rollout.filter(|_| version.is_some()).cloned(),
        }
    }

    /// How the lines shown name a slot: `2/3`, or a global service's node.
    fn label(&self, slot: u64) -> String {
        match self.nodes.get(&slot) {
            Some(node) => node.clone(),
            None => format!("{slot}/{}", self.desired),
        }
    }

    pub fn converged(&self) -> bool {
        self.running as u64 == self.desired
            && self.slots.len() as u64 == self.desired
            && self.rollout.as_ref().is_none_or(|s| !s.state.is_active())
    }

    /// Whether the wait is over: Ok(true) once converged; an error when the rollout paused, or
    /// when an update ended rolled back (by its failure action), quoting the manager's reason
    /// and saying how to go on.
    pub fn verdict(&self, service: &str, goal: Goal) -> anyhow::Result<bool> {
        let Some(status) = &self.rollout else {
            return Ok(self.converged());
        };
        let message = status.message.as_str();
        match status.state {
            UpdateState::Paused => bail!(
                "update of service {service} paused: {message}; roll it back with `meshctl \
                 service rollback {service}`, or fix the cause and run `meshctl service update \
                 {service}` again"
            ),
            UpdateState::RollbackPaused => bail!(
                "rollback of service {service} paused: {message}; fix the cause and run \
                 `meshctl service update {service}` (with --force to replace every task)"
            ),
            UpdateState::RollbackCompleted if goal == Goal::Update && self.converged() => bail!(
                "update of service {service} failed and was rolled back: {message}; see \
                 `meshctl service ps {service}`"
            ),
            _ => Ok(self.converged()),
        }
    }

    /// The slots that hold convergence up, for the timeout error.
    fn laggards(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|(slot, _)| !self.ready.contains(slot))
            .map(|(slot, text)| format!("{}: {text}", self.label(*slot)))
            .collect()
    }
}

/// A slot's line (`running`, `updating`, `starting (health: starting)`, `failed: ...`) and
/// whether its task is up. `version`: the version the slot must run, when waiting for an update.
fn slot_text(t: &TaskInfo, checked: bool, version: Option<u64>) -> (String, bool) {
    if version.is_some_and(|v| t.spec_version != v) {
        // Still the old spec's task: the rollout has not reached this slot yet.
        return ("updating".to_string(), false);
    }
    let (text, up) = match (t.state, checked, t.health) {
        (TaskState::Running, true, Some(Health::Healthy)) | (TaskState::Running, false, _) => {
            ("running".to_string(), true)
        }
        (TaskState::Running, true, Some(Health::Unhealthy)) => (
            format!(
                "running ({})",
                crate::render::health_note(Health::Unhealthy)
            ),
            false,
        ),
        (TaskState::Running, true, _) => (
            format!(
                "starting ({})",
                crate::render::health_note(Health::Starting)
            ),
            false,
        ),
        (state, ..) => (crate::render::state_word(state).to_lowercase(), false),
    };
    match &t.error {
        Some(e) => (format!("{text}: {e}"), up),
        None => (text, up),
    }
}

/// Polls the service's tasks until every slot runs, printing a line for every change; `info`
/// is the service as the manager answered the change, with the tasks it wants. For an update
/// or rollback it also polls the service: its version and update status.
pub fn wait(
    client: &mut Client,
    info: &ServiceInfo,
    goal: Goal,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // The name: unique, and what the user reads in messages.
    let service = info.spec.name.clone();
    // A change that starts no rollout is answered with the last rollout's status, finished
    // long ago: that one says nothing about this change.
    let stale = info.update_status.clone().filter(|s| !s.state.is_active());
    let mut info = info.clone();
    let deadline = Instant::now() + timeout;
    let mut shown: Option<Progress> = None;
    loop {
        if goal != Goal::Running {
            info = match client.call(&Request::ServiceInspect {
                service: info.id.clone(),
            })? {
                Response::Service { service } => *service,
                other => bail!("inspect service {service}: unexpected answer {other:?}"),
            };
        }
        let tasks = match client.call(&Request::ServicePs {
            service: service.clone(),
        })? {
            Response::Tasks { tasks } => tasks,
            other => bail!("list tasks of service {service}: unexpected answer {other:?}"),
        };
        let rollout = info
            .update_status
            .as_ref()
            .filter(|s| Some(*s) != stale.as_ref());
        let now = Progress::of(&tasks, &info, goal, rollout);
        if shown.as_ref() != Some(&now) {
            if let Some(s) = &now.rollout {
                let before = shown.as_ref().and_then(|p| p.rollout.as_ref());
                if s.state == UpdateState::RollbackStarted
                    && before.map(|b| b.state) != Some(s.state)
                {
                    writeln!(out, "rollback: {}", s.message)?;
                }
            }
            for (slot, text) in &now.slots {
                if shown.as_ref().and_then(|p| p.slots.get(slot)) != Some(text) {
                    writeln!(out, "{}: {text}", now.label(*slot))?;
                }
            }
            if shown.as_ref().map(|p| (p.running, p.desired)) != Some((now.running, now.desired)) {
                writeln!(
                    out,
                    "overall progress: {} out of {} tasks",
                    now.running, now.desired
                )?;
            }
            out.flush().context("write progress")?;
        }
        if now.verdict(&service, goal)? {
            writeln!(out, "verify: Service converged")?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut msg = format!(
                "service {service} did not converge within {}s: {} out of {} tasks running",
                timeout.as_secs(),
                now.running,
                now.desired
            );
            let laggards = now.laggards();
            if !laggards.is_empty() {
                msg.push_str(&format!(" ({})", laggards.join("; ")));
            }
            if let Some(s) = now.rollout.as_ref().filter(|s| s.state.is_active()) {
                msg.push_str(&format!("; {}: {}", s.state.as_str(), s.message));
            }
            msg.push_str(&format!("; see `meshctl service ps {service}`"));
            bail!(msg);
        }
        shown = Some(now);
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::ServiceSpec;
    use proto::model::{HealthCheck, HealthTest};

    fn task(slot: u64, desired: TaskState, state: TaskState, error: Option<&str>) -> TaskInfo {
        TaskInfo {
            id: format!("t{slot}{state:?}"),
            name: format!("web.{slot}"),
            service_id: "s".into(),
            service_name: "web".into(),
            slot,
            node_id: None,
            node: None,
            desired_state: desired,
            state,
            error: error.map(str::to_string),
            pid: None,
            netns: None,
            endpoints: vec![],
            created_at: 0,
            updated_at: 0,
            spec_version: 0,
            health: None,
        }
    }

    fn service(mode: ServiceMode, desired: u64) -> ServiceInfo {
        ServiceInfo {
            id: "s".into(),
            spec: ServiceSpec {
                name: "web".into(),
                mode,
                replicas: if mode == ServiceMode::Replicated {
                    desired
                } else {
                    0
                },
                networks: vec![],
                constraints: vec![],
                command: vec!["hello-server".into()],
                ports: vec![],
                endpoint_mode: Default::default(),
                aliases: Default::default(),
                env: Default::default(),
                update_config: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            },
            network_names: vec![],
            running: 0,
            desired,
            created_at: 0,
            updated_at: 0,
            fwmark: None,
            lb: vec![],
            virtual_ips: vec![],
            version: 0,
            previous_spec: None,
            update_status: None,
        }
    }

    #[test]
    fn converges_when_every_slot_runs() {
        use TaskState::*;
        let tasks = vec![
            task(1, Running, Running, None),
            task(1, Shutdown, Failed, Some("exit status 1")),
            task(2, Running, Assigned, None),
            task(
                3,
                Running,
                Pending,
                Some("no suitable node (1 node not ready or not active)"),
            ),
        ];
        let replicated = |desired| service(ServiceMode::Replicated, desired);
        let p = Progress::of(&tasks, &replicated(3), Goal::Running, None);
        assert_eq!(p.running, 1);
        assert!(!p.converged());
        assert_eq!(
            p.laggards(),
            [
                "2/3: assigned",
                "3/3: pending: no suitable node (1 node not ready or not active)"
            ]
        );
        let all = vec![
            task(1, Running, Running, None),
            task(2, Running, Running, None),
        ];
        let of = |tasks: &[TaskInfo], desired| {
            Progress::of(tasks, &replicated(desired), Goal::Running, None)
        };
        assert!(of(&all, 2).converged());
        // Scaled to 1 while slot 2 still exists: not yet.
        assert!(!of(&all, 1).converged());
        assert!(of(&[], 0).converged());
    }

    #[test]
    fn a_global_service_shows_progress_by_node() {
        use TaskState::*;
        let on = |slot, node: &str, state, error| TaskInfo {
            name: "web.4bc7f0d1a2b3c4d5e6f7a8b9c".into(),
            node: Some(node.to_string()),
            ..task(slot, Running, state, error)
        };
        let waiting = TaskInfo {
            node: None,
            ..on(3, "", Pending, Some("restart delayed"))
        };
        let tasks = vec![
            on(1, "node1", Running, None),
            on(2, "node2", Assigned, None),
            waiting,
        ];
        let global = |desired| service(ServiceMode::Global, desired);
        let p = Progress::of(&tasks, &global(3), Goal::Running, None);
        assert!(!p.converged());
        assert_eq!(
            p.laggards(),
            ["node2: assigned", "4bc7f0d1a2b3: pending: restart delayed"]
        );
        let all = [on(1, "node1", Running, None), on(2, "node2", Running, None)];
        assert!(Progress::of(&all, &global(2), Goal::Running, None).converged());
    }

    #[test]
    fn with_a_health_check_a_slot_counts_once_healthy() {
        use TaskState::*;
        let checked = ServiceInfo {
            spec: ServiceSpec {
                health: Some(HealthCheck::new(HealthTest::Http {
                    port: 8080,
                    path: "/".into(),
                })),
                ..service(ServiceMode::Replicated, 3).spec
            },
            ..service(ServiceMode::Replicated, 3)
        };
        let with = |slot, health| TaskInfo {
            health,
            ..task(slot, Running, Running, None)
        };
        let tasks = [
            with(1, Some(Health::Healthy)),
            with(2, Some(Health::Starting)),
            with(3, Some(Health::Unhealthy)),
        ];
        let p = Progress::of(&tasks, &checked, Goal::Running, None);
        assert_eq!(p.running, 1);
        assert_eq!(
            p.laggards(),
            [
                "2/3: starting (health: starting)",
                "3/3: running (unhealthy)"
            ]
        );
        let healthy = [1, 2, 3].map(|slot| with(slot, Some(Health::Healthy)));
        assert!(Progress::of(&healthy, &checked, Goal::Running, None).converged());
    }

    fn status(state: UpdateState, message: &str) -> UpdateStatus {
        UpdateStatus {
            state,
            started_at: 100,
            completed_at: None,
            message: message.into(),
        }
    }

    #[test]
    fn an_update_converges_once_every_slot_runs_the_new_version() {
        use TaskState::*;
        let updated = ServiceInfo {
            version: 2,
            ..service(ServiceMode::Replicated, 3)
        };
        let at = |slot, version, state| TaskInfo {
            spec_version: version,
            created_at: version,
            ..task(slot, Running, state, None)
        };
        // Slot 2 is being replaced start-first: its new task starts beside the old one.
        let tasks = [
            at(1, 2, Running),
            at(2, 1, Running),
            at(2, 2, Starting),
            at(3, 1, Running),
        ];
        let updating = status(UpdateState::Updating, "update in progress");
        let p = Progress::of(&tasks, &updated, Goal::Update, Some(&updating));
        assert_eq!(p.running, 1);
        assert_eq!(p.laggards(), ["2/3: starting", "3/3: updating"]);
        assert!(!p.verdict("web", Goal::Update).unwrap());
        // A scale waits for running slots only, whatever version they run.
        assert!(Progress::of(&tasks[..1], &updated, Goal::Running, None).running == 1);
        let done = [at(1, 2, Running), at(2, 2, Running), at(3, 2, Running)];
        let p = Progress::of(&done, &updated, Goal::Update, Some(&updating));
        assert!(
            !p.verdict("web", Goal::Update).unwrap(),
            "the rollout still runs"
        );
        let completed = status(UpdateState::Completed, "update completed");
        let p = Progress::of(&done, &updated, Goal::Update, Some(&completed));
        assert!(p.verdict("web", Goal::Update).unwrap());
        // An update that changed nothing to replace starts no rollout.
        assert!(Progress::of(&done, &updated, Goal::Update, None)
            .verdict("web", Goal::Update)
            .unwrap());
        // Old-version tasks keep it unconverged even when the status says completed.
        let p = Progress::of(&tasks, &updated, Goal::Update, Some(&completed));
        assert!(!p.verdict("web", Goal::Update).unwrap());
    }

    #[test]
    fn a_paused_or_rolled_back_rollout_ends_the_wait_with_its_reason() {
        let updated = ServiceInfo {
            version: 2,
            ..service(ServiceMode::Replicated, 1)
        };
        let running = [TaskInfo {
            spec_version: 2,
            ..task(1, TaskState::Running, TaskState::Running, None)
        }];
        let verdict = |state, goal| {
            let s = status(state, "task web.1 failed: exit status 1");
            Progress::of(&running, &updated, goal, Some(&s)).verdict("web", goal)
        };
        let err = verdict(UpdateState::Paused, Goal::Update)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("update of service web paused: task web.1 failed: exit status 1;"),
            "{err}"
        );
        assert!(err.contains("`meshctl service rollback web`"), "{err}");
        let err = verdict(UpdateState::RollbackPaused, Goal::Rollback)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("rollback of service web paused: task web.1"),
            "{err}"
        );
        assert!(err.contains("`meshctl service update web`"), "{err}");
        // The failure action rolled the update back: converged, but not what was asked.
        let err = verdict(UpdateState::RollbackCompleted, Goal::Update)
            .unwrap_err()
            .to_string();
        assert!(err.contains("failed and was rolled back"), "{err}");
        assert!(verdict(UpdateState::RollbackCompleted, Goal::Rollback).unwrap());
        assert!(!verdict(UpdateState::RollbackStarted, Goal::Rollback).unwrap());
    }

    /// A manager on a Unix socket that answers the wait's polls from a script: each
    /// `ServicePs` moves to the next (service, tasks) step, the last one repeating.
    fn scripted_manager(name: &str, steps: Vec<(ServiceInfo, Vec<TaskInfo>)>) -> Client {
        use std::io::{BufRead, BufReader};
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("meshctl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let (mut step, mut line) = (0, Vec::new());
            while reader.read_until(b'\n', &mut line).unwrap() > 0 {
                let (info, tasks) = &steps[step.min(steps.len() - 1)];
                let answer = match proto::decode_frame::<Request>(&line).unwrap() {
                    Request::ServiceInspect { .. } => Response::Service {
                        service: Box::new(info.clone()),
                    },
                    Request::ServicePs { .. } => {
                        step += 1;
                        Response::Tasks {
                            tasks: tasks.clone(),
                        }
                    }
                    other => panic!("unexpected request {other:?}"),
                };
                writer.write_all(&proto::encode_frame(&answer)).unwrap();
                line.clear();
            }
            let _ = std::fs::remove_dir_all(&dir);
        });
        Client::connect(&crate::client::Host::Unix(path), None).unwrap()
    }

    #[test]
    fn waiting_for_an_update_follows_versions_and_the_rollout() {
        use TaskState::*;
        let at = |slot, version, state| TaskInfo {
            spec_version: version,
            created_at: version,
            ..task(slot, Running, state, None)
        };
        let with = |version, state, message: &str, started_at| ServiceInfo {
            version,
            update_status: Some(UpdateStatus {
                started_at,
                ..status(state, message)
            }),
            ..service(ServiceMode::Replicated, 2)
        };
        // The manager answered the update with the new version but still the last rollout's
        // status: that status must not end the wait.
        let answered = with(2, UpdateState::Completed, "update completed", 50);
        let old = vec![at(1, 1, Running), at(2, 1, Running)];
        let updating = with(2, UpdateState::Updating, "update in progress", 200);
        let completed = with(2, UpdateState::Completed, "update completed", 200);
        let mut client = scripted_manager(
            "update",
            vec![
                (answered.clone(), old.clone()),
                (
                    updating.clone(),
                    vec![at(1, 2, Starting), at(2, 1, Running)],
                ),
                (updating, vec![at(1, 2, Running), at(2, 2, Running)]),
                (completed, vec![at(1, 2, Running), at(2, 2, Running)]),
            ],
        );
        let mut out = Vec::new();
        wait(
            &mut client,
            &answered,
            Goal::Update,
            Duration::from_secs(10),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1/2: updating\n2/2: updating\noverall progress: 0 out of 2 tasks\n\
             1/2: starting\n\
             1/2: running\n2/2: running\noverall progress: 2 out of 2 tasks\n\
             verify: Service converged\n"
        );

        let paused = with(
            2,
            UpdateState::Paused,
            "task web.1 failed: exit status 1",
            200,
        );
        let mut client = scripted_manager(
            "paused",
            vec![(paused, vec![at(1, 2, Failed), at(2, 1, Running)])],
        );
        let mut out = Vec::new();
        let err = wait(
            &mut client,
            &answered,
            Goal::Update,
            Duration::from_secs(10),
            &mut out,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("update of service web paused: task web.1 failed: exit status 1;"),
            "{err}"
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("1/2: failed\n2/2: updating\n"),
            "progress is shown before the error"
        );
    }
}
