//! Waiting for a service to converge, with docker's progress lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::api::{Request, Response, ServiceInfo, TaskInfo};
use proto::model::{ServiceMode, TaskState};

use crate::client::Client;

/// Where a service stands: per slot, what its current task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub desired: u64,
    pub running: usize,
    /// Slot → "running", "assigned", "pending: no suitable node (...)", ...
    pub slots: BTreeMap<u64, String>,
    /// A global service: slot → its node, which names the slot in the lines shown (as docker
    /// shows a global service's progress by node); empty for a replicated one.
    pub nodes: BTreeMap<u64, String>,
}

impl Progress {
    pub fn of(tasks: &[TaskInfo], desired: u64, mode: ServiceMode) -> Progress {
        let mut slots = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        let mut running = 0;
        for t in tasks
            .iter()
            .filter(|t| t.desired_state == TaskState::Running)
        {
            if t.state == TaskState::Running {
                running += 1;
            }
            let word = crate::render::state_word(t.state).to_lowercase();
            let text = match &t.error {
                Some(e) => format!("{word}: {e}"),
                None => word,
            };
            slots.insert(t.slot, text);
            if mode == ServiceMode::Global {
                // A task waiting to start has no node yet, but its name `<service>.<node id>`
                // says where it goes.
                let node = t.node.clone().unwrap_or_else(|| {
                    let id = t.name.rsplit_once('.').map_or("", |(_, id)| id);
                    id.chars().take(12).collect()
                });
                nodes.insert(t.slot, node);
            }
        }
        Progress {
            desired,
            running,
            slots,
            nodes,
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
        self.running as u64 == self.desired && self.slots.len() as u64 == self.desired
    }

    /// The slots that hold convergence up, for the timeout error.
    fn laggards(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|(_, text)| text.as_str() != "running")
            .map(|(slot, text)| format!("{}: {text}", self.label(*slot)))
            .collect()
    }
}

/// Polls the service's tasks until every slot runs, printing a line for every change; `info`
/// is the service as the manager answered the change, with the tasks it wants.
pub fn wait(
    client: &mut Client,
    info: &ServiceInfo,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // The name: unique, and what the user reads in messages.
    let service = info.spec.name.as_str();
    let desired = info.desired_tasks();
    let deadline = Instant::now() + timeout;
    let mut shown: Option<Progress> = None;
    loop {
        let tasks = match client.call(&Request::ServicePs {
            service: service.to_string(),
        })? {
            Response::Tasks { tasks } => tasks,
            other => bail!("list tasks of service {service}: unexpected answer {other:?}"),
        };
        let now = Progress::of(&tasks, desired, info.spec.mode);
        if shown.as_ref() != Some(&now) {
            for (slot, text) in &now.slots {
                if shown.as_ref().and_then(|p| p.slots.get(slot)) != Some(text) {
                    writeln!(out, "{}: {text}", now.label(*slot))?;
                }
            }
            if shown.as_ref().map(|p| p.running) != Some(now.running) {
                writeln!(
                    out,
                    "overall progress: {} out of {desired} tasks",
                    now.running
                )?;
            }
            out.flush().context("write progress")?;
        }
        if now.converged() {
            writeln!(out, "verify: Service converged")?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut msg = format!(
                "service {service} did not converge within {}s: {} out of {desired} tasks running",
                timeout.as_secs(),
                now.running
            );
            let laggards = now.laggards();
            if !laggards.is_empty() {
                msg.push_str(&format!(" ({})", laggards.join("; ")));
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
        let p = Progress::of(&tasks, 3, ServiceMode::Replicated);
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
        let of =
            |tasks: &[TaskInfo], desired| Progress::of(tasks, desired, ServiceMode::Replicated);
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
        let p = Progress::of(&tasks, 3, ServiceMode::Global);
        assert!(!p.converged());
        assert_eq!(
            p.laggards(),
            ["node2: assigned", "4bc7f0d1a2b3: pending: restart delayed"]
        );
        let all = [on(1, "node1", Running, None), on(2, "node2", Running, None)];
        assert!(Progress::of(&all, 2, ServiceMode::Global).converged());
    }
}
