//! The one long-lived connection to the manager: Hello, then Assign in / TaskStatus, Applied and
//! Heartbeat out; reconnects with backoff. Everything the agent does keeps running while it is
//! down: assignments only ever arrive through here, and statuses are re-sent on reconnect.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use proto::agent::{
    AgentMsg, Assignment, LbReport, ManagerMsg, TaskStatus, HEARTBEAT_SECS, NODE_DOWN_SECS,
};
use proto::{decode_frame, encode_frame, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::state::StateDir;

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    fn snapshot(&self) -> Vec<AgentMsg> {
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

pub struct Conn {
    pub manager: String,
    pub hostname: String,
    pub advertise_addr: IpAddr,
    /// Told to the manager, which keeps overlays clear of it.
    pub gwbridge_subnet: Ipv4Net,
    pub state: StateDir,
    pub assignments: watch::Sender<Assignment>,
    pub outbox: Outbox,
    pub outgoing: mpsc::UnboundedReceiver<AgentMsg>,
}

impl Conn {
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut welcomed = false;
            match self.session(&mut welcomed).await {
                Ok(()) => warn!(manager = %self.manager, "manager closed the connection"),
                Err(e) => warn!(manager = %self.manager, "manager connection: {e:#}"),
            }
            if welcomed {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&mut self, welcomed: &mut bool) -> anyhow::Result<()> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.manager))
            .await
            .context("connect: timed out")?
            .context("connect")?;
        set_user_timeout(&stream);
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();

        let hello = AgentMsg::Hello {
            version: PROTOCOL_VERSION,
            hostname: self.hostname.clone(),
            advertise_addr: self.advertise_addr,
            node_id: self.state.node_id()?,
            gwbridge_subnet: Some(self.gwbridge_subnet),
        };
        w.write_all(&encode_frame(&hello))
            .await
            .context("send hello")?;

        let first = tokio::time::timeout(Duration::from_secs(NODE_DOWN_SECS), lines.next_line())
            .await
            .context("no answer to hello")?
            .context("read welcome")?
            .context("closed before welcome")?;
        match decode_frame::<ManagerMsg>(first.as_bytes())? {
            ManagerMsg::Welcome {
                version,
                node_id,
                role,
            } => {
                if version != PROTOCOL_VERSION {
                    bail!("manager speaks protocol {version}, this agent {PROTOCOL_VERSION}");
                }
                if self.state.node_id()?.as_deref() != Some(node_id.as_str()) {
                    self.state.save_node_id(&node_id)?;
                }
                info!(manager = %self.manager, %node_id, ?role, "connected to the manager");
                *welcomed = true;
            }
            ManagerMsg::Refused { reason } => bail!("refused by the manager: {reason}"),
            ManagerMsg::Assign(_) => bail!("assignment before welcome"),
        }

        // Anything queued while disconnected is superseded by the status table.
        while self.outgoing.try_recv().is_ok() {}
        for msg in self.outbox.snapshot() {
            w.write_all(&encode_frame(&msg)).await.context("send")?;
        }

        let mut heartbeat = tokio::time::interval(Duration::from_secs(HEARTBEAT_SECS));
        let mut first_assign = true;
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line.context("read")? else { return Ok(()) };
                    match decode_frame::<ManagerMsg>(line.as_bytes())? {
                        ManagerMsg::Assign(a) => self.accept(a, std::mem::take(&mut first_assign)),
                        other => warn!("unexpected message from the manager: {other:?}"),
                    }
                }
                msg = self.outgoing.recv() => {
                    // The Outbox lives as long as the agent: the channel never closes.
                    let Some(msg) = msg else { return Ok(()) };
                    w.write_all(&encode_frame(&msg)).await.context("send")?;
                }
                _ = heartbeat.tick() => {
                    w.write_all(&encode_frame(&AgentMsg::Heartbeat)).await.context("send heartbeat")?;
                }
            }
        }
    }

    /// Newest revision wins. The first assignment of a connection is the manager's whole truth
    /// and is taken even if its revision went back (a manager whose store was reset).
    fn accept(&self, a: Assignment, first_of_connection: bool) {
        let current = self.assignments.borrow().revision;
        if !takes(current, a.revision, first_of_connection) {
            warn!(
                revision = a.revision,
                current, "ignoring an older assignment"
            );
            return;
        }
        if a.revision < current {
            warn!(
                revision = a.revision,
                current, "the manager's revision went back; taking its state"
            );
        }
        info!(
            revision = a.revision,
            networks = a.networks.len(),
            tasks = a.tasks.len(),
            "assignment received"
        );
        self.assignments.send_replace(a);
    }
}

