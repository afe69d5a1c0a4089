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
use tracing::{error, info};

use crate::lb::{self, sync_table, LbKind, LbOptions, LoadBalancer};
use crate::mesh::{self, GWBRIDGE, INGRESS_SBOX};

/// A table applied in one namespace, tied to the namespace's inode: a recreated namespace
/// starts empty, so its table is rebuilt in full.
struct Applied<R> {
    inode: u64,
    state: Option<R>,
}

pub struct MeshRules {
    node: Netns,
    dir: PathBuf,
    gw_subnet: Ipv4Net,
    lb_kind: LbKind,
    lb_opts: LbOptions,
    recheck_every: Duration,
    last_check: Option<Instant>,
    node_table: Option<NodeState>,
    tasks: BTreeMap<String, Applied<TaskState>>,
    lb: Option<(u64, Box<dyn LoadBalancer>)>,
}

/// The outcome of one pass.
#[derive(Default)]
pub struct MeshPass {
    pub errors: usize,
    /// Run again within this (an IPVS drain deadline).
    pub wake: Option<Duration>,
    pub report: Option<LbReport>,
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
            recheck_every,
            last_check: None,
            node_table: None,
            tasks: BTreeMap::new(),
            lb: None,
        }
    }

    /// Brings the tables and the load balancer to `desired`. `running`: the local tasks whose
    /// process runs; `gw_addrs`: their gwbridge addresses.
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

        for (key, value) in firewall::node_sysctls(GWBRIDGE) {
            if let Err(e) = self.node.write_sysctl(&key, &value) {
                fail("node sysctl", &e);
            }
        }
        let node = mesh::node_state(desired, self.gw_subnet, gw_addrs, running);
        if let Err(e) = sync_table(&self.node, &mut self.node_table, &node, recheck) {
            fail("node table", &e);
        }

        match mesh::sbox_state(desired, self.lb_kind.mode()) {
            Some(st) => match self.sync_lb(&st, recheck) {
                Ok(wake) => out.wake = wake,
                Err(e) => fail("load balancer in ingress_sbox", &e),
            },
            // The planner deletes the namespace, and IPVS state with it.
            None => self.lb = None,
        }
        out.report = self.lb.as_ref().map(|(_, lb)| lb.report());

        let tasks = mesh::task_states(desired, running, self.lb_kind.mode());
        self.tasks.retain(|name, _| tasks.contains_key(name));
        for (name, st) in &tasks {
            if let Err(e) = self.sync_task(name, st, recheck) {
                fail(&format!("table of task {name}"), &e);
            }
        }
        out
    }

    /// The load balancer alone, when it already runs: a new assignment's backends take effect
    /// before the full pass observes every namespace, so a dead task stops receiving new
    /// connections as soon as the manager says so. The full pass that follows re-checks it.
    pub fn sync_lb_first(&mut self, desired: &Assignment) -> Option<MeshPass> {
        self.lb.as_ref()?;
        let st = mesh::sbox_state(desired, self.lb_kind.mode())?;
        let mut out = MeshPass::default();
        match self.sync_lb(&st, false) {
            Ok(wake) => out.wake = wake,
            Err(e) => {
                error!("load balancer in ingress_sbox: {e}");
                out.errors += 1;
            }
        }
        out.report = self.lb.as_ref().map(|(_, lb)| lb.report());
        Some(out)
    }

    fn sync_lb(
        &mut self,
        st: &firewall::SboxState,
        recheck: bool,
    ) -> Result<Option<Duration>, lb::LbError> {
        let ns = Netns::open(&self.dir.join(INGRESS_SBOX))?;
        let inode = ns.inode()?;
        for (key, value) in firewall::sbox_sysctls(self.lb_kind.mode()) {
            ns.write_sysctl(&key, &value)?;
        }
        let lb = match &mut self.lb {
            Some((i, lb)) if *i == inode => lb,
            slot => {
                info!(
                    backend = self.lb_kind.name(),
                    "load balancer opened in ingress_sbox"
                );
                let opened = lb::open(self.lb_kind, ns, self.lb_opts)?;
                &mut slot.insert((inode, opened)).1
            }
        };
        lb.sync(st, recheck)
    }

    fn sync_task(&mut self, name: &str, st: &TaskState, recheck: bool) -> Result<(), String> {
        let ns = Netns::open(&self.dir.join(name)).map_err(|e| e.to_string())?;
        let inode = ns.inode().map_err(|e| e.to_string())?;
        let applied = self
            .tasks
            .entry(name.to_string())
            .or_insert(Applied { inode, state: None });
        if applied.inode != inode {
            *applied = Applied { inode, state: None };
        }
        sync_table(&ns, &mut applied.state, st, recheck)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}
