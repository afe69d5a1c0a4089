//! The reconciliation loop: observe → plan → apply, at start, on every new assignment, on every
//! task exit and on a timer. Kernel calls run on blocking threads (never on a tokio worker).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proto::agent::Assignment;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, info_span, warn, Instrument};

use crate::apply::Kernel;
use crate::conn::Outbox;
use crate::plan::{plan, sandbox_name, Action, Settings};
use crate::state::StateDir;
use crate::tasks::{ProcEvent, Supervisor};

/// A pass that failed is retried this soon, not only at the next interval.
const RETRY: Duration = Duration::from_secs(2);

pub struct Reconciler<K: Kernel> {
    pub kernel: Arc<K>,
    pub supervisor: Supervisor,
    pub settings: Settings,
    pub state: StateDir,
    pub outbox: Outbox,
}

impl<K: Kernel> Reconciler<K> {
    /// One observe → plan → apply pass. Returns the number of failed or skipped actions.
    pub async fn pass(&mut self, desired: &Assignment) -> usize {
        let kernel = self.kernel.clone();
        let observed = match tokio::task::spawn_blocking(move || kernel.observe()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                error!("observe the node: {e}");
                return 1;
            }
            Err(panicked) => {
                error!("observe the node: {panicked}");
                return 1;
            }
        };
        // A task whose name cannot name its namespace (and files) fails instead of retrying.
        for t in &desired.tasks {
            if let Err(e) = netns::validate_name(&t.name) {
                self.supervisor.reject(t, format!("task name: {e}"));
            }
        }
        let actions = plan(
            desired,
            self.supervisor.records(),
            &observed,
            &self.settings,
        );
        if !actions.is_empty() {
            info!(
                revision = desired.revision,
                actions = actions.len(),
                "reconciling"
            );
        }
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut errors = 0;
        for action in actions {
            if action.scopes().iter().any(|s| failed.contains(*s)) {
                errors += 1;
                continue;
            }
            let span = span_of(&action, desired);
            span.in_scope(|| info!(?action, "apply"));
            if let Err(e) = self
                .apply(action.clone(), desired)
                .instrument(span.clone())
                .await
            {
                span.in_scope(|| error!("{e}"));
                failed.extend(action.scopes().into_iter().map(String::from));
                errors += 1;
            }
        }
        errors
    }

    async fn apply(&mut self, action: Action, desired: &Assignment) -> Result<(), String> {
        match &action {
            Action::StopTask { task } => self.supervisor.stop(task),
            Action::ForgetTask { task } => self.supervisor.forget(task),
            Action::StartTask { task } => match desired.tasks.iter().find(|t| &t.name == task) {
                Some(spec) => self.supervisor.start(spec),
                None => return Err(format!("task {task} is not in the assignment")),
            },
            _ => {
                let kernel = self.kernel.clone();
                let shown = format!("{action:?}");
                tokio::task::spawn_blocking(move || kernel.apply(&action))
                    .await
                    .map_err(|e| format!("{shown}: {e}"))?
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Runs forever: passes on new assignments, process events and the timer.
    pub async fn run(
        mut self,
        mut assignments: watch::Receiver<Assignment>,
        mut events: mpsc::UnboundedReceiver<ProcEvent>,
        interval: Duration,
    ) {
        let mut desired = assignments.borrow_and_update().clone();
        // The revision the manager waits to hear about, until a clean pass has applied it.
        let mut unreported: Option<u64> = (desired.revision > 0).then_some(desired.revision);
        // It may have come from the manager before this loop started.
        if let Err(e) = self.state.save_assignment(&desired) {
            error!("persist assignment {}: {e}", desired.revision);
        }
        let mut next = Instant::now();
        loop {
            tokio::select! {
                changed = assignments.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    desired = assignments.borrow_and_update().clone();
                    if let Err(e) = self.state.save_assignment(&desired) {
                        error!("persist assignment {}: {e}", desired.revision);
                    }
                    unreported = Some(desired.revision);
                    next = Instant::now();
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    if self.supervisor.handle(ev) {
                        // A task ended: its namespace and maybe its network's sandbox go now.
                        next = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(next) => {
                    let errors = self.pass(&desired).await;
                    self.supervisor.flush_reports();
                    if errors == 0 {
                        if let Some(rev) = unreported.take() {
                            info!(revision = rev, "assignment applied");
                            self.outbox.applied(rev);
                        }
                        next = Instant::now() + interval;
                    } else {
                        warn!(errors, "pass incomplete; retrying in {RETRY:?}");
                        next = Instant::now() + RETRY;
                    }
                }
            }
        }
    }
}

/// A span naming the network or task an action is about.
fn span_of(action: &Action, desired: &Assignment) -> tracing::Span {
    let network = |sb: &str| {
        desired
            .networks
            .iter()
            .find(|n| sandbox_name(&n.id) == sb)
            .map_or_else(|| sb.to_string(), |n| n.name.clone())
    };
    match action {
        Action::StopTask { task }
        | Action::ForgetTask { task }
        | Action::StartTask { task }
        | Action::RebindNetns { task, .. }
        | Action::EnsureEndpoint { task, .. } => info_span!("task", task = %task),
        Action::EnsureBridge { sandbox, .. }
        | Action::EnsureVxlan { sandbox, .. }
        | Action::Peers { sandbox, .. } => {
            info_span!("network", network = %network(sandbox), sandbox = %sandbox)
        }
        Action::DeleteNetns { name } | Action::CreateNetns { name } => {
            info_span!("netns", netns = %name)
        }
        Action::DeleteLink { netns, .. } => info_span!("netns", netns = %netns),
    }
}
