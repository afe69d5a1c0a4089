//! Applies the routing mesh's nftables tables and load balancer, planned by [`crate::mesh`],
//! after the namespaces and links exist. Keeps what it applied last, per namespace, so each
//! change is one incremental batch; the first apply after a start is a full atomic rebuild of
//! our own table (`ip meshnet`), which keeps conntrack entries and so established connections.
//! Runs on blocking threads only: `nft`/`conntrack` are child processes, sysctls and IPVS use
//! dedicated threads inside the namespace.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use firewall::{NodeState, TaskState};
use ipnet::Ipv4Net;
use netns::Netns;
use proto::agent::{Assignment, LbReport, TaskSpec};
use proto::model::LbKind;
use tracing::{error, info};

use crate::lb::{self, sync_table, DrainingBackends, LbOptions, LoadBalancer, Synced, Table};
use crate::mesh;
use crate::names::{GWBRIDGE, INGRESS_SBOX};

/// Why a table (or a balancer, on recheck) could not be programmed or read back. Each source
/// already names the namespace and the step.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Nft(#[from] firewall::Error),
    #[error(transparent)]
    Lb(#[from] lb::LbError),
}

/// A table applied in one namespace, tied to the namespace's inode: a recreated namespace
/// starts empty, so its table is rebuilt in full.
struct Applied<R> {
    inode: u64,
    state: Table<R>,
}

pub struct MeshRules {
    node: Netns,
    dir: PathBuf,
    gw_subnet: Ipv4Net,
    lb_kind: LbKind,
    lb_opts: LbOptions,
    /// The kernel's release: which IPVS sysctls are right depends on it.
    kernel: String,
    recheck_every: Duration,
    last_check: Option<Instant>,
    node_table: Table<NodeState>,
    tasks: BTreeMap<String, Applied<TaskState>>,
    /// Balancers by namespace: the routing mesh's in ingress_sbox and, with IPVS, the VIP
    /// balancer of each `lb_<network>`.
    lbs: BTreeMap<String, OpenLb>,
    /// The sysctls the last pass kept, by namespace (`node`, or a file name in `dir`), for
    /// [`MeshRules::sysctl_drift`] between passes.
    sysctls: Vec<WantedSysctls>,
}

/// Sysctls kept in one namespace.
struct WantedSysctls {
    netns: String,
    pairs: Vec<(String, String)>,
    /// Keys that exist only while a module is loaded: skipped where absent.
    skip_absent: bool,
    /// Handles on the keys present, opened by the last pass: the watch between passes reads
    /// them without entering the namespace (a thread each time).
    handles: Vec<(String, std::fs::File)>,
}

/// The namespace the node's own objects live in, as repairs name it.
const NODE_NS: &str = "node";

/// A balancer opened in a namespace, tied to the namespace's inode: a recreated namespace
/// starts empty, so the balancer is opened (and programmed) afresh.
type OpenLb = (u64, Box<dyn LoadBalancer>);

