//! The running manager: the state, its store, and the connected agents. Every change goes
//! through [`Cluster::transact`]: it runs on a copy of the state, then reconciles, persists and
//! swaps the copy in, and only then pushes new assignments. A refused change or a failed write
//! leaves the state, the file and the agents untouched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::agent::{LbReport, ManagerMsg, ESP_KEY_BYTES, NODE_DOWN_SECS};
use proto::api::ManagerStatus;
use proto::model::{NodeStatus, Role};

use crate::certs::Pki;
use crate::etcd::ManagerInfo;
use crate::outbox::OutboxTx;
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

/// When each node's agent was last heard from. Agent connections record it without the cluster's
/// lock, so a node stays alive however long a change holds that lock.
#[derive(Clone, Default)]
pub struct Liveness(Arc<Mutex<HashMap<String, Instant>>>);

impl Liveness {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn seen(&self, node_id: &str) {
        self.map().insert(node_id.to_string(), Instant::now());
    }

    fn forget(&self, node_id: &str) {
        self.map().remove(node_id);
    }

    /// Every node in `nodes` counts as heard from now: a starting or newly leading manager
    /// gives them a full grace period to reconnect rather than declaring them down at once.
    fn reset<'a>(&self, nodes: impl Iterator<Item = &'a String>) {
        let now = Instant::now();
        *self.map() = nodes.map(|id| (id.clone(), now)).collect();
    }

    fn silent_for(&self, node_id: &str, limit: Duration) -> bool {
        self.map().get(node_id).is_none_or(|t| t.elapsed() > limit)
    }
}

/// One agent connection; a newer connection of the same node replaces it.
struct Session {
    conn: u64,
    tx: OutboxTx,
}

pub struct Cluster {
    state: State,
    store: Box<dyn Store>,
    /// Whether this manager leads: only the leader changes the state, takes agents and runs
    /// the orchestrator. With the embedded store it always does.
    leading: bool,
    /// This manager, the leader (when one is known) and every running manager.
    me: ManagerInfo,
    leader: Option<ManagerInfo>,
    managers: Vec<ManagerInfo>,
    sessions: HashMap<String, Session>,
    last_seen: Liveness,
    next_conn: u64,
    /// Each node's latest load balancer report, for inspection only: live state, not stored.
    lb: LbReports,
    pki: Arc<Pki>,
    /// When the state was last reconciled: timed work due by then is done.
    last_pass_ms: u64,
    /// `--encryption-key-rotation`, in seconds.
    key_rotation_secs: u64,
}

/// Swarm's rotation interval of the IPsec keys.
pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);

/// A fresh AES-128 key and salt from the OS's random source.
pub fn fresh_esp_key() -> [u8; ESP_KEY_BYTES] {
    let mut key = [0u8; ESP_KEY_BYTES];
    // getrandom(2) fails only before the kernel's pool is ready at boot, long past here.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .expect("the OS random source works");
    key
}

pub type Shared = Arc<Mutex<Cluster>>;

pub fn lock(shared: &Shared) -> MutexGuard<'_, Cluster> {
    // A panic while holding the lock happened between whole-state swaps, so the state is sound.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

use proto::unix_now_ms;

impl Cluster {
    /// A cluster that leads at once (`leading`: the embedded store) or waits to be elected.
    pub fn new(
        state: State,
        store: Box<dyn Store>,
        leading: bool,
        me: ManagerInfo,
        pki: Arc<Pki>,
    ) -> Cluster {
        let last_seen = Liveness::default();
        last_seen.reset(state.nodes.keys());
        Cluster {
            state,
            store,
            leading,
            leader: leading.then(|| me.clone()),
            managers: vec![me.clone()],
            me,
            sessions: HashMap::new(),
            last_seen,
            next_conn: 0,
            lb: LbReports::new(),
            pki,
            last_pass_ms: 0,
            key_rotation_secs: DEFAULT_KEY_ROTATION.as_secs(),
        }
    }

