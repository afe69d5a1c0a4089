//! What the agent tells the manager, kept so that a manager that was away (or a new leader)
//! hears all of it on the next connection: every task's latest status, the load balancer's
//! state and the revision applied last. The supervisor, the reconciler and the connection share
//! one [`Outbox`]; only the connection reads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proto::agent::{AgentMsg, LbReport, TaskStatus};
use tokio::sync::mpsc;
use tracing::info;

/// Messages for the manager. Task statuses are also kept as a table, re-sent whole on every
/// (re)connect, so nothing said while the manager was away is lost.
#[derive(Clone)]
pub struct Outbox {
    table: Arc<Mutex<Table>>,
    tx: mpsc::UnboundedSender<AgentMsg>,
}

/// What a (re)connected manager is told first.
#[derive(Default)]
struct Table {
    statuses: BTreeMap<String, TaskStatus>,
    applied: Option<u64>,
    lb: Option<LbReport>,
}

impl Outbox {
    pub fn new() -> (Outbox, mpsc::UnboundedReceiver<AgentMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Outbox {
            table: Arc::default(),
            tx,
        };
        (out, rx)
    }

    pub fn task_status(&self, st: TaskStatus) {
        self.lock().statuses.insert(st.task_id.clone(), st.clone());
        let _ = self.tx.send(AgentMsg::TaskStatus(st));
    }

    /// Stops re-sending the status of a task the manager no longer assigns.
    pub fn forget(&self, task_id: &str) {
        self.lock().statuses.remove(task_id);
    }

    pub fn applied(&self, revision: u64) {
        self.lock().applied = Some(revision);
        let _ = self.tx.send(AgentMsg::Applied { revision });
    }

    /// Sends the load balancer's state if it changed since the last one sent.
    pub fn lb_state(&self, report: LbReport) {
        let mut t = self.lock();
        if t.lb.as_ref() != Some(&report) {
            let programmed: Vec<String> = report
                .services
                .iter()
                .map(|s| {
                    let b: Vec<String> = s
                        .backends
                        .iter()
                        .map(|b| format!("{}/{}", b.ip, b.weight))
                        .collect();
                    format!("{}:[{}]", s.fwmark, b.join(" "))
                })
                .collect();
            info!(backend = %report.backend, services = %programmed.join(" "), "load balancer");
            t.lb = Some(report.clone());
            let _ = self.tx.send(AgentMsg::LbState(report));
        }
    }

    /// Every task's status, the load balancer's state, then the revision applied last.
    pub fn snapshot(&self) -> Vec<AgentMsg> {
        let t = self.lock();
        let statuses = t.statuses.values().cloned().map(AgentMsg::TaskStatus);
        statuses
            .chain(t.lb.clone().map(AgentMsg::LbState))
            .chain(t.applied.map(|revision| AgentMsg::Applied { revision }))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves plain data: still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}
