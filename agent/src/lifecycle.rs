//! A task's life as the agent records it, apart from the machinery that runs it: the record
//! kept in the state dir ([`TaskRecord`], its [`Phase`] and [`HealthState`]), the events of its
//! process and the pure [`transition`] they drive, the status the manager sees, and the checks
//! and signals that tell our process from a reused pid. The supervisor (`tasks`), the health
//! checker (`health`), the state dir and the planner all build on it; it builds on none of them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use proto::agent::{TaskSpec, TaskStatus};
use proto::model::{Health, TaskState};
use serde::{Deserialize, Serialize};

/// Where a task is in its life, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Its namespace and endpoints are being built; no process yet.
    Starting,
    Running {
        pid: u32,
        /// Field 22 of /proc/<pid>/stat: with the pid it tells our process from a reused pid.
        start_time: u64,
        /// The inode of the namespace the process runs in.
        netns_inode: u64,
    },
    /// Terminal: Complete, Failed or Shutdown. The task never runs again; the manager replaces it.
    Exited {
        state: TaskState,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: TaskSpec,
    pub phase: Phase,
    /// What the health checks found last, while Running with a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthState>,
}

/// What happens to a task's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Spawned {
        pid: u32,
        start_time: u64,
        netns_inode: u64,
    },
    SpawnFailed(String),
    /// Our child exited; its status is known.
    Exited(ExitStatus),
    /// A process we adopted (not our child) is gone; its exit status cannot be known.
    Vanished,
    /// The health checks of the running process found a new health.
    Health(HealthState),
}

/// The next phase, or None when the event does not apply (a terminal task stays terminal).
/// `stopping` says the agent asked the process to stop: then any exit is a Shutdown.
pub fn transition(phase: &Phase, event: &Event, stopping: bool) -> Option<Phase> {
    let exited = |state, error: Option<String>| Some(Phase::Exited { state, error });
    match (phase, event) {
        (
            Phase::Starting,
            Event::Spawned {
                pid,
                start_time,
                netns_inode,
            },
        ) => Some(Phase::Running {
            pid: *pid,
            start_time: *start_time,
            netns_inode: *netns_inode,
        }),
        (Phase::Starting, Event::SpawnFailed(e)) => exited(TaskState::Failed, Some(e.clone())),
        (Phase::Running { .. }, Event::Exited(_) | Event::Vanished) if stopping => {
            exited(TaskState::Shutdown, None)
        }
        (Phase::Running { .. }, Event::Exited(st)) => match (st.code(), st.signal()) {
            (Some(0), _) => exited(TaskState::Complete, None),
            (Some(code), _) => exited(TaskState::Failed, Some(format!("exit status {code}"))),
            (None, Some(sig)) => exited(TaskState::Failed, Some(format!("killed by signal {sig}"))),
            (None, None) => exited(TaskState::Failed, Some("exited".into())),
        },
        (Phase::Running { .. }, Event::Vanished) => exited(
            TaskState::Failed,
            Some("process exited while not a child of this agent; exit status unknown".into()),
        ),
        _ => None,
    }
}

/// The status the manager sees for a record. Health is told only while a task with a check
/// runs: Starting until the checks find otherwise; the log only while not healthy.
pub fn status_of(rec: &TaskRecord, netns_path: &Path) -> TaskStatus {
    let (state, error, pid) = match &rec.phase {
        Phase::Starting => (TaskState::Starting, None, None),
        Phase::Running { pid, .. } => (TaskState::Running, None, Some(*pid)),
        Phase::Exited { state, error } => (*state, error.clone(), None),
    };
    let checked = rec.spec.health.is_some() && matches!(rec.phase, Phase::Running { .. });
    let found = rec.health.as_ref().filter(|_| checked);
    let health = checked.then(|| found.map_or(Health::Starting, |f| f.health));
    let health_log = found
        .filter(|f| f.health != Health::Healthy)
        .and_then(|f| f.log.clone());
    TaskStatus {
        task_id: rec.spec.id.clone(),
        state,
        error,
        netns: matches!(rec.phase, Phase::Running { .. }).then(|| netns_path.display().to_string()),
        pid,
        health,
        health_log,
    }
}