/// The routing mesh's draining backends: those of the ingress network.
fn ingress_draining(desired: &Assignment) -> DrainingBackends {
    desired
        .ingress
        .as_ref()
        .map(|i| mesh::draining(&i.network))
        .unwrap_or_default()
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The outcome of one pass.
#[derive(Default)]
pub struct MeshPass {
    pub errors: usize,
    /// Run again within this (an IPVS drain deadline).
    pub wake: Option<Duration>,
    pub report: Option<LbReport>,
    /// The namespaces whose table had drifted and was rebuilt, each with how it differed.
    pub repaired: Vec<(String, String)>,
    /// The sysctls found with another value and written, by namespace.
    pub sysctls: Vec<(String, netns::SysctlDiff)>,
}

impl MeshRules {
    pub fn new(
        node: Netns,
        dir: PathBuf,
        gw_subnet: Ipv4Net,
        lb_kind: LbKind,
        lb_opts: LbOptions,
        recheck_every: Duration,
    ) -> MeshRules {
        MeshRules {
            node,
            dir,
            gw_subnet,
            lb_kind,
            lb_opts,
            kernel: firewall::kernel_release(),
            recheck_every,
            last_check: None,
            node_table: Table::default(),
            tasks: BTreeMap::new(),
            lbs: BTreeMap::new(),
            sysctls: Vec::new(),
        }
    }

    /// Brings the tables and the load balancer to `desired`. `running`: the local tasks whose
    /// process runs; `gw_addrs`: their gwbridge addresses. The tables are compared with what
    /// they should be every `recheck_every`.
    pub fn sync(
        &mut self,
        desired: &Assignment,
        running: &[&TaskSpec],
        gw_addrs: &BTreeMap<String, std::net::Ipv4Addr>,
    ) -> MeshPass {
        let mut out = MeshPass::default();
        let now = Instant::now();
        let recheck = self
            .last_check
            .is_none_or(|t| now.duration_since(t) >= self.recheck_every);
        if recheck {
            self.last_check = Some(now);
        }
        let mut fail = |what: &str, e: &dyn std::fmt::Display| {
            error!("{what}: {e}");
            out.errors += 1;
        };

        // Every pass, and watched between passes (see `sysctl_drift`): no notification tells
        // of a sysctl written behind our back.
        let mut wanted = vec![WantedSysctls {
            netns: NODE_NS.into(),
            pairs: firewall::node_sysctls(GWBRIDGE),
            skip_absent: false,
            handles: Vec::new(),
        }];
        // Where present: br_netfilter, and with it these keys, may come at any time.
        for sandbox in mesh::overlay_networks(desired, running).keys() {
            wanted.push(WantedSysctls {
                netns: sandbox.clone(),
                pairs: firewall::overlay_sysctls(),
                skip_absent: true,
                handles: Vec::new(),
            });
        }
        let sbox = mesh::sbox_state(desired, self.lb_kind);
        // The planner made (or deleted) the lb_ namespaces; the same rule picks them here.
        let lbs = match self.lb_kind {
            LbKind::Ipvs => mesh::lb_networks(desired, running),
            LbKind::Nftables => BTreeMap::new(),
        };
        // A balancer's sysctls are in place before it is opened.
        let balancers = sbox.iter().map(|_| INGRESS_SBOX.to_string());
        for name in balancers.chain(lbs.keys().cloned()) {
            wanted.push(WantedSysctls {
                netns: name,
                pairs: self.lb_sysctls(),
                skip_absent: false,
                handles: Vec::new(),
            });
        }
        for w in &mut wanted {
            let synced = self.in_netns(&w.netns, |ns| {
                let diffs = ns.sync_sysctls(&w.pairs, w.skip_absent)?;
                let keys: Vec<&str> = w.pairs.iter().map(|(k, _)| k.as_str()).collect();
                Ok((diffs, ns.open_sysctls(&keys, w.skip_absent)?))
            });
            match synced {
                Ok((diffs, handles)) => {
                    w.handles = handles;
                    out.sysctls
                        .extend(diffs.into_iter().map(|d| (w.netns.clone(), d)));
                }
                Err(e) => fail(&format!("sysctls in {}", w.netns), &e),
            }
        }
        let node = mesh::node_state(desired, self.gw_subnet, gw_addrs, running);
        match sync_table(&self.node, &mut self.node_table, &node, recheck) {
            Ok(Synced::Repaired(how)) => out.repaired.push(("node".into(), how)),
            Ok(_) => {}
            Err(e) => fail("node table", &e),
        }

        self.sysctls = wanted;
        match sbox {
            Some(st) => {
                match self.sync_lb(INGRESS_SBOX, &st, &ingress_draining(desired), recheck) {
                    Ok(s) => {
                        out.wake = s.wake;
                        if let Some(how) = s.repaired {
                            out.repaired.push((INGRESS_SBOX.into(), how));
                        }
                    }
                    Err(e) => fail("load balancer in ingress_sbox", &e),
                }
            }
            // The planner deletes the namespace, and IPVS state with it.
            None => {
                self.lbs.remove(INGRESS_SBOX);
            }
        }
        out.report = self.report();

        self.lbs
            .retain(|name, _| name == INGRESS_SBOX || lbs.contains_key(name));
        for (name, net) in lbs {
            let Some(st) = mesh::lb_state(net) else {
                continue;
            };
            match self.sync_lb(&name, &st, &mesh::draining(net), recheck) {
                Ok(s) => {
                    out.wake = earliest(out.wake, s.wake);
                    if let Some(how) = s.repaired {
                        out.repaired.push((name, how));
                    }
                }
                Err(e) => fail(&format!("load balancer in {name}"), &e),
            }
        }

        let tasks = mesh::task_states(desired, running, self.lb_kind);
        self.tasks.retain(|name, _| tasks.contains_key(name));
        for (name, st) in &tasks {
            match self.sync_task(name, st, recheck) {
                Ok(Synced::Repaired(how)) => out.repaired.push((name.clone(), how)),
                Ok(_) => {}
                Err(e) => fail(&format!("table of task {name}"), &e),
            }
        }
        out
    }

    /// Compares every table with what was last applied to it and rebuilds the ones that
    /// drifted, without a pass: on an nf_tables notification, which our own writes cause too.
    /// Costs a generation query per namespace while nothing moved. Returns the namespaces
    /// repaired and the errors.
    pub fn recheck_tables(&mut self) -> MeshPass {
        let mut out = MeshPass::default();
        let mut note = |name: &str, result: Result<Option<String>, TableError>| match result {
            Ok(Some(how)) => out.repaired.push((name.to_string(), how)),
            Ok(None) => {}
            Err(e) => {
                error!("recheck the table in {name}: {e}");
                out.errors += 1;
            }
        };
        note(
            "node",
            lb::recheck_table(&self.node, &mut self.node_table).map_err(TableError::from),
        );
        for (name, (_, lb)) in &mut self.lbs {
            note(name, lb.recheck().map_err(TableError::from));
        }
        for (name, applied) in &mut self.tasks {
            let result = Netns::open(&self.dir.join(name))
                .map_err(TableError::from)
                .and_then(|ns| {
                    // A namespace made anew since: the next pass programs it whole.
                    if ns.inode()? != applied.inode {
                        return Ok(None);
                    }
                    Ok(lb::recheck_table(&ns, &mut applied.state)?)
                });
            note(name, result);
        }
        out
    }

    /// The load balancer alone, when it already runs: a new assignment's backends take effect
    /// before the full pass observes every namespace, so a dead task stops receiving new
    /// connections as soon as the manager says so. The full pass that follows re-checks it.
    /// The VIP balancers (`lb_` namespaces, or the tasks' tables) are synced the same way.
    pub fn sync_lb_first(&mut self, desired: &Assignment) -> Option<MeshPass> {
        let mut out = MeshPass::default();
        let mut synced = false;
        let mut sync = |rules: &mut MeshRules,
                        name: &str,
                        st: Option<firewall::SboxState>,
                        draining: DrainingBackends| {
            let Some(st) = st else { return };
            synced = true;
            match rules.sync_lb(name, &st, &draining, false) {
                Ok(s) => out.wake = earliest(out.wake, s.wake),
                Err(e) => {
                    error!("load balancer in {name}: {e}");
                    out.errors += 1;
                }
            }
        };
        if self.lbs.contains_key(INGRESS_SBOX) {
            sync(
                self,
                INGRESS_SBOX,
                mesh::sbox_state(desired, self.lb_kind),
                ingress_draining(desired),
            );
        }
        for net in &desired.networks {
            let name = mesh::lb_netns_name(&net.name);
            if self.lbs.contains_key(&name) {
                sync(self, &name, mesh::lb_state(net), mesh::draining(net));
            }
        }
        // With nftables the VIPs balance in the tasks' own tables: those already programmed
        // get the new backends now too (a task that starts is programmed by the full pass).
        let known: Vec<&TaskSpec> = desired
            .tasks
            .iter()
            .filter(|t| self.tasks.contains_key(&t.name))
            .collect();
        for (name, st) in mesh::task_states(desired, &known, self.lb_kind) {
            synced = true;
            if let Err(e) = self.sync_task(&name, &st, false) {
                error!("table of task {name}: {e}");
                out.errors += 1;
            }
        }
        if !synced {
            return None;
        }
        out.report = self.report();
        Some(out)
    }

    /// The routing mesh's balancer as programmed, for the manager.
    fn report(&self) -> Option<LbReport> {
        self.lbs.get(INGRESS_SBOX).map(|(_, lb)| lb.report())
    }

    /// The sysctls of a balancer's namespace: the sandbox's, and with nftables the conntrack
    /// timeouts asked for (IPVS keeps its own, set over its netlink).
    fn lb_sysctls(&self) -> Vec<(String, String)> {
        let mut pairs = firewall::sbox_sysctls(self.lb_kind, &self.kernel);
        if self.lb_kind == LbKind::Nftables {
            pairs.extend(
                lb::nft::conntrack_sysctls(&self.lb_opts.timeouts)
                    .into_iter()
                    .map(|(key, secs)| (key.to_string(), secs.to_string())),
            );
        }
        pairs
    }

    /// `f` on `node`, or on a namespace of the agent's directory.
    fn in_netns<T>(
        &self,
        netns: &str,
        f: impl FnOnce(&Netns) -> Result<T, netns::Error>,
    ) -> Result<T, netns::Error> {
        if netns == NODE_NS {
            return f(&self.node);
        }
        f(&Netns::open(&self.dir.join(netns))?)
    }

    /// The first sysctl the last pass kept that differs now, if any: a change written behind
    /// the agent's back, which no notification tells of. Reads only, through the handles the
    /// pass opened.
    pub fn sysctl_drift(&self) -> Option<String> {
        self.sysctls.iter().find_map(|w| {
            w.handles.iter().find_map(|(key, file)| {
                // A namespace gone or unreadable is the next pass's to report.
                let now = netns::read_sysctl_handle(file).ok()?;
                let want = &w.pairs.iter().find(|(k, _)| k == key)?.1;
                (now != want.trim())
                    .then(|| format!("sysctl {key} in {} is {now}, should be {want}", w.netns))
            })
        })
    }

    /// Programs the balancer of namespace `name` (ingress_sbox or an `lb_` namespace), opening
    /// it first if the namespace is new to us.
    fn sync_lb(
        &mut self,
        name: &str,
        st: &firewall::SboxState,
        draining: &DrainingBackends,
        recheck: bool,
    ) -> Result<lb::LbSynced, lb::LbError> {
        let ns = Netns::open(&self.dir.join(name))?;
        let inode = ns.inode()?;
        if self.lbs.get(name).is_none_or(|(i, _)| *i != inode) {
            info!(
                backend = self.lb_kind.as_str(),
                netns = name,
                "load balancer opened"
            );
            let opened = lb::open(self.lb_kind, ns, self.lb_opts)?;
            self.lbs.insert(name.to_string(), (inode, opened));
        }
        let (_, lb) = self.lbs.get_mut(name).expect("inserted above");
        lb.sync(st, draining, recheck)
    }

    fn sync_task(
        &mut self,
        name: &str,
        st: &TaskState,
        recheck: bool,
    ) -> Result<Synced, TableError> {
        let ns = Netns::open(&self.dir.join(name))?;
        let inode = ns.inode()?;
        let applied = self.tasks.entry(name.to_string()).or_insert(Applied {
            inode,
            state: Table::default(),
        });
        if applied.inode != inode {
            *applied = Applied {
                inode,
                state: Table::default(),
            };
        }
        Ok(sync_table(&ns, &mut applied.state, st, recheck)?)
    }
}
