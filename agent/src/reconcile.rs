//! The reconciliation loop: observe → plan → apply, at start, on every new assignment, on every
//! task exit, soon after a kernel change in a namespace the agent owns, and on a timer (the
//! backstop). Kernel calls run on blocking threads (never on a tokio worker).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use proto::agent::{Assignment, TaskSpec};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::apply::{Kernel, KernelError};
use crate::dns::{Dns, DnsError};
use crate::esp;
use crate::lifecycle::{Phase, ProcEvent};
use crate::mesh::{self, Gw};
use crate::metrics::AgentMetrics;
use crate::names::{sandbox_name, INGRESS_SBOX};
use crate::netwatch::{Change, Watcher};
use crate::observe::ObsCache;
use crate::outbox::Outbox;
use crate::plan::{plan, Action, Settings};
use crate::rules::MeshRules;
use crate::state::{StateDir, StateError};
use crate::tasks::Supervisor;

/// The routing mesh's node-wide pieces.
pub struct Mesh {
    pub gw_subnet: Ipv4Net,
    /// MTU of the gwbridge and its legs: the underlay's.
    pub gw_mtu: u32,
    /// The gwbridge subnet's clash with the node's addresses or routes, as last logged.
    pub gw_clash: Option<String>,
    /// gwbridge addresses as given out (and persisted).
    pub gw_addrs: BTreeMap<String, Ipv4Addr>,
    pub rules: Arc<Mutex<MeshRules>>,
}

