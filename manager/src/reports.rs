//! What agents report about their tasks and assignments, applied in batches. A task's status
//! or an applied revision is one small change, but a transaction costs a reconcile, a fresh
//! projection to every node and a store write whatever it holds: under a burst (a scale to
//! thousands, a crash loop, a node's agent reconnecting) one transaction per report would keep
//! the cluster lock busy and the API waiting. Agent sessions queue their reports here and go
//! on reading; one thread applies all that queued up meanwhile in one transaction, so the
//! transaction rate stays bounded and a single report waits for no timer. The thread also keeps
//! the work (reconcile, fsync) off the async runtime's workers.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use proto::agent::{LbReport, TaskStatus};
use proto::model::NodeStatus;

use crate::cluster::{lock, Shared, TxError};
use crate::state::{OpError, Reason};

/// What one agent message tells the manager, beside that the node is alive.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Status {
        node_id: String,
        status: TaskStatus,
    },
    Applied {
        node_id: String,
        revision: u64,
    },
    /// The node's load balancer as its agent programmed it (for inspection only).
    Lb {
        node_id: String,
        report: LbReport,
    },
    /// A heartbeat or a renewal: only that the node is alive.
    Alive {
        node_id: String,
    },
}

impl Report {
    fn node_id(&self) -> &str {
        match self {
            Report::Status { node_id, .. }
            | Report::Applied { node_id, .. }
            | Report::Lb { node_id, .. }
            | Report::Alive { node_id } => node_id,
        }
    }
}

#[derive(Default)]
pub struct Inbox {
    queue: Mutex<Vec<Report>>,
    ready: Condvar,
}

impl Inbox {
    pub fn push(&self, report: Report) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(report);
        self.ready.notify_one();
    }

    /// Everything queued now, perhaps nothing.
    fn take_waiting(&self) -> Vec<Report> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Everything queued, waiting for at least one report.
    fn take(&self) -> Vec<Report> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.is_empty() {
            queue = self.ready.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        std::mem::take(&mut *queue)
    }
}

/// Applies the inbox's reports as they come, a batch per transaction, for the manager's life.
/// A report after a quiet spell is applied at once (a failed task leaves the balancers without
/// delay); under a stream of changes, transactions start at most every [`BATCH_EVERY`] (as
/// Swarm's dispatcher batches task updates), so a burst costs a few transactions, not one per
/// report. Batches that change nothing (heartbeats) do not count. After a batch the cluster's
/// lock stays free for as long as the batch held it (at most [`BATCH_EVERY`]): the API and the
/// timer get their turn however busy the agents are.
pub fn apply_forever(inbox: &Inbox, cluster: &Shared) {
    let mut last: Option<Instant> = None;
    loop {
        let mut batch = inbox.take();
        if let Some(wait) = last.and_then(|t| BATCH_EVERY.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
            batch.extend(inbox.take_waiting());
        }
        let t0 = Instant::now();
        if apply(&batch, cluster) {
            last = Some(t0);
        }
        let took = t0.elapsed();
        tracing::debug!(
            reports = batch.len(),
            took_us = took.as_micros() as u64,
            "agent reports applied"
        );
        std::thread::sleep(took.min(BATCH_EVERY));
    }
}

const BATCH_EVERY: Duration = Duration::from_millis(100);

