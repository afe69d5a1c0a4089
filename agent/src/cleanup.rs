//! `mesh-agent --cleanup`: takes everything the agent made off the node, then exits. The
//! agent must be stopped first (a running one would rebuild it all).
//!
//! - tasks' processes: SIGTERM to each recorded one still alive, SIGKILL after its own stop
//!   grace period; whatever still runs inside one of our namespaces is killed with it;
//! - every namespace in `<state-dir>/netns` (overlay sandboxes, tasks, `ingress_sbox`, the
//!   `lb_<network>` load balancers, and so IPVS services and nft tables in them), VXLAN
//!   devices first;
//! - the gwbridge and the node ends of its legs;
//! - our nft tables `ip meshnet` and `ip meshnet_esp` in the node namespace, and our ESP states
//!   and policies (nothing else there is touched).
//!
//! The state dir stays: the node's certificate (a later start needs no token) and the task
//! records, so a later start reports those tasks as gone and the manager replaces them.
//! Remove the state dir as well to leave the cluster for good.

use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use tracing::{error, info, warn};

use netns::Netns;

use crate::apply::Kernel;
use crate::lifecycle::{self, Phase};
use crate::names::GWBRIDGE;
use crate::observe::Observed;
use crate::plan::Action;
use crate::state::StateDir;

/// The actions that remove every object of `observed`: namespaces, then the node's legs,
/// then the gwbridge they hang on.
pub fn teardown(observed: &Observed) -> Vec<Action> {
    let mut actions: Vec<Action> = observed
        .namespaces
        .keys()
        .map(|name| Action::DeleteNetns { name: name.clone() })
        .collect();
    let mut links: Vec<&String> = observed.node.links.keys().collect();
    // The bridge last: deleting it first would leave its legs (veths) behind anyway.
    links.sort_by_key(|l| *l == GWBRIDGE);
    actions.extend(
        links
            .into_iter()
            .map(|l| Action::DeleteNodeLink { link: l.clone() }),
    );
    actions
}

/// Our ESP states and policies and the `meshnet_esp` table: what an assignment without
/// encrypted networks leaves. Returns the number of failed steps.
fn remove_esp() -> usize {
    // A kernel without XFRM netlink holds no state of ours.
    let mut socket = match crate::esp::xfrm::XfrmSocket::open() {
        Ok(s) => s,
        Err(e) => {
            info!("cleanup: no ESP state to remove ({e})");
            return 0;
        }
    };
    // The address and port only shape what is desired, and nothing is.
    let mut sync = crate::esp::EspSync::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
    let report = sync.sync(&mut socket, &proto::agent::Assignment::default(), true);
    for change in &report.applied {
        info!(%change, "cleanup");
    }
    for e in &report.errors {
        error!("{e}");
    }
    report.errors.len()
}

/// Runs the cleanup. Every step is tried; the error counts the ones that failed.
pub fn run(state: &StateDir, kernel: &dyn Kernel, node: &Netns) -> anyhow::Result<()> {
    let mut failed = 0;
    match state.task_records() {
        Ok(records) => stop_tasks(&records),
        Err(e) => {
            // The namespaces still go, and the processes in them.
            error!("read task records: {e}");
            failed += 1;
        }
    }
    let observed = kernel
        .observe()
        .context("read the node's meshnet objects")?;
    for action in teardown(&observed) {
        info!(?action, "cleanup");
        if let Err(e) = kernel.apply(&action) {
            error!("{action:?}: {e}");
            failed += 1;
        }
    }
    let nf = firewall::NsNetfilter::new(node);
    match firewall::Netfilter::apply(&nf, &firewall::Batch::drop_table()) {
        Ok(()) => info!(table = firewall::TABLE, "cleanup: nft table deleted"),
        Err(e) => {
            error!("delete nft table {}: {e}", firewall::TABLE);
            failed += 1;
        }
    }
    failed += remove_esp();
    if failed > 0 {
        anyhow::bail!("cleanup: {failed} step(s) failed (see above)");
    }
    info!("cleanup done: nothing of meshnet is left on this node");
    Ok(())
}

/// SIGTERM to every recorded task process that still runs, SIGKILL to each one left after its
/// task's stop grace period.
fn stop_tasks(records: &[lifecycle::TaskRecord]) {
    let mut alive: Vec<(&str, u32, u64, u64, Duration)> = records
        .iter()
        .filter_map(|r| match r.phase {
            Phase::Running {
                pid,
                start_time,
                netns_inode,
            } if lifecycle::is_alive(pid, start_time, netns_inode) => Some((
                r.spec.name.as_str(),
                pid,
                start_time,
                netns_inode,
                Duration::from_millis(r.spec.stop_grace_ms),
            )),
            _ => None,
        })
        .collect();
    for (task, pid, ..) in &alive {
        info!(task = %task, pid, "stopping task");
        lifecycle::signal_task(*pid, Signal::SIGTERM);
    }
    let started = Instant::now();
    while !alive.is_empty() {
        alive.retain(|(task, pid, start_time, netns_inode, grace)| {
            if !lifecycle::is_alive(*pid, *start_time, *netns_inode) {
                return false;
            }
            if started.elapsed() < *grace {
                return true;
            }
            warn!(task = %task, pid, "task ignored SIGTERM; killing it");
            lifecycle::signal_task(*pid, Signal::SIGKILL);
            false
        });
        if !alive.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::fake::FakeKernel;

    #[test]
    fn teardown_removes_every_namespace_and_node_link_bridge_last() {
        let k = FakeKernel::default();
        for name in ["1-abcdef0123", "ingress_sbox", "lb_backend", "web.1.t1"] {
            k.apply(&Action::CreateNetns { name: name.into() }).unwrap();
        }
        k.apply(&Action::EnsureGwBridge {
            gateway: "172.18.0.1/16".parse().unwrap(),
            mtu: 1500,
        })
        .unwrap();
        let mut node = k.state.lock().unwrap().node.links[GWBRIDGE].clone();
        node.name = "mgw0000001".into();
        k.state
            .lock()
            .unwrap()
            .node
            .links
            .insert(node.name.clone(), node);

        let actions = teardown(&k.observe().unwrap());
        assert_eq!(actions.len(), 6);
        assert_eq!(
            actions.last(),
            Some(&Action::DeleteNodeLink {
                link: GWBRIDGE.into()
            })
        );
        for a in &actions {
            k.apply(a).unwrap();
        }
        let left = k.observe().unwrap();
        assert!(left.namespaces.is_empty(), "{left:?}");
        assert!(left.node.links.is_empty(), "{left:?}");
        assert_eq!(teardown(&left), []);
    }
}