/// The environment the agent gives a task's process (and its health check commands): the
/// spec's, then the agent's own variables, which win.
pub fn task_env(spec: &TaskSpec) -> impl Iterator<Item = (&str, &str)> {
    let ours = [
        ("MESH_TASK_ID", spec.id.as_str()),
        ("MESH_TASK_NAME", spec.name.as_str()),
        ("MESH_SERVICE_NAME", spec.service_name.as_str()),
    ];
    spec.env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(ours)
}

/// A process event, tagged with the task and pid it is about (events of an earlier process of
/// the same task are ignored).
#[derive(Debug)]
pub struct ProcEvent {
    pub task: String,
    pub pid: u32,
    pub event: Event,
}

/// Field 22 (starttime) of /proc/<pid>/stat, or None if the process is gone.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn proc_netns_inode(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// True if `pid` is still the process recorded (same start time, same namespace), not a zombie.
pub fn is_alive(pid: u32, start_time: u64, netns_inode: u64) -> bool {
    proc_start_time(pid) == Some(start_time) && proc_netns_inode(pid) == Some(netns_inode)
}

/// What the checks found, as reported and persisted in the task's record (a restarted agent
/// goes on from it instead of taking a healthy task out of traffic until its next pass).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    pub health: Health,
    /// The output or error of the last failed probe (bounded).
    pub log: Option<String>,
}