/// One transaction for `batch`, if it holds a change; returns whether it did. A report the
/// state refuses (a task removed meanwhile, a task of another node) is logged and skipped; the
/// others are kept.
pub fn apply(batch: &[Report], cluster: &Shared) -> bool {
    let mut c = lock(cluster);
    if !c.leading() {
        // A follower takes no reports: its agents move to the leader, which learns them anew.
        return false;
    }
    // A node marked down whose agent speaks again is back.
    let back: BTreeSet<&str> = batch
        .iter()
        .map(Report::node_id)
        .filter(|id| {
            c.state()
                .nodes
                .get(*id)
                .is_some_and(|r| r.node.status == NodeStatus::Down)
        })
        .collect();
    let changes = batch
        .iter()
        .any(|r| matches!(r, Report::Status { .. } | Report::Applied { .. }));
    for report in batch {
        if let Report::Lb { node_id, report } = report {
            c.record_lb(node_id, report.clone());
        }
    }
    if back.is_empty() && !changes {
        return false;
    }
    for id in &back {
        tracing::info!(node = %id, "node is ready again");
    }
    let done = c.transact(|s, now| {
        for id in &back {
            s.set_node_status(id, NodeStatus::Ready);
        }
        for report in batch {
            match report {
                Report::Lb { .. } | Report::Alive { .. } => {}
                Report::Applied { node_id, revision } => s.set_applied(node_id, *revision),
                Report::Status { node_id, status } => match s.task_status(node_id, status, now) {
                    Ok(()) => {}
                    // Tasks removed by a scale-down or service rm are reported as they stop.
                    Err(OpError {
                        reason: Reason::NotFound { .. },
                        ..
                    }) => tracing::debug!(task = %status.task_id, "status of a task the manager no longer has"),
                    Err(e) => tracing::warn!(task = %status.task_id, "{e}"),
                },
            }
        }
        Ok(())
    });
    match done {
        Ok(()) => {}
        Err(TxError::Refused(e)) => tracing::error!("agent reports: {e}"),
        Err(e) => tracing::error!("{} agent reports were not recorded: {e}", batch.len()),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{cluster, join_and_connect};
    use crate::outbox::outbox;
    use crate::state::tests::{spec, MANAGER};
    use crate::store::tests::TempDir;
    use proto::model::{LbKind, TaskState};
    use std::sync::{Arc, Mutex};

    fn running(task_id: &str) -> TaskStatus {
        TaskStatus {
            task_id: task_id.into(),
            state: TaskState::Running,
            error: None,
            pid: Some(42),
            netns: Some(format!("/run/netns/{task_id}")),
            health: None,
            health_log: None,
        }
    }

    fn journal_lines(tmp: &TempDir) -> usize {
        std::fs::read_to_string(tmp.0.join("state.journal"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// A cluster with node1 connected and a service of two tasks placed there.
    fn with_tasks(tmp: &TempDir) -> (Shared, String, Vec<String>) {
        let mut c = cluster(tmp);
        let (tx, _rx) = outbox();
        let (node, _) = join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx);
        c.transact(|s, now| s.create_service(&spec("web", 2, &[]), now))
            .unwrap();
        let tasks = c.state().tasks.keys().cloned().collect();
        (Arc::new(Mutex::new(c)), node, tasks)
    }

    #[test]
    fn a_batch_is_one_transaction_and_a_refused_report_leaves_the_others() {
        let tmp = TempDir::new("reports-batch");
        let (shared, node, tasks) = with_tasks(&tmp);
        let revision = lock(&shared).state().nodes[&node].assignment.revision;
        let lines = journal_lines(&tmp);
        let status = |task: &str| Report::Status {
            node_id: node.clone(),
            status: running(task),
        };
        let batch = vec![
            status(&tasks[0]),
            // Removed meanwhile, or another node's: skipped, not the batch.
            status("nosuchtask"),
            Report::Status {
                node_id: "othernode".into(),
                status: running(&tasks[1]),
            },
            status(&tasks[1]),
            Report::Applied {
                node_id: node.clone(),
                revision,
            },
        ];
        assert!(apply(&batch, &shared));
        let c = lock(&shared);
        for t in &tasks {
            assert_eq!(c.state().tasks[t].state, TaskState::Running);
            assert_eq!(c.state().tasks[t].pid, Some(42));
        }
        assert_eq!(c.state().nodes[&node].applied_revision, revision);
        assert_eq!(journal_lines(&tmp), lines + 1, "one write for the batch");
    }

    #[test]
    fn a_down_node_heard_again_is_ready_and_load_balancer_reports_are_kept() {
        let tmp = TempDir::new("reports-alive");
        let (shared, node, _) = with_tasks(&tmp);
        lock(&shared)
            .transact(|s, _| {
                s.set_node_status(&node, NodeStatus::Down);
                Ok(())
            })
            .unwrap();
        let lines = journal_lines(&tmp);
        let report = LbReport {
            backend: LbKind::Nftables,
            services: vec![],
        };
        assert!(apply(
            &[Report::Lb {
                node_id: node.clone(),
                report: report.clone(),
            }],
            &shared,
        ));
        assert_eq!(lock(&shared).lb().get(&node), Some(&report));
        assert_eq!(
            lock(&shared).state().nodes[&node].node.status,
            NodeStatus::Ready,
            "any word from the agent"
        );
        let lines_after = journal_lines(&tmp);
        assert!(lines_after > lines);
        // A heartbeat of a ready node changes nothing and writes nothing.
        assert!(!apply(
            &[Report::Alive {
                node_id: node.clone(),
            }],
            &shared,
        ));
        assert_eq!(journal_lines(&tmp), lines_after, "nothing to write");
    }

    #[test]
    fn a_follower_takes_no_reports() {
        let tmp = TempDir::new("reports-follower");
        let (shared, node, tasks) = with_tasks(&tmp);
        lock(&shared).follow("a test");
        let before = lock(&shared).state().clone();
        assert!(!apply(
            &[Report::Status {
                node_id: node,
                status: running(&tasks[0]),
            }],
            &shared,
        ));
        assert_eq!(lock(&shared).state(), &before);
    }
}
