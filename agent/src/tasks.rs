//! Tasks as processes: each task's command runs inside the task's own network namespace, its
//! output goes to `<state-dir>/tasks/<name>.log`, and its record (spec + [`Phase`]) is kept in the
//! state dir so a restarted agent adopts the running process instead of starting another.
//!
//! The lifecycle is a pure state machine ([`transition`]); the [`Supervisor`] feeds it with what
//! happens to processes and reports every change to the manager. A task with a health check is
//! probed by a [`Checker`] while it runs, and its health is part of its status.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use proto::agent::TaskSpec;
use proto::model::{Health, TaskState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, info_span, warn};

use crate::health::{Checker, Target};
use crate::lifecycle::{
    is_alive, proc_start_time, signal_task, status_of, task_env, transition, Event, Phase,
    ProcEvent, TaskRecord,
};
use crate::metrics::AgentMetrics;
use crate::outbox::Outbox;
use crate::state::StateDir;

/// Why a task's process could not be started. The manager is told it as text.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the task has an empty command")]
    EmptyCommand,
    /// The task's namespace, the list of ours, or the task's own mounts.
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("open log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write resolv.conf and hosts of the task: {0}")]
    Files(#[source] std::io::Error),
    /// The namespace path is left out: it is the task's own, and says nothing more.
    #[error("spawn {prog}: {source}")]
    Spawn {
        prog: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spawn {prog}: {source}")]
    SpawnNetns {
        prog: String,
        #[source]
        source: netns::Error,
    },
}

pub struct Supervisor {
    state: StateDir,
    records: BTreeMap<String, TaskRecord>,
    stopping: BTreeSet<String>,
    /// Tasks whose new phase the manager has not been told yet: told after the pass that acts
    /// on it, so a Shutdown arrives once the task's namespace is gone too.
    unreported: BTreeSet<String>,
    events: UnboundedSender<ProcEvent>,
    outbox: Outbox,
    metrics: AgentMetrics,
    /// The health checks of running tasks that have one; dropping one stops it.
    checkers: BTreeMap<String, Checker>,
    /// The node's search domains, for the tasks' resolv.conf.
    search: Vec<String>,
}

impl Supervisor {
    /// Loads the records and adopts every process that still runs (and its health checks,
    /// which go on from the health last found); the others are marked as exited. Reports every
    /// task's status.
    pub fn adopt(
        state: StateDir,
        events: UnboundedSender<ProcEvent>,
        outbox: Outbox,
        metrics: AgentMetrics,
    ) -> anyhow::Result<Supervisor> {
        let mut sup = Supervisor {
            records: BTreeMap::new(),
            stopping: BTreeSet::new(),
            unreported: BTreeSet::new(),
            state,
            events,
            outbox,
            metrics,
            checkers: BTreeMap::new(),
            search: Vec::new(),
        };
        for rec in sup.state.task_records()? {
            let name = rec.spec.name.clone();
            let _span = info_span!("task", task = %name).entered();
            match rec.phase {
                Phase::Running {
                    pid,
                    start_time,
                    netns_inode,
                } => {
                    sup.records.insert(name.clone(), rec);
                    if is_alive(pid, start_time, netns_inode) {
                        info!(pid, "adopted running task");
                        sup.watch_adopted(&name, pid, start_time, netns_inode);
                        sup.check_health(&name);
                        sup.report(&name);
                    } else {
                        warn!(pid, "task process is gone");
                        sup.handle(ProcEvent {
                            task: name,
                            pid,
                            event: Event::Vanished,
                        });
                    }
                }
                Phase::Starting => {
                    // A crash while starting: a process may have been spawned but not recorded.
                    // Kill whatever runs in the task's namespace; the task then starts afresh.
                    let path = sup.netns_path(&name);
                    if let Ok(ns) = netns::Netns::open(&path) {
                        for pid in ns.pids().unwrap_or_default() {
                            warn!(pid, "killing unrecorded process of a half-started task");
                            let _ =
                                nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        }
                    }
                    sup.state.remove_task(&name)?;
                }
                Phase::Exited { .. } => {
                    sup.records.insert(name.clone(), rec);
                    sup.report(&name);
                }
            }
        }
        sup.flush_reports();
        Ok(sup)
    }

    /// The search domains tasks started from now on see in their resolv.conf.
    pub fn with_search_domains(mut self, search: Vec<String>) -> Supervisor {
        self.search = search;
        self
    }

    pub fn records(&self) -> &BTreeMap<String, TaskRecord> {
        &self.records
    }

    fn netns_path(&self, name: &str) -> PathBuf {
        self.state.netns_dir().join(name)
    }

    fn report(&self, name: &str) {
        if let Some(rec) = self.records.get(name) {
            let st = status_of(rec, &self.netns_path(name));
            info!(
                task = %name,
                state = ?st.state,
                error = st.error.as_deref().unwrap_or(""),
                pid = st.pid.unwrap_or(0),
                health = st.health.map_or("", Health::as_str),
                "task status"
            );
            self.outbox.task_status(st);
        }
    }

    fn set_phase(&mut self, name: &str, phase: Phase) {
        let Some(rec) = self.records.get_mut(name) else {
            return;
        };
        if !matches!(phase, Phase::Running { .. }) {
            rec.health = None;
            self.checkers.remove(name);
        }
        rec.phase = phase;
        if let Err(e) = self.state.save_task(rec) {
            warn!(task = %name, "persist task record: {e}");
        }
        self.unreported.insert(name.to_string());
    }

    /// Reports every phase change not reported yet.
    pub fn flush_reports(&mut self) {
        for name in std::mem::take(&mut self.unreported) {
            self.report(&name);
        }
    }

    /// Starts the health checks of a running task that has some.
    fn check_health(&mut self, name: &str) {
        let Some(rec) = self.records.get(name) else {
            return;
        };
        let (
            Some(check),
            Phase::Running {
                pid,
                start_time,
                netns_inode,
            },
        ) = (&rec.spec.health, &rec.phase)
        else {
            return;
        };
        let target = Target {
            task: name.to_string(),
            pid: *pid,
            start_time: *start_time,
            netns_inode: *netns_inode,
        };
        let checker = Checker::start(
            target,
            &rec.spec,
            check.clone(),
            rec.health.clone(),
            self.events.clone(),
            self.metrics.clone(),
        );
        self.checkers.insert(name.to_string(), checker);
    }

    /// Applies a process event. Returns true if the task's phase changed.
    pub fn handle(&mut self, ev: ProcEvent) -> bool {
        let Some(rec) = self.records.get_mut(&ev.task) else {
            return false;
        };
        if matches!(rec.phase, Phase::Running { pid, .. } if pid != ev.pid) {
            return false;
        }
        if let Event::Health(found) = ev.event {
            // Only about the process that runs now; told at once, the manager routes by it.
            if matches!(rec.phase, Phase::Running { .. }) && rec.health.as_ref() != Some(&found) {
                rec.health = Some(found);
                if let Err(e) = self.state.save_task(rec) {
                    warn!(task = %ev.task, "persist task record: {e}");
                }
                self.report(&ev.task);
            }
            return false;
        }
        let stopping = self.stopping.contains(&ev.task);
        match transition(&rec.phase, &ev.event, stopping) {
            Some(next) => {
                self.stopping.remove(&ev.task);
                self.set_phase(&ev.task, next);
                // A crash is told at once, so the manager takes the task out of every node's
                // load balancer while this node tears its network down; a requested stop is
                // told after the pass that removed it.
                if !stopping && self.unreported.remove(&ev.task) {
                    self.report(&ev.task);
                }
                true
            }
            None => false,
        }
    }

    /// Starts the task's process inside its namespace (which exists, with its endpoints).
    pub fn start(&mut self, spec: &TaskSpec) {
        let name = spec.name.clone();
        self.records.insert(
            name.clone(),
            TaskRecord {
                spec: spec.clone(),
                phase: Phase::Starting,
                health: None,
            },
        );
        // Starting and Running are both told at once: the network is already built.
        self.set_phase(&name, Phase::Starting);
        self.flush_reports();
        let event = match self.spawn(spec) {
            Ok((pid, start_time, netns_inode)) => {
                info!(pid, command = ?spec.command, "task started");
                Event::Spawned {
                    pid,
                    start_time,
                    netns_inode,
                }
            }
            Err(e) => {
                warn!("start failed: {e}");
                // The manager is told the reason as text.
                Event::SpawnFailed(e.to_string())
            }
        };
        if let Some(next) = transition(&Phase::Starting, &event, false) {
            self.set_phase(&name, next);
            self.check_health(&name);
            self.flush_reports();
        }
    }

    /// Spawns the process and its waiter thread; returns (pid, start time, netns inode).
    fn spawn(&self, spec: &TaskSpec) -> Result<(u32, u64, u64), SpawnError> {
        let (prog, args) = spec.command.split_first().ok_or(SpawnError::EmptyCommand)?;
        let ns = netns::Netns::open(&self.netns_path(&spec.name))?;
        let netns_inode = ns.inode()?;
        let log_path = self.state.task_log(&spec.name);
        let log_err = |source| SpawnError::Log {
            path: log_path.clone(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .envs(task_env(spec))
            // Its own process group: a signal to the agent's terminal or group does not reach
            // the task, and stopping it reaches the task's children too.
            .process_group(0);
        // The task's own /etc/resolv.conf (the embedded DNS) and /etc/hosts, in a mount
        // namespace of its own that holds none of our namespace files.
        let (resolv, hosts) =
            crate::dns::view::write(&self.state.task_files_dir(&spec.name), spec, &self.search)
                .map_err(SpawnError::Files)?;
        let ours = netns::list(&self.state.netns_dir())?;
        let binds = present_targets(&[
            (&resolv, Path::new("/etc/resolv.conf")),
            (&hosts, Path::new("/etc/hosts")),
        ]);
        netns::prepare_own_mounts(&mut cmd, &binds, &ours)?;
        let mut child = ns.spawn(&mut cmd).map_err(|e| match e {
            netns::Error::Io { cause, .. } => SpawnError::Spawn {
                prog: prog.clone(),
                source: cause,
            },
            other => SpawnError::SpawnNetns {
                prog: prog.clone(),
                source: other,
            },
        })?;
        let pid = child.id();
        let start_time = proc_start_time(pid).unwrap_or(0);
        let events = self.events.clone();
        let task = spec.name.clone();
        std::thread::spawn(move || {
            let event = match child.wait() {
                Ok(st) => Event::Exited(st),
                Err(_) => Event::Vanished,
            };
            let _ = events.send(ProcEvent { task, pid, event });
        });
        Ok((pid, start_time, netns_inode))
    }

    /// Watches a process that is not our child: pidfd readiness, or /proc polling where pidfd
    /// is not available.
    fn watch_adopted(&self, name: &str, pid: u32, start_time: u64, netns_inode: u64) {
        let events = self.events.clone();
        let task = name.to_string();
        tokio::spawn(async move {
            match pidfd_open(pid) {
                // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and is not
                // reused for as long as it is registered.
                Some(fd) => {
                    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                        Ok(afd) => {
                            let _ = afd.readable().await;
                        }
                        Err(_) => poll_until_gone(pid, start_time, netns_inode).await,
                    }
                }
                None => poll_until_gone(pid, start_time, netns_inode).await,
            }
            let _ = events.send(ProcEvent {
                task,
                pid,
                event: Event::Vanished,
            });
        });
    }

    /// Stops a task that is no longer wanted: SIGTERM to its process group, SIGKILL after the
    /// task's grace period. Its exit arrives as an event and makes it Shutdown. Its checks stop:
    /// it gets no traffic any more whatever they would find.
    pub fn stop(&mut self, name: &str) {
        let Some(TaskRecord {
            phase:
                Phase::Running {
                    pid,
                    start_time,
                    netns_inode,
                },
            spec,
            ..
        }) = self.records.get(name).cloned()
        else {
            return;
        };
        if !self.stopping.insert(name.to_string()) {
            return;
        }
        self.checkers.remove(name);
        let grace = Duration::from_millis(spec.stop_grace_ms);
        info!(pid, ?grace, "stopping task");
        signal_task(pid, Signal::SIGTERM);
        let task = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if is_alive(pid, start_time, netns_inode) {
                warn!(task = %task, pid, "task ignored SIGTERM; killing it");
                signal_task(pid, Signal::SIGKILL);
            }
        });
    }

    /// Marks a task that cannot run at all as Failed, without a record on disk (its name is
    /// not a safe file name).
    pub fn reject(&mut self, spec: &TaskSpec, error: String) {
        if self.records.contains_key(&spec.name) {
            return;
        }
        warn!(task = %spec.name, "{error}");
        let phase = Phase::Exited {
            state: TaskState::Failed,
            error: Some(error),
        };
        let rec = TaskRecord {
            spec: spec.clone(),
            phase,
            health: None,
        };
        self.records.insert(spec.name.clone(), rec);
        self.unreported.insert(spec.name.clone());
    }

    /// Forgets a terminal task that left the assignment.
    pub fn forget(&mut self, name: &str) {
        self.checkers.remove(name);
        if self.unreported.remove(name) {
            self.report(name);
        }
        if let Some(rec) = self.records.remove(name) {
            self.outbox.forget(&rec.spec.id);
        }
        // A rejected name was never written, and must not name a path to remove.
        if netns::validate_name(name).is_ok() {
            if let Err(e) = self.state.remove_task(name) {
                warn!(task = %name, "{e}");
            }
        }
    }
}