    pub fn set_key_rotation(&mut self, every: Duration) {
        self.key_rotation_secs = every.as_secs().max(1);
    }

    pub fn key_rotation_secs(&self) -> u64 {
        self.key_rotation_secs
    }

    /// Makes the IPsec key ring, or begins a rotation, when due (while an encrypted network
    /// exists); takes a rotation's next step when its last one timed out or had no node to wait
    /// for (a node's confirmation takes it at once: see `agents`).
    fn rotate_keys_if_due(&mut self) -> Result<(), TxError> {
        let interval = self.key_rotation_secs;
        let now_ms = unix_now_ms();
        if self.state.has_encrypted_networks() && self.state.esp_keys.due(now_ms / 1000, interval) {
            self.transact(|s, _| {
                s.rotate_keys(now_ms, interval, &mut fresh_esp_key);
                Ok(())
            })?;
        } else if self.state.key_step_ready(now_ms) {
            self.transact(|_, _| Ok(()))?;
        }
        Ok(())
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn pki_arc(&self) -> Arc<Pki> {
        self.pki.clone()
    }

    /// Where agents reach the managers, this one first, for the join command `meshctl
    /// join-token` prints.
    pub fn agent_addrs(&self) -> Vec<String> {
        let mut out = vec![self.me.agents.clone()];
        out.extend(
            self.managers
                .iter()
                .filter(|m| **m != self.me)
                .map(|m| m.agents.clone()),
        );
        out
    }

    /// A node joined with a valid token for `role`: registers it under a new id and returns
    /// that id with its certificate for the key in `csr`. Nothing is kept if either fails.
    pub fn join(
        &mut self,
        hostname: &str,
        addr: IpAddr,
        role: Role,
        csr: &str,
    ) -> Result<(String, String), String> {
        // A manager's own node is a manager whichever token it used.
        let role = if self.is_manager_addr(addr) {
            Role::Manager
        } else {
            role
        };
        let id = crate::alloc::new_id();
        let cert = self
            .pki
            .sign_node(csr, &id, role)
            .map_err(|e| format!("sign the node's certificate: {e}"))?;
        self.transact(|s, _| s.join_node(&id, hostname, addr, role))
            .map_err(|e| e.to_string())?;
        Ok((id, cert))
    }

    /// A renewed certificate for a connected node, with the role the cluster gives it now.
    pub fn renew(&self, node_id: &str, csr: &str) -> Result<String, String> {
        let role = self
            .state
            .nodes
            .get(node_id)
            .map(|r| r.node.role)
            .ok_or_else(|| format!("node {node_id} is not part of this cluster"))?;
        self.pki
            .sign_node(csr, node_id, role)
            .map_err(|e| format!("sign the renewed certificate: {e}"))
    }

    /// `meshctl node rm`: the node is revoked and its session, if any, ends now.
    pub fn remove_node(&mut self, key: &str, force: bool) -> Result<String, TxError> {
        let id = self.transact(|s, now| s.remove_node(key, force, now))?;
        self.sessions.remove(&id);
        self.last_seen.forget(&id);
        self.lb.remove(&id);
        Ok(id)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// The leader's API address, for a follower that forwards a request.
    pub fn leader_api(&self) -> Option<String> {
        self.leader.as_ref().map(|l| l.api.clone())
    }

    /// What a follower tells an agent or a joining node: where the leader is.
    pub fn not_leader(&self) -> ManagerMsg {
        ManagerMsg::NotLeader {
            leader: self.leader.as_ref().map(|l| l.agents.clone()),
        }
    }

    /// Elected: takes over `state` (what is stored, brought up to date by the caller from
    /// `stored`), saves it, and starts leading. Known nodes get a full grace period to
    /// reconnect, as after a restart.
    pub fn lead(&mut self, stored: &State, state: State) -> Result<(), StoreError> {
        self.store.save(stored, &state)?;
        self.last_seen.reset(state.nodes.keys());
        self.state = state;
        self.sessions.clear();
        self.lb = LbReports::new();
        self.leading = true;
        self.leader = Some(self.me.clone());
        tracing::info!(store = %self.store.describe(), nodes = self.state.nodes.len(), services = self.state.services.len(), "this manager is the leader");
        Ok(())
    }

    /// Leadership is lost: every agent session ends (the agents go to the new leader) and
    /// nothing is changed from here until this manager is elected again.
    pub fn follow(&mut self, why: &str) {
        if self.leading {
            tracing::warn!("this manager no longer leads: {why}");
        }
        self.leading = false;
        if self.leader.as_ref() == Some(&self.me) {
            self.leader = None;
        }
        self.sessions.clear();
        self.lb = LbReports::new();
    }

    /// The leader and the running managers as etcd shows them now. Agents are told when the
    /// set of managers changes.
    pub fn set_view(&mut self, leader: Option<ManagerInfo>, mut managers: Vec<ManagerInfo>) {
        if self.leading && leader.as_ref().is_some_and(|l| *l != self.me) {
            // Our lease ended without our noticing yet: our writes are fenced off already;
            // the agents must not wait for the keep-alive to say so.
            self.follow("etcd names another leader");
        }
        if !self.leading {
            self.leader = leader;
        }
        if !managers.contains(&self.me) {
            managers.push(self.me.clone());
        }
        managers.sort_by(|a, b| a.agents.cmp(&b.agents));
        if managers != self.managers {
            self.managers = managers;
            let msg = self.managers_msg();
            self.sessions.retain(|_, s| s.tx.send(msg.clone()).is_ok());
        }
        if self.leading {
            self.promote_manager_nodes();
        }
    }

    /// A node that runs a manager is a manager node, also when it joined (as the lab's do)
    /// before its manager first registered.
    fn promote_manager_nodes(&mut self) {
        let ids: Vec<String> = self
            .state
            .nodes
            .values()
            .filter(|r| r.node.role == Role::Worker && self.is_manager_addr(r.node.addr))
            .map(|r| r.node.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let promoted = self.transact(|s, _| {
            for id in &ids {
                s.set_node_role(id, Role::Manager)?;
            }
            Ok(())
        });
        match promoted {
            Ok(()) => tracing::info!(nodes = ?ids, "nodes that run a manager are manager nodes"),
            Err(e) => tracing::warn!("make the nodes that run a manager manager nodes: {e}"),
        }
    }

    fn managers_msg(&self) -> ManagerMsg {
        ManagerMsg::Managers {
            addrs: self.managers.iter().map(|m| m.agents.clone()).collect(),
        }
    }

    /// `node ls`'s MANAGER STATUS of a node.
    pub fn manager_status(&self, node: &proto::model::Node) -> Option<ManagerStatus> {
        if node.role != Role::Manager {
            return None;
        }
        Some(
            if self.leader.as_ref().is_some_and(|l| l.addr == node.addr) {
                ManagerStatus::Leader
            } else if self.managers.iter().any(|m| m.addr == node.addr) {
                ManagerStatus::Reachable
            } else {
                ManagerStatus::Unreachable
            },
        )
    }

    /// A node whose manager is running stays a manager: demoting it would leave a manager
    /// that agents and the API trust on a worker's certificate.
    pub fn check_demote(&self, key: &str, role: Role) -> Result<(), String> {
        let Ok(id) = self.state.find_node(key) else {
            return Ok(()); // the operation itself says the node is unknown
        };
        let node = &self.state.nodes[&id].node;
        if role == Role::Worker && self.managers.iter().any(|m| m.addr == node.addr) {
            return Err(format!(
                "demote node {}: a manager runs there (mesh-manager at {}); stop it first",
                node.hostname,
                self.managers
                    .iter()
                    .find(|m| m.addr == node.addr)
                    .map(|m| m.agents.as_str())
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Whether a manager runs at `addr` (this one is always among `managers`): its node is a
    /// manager whichever token it joined with.
    fn is_manager_addr(&self, addr: IpAddr) -> bool {
        self.managers.iter().any(|m| m.addr == addr)
    }

    /// Agents with an open session.
    pub fn connected_agents(&self) -> usize {
        self.sessions.len()
    }

    /// Agents whose advertise address is this one run on the manager's own node.
    pub fn manager_ip(&self) -> IpAddr {
        self.me.addr
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
        if !self.leading {
            return Err(TxError::Store(StoreError::NotLeader(
                self.leader.as_ref().map(|l| l.api.clone()),
            )));
        }
        let now_ms = unix_now_ms();
        let mut next = self.state.clone();
        let out = change(&mut next, now_ms / 1000)?;
        next.reconcile_ms(now_ms);
        self.last_pass_ms = now_ms;
        let changed = if next.projects_as(&self.state) {
            Vec::new()
        } else {
            next.refresh_assignments()
        };
        // The store writes what differs, nothing when nothing does.
        if let Err(e) = self.store.save(&self.state, &next) {
            if matches!(e, StoreError::NotLeader(_)) {
                self.follow("a write was fenced off: another manager leads");
            }
            return Err(e.into());
        }
        self.state = next;
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

    /// Registers the agent of node `id` (its certificate's CN) that said Hello and queues
    /// Welcome and its current assignment on `tx` (under the same lock, so no change can slip in
    /// between). Returns the connection id.
    pub fn connect_agent(
        &mut self,
        id: &str,
        hostname: &str,
        addr: IpAddr,
        tx: OutboxTx,
    ) -> Result<u64, TxError> {
        let role = self.transact(|s, _| s.connect_node(id, hostname, addr))?;
        let id = id.to_string();
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
        self.last_seen.seen(&id);
        let assignment = self.state.nodes[&id].assignment.clone();
        let _ = tx.send(ManagerMsg::Welcome {
            version: proto::PROTOCOL_VERSION,
            node_id: id.clone(),
            role,
        });
        let _ = tx.send(ManagerMsg::Assign(assignment));
        let _ = tx.send(self.managers_msg());
        Ok(conn)
    }

    pub fn disconnect_agent(&mut self, node_id: &str, conn: u64) {
        if self.sessions.get(node_id).is_some_and(|s| s.conn == conn) {
            self.sessions.remove(node_id);
        }
    }

    pub fn liveness(&self) -> Liveness {
        self.last_seen.clone()
    }

    /// Runs once a second (`whole_second`: marks silent nodes down, and retries placing pending
    /// tasks, as a restart delay may have passed) and when the clock alone moves a drain or a
    /// rolling update on (see [`State::next_deadline_ms`]). Returns when that is next.
    pub fn tick(&mut self, whole_second: bool) -> Result<Option<u64>, TxError> {
        if !self.leading {
            return Ok(None);
        }
        let now_ms = unix_now_ms();
        if self
            .state
            .next_deadline_ms(self.last_pass_ms)
            .is_some_and(|d| d <= now_ms)
        {
            self.transact(|_, _| Ok(()))?;
        }
        if whole_second {
            self.check_liveness()?;
            self.rotate_keys_if_due()?;
            if self
                .state
                .tasks
                .values()
                .any(|t| t.is_current() && t.node_id.is_none())
            {
                self.transact(|_, _| Ok(()))?;
            }
        }
        Ok(self.state.next_deadline_ms(self.last_pass_ms))
    }

    /// Marks down the nodes silent for longer than [`NODE_DOWN_SECS`]; their tasks move.
    fn check_liveness(&mut self) -> Result<(), TxError> {
        let limit = Duration::from_secs(NODE_DOWN_SECS);
        let silent: Vec<String> = self
            .state
            .nodes
            .values()
            .filter(|r| r.node.status == NodeStatus::Ready)
            .filter(|r| self.last_seen.silent_for(&r.node.id, limit))
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
pub(crate) mod tests {
    use super::*;
    use crate::outbox::{outbox, OutboxRx};
    use crate::state::tests::{spec, MANAGER};
    use crate::store::tests::TempDir;
    use crate::store::FileStore;
    use std::sync::Mutex;

    /// A cluster on a fresh state with its store and CA in `tmp`.
    pub(crate) fn cluster(tmp: &TempDir) -> Cluster {
        let (store, _) = FileStore::open(&tmp.0).unwrap();
        let mut state = crate::state::tests::new_state();
        state.cluster_id = "test-cluster".into();
        state.join_secrets.set(Role::Worker, [1; 16]);
        state.join_secrets.set(Role::Manager, [2; 16]);
        let pki = Pki::open(
            &tmp.0.join("pki"),
            None,
            &state.cluster_id,
            Duration::from_secs(3600),
            vec![],
        )
        .unwrap();
        let me = ManagerInfo {
            addr: MANAGER.parse().unwrap(),
            agents: format!("{MANAGER}:2377"),
            api: format!("{MANAGER}:2378"),
        };
        Cluster::new(state, Box::new(store), true, me, Arc::new(pki))
    }

    /// Joins a node as a worker token would and connects its agent: (node id, connection id).
    pub(crate) fn join_and_connect(
        c: &mut Cluster,
        hostname: &str,
        addr: IpAddr,
        tx: OutboxTx,
    ) -> (String, u64) {
        let csr = trust::KeyRequest::generate().unwrap().csr_pem;
        let (id, _) = c.join(hostname, addr, Role::Worker, &csr).unwrap();
        let conn = c.connect_agent(&id, hostname, addr, tx).unwrap();
        (id, conn)
    }

    fn drain(rx: &mut OutboxRx) -> Vec<ManagerMsg> {
        std::iter::from_fn(|| rx.try_recv()).collect()
    }

    #[test]
    fn agents_get_welcome_then_their_assignment_and_every_change() {
        let tmp = TempDir::new("cluster-push");
        let mut c = cluster(&tmp);
        let (tx1, mut rx1) = outbox();
        let (id1, _) = join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx1);
        let (tx2, mut rx2) = outbox();
        join_and_connect(&mut c, "node2", "192.168.56.12".parse().unwrap(), tx2);
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

    /// A store whose writes can be fenced off, as etcd does a deposed leader's.
    struct Fenced(Arc<Mutex<bool>>);

    impl Store for Fenced {
        fn save(&mut self, _prev: &State, _next: &State) -> Result<(), StoreError> {
            if *self.0.lock().unwrap() {
                return Err(StoreError::NotLeader(None));
            }
            Ok(())
        }

        fn describe(&self) -> String {
            "fenced".into()
        }
    }

    /// A store whose disk has failed.
    struct Broken;

    impl Store for Broken {
        fn save(&mut self, _prev: &State, _next: &State) -> Result<(), StoreError> {
            Err(StoreError::Write {
                path: "/broken".into(),
                source: std::io::Error::other("input/output error"),
            })
        }

        fn describe(&self) -> String {
            "broken".into()
        }
    }

    fn info(addr: &str) -> ManagerInfo {
        ManagerInfo {
            addr: addr.parse().unwrap(),
            agents: format!("{addr}:2377"),
            api: format!("{addr}:2378"),
        }
    }

    #[test]
    fn only_the_leader_changes_anything_and_a_fenced_write_makes_it_follow() {
        let tmp = TempDir::new("cluster-leader");
        let mut c = cluster(&tmp);
        let fenced = Arc::new(Mutex::new(false));
        c.store = Box::new(Fenced(fenced.clone()));
        let (tx, mut rx) = outbox();
        join_and_connect(&mut c, "node2", "192.168.56.12".parse().unwrap(), tx);
        let (me, other) = (info(MANAGER), info("192.168.56.13"));
        c.set_view(None, vec![other.clone()]);
        let msgs = drain(&mut rx);
        assert!(
            msgs.iter()
                .any(|m| matches!(m, ManagerMsg::Managers { addrs } if addrs.len() == 2)),
            "agents learn of a new manager: {msgs:?}"
        );

        // Another manager was elected meanwhile: this one's write is fenced off.
        *fenced.lock().unwrap() = true;
        let before = c.state().clone();
        let err = c
            .transact(|s, now| s.create_service(&spec("web", 1, &[]), now))
            .unwrap_err();
        assert!(err.to_string().contains("not the leader"), "{err}");
        assert_eq!(c.state(), &before, "nothing changed");
        assert!(!c.leading());
        assert!(
            rx.try_recv().is_none() && rx.is_closed(),
            "agent sessions end"
        );
        assert_eq!(
            c.tick(true).unwrap(),
            None,
            "a follower runs no orchestrator"
        );

        // Following: refusals name the leader, whose node shows as Leader.
        c.set_view(Some(other.clone()), vec![me.clone(), other.clone()]);
        let err = c.transact(|_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("192.168.56.13:2378"), "{err}");
        assert_eq!(
            c.not_leader(),
            ManagerMsg::NotLeader {
                leader: Some(other.agents.clone())
            }
        );
        let mut node = c.state().nodes.values().next().unwrap().node.clone();
        node.role = Role::Manager;
        node.addr = other.addr;
        assert_eq!(c.manager_status(&node), Some(ManagerStatus::Leader));
        node.addr = me.addr;
        assert_eq!(c.manager_status(&node), Some(ManagerStatus::Reachable));
        node.addr = "192.168.56.99".parse().unwrap();
        assert_eq!(c.manager_status(&node), Some(ManagerStatus::Unreachable));
        node.role = Role::Worker;
        assert_eq!(c.manager_status(&node), None);

        // Elected again: it takes over the stored state and changes go through.
        *fenced.lock().unwrap() = false;
        let stored = c.state().clone();
        c.lead(&stored, stored.clone()).unwrap();
        assert!(c.leading() && c.leader_api() == Some(me.api.clone()));
        c.transact(|s, now| s.create_service(&spec("web", 1, &[]), now))
            .unwrap();
    }

    #[test]
    fn a_newer_connection_replaces_the_older_one() {
        let tmp = TempDir::new("cluster-replace");
        let mut c = cluster(&tmp);
        let (old_tx, mut old_rx) = outbox();
        let (id, old_conn) = join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), old_tx);
        let (new_tx, mut new_rx) = outbox();
        c.connect_agent(&id, "node1", MANAGER.parse().unwrap(), new_tx)
            .unwrap();
        drain(&mut old_rx);
        assert!(
            old_rx.try_recv().is_none() && old_rx.is_closed(),
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
    fn a_joined_node_is_down_until_its_agent_connects_and_a_hostname_is_not_taken_over() {
        let tmp = TempDir::new("cluster-join");
        let mut c = cluster(&tmp);
        let csr = || trust::KeyRequest::generate().unwrap().csr_pem;
        let addr: IpAddr = "192.168.56.12".parse().unwrap();
        let (id, cert) = c.join("node2", addr, Role::Worker, &csr()).unwrap();
        let who = trust::Identity::from_pem(&cert).unwrap();
        assert_eq!(who.common_name, id);
        assert_eq!(who.role, Some(trust::CertRole::Worker));
        assert_eq!(who.cluster_id, "test-cluster");
        assert_eq!(c.state().nodes[&id].node.status, NodeStatus::Down);
        // The manager's own node is a manager whatever token it used.
        let (m, cert) = c
            .join("node1", MANAGER.parse().unwrap(), Role::Worker, &csr())
            .unwrap();
        assert_eq!(c.state().nodes[&m].node.role, Role::Manager);
        assert_eq!(
            trust::Identity::from_pem(&cert).unwrap().role,
            Some(trust::CertRole::Manager)
        );

        let before = c.state().clone();
        let err = c.join("node2", addr, Role::Worker, &csr()).unwrap_err();
        assert!(err.contains("already in the cluster"), "{err}");
        let err = c.join("node3", addr, Role::Worker, "garbage").unwrap_err();
        assert!(err.starts_with("sign the node's certificate"), "{err}");
        assert_eq!(c.state(), &before);

        let (tx, _rx) = outbox();
        c.connect_agent(&id, "node2", addr, tx.clone()).unwrap();
        assert_eq!(c.state().nodes[&id].node.status, NodeStatus::Ready);
        // A certificate's node may not rename itself onto another node.
        let err = c.connect_agent(&id, "node1", addr, tx.clone()).unwrap_err();
        assert!(err.to_string().contains("already in the cluster"), "{err}");
        let err = c
            .connect_agent("nosuchnode", "node9", addr, tx)
            .unwrap_err();
        assert!(
            err.to_string().contains("not part of this cluster"),
            "{err}"
        );
    }

    #[test]
    fn a_removed_node_is_revoked_its_session_ends_and_its_tasks_move() {
        let tmp = TempDir::new("cluster-rm");
        let mut c = cluster(&tmp);
        let (tx1, _rx1) = outbox();
        join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx1);
        let (tx2, mut rx2) = outbox();
        let (n2, _) = join_and_connect(&mut c, "node2", "192.168.56.12".parse().unwrap(), tx2);
        c.transact(|s, now| s.create_service(&spec("web", 2, &[]), now))
            .unwrap();
        let on_n2 = |c: &Cluster| {
            c.state()
                .tasks
                .values()
                .filter(|t| t.is_current() && t.node_id.as_deref() == Some(n2.as_str()))
                .count()
        };
        assert_eq!(on_n2(&c), 1);
        let before = c.state().clone();
        let err = c.remove_node("node2", false).unwrap_err();
        assert!(err.to_string().contains("is ready"), "{err}");
        assert_eq!(c.state(), &before);
        c.remove_node("node2", true).unwrap();
        assert!(c.state().revoked.contains(&n2));
        assert_eq!(on_n2(&c), 0);
        let current = c.state().tasks.values().filter(|t| t.is_current()).count();
        assert_eq!(current, 2, "the removed node's slot is refilled");
        drain(&mut rx2);
        assert!(rx2.is_closed(), "the removed node's session is closed");
        let (tx, _rx) = outbox();
        let err = c
            .connect_agent(&n2, "node2", "192.168.56.12".parse().unwrap(), tx)
            .unwrap_err();
        assert!(err.to_string().contains("was removed"), "{err}");
        let csr = trust::KeyRequest::generate().unwrap().csr_pem;
        assert!(c.renew(&n2, &csr).is_err(), "no renewal for a removed node");
    }

    #[test]
    fn load_balancer_reports_are_kept_until_the_node_goes_down() {
        let tmp = TempDir::new("cluster-lb");
        let mut c = cluster(&tmp);
        let (tx, _rx) = outbox();
        let (id, _) = join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx);
        let report = LbReport {
            backend: proto::model::LbKind::Ipvs,
            services: vec![],
        };
        c.record_lb("unknown", report.clone());
        c.record_lb(&id, report.clone());
        assert_eq!(c.lb().keys().collect::<Vec<_>>(), [&id]);
        c.tick(true).unwrap();
        assert_eq!(
            c.lb().get(&id),
            Some(&report),
            "a live node keeps its report"
        );
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(NODE_DOWN_SECS + 1))
            .unwrap();
        c.last_seen.map().insert(id.clone(), long_ago);
        c.tick(true).unwrap();
        assert_eq!(c.state().nodes[&id].node.status, NodeStatus::Down);
        assert!(c.lb().is_empty());
    }

    #[test]
    fn a_change_that_cannot_be_saved_is_not_made() {
        let tmp = TempDir::new("cluster-nosave");
        let mut c = cluster(&tmp);
        let (tx, mut rx) = outbox();
        join_and_connect(&mut c, "node1", MANAGER.parse().unwrap(), tx);
        drain(&mut rx);
        let before = c.state().clone();
        c.store = Box::new(Broken);
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
