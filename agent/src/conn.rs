//! The one long-lived connection to the manager, mutual TLS with the node's certificate: Hello,
//! then Assign in / TaskStatus, Applied and Heartbeat out. Of several managers only the leader
//! takes the agent: a follower's NotLeader sends it on, and a lost manager is replaced by the
//! next known one ([`crate::managers`] decides which, and how long to wait). Everything the agent
//! does keeps running while it is down or switching managers: assignments only ever arrive
//! through here, and statuses are re-sent on reconnect. The certificate is renewed over the same
//! connection at a random point between 50 % and 80 % of its life, so nodes do not renew all at
//! once and nothing reconnects.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use proto::agent::{AgentMsg, Assignment, EspSupport, ManagerMsg, HEARTBEAT_SECS, NODE_DOWN_SECS};
use proto::wire::{read_frame, write_frame};
use proto::{decode_frame, PROTOCOL_VERSION};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use trust::{Credentials, KeyRequest};

use crate::managers::{parse_manager, Managers, Outcome, BACKOFF_MAX};
use crate::metrics::AgentMetrics;
use crate::outbox::Outbox;
use crate::state::StateDir;

pub struct Conn {
    /// The known managers; the current one is connected to.
    pub managers: Managers,
    pub hostname: String,
    pub advertise_addr: IpAddr,
    /// Told to the manager, which keeps overlays clear of it.
    pub gwbridge_subnet: Ipv4Net,
    /// Told to the manager, which places encrypted networks' tasks only where ESP works.
    pub esp: EspSupport,
    pub state: StateDir,
    /// Replaced on renewal, and kept in the state dir's tls/.
    pub creds: Credentials,
    pub assignments: watch::Sender<Assignment>,
    pub outbox: Outbox,
    pub outgoing: mpsc::UnboundedReceiver<AgentMsg>,
    pub metrics: AgentMetrics,
}

