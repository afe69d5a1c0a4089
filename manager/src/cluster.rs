//! The running manager: the state, its store, and the connected agents. Every change goes
//! through [`Cluster::transact`]: it runs on a copy of the state, then reconciles, persists and
//! swaps the copy in, and only then pushes new assignments. A refused change or a failed write
//! leaves the state, the file and the agents untouched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::agent::{LbReport, ManagerMsg, NODE_DOWN_SECS};
use proto::model::{NodeStatus, Role};
use tokio::sync::mpsc::UnboundedSender;

use crate::state::{OpError, State};
use crate::store::{Store, StoreError};
use crate::views::LbReports;

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error(transparent)]
    Refused(#[from] OpError),
    #[error("the change was not saved, so it was not made: {0}")]
    Store(#[from] StoreError),
}

/// One agent connection; a newer connection of the same node replaces it.
struct Session {
    conn: u64,
    tx: UnboundedSender<ManagerMsg>,
}

pub struct Cluster {
    state: State,
    store: Store,
    /// Agents whose advertise address is this one run on the manager's own node.
    manager_ip: IpAddr,
    sessions: HashMap<String, Session>,
    last_seen: HashMap<String, Instant>,
    next_conn: u64,
    /// Each node's latest load balancer report, for inspection only: live state, not stored.
    lb: LbReports,
}

pub type Shared = Arc<Mutex<Cluster>>;

pub fn lock(shared: &Shared) -> MutexGuard<'_, Cluster> {
    // A panic while holding the lock happened between whole-state swaps, so the state is sound.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cluster {
    pub fn new(state: State, store: Store, manager_ip: IpAddr) -> Cluster {
        // Known nodes get a full grace period to reconnect after a manager restart, rather than
        // being declared down (and their tasks moved) at once.
        let now = Instant::now();
        let last_seen = state.nodes.keys().map(|id| (id.clone(), now)).collect();
        Cluster {
            state,
            store,
            manager_ip,
            sessions: HashMap::new(),
            last_seen,
            next_conn: 0,
            lb: LbReports::new(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn manager_ip(&self) -> IpAddr {
        self.manager_ip
    }

    pub fn lb(&self) -> &LbReports {
        &self.lb
    }

    /// Keeps an agent's load balancer report until the next one, or until its node goes down.
    pub fn record_lb(&mut self, node_id: &str, report: LbReport) {
        if self.state.nodes.contains_key(node_id) {
            self.lb.insert(node_id.to_string(), report);
        }
    }

    pub fn transact<T>(
        &mut self,
        change: impl FnOnce(&mut State, u64) -> Result<T, OpError>,
    ) -> Result<T, TxError> {
        let now = unix_now();
        let mut next = self.state.clone();
        let out = change(&mut next, now)?;
        next.reconcile(now);
        let changed = next.refresh_assignments();
        if next != self.state {
            self.store.save(&next)?;
            self.state = next;
        }
        for id in changed {
            self.push(&id);
        }
        Ok(out)
    }

    fn push(&mut self, node_id: &str) {
        let (Some(session), Some(record)) =
            (self.sessions.get(node_id), self.state.nodes.get(node_id))
        else {
            return;
        };
        tracing::debug!(node = %record.node.hostname, revision = record.assignment.revision, "push assignment");
        if session
            .tx
            .send(ManagerMsg::Assign(record.assignment.clone()))
            .is_err()
        {
            self.sessions.remove(node_id);
        }
    }

    /// Registers an agent that said Hello and queues Welcome and its current assignment on `tx`
    /// (under the same lock, so no change can slip in between). Returns (node id, connection id).
    pub fn connect_agent(
        &mut self,
        hostname: &str,
        addr: IpAddr,
        node_id: Option<&str>,
        tx: UnboundedSender<ManagerMsg>,
    ) -> Result<(String, u64), TxError> {
        let role = if addr == self.manager_ip {
            Role::Manager
        } else {
            Role::Worker
        };
        let id = self.transact(|s, _| s.register_node(hostname, addr, node_id, role))?;
        self.next_conn += 1;
        let conn = self.next_conn;
        // The previous connection's sender is dropped here, which ends that session.
        self.sessions.insert(
            id.clone(),
            Session {
                conn,
                tx: tx.clone(),
            },
        );
        self.last_seen.insert(id.clone(), Instant::now());
        let assignment = self.state.nodes[&id].assignment.clone();
        let _ = tx.send(ManagerMsg::Welcome {
            version: proto::PROTOCOL_VERSION,
            node_id: id.clone(),
            role,
        });
        let _ = tx.send(ManagerMsg::Assign(assignment));
        Ok((id, conn))
    }

    pub fn disconnect_agent(&mut self, node_id: &str, conn: u64) {
        if self.sessions.get(node_id).is_some_and(|s| s.conn == conn) {
            self.sessions.remove(node_id);
        }
    }

    pub fn seen(&mut self, node_id: &str) {
        self.last_seen.insert(node_id.to_string(), Instant::now());
    }

    /// Runs once a second: marks silent nodes down, and retries placing pending tasks (a
    /// restart delay may have passed).
    pub fn tick(&mut self) -> Result<(), TxError> {
        self.check_liveness()?;
        if self
            .state
            .tasks
            .values()
            .any(|t| t.is_current() && t.node_id.is_none())
        {
            self.transact(|_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Marks down the nodes silent for longer than [`NODE_DOWN_SECS`]; their tasks move.
    fn check_liveness(&mut self) -> Result<(), TxError> {
        let limit = Duration::from_secs(NODE_DOWN_SECS);
        let silent: Vec<String> = self
            .state
            .nodes
            .values()
            .filter(|r| r.node.status == NodeStatus::Ready)
            .filter(|r| {
                self.last_seen
                    .get(&r.node.id)
                    .is_none_or(|t| t.elapsed() > limit)
            })
            .map(|r| r.node.id.clone())
            .collect();
        if silent.is_empty() {
            return Ok(());
        }
        for id in &silent {
            // What a silent node's balancer holds is unknown now.
            self.lb.remove(id);
            tracing::warn!(node = %self.state.nodes[id].node.hostname, "node is down: no word from its agent for {NODE_DOWN_SECS}s");
        }
        self.transact(|s, _| {
            for id in &silent {
                s.set_node_status(id, NodeStatus::Down);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{spec, MANAGER};
    use crate::store::tests::TempDir;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn cluster(tmp: &TempDir) -> Cluster {
        let (store, _) = Store::open(&tmp.0).unwrap();
        Cluster::new(
            crate::state::tests::new_state(),
            store,
            MANAGER.parse().unwrap(),
        )
    }

    fn drain(rx: &mut UnboundedReceiver<ManagerMsg>) -> Vec<ManagerMsg> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn agents_get_welcome_then_their_assignment_and_every_change() {
        let tmp = TempDir::new("cluster-push");
        let mut c = cluster(&tmp);
        let (tx1, mut rx1) = unbounded_channel();
        let (id1, _) = c
            .connect_agent("node1", MANAGER.parse().unwrap(), None, tx1)
            .unwrap();
        let (tx2, mut rx2) = unbounded_channel();
        c.connect_agent("node2", "192.168.56.12".parse().unwrap(), None, tx2)
            .unwrap();
        let first = drain(&mut rx1);
        assert!(
            matches!(&first[0], ManagerMsg::Welcome { node_id, role: Role::Manager, .. } if *node_id == id1)
        );
        let ManagerMsg::Assign(a) = &first[1] else {
            panic!("{first:?}")
        };
        assert!(a.revision > 0 && a.tasks.is_empty());
        assert!(matches!(
            drain(&mut rx2)[0],
            ManagerMsg::Welcome {
                role: Role::Worker,
                ..
            }
        ));

        c.transact(|s, now| s.create_service(&spec("web", 2, &[]), now))
            .unwrap();
        for rx in [&mut rx1, &mut rx2] {
            let msgs = drain(rx);
            assert_eq!(msgs.len(), 1, "{msgs:?}");
            let ManagerMsg::Assign(a) = &msgs[0] else {
                panic!("{msgs:?}")
            };
            assert_eq!(a.tasks.len(), 1);
        }
        // A refused change pushes nothing.
        assert!(c
            .transact(|s, now| s.create_service(&spec("web", 1, &[]), now))
            .is_err());
        assert!(drain(&mut rx1).is_empty());
    }

    #[test]
    fn a_newer_connection_replaces_the_older_one() {
        let tmp = TempDir::new("cluster-replace");
        let mut c = cluster(&tmp);
        let (old_tx, mut old_rx) = unbounded_channel();
        let (id, old_conn) = c
            .connect_agent("node1", MANAGER.parse().unwrap(), None, old_tx)
            .unwrap();
        let (new_tx, mut new_rx) = unbounded_channel();
        let (same, _) = c
            .connect_agent("node1", MANAGER.parse().unwrap(), Some(&id), new_tx)
            .unwrap();
        assert_eq!(same, id);
        drain(&mut old_rx);
        assert!(
            old_rx.try_recv().is_err() && old_rx.is_closed(),
            "the old session's channel is closed"
        );
        // The old session ending late must not unregister the new one.
        c.disconnect_agent(&id, old_conn);
        drain(&mut new_rx);
        c.transact(|s, now| s.create_service(&spec("web", 1, &[]), now))
            .unwrap();
        assert_eq!(drain(&mut new_rx).len(), 1);
    }

    #[test]
    fn load_balancer_reports_are_kept_until_the_node_goes_down() {
        let tmp = TempDir::new("cluster-lb");
        let mut c = cluster(&tmp);
        let (tx, _rx) = unbounded_channel();
        let (id, _) = c
            .connect_agent("node1", MANAGER.parse().unwrap(), None, tx)
            .unwrap();
        let report = LbReport {
            backend: "ipvs".into(),
            services: vec![],
        };
        c.record_lb("unknown", report.clone());
        c.record_lb(&id, report.clone());
        assert_eq!(c.lb().keys().collect::<Vec<_>>(), [&id]);
        c.tick().unwrap();
        assert_eq!(
            c.lb().get(&id),
            Some(&report),
            "a live node keeps its report"
        );
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(NODE_DOWN_SECS + 1))
            .unwrap();
        c.last_seen.insert(id.clone(), long_ago);
        c.tick().unwrap();
        assert_eq!(c.state().nodes[&id].node.status, NodeStatus::Down);
        assert!(c.lb().is_empty());
    }

    #[test]
    fn a_change_that_cannot_be_saved_is_not_made() {
        let tmp = TempDir::new("cluster-nosave");
        let mut c = cluster(&tmp);
        let (tx, mut rx) = unbounded_channel();
        c.connect_agent("node1", MANAGER.parse().unwrap(), None, tx)
            .unwrap();
        drain(&mut rx);
        let before = c.state().clone();
        std::fs::remove_dir_all(&tmp.0).unwrap();
        let err = c
            .transact(|s, now| s.create_service(&spec("web", 1, &[]), now))
            .unwrap_err();
        assert!(matches!(err, TxError::Store(_)), "{err}");
        assert!(
            err.to_string().starts_with("the change was not saved"),
            "{err}"
        );
        assert_eq!(c.state(), &before);
        assert!(drain(&mut rx).is_empty());
    }
}