/// The (task file, node file) pairs whose node file exists: a bind mount needs a target, and
/// the node's files are not ours to create. A node without one (a debootstrap'd machine has no
/// /etc/hosts) runs its tasks without that file of their own, and says so once per file.
fn present_targets<'a>(binds: &[(&'a Path, &'a Path)]) -> Vec<(&'a Path, &'a Path)> {
    static WARNED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    binds
        .iter()
        .copied()
        .filter(|(_, target)| {
            let present = target.exists();
            if !present && WARNED.lock().map(|mut w| w.insert(target.to_path_buf())).unwrap_or(false) {
                warn!(file = %target.display(), "the node has no such file: tasks run without their own copy of it");
            }
            present
        })
        .collect()
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a fresh descriptor, owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

async fn poll_until_gone(pid: u32, start_time: u64, netns_inode: u64) {
    while is_alive(pid, start_time, netns_inode) && !is_zombie(pid) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_file_goes_only_over_a_node_file_that_exists() {
        let dir = std::env::temp_dir().join(format!("meshnet-targets-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (ours, there) = (dir.join("ours"), dir.join("there"));
        fs::write(&there, "").unwrap();
        let missing = dir.join("missing");
        let kept = present_targets(&[(&ours, &there), (&ours, &missing)]);
        assert_eq!(kept, [(ours.as_path(), there.as_path())]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_task_with_an_unusable_name_fails_and_is_forgotten_safely() {
        let root = std::env::temp_dir().join(format!("mesh-agent-reject-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let state = StateDir::open(&root).unwrap();
        let outside = root.join("keep.json");
        fs::write(&outside, b"{}").unwrap();
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let (outbox, mut sent) = Outbox::new();
        let mut sup = Supervisor::adopt(state, events, outbox, AgentMetrics::new()).unwrap();
        let spec = TaskSpec {
            id: "t9".into(),
            name: "../keep".into(),
            service_id: "s".into(),
            service_name: "web".into(),
            command: vec!["true".into()],
            attachments: vec![],
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        };
        sup.reject(&spec, "task name: invalid".into());
        sup.flush_reports();
        let Some(proto::agent::AgentMsg::TaskStatus(st)) = sent.recv().await else {
            panic!("a status")
        };
        assert_eq!((st.task_id.as_str(), st.state), ("t9", TaskState::Failed));
        sup.forget("../keep");
        assert!(sup.records().is_empty());
        assert!(
            outside.exists(),
            "forgetting never touches a path outside the state dir"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn our_own_process_is_no_zombie() {
        assert!(!is_zombie(std::process::id()));
    }
}