/// Why an action of a pass (or the gwbridge allocation before them) failed. The pass logs it,
/// skips what depends on it and is retried.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Already says what was being done, and in which namespace.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The blocking thread applying `action` panicked.
    #[error("{action}: {source}")]
    KernelPanicked {
        action: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("task {0} is not in the assignment")]
    NotAssigned(String),
    #[error(transparent)]
    GwFull(#[from] mesh::GwFull),
    #[error("persist gwbridge addresses: {0}")]
    PersistGw(#[source] StateError),
}

/// A pass that failed is retried this soon, not only at the next interval.
const RETRY: Duration = Duration::from_secs(2);
/// A kernel change brings the next pass this close: the rest of a burst (a veth takes its
/// peer, addresses and routes with it) comes in meanwhile and is seen by the same pass.
const DEBOUNCE: Duration = Duration::from_millis(75);
/// How often the sysctls the agent keeps are read between passes: no notification tells of
/// one written behind its back, and a repair must follow within a second.
const SYSCTL_WATCH: Duration = Duration::from_millis(500);

pub struct Reconciler<K: Kernel> {
    pub kernel: Arc<K>,
    pub supervisor: Supervisor,
    pub settings: Settings,
    pub state: StateDir,
    pub outbox: Outbox,
    pub mesh: Mesh,
    /// Set by a pass that wants the next one sooner than the interval (an IPVS drain).
    pub wake: Option<Duration>,
    pub metrics: AgentMetrics,
    /// Kernel changes in the node namespace and the agent's own ones.
    pub watch: Watcher,
    /// The last pass completed and nothing was asked of the agent since (no new assignment, no
    /// task ended): whatever a pass applies now repairs drift.
    pub settled: bool,
    /// The embedded resolver: its records follow `desired`, its listeners the tasks.
    pub dns: Dns,
    /// ESP for encrypted networks, on a node whose kernel has it.
    pub esp: Option<Arc<Mutex<EspNode>>>,
    /// What the last pass observed of the namespaces nothing changed in since.
    pub observed: ObsCache,
}

/// The node's XFRM socket and what it applied.
pub struct EspNode {
    pub socket: esp::xfrm::XfrmSocket,
    pub sync: esp::EspSync,
}

impl<K: Kernel> Reconciler<K> {
    /// One observe → plan → apply pass. Returns the number of failed or skipped actions.
    pub async fn pass(&mut self, desired: &Assignment) -> usize {
        self.wake = None;
        let mut clock = PassClock::start();
        // Names first: they need no kernel change, and a change is answered at once. Listeners
        // of tasks that ended close before their namespaces go.
        self.dns.update(desired);
        self.sync_dns().await;
        clock.lap("dns");
        // The node's addresses and routes, read again: they change under us (DHCP, VPNs).
        let kernel = self.kernel.clone();
        let node = match tokio::task::spawn_blocking(move || kernel.node_nets()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                error!("read the node's addresses and routes: {e}");
                return 1;
            }
            Err(panicked) => {
                error!("read the node's addresses and routes: {panicked}");
                return 1;
            }
        };
        let gw_clash = node.check_clash("gwbridge", self.mesh.gw_subnet, &[]).err();
        if gw_clash != self.mesh.gw_clash {
            match &gw_clash {
                Some(e) => error!("{e}: tasks may not reach it through the gwbridge"),
                None => info!("the gwbridge subnet no longer clashes with the node"),
            }
            self.mesh.gw_clash = gw_clash;
        }
        // An ingress subnet that clashes with the node is refused: no ingress here.
        let mut desired = desired.clone();
        if let Some(i) = &desired.ingress {
            let gw = [self.mesh.gw_subnet];
            if let Err(e) = node.check_clash("ingress", i.network.subnet, &gw) {
                error!("{e}; the routing mesh stays off on this node");
                desired.ingress = None;
            }
        }
        let desired = &desired;
        clock.lap("node");
        let gw = match self.allocate_gw(desired) {
            Ok(gw) => gw,
            Err(e) => {
                error!("{e}");
                return 1;
            }
        };
        let rules = self.mesh.rules.clone();
        let lb_desired = desired.clone();
        if let Ok(Some(first)) = tokio::task::spawn_blocking(move || {
            let mut rules = rules.lock().unwrap_or_else(|p| p.into_inner());
            rules.sync_lb_first(&lb_desired)
        })
        .await
        {
            if let Some(report) = first.report {
                self.outbox.lb_state(report);
            }
        }
        clock.lap("lb");
        let kernel = self.kernel.clone();
        // Watched before the observation begins: a change after it is bound to be notified.
        let watched = self.watch.watched();
        // Taken, not copied: the observation replaces it below (a failed one leaves it empty,
        // so the next pass reads everything).
        let reuse = self.observed.take();
        let observed = tokio::task::spawn_blocking(move || {
            let observed = kernel.observe_reusing(&reuse);
            (observed, reuse)
        })
        .await;
        let (observed, reuse) = match observed {
            Ok((Ok(o), reuse)) => (o, reuse),
            Ok((Err(e), _)) => {
                error!("observe the node: {e}");
                return 1;
            }
            Err(panicked) => {
                error!("observe the node: {panicked}");
                return 1;
            }
        };
        // A watch holds its namespace alive: none outlives the file it was opened through.
        let current = observed
            .namespaces
            .iter()
            .map(|(name, o)| (name.clone(), o.inode))
            .collect();
        self.watch.retain(&current).await;
        let reused = observed
            .namespaces
            .iter()
            .filter(|(name, o)| reuse.get(*name).is_some_and(|kept| kept.inode == o.inode))
            .count();
        self.observed.store(&observed, &watched);
        clock.lap("observe");
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
            Some(&gw),
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
            // Whether it worked or not, the namespaces it is about changed.
            for scope in action.scopes() {
                self.observed.invalidate(scope);
            }
            let span = span_of(&action, desired);
            if self.settled {
                span.in_scope(|| warn!(kind = action.kind(), ?action, "repair"));
                self.metrics.repair(action.kind());
            } else {
                span.in_scope(|| info!(?action, "apply"));
            }
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
        clock.lap("apply");
        // Again once namespaces are in place (a namespace made anew needs a new listener).
        self.sync_dns().await;
        self.watch.sync().await;
        clock.lap("watch");
        errors += self.sync_mesh(desired, gw.addrs).await;
        clock.lap("mesh");
        errors += self.sync_esp(desired).await;
        clock.lap("esp");
        debug!(
            revision = desired.revision,
            namespaces = observed.namespaces.len(),
            reused,
            %clock,
            "pass"
        );
        errors
    }

    /// ESP states, policies and the `meshnet_esp` table (see [`crate::esp`]).
    async fn sync_esp(&mut self, desired: &Assignment) -> usize {
        let Some(node) = self.esp.clone() else {
            return 0;
        };
        let desired = desired.clone();
        let recheck = self.settled;
        let result = tokio::task::spawn_blocking(move || {
            let mut node = node.lock().unwrap_or_else(|p| p.into_inner());
            let EspNode { socket, sync } = &mut *node;
            sync.sync(socket, &desired, recheck)
        })
        .await;
        let report = match result {
            Ok(r) => r,
            Err(panicked) => {
                error!("ESP: {panicked}");
                return 1;
            }
        };
        for applied in &report.applied {
            if self.settled {
                warn!(kind = "esp", change = %applied, "repair");
                self.metrics.repair("esp");
            } else {
                info!(change = %applied, "ESP");
            }
        }
        if let Some(how) = report.repaired {
            self.table_repairs(
                &[("node".into(), how.to_string())],
                &format!("ip {}", esp::TABLE),
            );
        }
        for e in &report.errors {
            error!("ESP: {e}");
        }
        report.errors.len()
    }

    /// Compares every table with what was last applied (see [`MeshRules::recheck_tables`]).
    /// Returns the errors.
    async fn recheck_tables(&mut self) -> usize {
        let rules = self.mesh.rules.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut rules = rules.lock().unwrap_or_else(|p| p.into_inner());
            rules.recheck_tables()
        })
        .await;
        match result {
            Ok(out) => {
                self.table_repairs(&out.repaired, firewall::TABLE);
                out.errors
            }
            Err(panicked) => {
                error!("recheck the tables: {panicked}");
                1
            }
        }
    }

    /// Logs the sysctls written because they differed, and counts them as repairs once the
    /// node has settled (before, they are what a start sets).
    fn sysctl_repairs(&self, written: &[(String, netns::SysctlDiff)]) {
        for (netns, d) in written {
            if self.settled {
                warn!(kind = "sysctl", %netns, key = %d.key, was = %d.was, want = %d.want, "repair: sysctl {} in {netns} was {}; set to {}", d.key, d.was, d.want);
                self.metrics.repair("sysctl");
            } else {
                info!(%netns, key = %d.key, was = %d.was, value = %d.want, "sysctl set");
            }
        }
    }

    /// Logs and counts the tables (`table`: family and name) rebuilt because they differed.
    fn table_repairs(&self, repaired: &[(String, String)], table: &str) {
        for (netns, how) in repaired {
            warn!(kind = "nft_table", %netns, differed = %how, "repair: table {table} differed from what it should be; rebuilt");
            self.metrics.repair("nft_table");
        }
    }

    /// DNS listeners for every live task (adopted ones after a restart); the others close.
    async fn sync_dns(&mut self) {
        let live: BTreeSet<String> = self
            .supervisor
            .records()
            .iter()
            .filter(|(_, r)| !matches!(r.phase, Phase::Exited { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        self.dns.retain(&live).await;
    }

    /// gwbridge addresses for every leg wanted now (tasks kept while they stop included),
    /// persisted when they change.
    fn allocate_gw(&mut self, desired: &Assignment) -> Result<Gw, ApplyError> {
        let records = self.supervisor.records();
        let mut wanted: BTreeSet<String> = desired
            .tasks
            .iter()
            .filter(|t| !matches!(records.get(&t.name), Some(r) if matches!(r.phase, Phase::Exited { .. })))
            .map(|t| t.name.clone())
            .collect();
        wanted.extend(
            records
                .iter()
                .filter(|(_, r)| matches!(r.phase, Phase::Running { .. }))
                .map(|(n, _)| n.clone()),
        );
        if desired.ingress.is_some() {
            wanted.insert(INGRESS_SBOX.to_string());
        }
        let m = &mut self.mesh;
        let addrs = mesh::allocate_gw(m.gw_subnet, &m.gw_addrs, &wanted)?;
        if addrs != m.gw_addrs {
            self.state
                .save_gw_addrs(m.gw_subnet, &addrs)
                .map_err(ApplyError::PersistGw)?;
            m.gw_addrs = addrs.clone();
        }
        Ok(Gw {
            gateway: mesh::gw_gateway(m.gw_subnet),
            mtu: m.gw_mtu,
            addrs,
        })
    }

    /// Tables and load balancer, once namespaces and links are in place.
    async fn sync_mesh(
        &mut self,
        desired: &Assignment,
        gw_addrs: BTreeMap<String, Ipv4Addr>,
    ) -> usize {
        let records = self.supervisor.records();
        let running: Vec<TaskSpec> = desired
            .tasks
            .iter()
            .filter(|t| matches!(records.get(&t.name), Some(r) if matches!(r.phase, Phase::Running { .. })))
            .cloned()
            .collect();
        let rules = self.mesh.rules.clone();
        let desired = desired.clone();
        let result = tokio::task::spawn_blocking(move || {
            let running: Vec<&TaskSpec> = running.iter().collect();
            let mut rules = rules.lock().unwrap_or_else(|p| p.into_inner());
            rules.sync(&desired, &running, &gw_addrs)
        })
        .await;
        match result {
            Ok(out) => {
                self.wake = out.wake;
                self.table_repairs(&out.repaired, firewall::TABLE);
                self.sysctl_repairs(&out.sysctls);
                if let Some(report) = out.report {
                    self.outbox.lb_state(report);
                }
                out.errors
            }
            Err(panicked) => {
                error!("routing mesh rules: {panicked}");
                1
            }
        }
    }

    async fn apply(&mut self, action: Action, desired: &Assignment) -> Result<(), ApplyError> {
        match &action {
            Action::StopTask { task } => self.supervisor.stop(task),
            Action::ForgetTask { task } => self.supervisor.forget(task),
            Action::DeleteNetns { name } => {
                // Our socket inside would keep the namespace, and its links, alive.
                self.watch.forget(name).await;
                self.apply_kernel(action).await?;
            }
            Action::StartTask { task } => match desired.tasks.iter().find(|t| &t.name == task) {
                Some(spec) => {
                    // The resolver listens before the task's first query.
                    self.dns.open(task).await?;
                    self.supervisor.start(spec)
                }
                None => return Err(ApplyError::NotAssigned(task.clone())),
            },
            _ => self.apply_kernel(action).await?,
        }
        Ok(())
    }

    async fn apply_kernel(&self, action: Action) -> Result<(), ApplyError> {
        let kernel = self.kernel.clone();
        let shown = format!("{action:?}");
        tokio::task::spawn_blocking(move || kernel.apply(&action))
            .await
            .map_err(|source| ApplyError::KernelPanicked {
                action: shown,
                source,
            })?
            .map_err(ApplyError::from)
    }

    /// Runs forever: passes on new assignments, process events, kernel changes and the timer.
    pub async fn run(
        mut self,
        mut assignments: watch::Receiver<Assignment>,
        mut events: mpsc::UnboundedReceiver<ProcEvent>,
        mut changes: mpsc::UnboundedReceiver<Change>,
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
        // systemd's Type=notify: ready after the first pass over the last known assignment
        // (saved, or the manager's if it came first). Joining came before; a failed action of
        // that pass is retried as usual and does not hold readiness back.
        let mut notified = false;
        // When the tables are next compared with what was applied, after an nf_tables change.
        let mut tables_due: Option<Instant> = None;
        // When a pass last read every namespace.
        let mut last_full: Option<Instant> = None;
        let mut sysctl_watch = tokio::time::interval(SYSCTL_WATCH);
        sysctl_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    self.settled = false;
                    next = Instant::now();
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    if self.supervisor.handle(ev) {
                        // A task ended: its namespace and maybe its network's sandbox go now.
                        self.settled = false;
                        next = Instant::now();
                    }
                }
                Some(Change { netns, what, nft }) = changes.recv() => {
                    let soon = Instant::now() + DEBOUNCE;
                    if nft {
                        // Our own writes come back too: they cost a generation query per
                        // table, not a pass.
                        if tables_due.is_none_or(|due| soon < due) {
                            debug!(%netns, %what, "nf_tables change; rechecking the tables");
                            tables_due = Some(soon);
                        }
                    } else {
                        self.observed.invalidate(&netns);
                        if soon < next {
                            // Our own changes come back too: they cost one pass that finds
                            // nothing.
                            debug!(%netns, %what, "kernel change; reconciling");
                            next = soon;
                        }
                    }
                }
                _ = sysctl_watch.tick() => {
                    let rules = self.mesh.rules.clone();
                    let drift = tokio::task::spawn_blocking(move || {
                        rules.lock().unwrap_or_else(|p| p.into_inner()).sysctl_drift()
                    })
                    .await
                    .ok()
                    .flatten();
                    if let Some(what) = drift {
                        let soon = Instant::now() + DEBOUNCE;
                        if soon < next {
                            debug!(%what, "sysctl changed; reconciling");
                            next = soon;
                        }
                    }
                }
                _ = tokio::time::sleep_until(tables_due.unwrap_or(next)), if tables_due.is_some() => {
                    tables_due = None;
                    if self.recheck_tables().await > 0 {
                        next = next.min(Instant::now() + RETRY);
                    }
                }
                _ = tokio::time::sleep_until(next) => {
                    let started = Instant::now();
                    // The backstop: every namespace read again once an interval.
                    if last_full.is_none_or(|t| started.duration_since(t) >= interval) {
                        self.observed.clear();
                        last_full = Some(started);
                    }
                    let errors = self.pass(&desired).await;
                    self.supervisor.flush_reports();
                    self.metrics.pass(
                        started.elapsed().as_secs_f64(),
                        errors,
                        self.supervisor.records().values(),
                    );
                    if !notified {
                        notified = true;
                        if let Err(e) = proto::sd_notify::ready() {
                            warn!("tell systemd the agent is ready: {e}");
                        }
                    }
                    if errors == 0 {
                        self.settled = true;
                        if let Some(rev) = unreported.take() {
                            info!(revision = rev, "assignment applied");
                            self.outbox.applied(rev);
                            self.metrics.applied(rev);
                        }
                        let wait = self.wake.map_or(interval, |w| w.min(interval));
                        next = Instant::now() + wait;
                    } else {
                        warn!(errors, "pass incomplete; retrying in {RETRY:?}");
                        next = Instant::now() + RETRY;
                    }
                }
            }
        }
    }
}

/// Where a pass spent its time, for the debug log: a slow pass holds back every revision the
/// manager waits on, and this names the step to look at.
struct PassClock {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl PassClock {
    fn start() -> Self {
        PassClock {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        self.laps.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for PassClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: Duration = self.laps.iter().map(|(_, d)| *d).sum();
        write!(f, "{} ms:", total.as_millis())?;
        for (step, d) in &self.laps {
            write!(f, " {step} {}", d.as_millis())?;
        }
        Ok(())
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
        | Action::EnsureEndpoint { task, .. }
        | Action::EnsureGwLeg { task, .. }
        | Action::EnsureDefaultRoute { task, .. } => info_span!("task", task = %task),
        Action::EnsureGwBridge { .. } | Action::DeleteNodeLink { .. } => {
            info_span!("gwbridge")
        }
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