/// Signals the task's process group (the task and its children), or the process alone if it
/// left its group.
pub fn signal_task(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(pid as i32);
    if killpg(pid, sig).is_err() {
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn running() -> Phase {
        Phase::Running {
            pid: 10,
            start_time: 5,
            netns_inode: 99,
        }
    }

    /// Task t1 of service web, slot 1, with no command, network or check.
    fn web_t1() -> TaskSpec {
        TaskSpec {
            id: "t1".into(),
            name: "web.1.t1".into(),
            service_id: "s".into(),
            service_name: "web".into(),
            command: vec![],
            attachments: vec![],
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    fn exited(state: TaskState, error: Option<&str>) -> Option<Phase> {
        Some(Phase::Exited {
            state,
            error: error.map(String::from),
        })
    }

    #[test]
    fn starting_becomes_running_or_failed() {
        let spawned = Event::Spawned {
            pid: 10,
            start_time: 5,
            netns_inode: 99,
        };
        assert_eq!(
            transition(&Phase::Starting, &spawned, false),
            Some(running())
        );
        let failed = Event::SpawnFailed("spawn nope: No such file or directory".into());
        assert_eq!(
            transition(&Phase::Starting, &failed, false),
            exited(
                TaskState::Failed,
                Some("spawn nope: No such file or directory")
            )
        );
    }

    #[test]
    fn exits_map_to_complete_or_failed() {
        let code = |c: i32| Event::Exited(ExitStatus::from_raw(c << 8));
        assert_eq!(
            transition(&running(), &code(0), false),
            exited(TaskState::Complete, None)
        );
        assert_eq!(
            transition(&running(), &code(3), false),
            exited(TaskState::Failed, Some("exit status 3"))
        );
        let killed = Event::Exited(ExitStatus::from_raw(9));
        assert_eq!(
            transition(&running(), &killed, false),
            exited(TaskState::Failed, Some("killed by signal 9"))
        );
        let gone = transition(&running(), &Event::Vanished, false);
        assert!(
            matches!(gone, Some(Phase::Exited { state: TaskState::Failed, error: Some(e) }) if e.contains("unknown"))
        );
    }

    #[test]
    fn a_requested_stop_is_shutdown_whatever_the_status() {
        for ev in [
            Event::Exited(ExitStatus::from_raw(15)),
            Event::Exited(ExitStatus::from_raw(1 << 8)),
            Event::Vanished,
        ] {
            assert_eq!(
                transition(&running(), &ev, true),
                exited(TaskState::Shutdown, None)
            );
        }
    }

    #[test]
    fn terminal_stays_terminal() {
        let done = Phase::Exited {
            state: TaskState::Complete,
            error: None,
        };
        for ev in [
            Event::Vanished,
            Event::SpawnFailed("x".into()),
            Event::Spawned {
                pid: 1,
                start_time: 1,
                netns_inode: 1,
            },
        ] {
            assert_eq!(transition(&done, &ev, false), None);
        }
        assert_eq!(
            transition(
                &running(),
                &Event::Spawned {
                    pid: 2,
                    start_time: 2,
                    netns_inode: 2
                },
                false
            ),
            None
        );
    }

    #[test]
    fn status_carries_pid_and_netns_only_while_running() {
        let spec = web_t1();
        let ns = Path::new("/run/meshnet/agent/netns/web.1.t1");
        let st = status_of(
            &TaskRecord {
                spec: spec.clone(),
                phase: running(),
                health: None,
            },
            ns,
        );
        assert_eq!((st.state, st.pid), (TaskState::Running, Some(10)));
        assert_eq!(
            st.netns.as_deref(),
            Some("/run/meshnet/agent/netns/web.1.t1")
        );
        let st = status_of(
            &TaskRecord {
                spec,
                phase: Phase::Exited {
                    state: TaskState::Failed,
                    error: Some("exit status 1".into()),
                },
                health: None,
            },
            ns,
        );
        assert_eq!(st.task_id, "t1");
        assert_eq!(
            (st.state, st.pid, st.netns),
            (TaskState::Failed, None, None)
        );
        assert_eq!(st.error.as_deref(), Some("exit status 1"));
    }

    #[test]
    fn status_carries_health_only_while_a_checked_task_runs() {
        let mut rec = TaskRecord {
            spec: web_t1(),
            phase: running(),
            health: None,
        };
        let ns = Path::new("/run/meshnet/agent/netns/web.1.t1");
        let health = |rec: &TaskRecord| {
            let st = status_of(rec, ns);
            (st.health, st.health_log)
        };
        assert_eq!(health(&rec), (None, None), "no check, no health");
        rec.spec.health = Some(proto::model::HealthCheck::new(
            proto::model::HealthTest::Http {
                port: 80,
                path: "/".into(),
            },
        ));
        assert_eq!(health(&rec), (Some(Health::Starting), None));
        rec.health = Some(HealthState {
            health: Health::Starting,
            log: Some("connect 127.0.0.1:80: refused".into()),
        });
        assert_eq!(
            health(&rec),
            (
                Some(Health::Starting),
                Some("connect 127.0.0.1:80: refused".into())
            )
        );
        // A healthy task's last failure (fewer than retries) is not told.
        rec.health = Some(HealthState {
            health: Health::Healthy,
            log: Some("a failure".into()),
        });
        assert_eq!(health(&rec), (Some(Health::Healthy), None));
        rec.phase = Phase::Exited {
            state: TaskState::Shutdown,
            error: None,
        };
        assert_eq!(health(&rec), (None, None));
    }

    #[test]
    fn the_spec_env_comes_with_the_agents_own_variables_which_win() {
        let spec = TaskSpec {
            env: [("GREETING", "hi"), ("MESH_TASK_ID", "forged")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            ..web_t1()
        };
        let env: BTreeMap<&str, &str> = task_env(&spec).collect();
        assert_eq!(env["GREETING"], "hi");
        assert_eq!(env["MESH_TASK_ID"], "t1");
        assert_eq!(env["MESH_SERVICE_NAME"], "web");
    }

    #[test]
    fn our_own_process_is_alive_with_its_start_time() {
        let pid = std::process::id();
        let st = proc_start_time(pid).expect("own stat is readable");
        let ino = proc_netns_inode(pid).expect("own netns is readable");
        assert!(is_alive(pid, st, ino));
        assert!(!is_alive(pid, st + 1, ino));
    }
}