impl Conn {
    pub async fn run(mut self) {
        loop {
            let manager = self.managers.current().to_string();
            let outcome = match self.session(&manager).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    warn!(%manager, "manager connection: {e:#}");
                    Outcome::Lost
                }
            };
            self.metrics.manager_connected.set(0);
            let next = self.managers.after(outcome);
            info!(from = %manager, to = %next.addr, wait_ms = next.wait.as_millis() as u64, "next manager: {}", next.reason);
            tokio::time::sleep(next.wait).await;
        }
    }

    /// One session with the manager at `manager`, until it closes (`Lost`) or turns out a
    /// follower.
    async fn session(&mut self, manager: &str) -> anyhow::Result<Outcome> {
        let config = self.creds.client_config()?;
        let stream = trust::join::connect(manager, config).await?;
        set_user_timeout(stream.get_ref().0);
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();

        let hello = AgentMsg::Hello {
            version: PROTOCOL_VERSION,
            hostname: self.hostname.clone(),
            advertise_addr: self.advertise_addr,
            gwbridge_subnet: Some(self.gwbridge_subnet),
            esp: Some(self.esp.clone()),
        };
        write_frame(&mut w, &hello).await.context("send hello")?;

        let got = tokio::time::timeout(
            Duration::from_secs(NODE_DOWN_SECS),
            read_frame(&mut r, &mut buf, proto::MAX_FRAME_BYTES),
        )
        .await
        .context("no answer to hello")?
        .context("read welcome")?;
        if !got {
            bail!("closed before welcome");
        }
        match decode_frame::<ManagerMsg>(&buf)? {
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
                info!(%manager, %node_id, ?role, "connected to the manager");
                self.managers.connected();
                self.metrics.manager_connected.set(1);
            }
            ManagerMsg::NotLeader { leader } => return Ok(not_leader(leader)),
            ManagerMsg::Refused { reason } => bail!("refused by the manager: {reason}"),
            other => bail!("expected welcome, got {}", other.kind()),
        }
        buf.clear();

        // Anything queued while disconnected is superseded by the status table.
        while self.outgoing.try_recv().is_ok() {}
        for msg in self.outbox.snapshot() {
            write_frame(&mut w, &msg).await.context("send")?;
        }

        let mut heartbeat = tokio::time::interval(Duration::from_secs(HEARTBEAT_SECS));
        let mut first_assign = true;
        let mut renewal: Option<KeyRequest> = None;
        let renew = tokio::time::sleep(self.until_renewal());
        tokio::pin!(renew);
        loop {
            tokio::select! {
                got = read_frame(&mut r, &mut buf, proto::MAX_FRAME_BYTES) => {
                    if !got.context("read")? {
                        warn!(%manager, "manager closed the connection");
                        return Ok(Outcome::Lost);
                    }
                    let msg = decode_frame::<ManagerMsg>(&buf)?;
                    buf.clear();
                    match msg {
                        ManagerMsg::Assign(a) => self.accept(Arc::unwrap_or_clone(a), std::mem::take(&mut first_assign)),
                        ManagerMsg::Certificate { cert } => {
                            let Some(key) = renewal.take() else {
                                warn!("a certificate the agent did not ask for: ignored");
                                continue;
                            };
                            self.renewed(cert, key)?;
                            renew.as_mut().reset(tokio::time::Instant::now() + self.until_renewal());
                        }
                        ManagerMsg::Refused { reason } => {
                            warn!("the manager refused: {reason}");
                            // A refused renewal is tried again a little later.
                            if renewal.take().is_some() {
                                renew.as_mut().reset(tokio::time::Instant::now() + BACKOFF_MAX);
                            }
                        }
                        ManagerMsg::Managers { addrs } => self.learn(addrs),
                        // A leader that stepped down: its agents go to the new one.
                        ManagerMsg::NotLeader { leader } => return Ok(not_leader(leader)),
                        other => warn!("unexpected {} message from the manager", other.kind()),
                    }
                }
                msg = self.outgoing.recv() => {
                    // The Outbox lives as long as the agent: the channel never closes.
                    let Some(msg) = msg else { return Ok(Outcome::Lost) };
                    write_frame(&mut w, &msg).await.context("send")?;
                }
                _ = heartbeat.tick() => {
                    write_frame(&mut w, &AgentMsg::Heartbeat).await.context("send heartbeat")?;
                }
                _ = &mut renew, if renewal.is_none() => {
                    let key = KeyRequest::generate().context("make a key for the renewed certificate")?;
                    info!("renewing the node's certificate");
                    write_frame(&mut w, &AgentMsg::Renew { csr: key.csr_pem.clone() }).await.context("send renewal")?;
                    renewal = Some(key);
                }
            }
        }
    }

    /// Takes the leader's list of managers, kept in the state dir when it changed. A bad
    /// address is left out: the others are still worth knowing.
    fn learn(&mut self, addrs: Vec<String>) {
        let valid: Vec<String> = addrs
            .iter()
            .filter_map(|a| {
                parse_manager(a)
                    .map_err(|e| warn!("the manager listed a bad manager address: {e}"))
                    .ok()
            })
            .collect();
        if !self.managers.learn(valid) {
            return;
        }
        info!(managers = ?self.managers.learned(), "the cluster's managers");
        if let Err(e) = self.state.save_managers(self.managers.learned()) {
            // They are still used in this run; only a restart would not know them.
            warn!("keep the cluster's managers: {e}");
        }
    }

    /// Time until the current certificate should be renewed: 50-80 % of its life, chosen anew
    /// for each certificate.
    fn until_renewal(&self) -> Duration {
        let at = match self.creds.identity() {
            Ok(id) => id.renew_at(trust::pki::renewal_fraction()),
            Err(e) => {
                warn!("read the node's certificate: {e}; renewing now");
                SystemTime::now()
            }
        };
        at.duration_since(SystemTime::now()).unwrap_or_default()
    }

    /// Takes a renewed certificate for `key`: it must name this node, then it is kept on disk
    /// and used from the next connection on.
    fn renewed(&mut self, cert: String, key: KeyRequest) -> anyhow::Result<()> {
        let next = Credentials {
            ca_pem: self.creds.ca_pem.clone(),
            cert_pem: cert,
            key_pem: key.key_pem,
        };
        let (old, new) = (self.creds.identity()?, next.identity()?);
        if old.common_name != new.common_name || old.cluster_id != new.cluster_id {
            bail!("the manager renewed the certificate for another node: refused");
        }
        next.client_config()
            .context("check the renewed certificate")?;
        next.store_node(&self.state.tls_dir())
            .context("keep the renewed certificate")?;
        let expires = new
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs();
        info!(expires_in_secs = expires, "renewed the node's certificate");
        self.creds = next;
        Ok(())
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

/// A follower's answer; a leader address that is not ADDR:PORT counts as none known.
fn not_leader(leader: Option<String>) -> Outcome {
    Outcome::NotLeader(leader.and_then(|l| {
        parse_manager(&l)
            .map_err(|e| warn!("the manager named a bad leader address: {e}"))
            .ok()
    }))
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
    use proto::agent::TaskStatus;
    use proto::model::{Role, TaskState};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

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
            health: None,
            health_log: None,
        }
    }

    /// Reads the next message that is not a heartbeat.
    async fn next<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> AgentMsg {
        loop {
            let mut buf = Vec::new();
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                read_frame(r, &mut buf, proto::MAX_FRAME_BYTES),
            )
            .await
            .expect("a message in time")
            .unwrap();
            assert!(got, "an open connection");
            let msg: AgentMsg = decode_frame(&buf).unwrap();
            if msg != AgentMsg::Heartbeat {
                return msg;
            }
        }
    }

    /// A manager's side: a CA, the manager's certificate, and a node's credentials of that CA.
    fn pki(node_id: &str, lifetime: Duration) -> (trust::Ca, TlsAcceptor, Credentials) {
        let ca = trust::Ca::generate("c1").unwrap();
        let subject = |cn: &str, role| trust::Subject {
            common_name: cn.into(),
            role,
            cluster_id: "c1".into(),
        };
        let (cert, key) = ca
            .issue(
                &subject("mesh-manager", trust::CertRole::Manager),
                &[],
                lifetime,
            )
            .unwrap();
        let slot = trust::tls::CertSlot::new(trust::tls::certified_key(&cert, &key).unwrap());
        let config =
            trust::tls::server_config(ca.cert_pem(), slot, trust::tls::ClientAuth::Optional)
                .unwrap();
        let (cert_pem, key_pem) = ca
            .issue(&subject(node_id, trust::CertRole::Worker), &[], lifetime)
            .unwrap();
        let creds = Credentials {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem,
            key_pem,
        };
        (ca, TlsAcceptor::from(config), creds)
    }

    type Server = (
        BufReader<tokio::io::ReadHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
        tokio::io::WriteHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    );

    async fn accept(listener: &TcpListener, tls: &TlsAcceptor) -> Server {
        let (s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a connection")
            .unwrap();
        let s = tls.accept(s).await.unwrap();
        let (r, w) = tokio::io::split(s);
        (BufReader::new(r), w)
    }

    fn addr(listener: &TcpListener) -> String {
        listener.local_addr().unwrap().to_string()
    }

    /// Waits up to 5 s for `cond`.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..50 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: not within 5 s");
    }

    fn welcome() -> ManagerMsg {
        ManagerMsg::Welcome {
            version: PROTOCOL_VERSION,
            node_id: "node-abc".into(),
            role: Role::Worker,
        }
    }

    /// node1's connection to the manager listening on `listener`.
    fn node1(
        listener: &TcpListener,
        state: &StateDir,
        creds: Credentials,
        outbox: &Outbox,
        outgoing: mpsc::UnboundedReceiver<AgentMsg>,
        assignments: watch::Sender<Assignment>,
    ) -> Conn {
        let managers = Managers::new(vec![addr(listener)], vec![]);
        node1_of(managers, state, creds, outbox, outgoing, assignments)
    }

    /// node1's connection to `managers`.
    fn node1_of(
        managers: Managers,
        state: &StateDir,
        creds: Credentials,
        outbox: &Outbox,
        outgoing: mpsc::UnboundedReceiver<AgentMsg>,
        assignments: watch::Sender<Assignment>,
    ) -> Conn {
        Conn {
            managers,
            hostname: "node1".into(),
            advertise_addr: "192.168.56.11".parse().unwrap(),
            gwbridge_subnet: "172.18.0.0/16".parse().unwrap(),
            esp: EspSupport::Supported,
            state: state.clone(),
            creds,
            assignments,
            outbox: outbox.clone(),
            outgoing,
            metrics: AgentMetrics::new(),
        }
    }

    fn temp_state(tag: &str) -> (std::path::PathBuf, StateDir) {
        let root =
            std::env::temp_dir().join(format!("mesh-agent-conn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = StateDir::open(&root).unwrap();
        (root, state)
    }

    #[tokio::test]
    async fn a_session_and_a_reconnect_carry_everything_the_manager_needs() {
        let (root, state) = temp_state("session");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_ca, tls, creds) = pki("node-abc", Duration::from_secs(3600));
        let (outbox, outgoing) = Outbox::new();
        // Said while no manager was there: re-sent on connect.
        outbox.task_status(status("t1", TaskState::Running));
        let (tx, mut assignments) = watch::channel(Assignment::default());
        let conn = node1(&listener, &state, creds, &outbox, outgoing, tx);
        let agent = tokio::spawn(conn.run());

        let welcome = ManagerMsg::Welcome {
            version: PROTOCOL_VERSION,
            node_id: "node-abc".into(),
            role: Role::Worker,
        };
        let (mut r, mut w) = accept(&listener, &tls).await;
        let AgentMsg::Hello { hostname, .. } = next(&mut r).await else {
            panic!("hello first")
        };
        assert_eq!(hostname, "node1");
        write_frame(&mut w, &welcome).await.unwrap();
        let assign = Assignment {
            revision: 5,
            ..Default::default()
        };
        write_frame(&mut w, &ManagerMsg::Assign(Arc::new(assign.clone())))
            .await
            .unwrap();
        assert_eq!(
            next(&mut r).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Running))
        );
        assignments.changed().await.unwrap();
        assert_eq!(*assignments.borrow_and_update(), assign);
        assert_eq!(state.node_id().unwrap().as_deref(), Some("node-abc"));
        outbox.applied(5);
        assert_eq!(next(&mut r).await, AgentMsg::Applied { revision: 5 });
        outbox.task_status(status("t1", TaskState::Failed));
        assert_eq!(
            next(&mut r).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Failed))
        );

        // The manager goes away; the agent comes back and tells the latest.
        drop((r, w));
        let (mut r, mut w) = accept(&listener, &tls).await;
        assert!(matches!(next(&mut r).await, AgentMsg::Hello { .. }));
        write_frame(&mut w, &welcome).await.unwrap();
        assert_eq!(
            next(&mut r).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Failed))
        );
        assert_eq!(next(&mut r).await, AgentMsg::Applied { revision: 5 });

        agent.abort();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn a_certificate_is_renewed_on_the_open_connection_and_kept() {
        let (root, state) = temp_state("renew");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // 2 s of life: renewal falls 1 to 1.6 s after issue.
        let (ca, tls, creds) = pki("node-abc", Duration::from_secs(2));
        creds.store_node(&state.tls_dir()).unwrap();
        let (outbox, outgoing) = Outbox::new();
        let (tx, _assignments) = watch::channel(Assignment::default());
        let conn = node1(&listener, &state, creds.clone(), &outbox, outgoing, tx);
        let agent = tokio::spawn(conn.run());
        let (mut r, mut w) = accept(&listener, &tls).await;
        assert!(matches!(next(&mut r).await, AgentMsg::Hello { .. }));
        let welcome = ManagerMsg::Welcome {
            version: PROTOCOL_VERSION,
            node_id: "node-abc".into(),
            role: Role::Worker,
        };
        write_frame(&mut w, &welcome).await.unwrap();
        // Heartbeats are skipped by `next`.
        let AgentMsg::Renew { csr } = next(&mut r).await else {
            panic!("a renewal")
        };
        let subject = trust::Subject {
            common_name: "node-abc".into(),
            role: trust::CertRole::Worker,
            cluster_id: "c1".into(),
        };
        let cert = ca
            .sign_request(&csr, &subject, Duration::from_secs(3600))
            .unwrap();
        write_frame(&mut w, &ManagerMsg::Certificate { cert: cert.clone() })
            .await
            .unwrap();
        // The connection stays up (heartbeats go on) and the new certificate is on disk.
        for _ in 0..50 {
            let kept = Credentials::load_node(&state.tls_dir()).unwrap().unwrap();
            if kept.cert_pem.trim() == cert.trim() {
                assert_ne!(
                    kept.key_pem, creds.key_pem,
                    "a new key with the new certificate"
                );
                agent.abort();
                std::fs::remove_dir_all(&root).unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the renewed certificate was not kept");
    }

    #[tokio::test]
    async fn a_follower_sends_the_agent_to_the_leader_it_names() {
        let (root, state) = temp_state("follower");
        let follower = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let leader = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_ca, tls, creds) = pki("node-abc", Duration::from_secs(3600));
        let (outbox, outgoing) = Outbox::new();
        outbox.task_status(status("t1", TaskState::Running));
        let (tx, _assignments) = watch::channel(Assignment::default());
        // Only the follower is known.
        let conn = node1(&follower, &state, creds, &outbox, outgoing, tx);
        let metrics = conn.metrics.clone();
        let agent = tokio::spawn(conn.run());

        let (mut r, mut w) = accept(&follower, &tls).await;
        assert!(matches!(next(&mut r).await, AgentMsg::Hello { .. }));
        let hint = ManagerMsg::NotLeader {
            leader: Some(addr(&leader)),
        };
        write_frame(&mut w, &hint).await.unwrap();

        let (mut r, mut w) = accept(&leader, &tls).await;
        let AgentMsg::Hello { hostname, .. } = next(&mut r).await else {
            panic!("hello first")
        };
        assert_eq!(hostname, "node1");
        write_frame(&mut w, &welcome()).await.unwrap();
        // The session with the leader is a full one: what the agent had to say is said.
        assert_eq!(
            next(&mut r).await,
            AgentMsg::TaskStatus(status("t1", TaskState::Running))
        );
        until("connected", || metrics.manager_connected.get() == 1).await;
        assert!(
            state.managers().unwrap().is_empty(),
            "a follower's hint is not kept"
        );

        agent.abort();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn the_leaders_list_of_managers_is_kept_and_used_after_a_restart() {
        let (root, state) = temp_state("managers");
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_ca, tls, creds) = pki("node-abc", Duration::from_secs(3600));
        let flags = vec![addr(&first)];
        let (outbox, outgoing) = Outbox::new();
        let (tx, _assignments) = watch::channel(Assignment::default());
        let conn = node1(&first, &state, creds.clone(), &outbox, outgoing, tx);
        let agent = tokio::spawn(conn.run());
        let (mut r, mut w) = accept(&first, &tls).await;
        assert!(matches!(next(&mut r).await, AgentMsg::Hello { .. }));
        write_frame(&mut w, &welcome()).await.unwrap();
        let listed = vec![addr(&first), addr(&second), "bad address".to_string()];
        write_frame(&mut w, &ManagerMsg::Managers { addrs: listed })
            .await
            .unwrap();
        let kept = vec![addr(&first), addr(&second)];
        until("the managers kept", || state.managers().unwrap() == kept).await;

        // The agent restarts while the first manager is gone: it finds the second.
        agent.abort();
        drop((r, w, first));
        let managers = Managers::new(flags, state.managers().unwrap());
        let (outbox, outgoing) = Outbox::new();
        let (tx, _assignments) = watch::channel(Assignment::default());
        let conn = node1_of(managers, &state, creds, &outbox, outgoing, tx);
        let metrics = conn.metrics.clone();
        let agent = tokio::spawn(conn.run());
        let (mut r, mut w) = accept(&second, &tls).await;
        assert!(matches!(next(&mut r).await, AgentMsg::Hello { .. }));
        write_frame(&mut w, &welcome()).await.unwrap();
        until("connected", || metrics.manager_connected.get() == 1).await;

        agent.abort();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