/// Whether an assignment of revision `incoming` replaces the one of revision `current`.
fn takes(current: u64, incoming: u64, first_of_connection: bool) -> bool {
    incoming >= current || first_of_connection
}

/// Unacknowledged data (our heartbeats) to a vanished manager fails the connection after
/// NODE_DOWN_SECS instead of TCP's default of many minutes.
fn set_user_timeout(stream: &TcpStream) {
    let ms: libc::c_uint = (NODE_DOWN_SECS * 1000) as libc::c_uint;
    // SAFETY: setsockopt on a socket we own with a pointer to a c_uint of the given size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            &ms as *const libc::c_uint as *const libc::c_void,
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        warn!("set TCP_USER_TIMEOUT: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::{Role, TaskState};
    use tokio::io::{AsyncBufRead, Lines};
    use tokio::net::TcpListener;

    #[test]
    fn newest_revision_wins_except_a_fresh_connection() {
        assert!(takes(3, 4, false));
        assert!(
            takes(3, 3, false),
            "the same revision again is applied again (idempotent)"
        );
        assert!(!takes(4, 3, false));
        assert!(
            takes(4, 1, true),
            "a reset manager's first assignment is the truth"
        );
    }

    fn status(id: &str, state: TaskState) -> TaskStatus {
        TaskStatus {
            task_id: id.into(),
            state,
            error: None,
            pid: Some(7),
            netns: None,
        }
    }

    /// Reads the next message that is not a heartbeat.
    async fn next<R: AsyncBufRead + Unpin>(lines: &mut Lines<R>) -> AgentMsg {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
                .await
                .expect("a message in time")
                .unwrap()
                .expect("an open connection");
            let msg: AgentMsg = decode_frame(line.as_bytes()).unwrap();
            if msg != AgentMsg::Heartbeat {
                return msg;
            }
        }
    }

    #[tokio::test]
    async fn a_session_and_a_reconnect_carry_everything_the_manager_needs() {
        let root = std::env::temp_dir().join(format!("mesh-agent-conn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = StateDir::open(&root).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (outbox, outgoing) = Outbox::new();
        // Said while no manager was there: re-sent on connect.
        outbox.task_status(status("t1", TaskState::Running));
        let (tx, mut assignments) = watch::channel(Assignment::default());
        let conn = Conn {
            manager: listener.local_addr().unwrap().to_string(),
            hostname: "node1".into(),
            advertise_addr: "192.168.56.11".parse().unwrap(),
            gwbridge_subnet: "172.18.0.0/16".parse().unwrap(),
            state: state.clone(),
            assignments: tx,
            outbox: outbox.clone(),
            outgoing,
        };
        let agent = tokio::spawn(conn.run());

        let welcome = encode_frame(&ManagerMsg::Welcome {
            version: PROTOCOL_VERSION,
            node_id: "node-abc".into(),
            role: Role::Worker,
        });
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let AgentMsg::Hello {
            node_id, hostname, ..
        } = next(&mut lines).await
        else {
            panic!("hello first")
        };
        assert_eq!((node_id, hostname.as_str()), (None, "node1"));
        w.write_all(&welcome).await.unwrap();
        let assign = Assignment {
            revision: 5,
            ..Default::default()
        };
        w.write_all(&encode_frame(&ManagerMsg::Assign(assign.clone())))
            .await
            .unwrap();
        assert_eq!(
            next(&mut lines).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Running))
        );
        assignments.changed().await.unwrap();
        assert_eq!(*assignments.borrow_and_update(), assign);
        assert_eq!(state.node_id().unwrap().as_deref(), Some("node-abc"));
        outbox.applied(5);
        assert_eq!(next(&mut lines).await, AgentMsg::Applied { revision: 5 });
        outbox.task_status(status("t1", TaskState::Failed));
        assert_eq!(
            next(&mut lines).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Failed))
        );

        // The manager goes away; the agent comes back with its node id and tells the latest.
        drop((lines, w));
        let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a reconnect")
            .unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let AgentMsg::Hello { node_id, .. } = next(&mut lines).await else {
            panic!("hello first")
        };
        assert_eq!(node_id.as_deref(), Some("node-abc"));
        w.write_all(&welcome).await.unwrap();
        assert_eq!(
            next(&mut lines).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Failed))
        );
        assert_eq!(next(&mut lines).await, AgentMsg::Applied { revision: 5 });

        agent.abort();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
