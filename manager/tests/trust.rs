//! End to end, without root: the cluster's trust against the real mesh-manager binary on
//! loopback. Every test has its own data dir, ports and manager (killed when dropped), and
//! plays the part of a node, meshctl or an attacker with the real wire protocols: join tokens,
//! mutual TLS on the agent port and the TCP API, the owner-only Unix socket, and the bounds on
//! what unauthenticated or idle peers can hold of the manager.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use proto::agent::{AgentMsg, ManagerMsg};
use proto::api::{NodeInfo, Request, Response, ServiceSpec, TaskInfo};
use proto::model::{PortConfig, Protocol, PublishMode, Role, TaskState};

use common::{free_port, tls_to, Conn, TempDir, Tls};

/// How long any single read from the manager may take before a test gives up on it.
/// How long a test polls for something that must happen "soon".
const DEADLINE: Duration = Duration::from_secs(10);

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The manager process; killed when dropped, so a failing test leaves nothing running.
struct Manager {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    port: u16,
    api_port: Option<u16>,
}

impl Manager {
    /// A manager on 127.0.0.1 with an agent port and, with `tcp_api`, a TCP API port.
    fn start(dir: &Path, tcp_api: bool) -> Manager {
        let api_port = tcp_api.then(free_port);
        Manager::start_on(dir, free_port(), api_port, "first")
    }

    fn start_on(dir: &Path, port: u16, api_port: Option<u16>, run: &str) -> Manager {
        let log = dir.join(format!("manager-{run}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-manager"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .args(["--log-format", "json"])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(api) = api_port {
            cmd.arg("--api-listen").arg(format!("127.0.0.1:{api}"));
        }
        let child = cmd.spawn().expect("start mesh-manager");
        let m = Manager {
            child,
            dir: dir.to_path_buf(),
            log,
            port,
            api_port,
        };
        m.wait_for(
            || UnixStream::connect(dir.join("api.sock")).is_ok(),
            "the API socket",
        );
        m.wait_for(
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "the agent port",
        );
        if let Some(api) = api_port {
            m.wait_for(
                || TcpStream::connect(("127.0.0.1", api)).is_ok(),
                "the TCP API port",
            );
        }
        m
    }

    /// Kills the manager and starts it again on the same data dir and ports.
    fn restart(mut self) -> Manager {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        Manager::start_on(&self.dir, self.port, self.api_port, "again")
    }

    fn wait_for(&self, ready: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "{what} never came up; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn api_port(&self) -> u16 {
        self.api_port.expect("started with a TCP API")
    }

    fn api(&self) -> Conn<UnixStream> {
        Conn::unix(&self.dir.join("api.sock"))
    }

    /// One request on a new API connection.
    fn call(&self, req: Request) -> Response {
        self.api().call(req)
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        match self.call(Request::NodeLs) {
            Response::Nodes { nodes } => nodes,
            other => panic!("node ls: {other:?}"),
        }
    }

    fn token(&self, role: Role, rotate: bool) -> String {
        match self.call(Request::JoinToken { role, rotate }) {
            Response::JoinToken { token, .. } => token,
            other => panic!("join-token: {other:?}"),
        }
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data().join("tls/ca.pem")).unwrap()
    }

    /// The admin bundle the manager writes for meshctl --tls-dir.
    fn admin(&self) -> trust::Credentials {
        trust::Credentials::load_client(&self.data().join("client")).unwrap()
    }

    /// Joins through the real join protocol (trust::join::join) with `token`.
    fn join_with(
        &self,
        token: &str,
        hostname: &str,
        addr: &str,
    ) -> Result<(String, trust::Credentials), trust::Error> {
        let token: trust::JoinToken = token.parse().unwrap();
        block_on(trust::join::join(
            &self.addr(),
            &token,
            hostname,
            addr.parse().unwrap(),
        ))
    }

    /// Joins with the current worker token; panics if refused.
    fn join(&self, hostname: &str, addr: &str) -> (String, trust::Credentials) {
        let token = self.token(Role::Worker, false);
        self.join_with(&token, hostname, addr)
            .unwrap_or_else(|e| panic!("join {hostname}: {e}; log:\n{}", self.logs()))
    }

    /// An agent connection presenting `creds`, Hello answered with Welcome.
    fn agent(&self, creds: &trust::Credentials, hostname: &str, addr: &str) -> (Conn<Tls>, String) {
        let mut conn = Conn::tls(self.port, creds.client_config().unwrap());
        let id = conn.hello(hostname, addr).0;
        (conn, id)
    }

    fn vm_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn handshake(tls: &mut Tls) -> std::io::Result<()> {
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(())
}

/// A client that trusts the cluster's CA and shows no certificate.
fn no_cert(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    trust::tls::client_config(ca_pem, None).unwrap()
}

/// How a connection ended when read to the end.
#[derive(Debug, PartialEq)]
enum End {
    /// The peer closed it (EOF).
    Closed,
    /// A read failed: reset, a TLS alert, ...
    Failed(String),
    /// Still open after the deadline.
    Open,
}

/// Everything the peer sends until the connection ends or `within` passes.
fn read_rest<R: Read>(r: &mut R, within: Duration) -> (Vec<u8>, End) {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, End::Closed),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return (out, End::Open);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (out, End::Failed(e.to_string())),
        }
        if Instant::now() >= deadline {
            return (out, End::Open);
        }
    }
}

/// Asserts that what came back holds no state: no assignment, welcome, node or service.
fn assert_no_state(bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes).to_lowercase();
    for word in [
        "assign", "welcome", "nodes", "\"node\"", "services", "tasks", "joined", "\"ca\"",
    ] {
        assert!(
            !text.contains(word),
            "{what}: the manager sent {word}: {text}"
        );
    }
}

/// Trust tests also check what a connection does not carry.
trait ExpectClosed {
    fn expect_closed(&mut self, what: &str, allowed: impl Fn(&ManagerMsg) -> bool) -> usize;
}

impl<S: Read + Write> ExpectClosed for Conn<S> {
    /// Asserts that the manager closes the connection without sending anything more than the
    /// messages `allowed` accepts; returns how many it sent.
    fn expect_closed(&mut self, what: &str, allowed: impl Fn(&ManagerMsg) -> bool) -> usize {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = 0;
        loop {
            assert!(
                Instant::now() < deadline,
                "{what}: the connection stayed open"
            );
            match self.line() {
                Ok(None) => return seen,
                Ok(Some(line)) => {
                    let msg: ManagerMsg = proto::decode_frame(&line).unwrap_or_else(|e| {
                        panic!("{what}: {e}: {}", String::from_utf8_lossy(&line))
                    });
                    assert!(allowed(&msg), "{what}: the manager sent {msg:?}");
                    seen += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                // A reset or a TLS close without close_notify is a close too.
                Err(_) => return seen,
            }
        }
    }
}

/// The reason of a Refused, or a panic with what came instead.
fn refused(msg: ManagerMsg, what: &str) -> String {
    match msg {
        ManagerMsg::Refused { reason } => reason,
        other => panic!("{what}: expected Refused, got {other:?}"),
    }
}

/// Sends a Join with `token` on a TLS connection without a certificate (as a joining node's
/// second step does) and returns the answer; the connection must close after it.
fn raw_join(m: &Manager, token: &str, hostname: &str, addr: &str) -> ManagerMsg {
    let mut conn = Conn::tls(m.port, no_cert(&m.ca_pem()));
    conn.send(&AgentMsg::Join {
        version: proto::PROTOCOL_VERSION,
        token: token.into(),
        csr: trust::KeyRequest::generate().unwrap().csr_pem,
        hostname: hostname.into(),
        advertise_addr: addr.parse().unwrap(),
    });
    let answer = conn.recv();
    conn.expect_closed("after a join answer", |_| false);
    answer
}

fn tasks(m: &Manager, service: &str) -> Vec<TaskInfo> {
    match m.call(Request::ServicePs {
        service: service.into(),
    }) {
        Response::Tasks { tasks } => tasks,
        other => panic!("service ps: {other:?}"),
    }
}

fn services(m: &Manager) -> usize {
    match m.call(Request::ServiceLs) {
        Response::Services { services } => services.len(),
        other => panic!("service ls: {other:?}"),
    }
}

fn spec(name: &str, replicas: u64, ports: Vec<PortConfig>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: Default::default(),
        replicas,
        networks: vec![],
        constraints: vec![],
        command: vec!["hello-server".into(), "--port".into(), "8080".into()],
        ports,
        endpoint_mode: Default::default(),
        aliases: Default::default(),
        env: Default::default(),
        update_config: Default::default(),
        stop_grace_ms: 10_000,
        health: None,
    }
}

fn tcp_port(published: u16, mode: PublishMode) -> PortConfig {
    PortConfig {
        protocol: Protocol::Tcp,
        published,
        target: 8080,
        mode,
    }
}

fn error_of(resp: Response, what: &str) -> String {
    match resp {
        Response::Error { message } => message,
        other => panic!("{what} was accepted: {other:?}"),
    }
}

/// The same token with one bit of its secret flipped: well formed, never issued.
fn wrong_secret(token: &str) -> String {
    let mut t: trust::JoinToken = token.parse().unwrap();
    t.secret[15] ^= 1;
    t.to_string()
}

/// Opens a TCP connection from `from` (any 127/8 address) to 127.0.0.1:`port`.
fn tcp_from(rt: &tokio::runtime::Runtime, from: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::new(from, 0))?;
        let stream = s.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(std)
    })
}

/// Whether the peer has neither closed nor reset `s` (nothing is expected to arrive on it).
fn still_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn tcp_still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 4096,
        "this test needs 4096 open files, the hard limit is {}",
        lim.rlim_cur
    );
}

/// 1. A wrong token, another cluster's token, a malformed token, or a Hello without any
///    certificate: each is refused with a reason that says why, and the node gets nothing.
#[test]
fn a_node_without_a_valid_token_or_a_certificate_gets_nothing() {
    let tmp = TempDir::new("refused");
    let m = Manager::start(&tmp.0, false);
    let good = m.token(Role::Worker, false);

    // Well formed, this cluster's CA, a secret never issued: refused by the manager.
    match m.join_with(&wrong_secret(&good), "intruder", "127.0.0.5") {
        Err(trust::Error::Refused(reason)) => assert!(
            reason.contains("invalid join token") && reason.contains("never issued"),
            "{reason}"
        ),
        other => panic!("a wrong secret joined: {other:?}"),
    }

    // A token of another cluster: the node itself stops at the CA digest...
    let other_ca = trust::Ca::generate("another-cluster").unwrap();
    let foreign = trust::JoinToken::generate(other_ca.cert_pem())
        .unwrap()
        .to_string();
    match m.join_with(&foreign, "intruder", "127.0.0.5") {
        Err(trust::Error::CaMismatch(addr)) => assert_eq!(addr, m.addr()),
        other => panic!("another cluster's token joined: {other:?}"),
    }
    // ... and a node that sends it anyway is refused by the manager.
    let reason = refused(
        raw_join(&m, &foreign, "intruder", "127.0.0.5"),
        "a foreign token",
    );
    assert!(reason.contains("another cluster"), "{reason}");

    // The manager's token for the manager role with a wrong secret is no better.
    let manager_token = m.token(Role::Manager, false);
    let reason = refused(
        raw_join(&m, &wrong_secret(&manager_token), "intruder", "127.0.0.5"),
        "a wrong manager secret",
    );
    assert!(reason.contains("invalid join token"), "{reason}");

    // Not a token at all, and one cut short by a character.
    for bad in ["hunter2", &good[..good.len() - 1]] {
        let reason = refused(raw_join(&m, bad, "intruder", "127.0.0.5"), bad);
        assert!(
            reason.starts_with("invalid join token") && reason.contains("SWMTKN-1-"),
            "{reason}"
        );
    }

    // A Hello on TLS without a client certificate: refused, told to join, nothing else.
    let mut fake = Conn::tls(m.port, no_cert(&m.ca_pem()));
    let reason = refused(
        fake.hello_msg("intruder", "127.0.0.5", None),
        "a Hello without a certificate",
    );
    assert!(
        reason.contains("no certificate of this cluster") && reason.contains("join first"),
        "{reason}"
    );
    fake.expect_closed("after refusing a Hello without a certificate", |_| false);

    // A Heartbeat, a task report or a Renew without a certificate: likewise.
    for msg in [
        AgentMsg::Heartbeat,
        AgentMsg::Renew {
            csr: trust::KeyRequest::generate().unwrap().csr_pem,
        },
        AgentMsg::Applied { revision: 1 },
    ] {
        let mut fake = Conn::tls(m.port, no_cert(&m.ca_pem()));
        fake.send(&msg);
        let reason = refused(fake.recv(), &format!("{msg:?}"));
        assert!(
            reason.contains("no certificate of this cluster"),
            "{reason}"
        );
        fake.expect_closed("after refusing a message without a certificate", |_| false);
    }

    assert!(m.nodes().is_empty(), "a refused node was registered");
    // The refused tokens left the real one as it was: it still joins.
    let (id, creds) = m.join("node1", "127.0.0.1");
    let (mut agent, welcomed) = m.agent(&creds, "node1", "127.0.0.1");
    assert_eq!(welcomed, id);
    assert!(agent.assignment().tasks.is_empty());
    let nodes = m.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node.hostname, "node1");
}

/// 2. An agent pointed at another cluster's manager refuses it before it sends anything
///    secret, and neither manager registers it; certificates do not cross clusters.
#[test]
fn an_agent_refuses_the_manager_of_another_cluster() {
    let (tmp_a, tmp_b) = (TempDir::new("cluster-a"), TempDir::new("cluster-b"));
    let a = Manager::start(&tmp_a.0, false);
    let b = Manager::start(&tmp_b.0, false);
    assert_ne!(a.ca_pem(), b.ca_pem());

    let token_a = a.token(Role::Worker, false);
    let parsed: trust::JoinToken = token_a.parse().unwrap();
    match b.join_with(&token_a, "node2", "127.0.0.2") {
        Err(e @ trust::Error::CaMismatch(_)) => {
            assert!(!e.is_transient(), "a foreign CA is not worth retrying");
            assert!(e.to_string().contains(&b.addr()), "{e}");
        }
        other => panic!("joined the wrong cluster: {other:?}"),
    }
    // fetch_ca alone says the same.
    match block_on(trust::join::fetch_ca(&b.addr(), &parsed)) {
        Err(trust::Error::CaMismatch(_)) => {}
        other => panic!("fetch_ca against another cluster: {other:?}"),
    }
    assert!(b.nodes().is_empty(), "manager B registered a node");
    assert!(a.nodes().is_empty(), "manager A registered a node");

    // A node of cluster B cannot talk to manager A with B's certificate: A's CA did not
    // sign it, so the handshake (or the first read) fails and nothing comes back.
    let (_, creds_b) = b.join("node2", "127.0.0.2");
    let mut cross = tls_to(a.port, {
        // Trust A (so the client side would accept A), show B's certificate.
        trust::tls::client_config(&a.ca_pem(), Some((&creds_b.cert_pem, &creds_b.key_pem))).unwrap()
    });
    let hello = proto::encode_frame(&AgentMsg::Hello {
        version: proto::PROTOCOL_VERSION,
        hostname: "node2".into(),
        advertise_addr: "127.0.0.2".parse().unwrap(),
        gwbridge_subnet: None,
        esp: None,
    });
    let sent = handshake(&mut cross).and_then(|()| cross.write_all(&hello));
    let (bytes, end) = read_rest(&mut cross, DEADLINE);
    assert_ne!(end, End::Open, "a foreign certificate was kept talking");
    assert!(
        sent.is_err() || matches!(&end, End::Failed(e) if e.contains("alert")),
        "no TLS refusal of a foreign certificate: {sent:?} {end:?}"
    );
    assert_no_state(&bytes, "a foreign certificate");
    assert!(a.nodes().is_empty(), "manager A registered B's node");
    // Cluster B is fine with its own node.
    let (mut agent, _) = b.agent(&creds_b, "node2", "127.0.0.2");
    assert!(agent.assignment().tasks.is_empty());
}

/// 3. Cleartext to the agent port or the TCP API, TLS without a certificate to the TCP API, a
///    worker's certificate on the TCP API: none of them gets a byte of state. The admin bundle
///    does.
#[test]
fn cleartext_and_certificateless_clients_get_no_state() {
    let tmp = TempDir::new("cleartext");
    let m = Manager::start(&tmp.0, true);
    let (_, worker) = m.join("node2", "127.0.0.2");
    let (mut agent, _) = m.agent(&worker, "node2", "127.0.0.2");
    agent.assignment();

    // Cleartext Hello to the agent port, cleartext node ls to the API port.
    let hello = proto::encode_frame(&AgentMsg::Hello {
        version: proto::PROTOCOL_VERSION,
        hostname: "node2".into(),
        advertise_addr: "127.0.0.2".parse().unwrap(),
        gwbridge_subnet: None,
        esp: None,
    });
    let node_ls = proto::encode_frame(&Request::NodeLs);
    for (port, line, what) in [
        (m.port, &hello, "cleartext Hello to the agent port"),
        (m.api_port(), &node_ls, "cleartext node ls to the TCP API"),
    ] {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.write_all(line).unwrap();
        let (bytes, end) = read_rest(&mut s, DEADLINE);
        eprintln!(
            "{what}: {} bytes back, {end:?} after {:?}",
            bytes.len(),
            started.elapsed()
        );
        assert_ne!(end, End::Open, "{what}: the connection stayed open");
        assert_no_state(&bytes, what);
        // Nothing but a TLS alert record (content type 21) may come back.
        assert!(
            bytes.is_empty() || (bytes[0] == 0x15 && bytes.len() < 64),
            "{what}: {bytes:?}"
        );
        assert!(
            proto::decode_frame::<Response>(&bytes).is_err()
                && proto::decode_frame::<ManagerMsg>(&bytes).is_err(),
            "{what}: a frame came back"
        );
    }

    // TLS without a certificate to the TCP API: the handshake fails, or an Error saying it
    // needs a certificate; never a Response with data.
    let mut anon = Conn::tls(m.api_port(), no_cert(&m.ca_pem()));
    let shook = handshake(anon.stream.get_mut());
    let wrote = shook.as_ref().ok().map(|()| {
        let w = anon.stream.get_mut();
        w.write_all(&node_ls).and_then(|()| w.flush())
    });
    let (bytes, end) = read_rest(&mut anon.stream, DEADLINE);
    eprintln!("TLS without a certificate to the TCP API: handshake {shook:?}, write {wrote:?}, {end:?}, {} bytes", bytes.len());
    assert_ne!(end, End::Open, "a client without a certificate was served");
    assert_no_state(&bytes, "TLS without a certificate to the TCP API");
    if !bytes.is_empty() {
        let message = error_of(
            proto::decode_frame(&bytes).unwrap(),
            "node ls without a certificate",
        );
        assert!(message.contains("certificate"), "{message}");
    } else {
        let refused_in_tls = shook.is_err()
            || matches!(wrote, Some(Err(_)))
            || matches!(&end, End::Failed(e) if e.contains("CertificateRequired") || e.contains("alert"));
        assert!(
            refused_in_tls,
            "no TLS refusal: {shook:?} {wrote:?} {end:?}"
        );
    }

    // A worker node's certificate on the TCP API: an Error, and nothing else.
    let mut as_worker = Conn::tls(m.api_port(), worker.client_config().unwrap());
    as_worker.send(&Request::NodeLs);
    let message = error_of(as_worker.recv(), "node ls with a worker certificate");
    assert!(
        message.contains("needs an admin or manager certificate"),
        "{message}"
    );
    let (bytes, end) = read_rest(&mut as_worker.stream, DEADLINE);
    assert_ne!(end, End::Open, "the worker's API connection stayed open");
    assert_no_state(&bytes, "a worker certificate on the TCP API");

    // The admin bundle works, on the same port.
    let mut admin = Conn::tls(m.api_port(), m.admin().client_config().unwrap());
    match admin.call(Request::NodeLs) {
        Response::Nodes { nodes } => {
            assert_eq!(nodes.len(), 1);
            assert_eq!(nodes[0].node.hostname, "node2");
        }
        other => panic!("node ls with the admin bundle: {other:?}"),
    }
    // And the agent that was connected all along was not disturbed.
    agent.send(&AgentMsg::Heartbeat);
    assert_eq!(m.nodes()[0].node.status, proto::model::NodeStatus::Ready);
}

/// 4a. A service create over the TCP API without the right certificate creates nothing.
#[test]
fn an_unauthenticated_service_create_over_tcp_changes_nothing() {
    let tmp = TempDir::new("svc-create");
    let m = Manager::start(&tmp.0, true);
    let (_, worker) = m.join("node2", "127.0.0.2");
    let create = proto::encode_frame(&Request::ServiceCreate {
        spec: spec("evil", 1, vec![tcp_port(2222, PublishMode::Ingress)]),
    });

    // Cleartext.
    let mut plain = TcpStream::connect(("127.0.0.1", m.api_port())).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    plain.write_all(&create).unwrap();
    let (bytes, end) = read_rest(&mut plain, DEADLINE);
    assert_ne!(end, End::Open);
    assert!(!String::from_utf8_lossy(&bytes).contains("evil"));

    // TLS, no certificate.
    let mut anon = tls_to(m.api_port(), no_cert(&m.ca_pem()));
    let _ = handshake(&mut anon).and_then(|()| anon.write_all(&create));
    let (bytes, end) = read_rest(&mut anon, DEADLINE);
    assert_ne!(end, End::Open);
    assert!(!String::from_utf8_lossy(&bytes).contains("evil"));

    // TLS with a worker's certificate.
    let mut as_worker = Conn::tls(m.api_port(), worker.client_config().unwrap());
    as_worker.stream.get_mut().write_all(&create).unwrap();
    let message = error_of(as_worker.recv(), "service create with a worker certificate");
    assert!(message.contains("may not use the API"), "{message}");

    // Nothing was created, nothing published; the admin can create the same service.
    assert_eq!(services(&m), 0, "a service was created");
    match m.call(Request::PublishLs) {
        Response::Ports { ports } => assert!(ports.is_empty(), "{ports:?}"),
        other => panic!("publish ls: {other:?}"),
    }
    let mut admin = Conn::tls(m.api_port(), m.admin().client_config().unwrap());
    admin.stream.get_mut().write_all(&create).unwrap();
    match admin.recv() {
        Response::Service { service } => assert_eq!(service.spec.name, "evil"),
        other => panic!("the admin's service create: {other:?}"),
    }
    assert_eq!(services(&m), 1);
}

/// 4b. A fake agent: no certificate, or a joined node's certificate claiming another node's
///     hostname. Neither registers nor takes anything over.
#[test]
fn a_fake_agent_cannot_register_or_take_over_a_node() {
    let tmp = TempDir::new("fake-agent");
    let m = Manager::start(&tmp.0, false);
    let (id_a, creds_a) = m.join("alpha", "127.0.0.2");
    let (id_b, creds_b) = m.join("beta", "127.0.0.3");
    let (mut alpha, welcomed) = m.agent(&creds_a, "alpha", "127.0.0.2");
    assert_eq!(welcomed, id_a);
    assert!(alpha.assignment().tasks.is_empty());

    // A plain Hello without a certificate, claiming alpha.
    let mut fake = Conn::tls(m.port, no_cert(&m.ca_pem()));
    let reason = refused(
        fake.hello_msg("alpha", "127.0.0.66", None),
        "a Hello without a certificate",
    );
    assert!(
        reason.contains("no certificate of this cluster"),
        "{reason}"
    );
    fake.expect_closed("the fake agent", |_| false);

    // beta's certificate, claiming alpha's hostname (and another address).
    let mut takeover = Conn::tls(m.port, creds_b.client_config().unwrap());
    let reason = refused(
        takeover.hello_msg("alpha", "127.0.0.66", None),
        "a Hello with another node's hostname",
    );
    assert!(
        reason.contains("a node named alpha is already in the cluster"),
        "{reason}"
    );
    takeover.expect_closed("the takeover", |_| false);

    // Joining again under alpha's hostname is refused too.
    let reason = refused(
        raw_join(&m, &m.token(Role::Worker, false), "alpha", "127.0.0.66"),
        "a join with a taken hostname",
    );
    assert!(reason.contains("already in the cluster"), "{reason}");

    // alpha keeps its id, address and session; beta is what it joined as.
    let nodes = m.nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let by_id = |id: &str| nodes.iter().find(|n| n.node.id == id).unwrap().node.clone();
    let (a, b) = (by_id(&id_a), by_id(&id_b));
    assert_eq!(
        (a.hostname.as_str(), a.addr.to_string()),
        ("alpha", "127.0.0.2".into())
    );
    assert_eq!(a.status, proto::model::NodeStatus::Ready);
    assert_eq!(
        (b.hostname.as_str(), b.addr.to_string()),
        ("beta", "127.0.0.3".into())
    );
    let Response::Service { .. } = m.call(Request::ServiceCreate {
        spec: ServiceSpec {
            constraints: vec![proto::model::Constraint::parse("node.hostname==alpha").unwrap()],
            ..spec("web", 1, vec![])
        },
    }) else {
        panic!("service create")
    };
    let a = alpha.assignment_with(1);
    assert_eq!(a.tasks[0].service_name, "web");
    // beta, under its own name, is welcome.
    let (_, welcomed) = m.agent(&creds_b, "beta", "127.0.0.3");
    assert_eq!(welcomed, id_b);
}

/// Sends up to `total` bytes without a newline; returns what the socket took and whether the
/// manager cut the connection.
fn flood(w: &mut impl Write, total: usize) -> (usize, bool) {
    let chunk = vec![b'x'; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        match w.write(&chunk[..n]) {
            Ok(0) => return (sent, true),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Timed out: the manager stopped reading; anything else: it closed the connection.
            Err(e) => return (sent, e.kind() != std::io::ErrorKind::WouldBlock),
        }
    }
    (sent, false)
}

const FLOOD_BYTES: usize = 60 * 1024 * 1024;
const MAX_GROWTH_KB: u64 = 80 * 1024;

/// Six connections flood the manager with `connect`, while the API answers and a real node
/// joins and says Hello; returns (RSS before, peak after, RSS after) in kB.
fn flood_six(
    m: &Manager,
    what: &str,
    connect: impl Fn() -> Box<dyn Write + Send> + Sync,
) -> (u64, u64, u64) {
    let rss_before = m.vm_kb("VmRSS");
    let hwm_before = m.vm_kb("VmHWM");
    let started = Barrier::new(7);
    let cut = std::thread::scope(|scope| {
        let floods: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let mut w = connect();
                    started.wait();
                    flood(&mut w, FLOOD_BYTES)
                })
            })
            .collect();
        started.wait();
        // Meanwhile, meshctl gets answers and a new node joins and connects.
        let t = Instant::now();
        assert!(matches!(m.call(Request::NodeLs), Response::Nodes { .. }));
        eprintln!(
            "{what}: node ls answered in {:?} during the flood",
            t.elapsed()
        );
        let hostname = format!("fresh-{}", m.nodes().len());
        let (id, creds) = m.join(&hostname, "127.0.0.9");
        let (mut agent, welcomed) = m.agent(&creds, &hostname, "127.0.0.9");
        assert_eq!(welcomed, id);
        agent.assignment();
        eprintln!(
            "{what}: join + hello done in {:?} during the flood",
            t.elapsed()
        );
        floods
            .into_iter()
            .map(|f| f.join().unwrap())
            .collect::<Vec<_>>()
    });
    let hwm_after = m.vm_kb("VmHWM");
    let rss_after = m.vm_kb("VmRSS");
    eprintln!(
        "{what}: VmRSS {rss_before} kB before, {rss_after} kB after; VmHWM {hwm_before} kB before, {hwm_after} kB after; peak growth {} kB; sent per connection (bytes, cut): {cut:?}",
        hwm_after.saturating_sub(rss_before)
    );
    // Cut early: well before the manager could have read a whole agent frame (what it
    // buffers is bounded by what it reads; the rest sits in socket buffers).
    assert!(
        cut.iter()
            .all(|&(sent, cut)| cut && sent < proto::AGENT_FRAME_BYTES),
        "{what}: the manager read too much of a line before a Hello: {cut:?}"
    );
    assert!(
        hwm_after.saturating_sub(rss_before) < MAX_GROWTH_KB,
        "{what}: the manager grew from {rss_before} kB to a peak of {hwm_after} kB"
    );
    (rss_before, hwm_after, rss_after)
}

/// 4c. Six connections without a certificate that each send 60 MiB without a newline before
///     any request: the manager's memory stays bounded and it keeps serving.
#[test]
fn endless_lines_before_hello_keep_the_manager_small() {
    let tmp = TempDir::new("flood");
    let m = Manager::start(&tmp.0, false);
    let ca = m.ca_pem();
    // Warm up (a join and a session) so the baseline is the manager at work.
    let (_, creds) = m.join("node1", "127.0.0.1");
    let (mut agent, _) = m.agent(&creds, "node1", "127.0.0.1");
    agent.assignment();
    flood_six(&m, "TLS without a certificate", || {
        let mut s = tls_to(m.port, no_cert(&ca));
        s.sock
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        handshake(&mut s).unwrap();
        Box::new(s)
    });
    flood_six(&m, "cleartext", || {
        let s = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        Box::new(s)
    });
    // The session that was open all along still works.
    agent.send(&AgentMsg::Heartbeat);
    assert!(m
        .nodes()
        .iter()
        .all(|n| n.node.status == proto::model::NodeStatus::Ready));
}

/// 4c, by a joined node: its certificate passes the handshake, but until its Hello it is no
/// more than an unauthenticated peer and must cost as little.
#[test]
fn endless_lines_before_hello_from_a_node_certificate_keep_the_manager_small() {
    let tmp = TempDir::new("flood-cert");
    let m = Manager::start(&tmp.0, false);
    let (_, creds) = m.join("node2", "127.0.0.2");
    let config = creds.client_config().unwrap();
    let (mut agent, _) = m.agent(&creds, "node2", "127.0.0.2");
    agent.assignment();
    flood_six(&m, "a node's certificate", || {
        let mut s = tls_to(m.port, config.clone());
        s.sock
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        handshake(&mut s).unwrap();
        Box::new(s)
    });
}

/// 4d. 1100 idle connections on the API socket and 1100 on the TCP API (from another
///     address): meshctl still gets answers within seconds, a node still joins and connects,
///     and a change is still saved.
#[test]
fn idle_connections_do_not_lock_out_meshctl_agents_or_saves() {
    raise_fd_limit();
    let tmp = TempDir::new("idle");
    let m = Manager::start(&tmp.0, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let t = Instant::now();
    let unix: Vec<UnixStream> = (0..1100)
        .map(|_| UnixStream::connect(tmp.0.join("api.sock")).unwrap())
        .collect();
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let mut refused_at_connect = 0;
    let tcp: Vec<TcpStream> = (0..1100)
        .filter_map(|_| match tcp_from(&rt, attacker, m.api_port()) {
            Ok(s) => Some(s),
            Err(_) => {
                refused_at_connect += 1;
                None
            }
        })
        .collect();
    eprintln!(
        "opened {} idle Unix and {} idle TCP API connections ({refused_at_connect} TCP connects failed) in {:?}",
        unix.len(),
        tcp.len(),
        t.elapsed()
    );

    // meshctl on the socket, on a new connection.
    let t = Instant::now();
    assert!(matches!(m.call(Request::NodeLs), Response::Nodes { .. }));
    let unix_latency = t.elapsed();
    // meshctl over TCP with the admin bundle, from the manager's own address.
    let t = Instant::now();
    let mut admin = Conn::tls(m.api_port(), m.admin().client_config().unwrap());
    assert!(matches!(
        admin.call(Request::NodeLs),
        Response::Nodes { .. }
    ));
    let tcp_latency = t.elapsed();
    // A new node joins and connects.
    let t = Instant::now();
    let (id, creds) = m.join("node1", "127.0.0.1");
    let (mut agent, welcomed) = m.agent(&creds, "node1", "127.0.0.1");
    assert_eq!(welcomed, id);
    agent.assignment();
    let join_latency = t.elapsed();
    // A change is saved.
    let t = Instant::now();
    match m.call(Request::NetworkCreate {
        name: "backend".into(),
        driver: "overlay".into(),
        subnet: Some("10.0.9.0/24".into()),
        options: Default::default(),
    }) {
        Response::Network { network } => assert_eq!(network.network.name, "backend"),
        other => panic!(
            "network create during the flood: {other:?}; log:\n{}",
            m.logs()
        ),
    }
    let save_latency = t.elapsed();
    eprintln!(
        "with the idle connections open: node ls over the socket {unix_latency:?}, over TCP {tcp_latency:?}; join + hello {join_latency:?}; network create {save_latency:?}"
    );
    for (what, took) in [
        ("node ls over the socket", unix_latency),
        ("node ls over TCP", tcp_latency),
        ("join + hello", join_latency),
        ("network create", save_latency),
    ] {
        assert!(took < Duration::from_secs(3), "{what} took {took:?}");
    }
    // In the snapshot or in the journal of changes since.
    let state = ["state.json", "state.journal"]
        .map(|f| std::fs::read_to_string(m.data().join(f)).unwrap_or_default())
        .concat();
    assert!(state.contains("\"backend\""), "the network was not saved");

    // The TCP API took at most 16 handshakes from the one address (MAX_PENDING_PER_PEER),
    // closing the rest at accept.
    let deadline = Instant::now() + DEADLINE;
    let open = loop {
        let open = tcp.iter().filter(|s| tcp_still_open(s)).count();
        if open <= 16 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{open} of the idle TCP API connections from 127.0.0.2 are still open");
    assert!(
        open <= 16,
        "{open} pending TCP API handshakes from one address"
    );
    drop((unix, tcp));
}

/// 4d, the bound itself: the API keeps at most MAX_API_CONNS (128) connections, closing the
/// longest idle to make room, also when 1100 arrive at once.
#[test]
fn a_burst_of_idle_api_connections_is_capped() {
    raise_fd_limit();
    let tmp = TempDir::new("idle-cap");
    let m = Manager::start(&tmp.0, false);
    let unix: Vec<UnixStream> = (0..1100)
        .map(|_| UnixStream::connect(tmp.0.join("api.sock")).unwrap())
        .collect();
    assert!(matches!(m.call(Request::NodeLs), Response::Nodes { .. }));
    let deadline = Instant::now() + DEADLINE;
    let open = loop {
        let open = unix.iter().filter(|s| still_open(s)).count();
        if open <= 130 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{open} of the 1100 idle socket connections are still open");
    assert!(
        open <= 130,
        "the manager holds {open} idle API connections, more than its cap of 128"
    );
}

/// Idle connections that never start a TLS handshake, from many addresses (16 each, the
/// per-address cap): agents, joining nodes and meshctl over TCP must still get through.
#[test]
fn idle_handshakes_from_many_addresses_do_not_lock_out_agents_or_meshctl() {
    raise_fd_limit();
    let tmp = TempDir::new("pending");
    let m = Manager::start(&tmp.0, true);
    let (id, creds) = m.join("node1", "127.0.0.1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut idle = Vec::new();
    for host in 2..=18u8 {
        for _ in 0..16 {
            for port in [m.port, m.api_port()] {
                idle.push(tcp_from(&rt, IpAddr::from([127, 0, 0, host]), port).unwrap());
            }
        }
    }
    // Wait until the manager holds them: 256 pending handshakes on each listener.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
            .unwrap()
            .count()
    };
    let deadline = Instant::now() + DEADLINE;
    while fds() < 2 * 256 {
        assert!(Instant::now() < deadline, "the manager holds {} fds", fds());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{} idle connections from 17 addresses", idle.len());

    let mut locked_out = Vec::new();
    // node1's agent reconnects.
    let mut agent = Conn::tls(m.port, creds.client_config().unwrap());
    match handshake(agent.stream.get_mut()) {
        Ok(()) => assert_eq!(agent.hello("node1", "127.0.0.1").0, id),
        Err(e) => locked_out.push(format!("node1's agent: {e}")),
    }
    // A new node joins (its token comes over the socket, which has no such cap).
    let token: trust::JoinToken = m.token(Role::Worker, false).parse().unwrap();
    if let Err(e) = block_on(trust::join::join(
        &m.addr(),
        &token,
        "node2",
        "127.0.0.20".parse().unwrap(),
    )) {
        locked_out.push(format!("joining node2: {e}"));
    }
    // meshctl over TCP with the admin bundle.
    let mut admin = Conn::tls(m.api_port(), m.admin().client_config().unwrap());
    match handshake(admin.stream.get_mut()) {
        Ok(()) => assert!(matches!(
            admin.call(Request::NodeLs),
            Response::Nodes { .. }
        )),
        Err(e) => locked_out.push(format!("meshctl over TCP: {e}")),
    }
    assert!(locked_out.is_empty(), "turned away: {locked_out:#?}");
    drop(idle);
}

/// 4e. The TCP API's port cannot be published, by create or by update, in either mode.
#[test]
fn the_tcp_api_port_cannot_be_published() {
    let tmp = TempDir::new("publish-api");
    let m = Manager::start(&tmp.0, true);
    let api = m.api_port();
    for mode in [PublishMode::Ingress, PublishMode::Host] {
        let message = error_of(
            m.call(Request::ServiceCreate {
                spec: spec("web", 1, vec![tcp_port(api, mode)]),
            }),
            "publishing the API port",
        );
        assert!(
            message.contains(&format!("port {api}/tcp is reserved"))
                && message.contains("serves its API"),
            "{message}"
        );
    }
    assert_eq!(services(&m), 0);
    let Response::Service { .. } = m.call(Request::ServiceCreate {
        spec: spec("web", 1, vec![tcp_port(8088, PublishMode::Ingress)]),
    }) else {
        panic!("service create")
    };
    let message = error_of(
        m.call(Request::ServiceUpdate {
            service: "web".into(),
            publish_add: vec![tcp_port(api, PublishMode::Ingress)],
            publish_rm: vec![],
            endpoint_mode: None,
            spec: Default::default(),
        }),
        "publish_add of the API port",
    );
    assert!(message.contains("serves its API"), "{message}");
    match m.call(Request::PublishLs) {
        Response::Ports { ports } => {
            let published: Vec<u16> = ports.iter().map(|p| p.port.published).collect();
            assert_eq!(published, [8088]);
        }
        other => panic!("publish ls: {other:?}"),
    }
    // The same number over UDP is nobody's: it may be published.
    let Response::Service { .. } = m.call(Request::ServiceUpdate {
        service: "web".into(),
        publish_add: vec![PortConfig {
            protocol: Protocol::Udp,
            ..tcp_port(api, PublishMode::Ingress)
        }],
        publish_rm: vec![],
        endpoint_mode: None,
        spec: Default::default(),
    }) else {
        panic!("publishing {api}/udp was refused")
    };
}

/// 5. `node rm`: refused for a ready node without --force; with it, the node's session ends,
///    its certificate is refused from then on, and its task is replaced elsewhere.
#[test]
fn a_removed_node_is_cut_off_and_its_tasks_move() {
    let tmp = TempDir::new("node-rm");
    let m = Manager::start(&tmp.0, false);
    let (id1, c1) = m.join("node1", "127.0.0.1");
    let (id2, c2) = m.join("node2", "127.0.0.2");
    let (mut a1, _) = m.agent(&c1, "node1", "127.0.0.1");
    let (mut a2, _) = m.agent(&c2, "node2", "127.0.0.2");
    a1.assignment();
    a2.assignment();
    let Response::Service { .. } = m.call(Request::ServiceCreate {
        spec: spec("web", 2, vec![]),
    }) else {
        panic!("service create; log:\n{}", m.logs())
    };
    let on1 = a1.assignment_with(1);
    let on2 = a2.assignment_with(1);
    a1.report_running(&on1);
    a2.report_running(&on2);
    let deadline = Instant::now() + DEADLINE;
    while tasks(&m, "web")
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "tasks never ran");
        std::thread::sleep(Duration::from_millis(20));
    }

    let message = error_of(
        m.call(Request::NodeRm {
            node: "node2".into(),
            force: false,
        }),
        "node rm of a ready node without --force",
    );
    assert!(message.contains("node2 is ready"), "{message}");
    assert_eq!(m.nodes().len(), 2);

    match m.call(Request::NodeRm {
        node: "node2".into(),
        force: true,
    }) {
        Response::Removed { id } => assert_eq!(id, id2),
        other => panic!("node rm --force: {other:?}"),
    }
    // Its session ends; it is told nothing new on the way out.
    a2.expect_closed(
        "node2's session after node rm",
        |msg| matches!(msg, ManagerMsg::Assign(a) if a.tasks.len() <= 1),
    );
    let nodes = m.nodes();
    assert_eq!(
        nodes.iter().map(|n| n.node.id.as_str()).collect::<Vec<_>>(),
        [id1.as_str()]
    );

    // Its certificate still passes TLS (the CA signed it) but the node is revoked.
    let mut again = Conn::tls(m.port, c2.client_config().unwrap());
    let reason = refused(
        again.hello_msg("node2", "127.0.0.2", None),
        "a removed node's Hello",
    );
    assert!(reason.contains("removed"), "{reason}");
    again.expect_closed("a removed node's reconnection", |_| false);
    // Under another hostname too: the certificate names the node, not the Hello.
    let mut renamed = Conn::tls(m.port, c2.client_config().unwrap());
    let reason = refused(
        renamed.hello_msg("node3", "127.0.0.3", None),
        "a removed node, renamed",
    );
    assert!(reason.contains("removed"), "{reason}");
    assert_eq!(m.nodes().len(), 1, "the removed node came back");

    // Both slots end up on node1.
    let on1 = a1.assignment_with(2);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ts = tasks(&m, "web");
        let current: Vec<&TaskInfo> = ts
            .iter()
            .filter(|t| t.desired_state == TaskState::Running)
            .collect();
        let mut slots: Vec<u64> = current.iter().map(|t| t.slot).collect();
        slots.sort_unstable();
        if slots == [1, 2] && current.iter().all(|t| t.node_id.as_deref() == Some(&id1)) {
            // The task that ran on node2 is history, with the reason.
            let old = ts
                .iter()
                .find(|t| t.node_id.as_deref() == Some(&id2))
                .expect("node2's task is kept as history");
            assert_eq!(old.desired_state, TaskState::Shutdown);
            assert!(
                old.error.as_deref().unwrap_or("").contains("removed"),
                "{old:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node2's task never moved: {ts:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(on1.tasks.len(), 2);
}

/// 5, for a manager node: removing it also revokes its certificate on the TCP API, which
/// manager certificates may otherwise use.
#[test]
fn a_removed_managers_certificate_no_longer_opens_the_api() {
    let tmp = TempDir::new("rm-manager");
    let m = Manager::start(&tmp.0, true);
    let manager_token = m.token(Role::Manager, false);
    let (id, creds) = m.join_with(&manager_token, "m2", "127.0.0.3").unwrap();
    let (mut agent, _) = m.agent(&creds, "m2", "127.0.0.3");
    agent.assignment();
    let mut api = Conn::tls(m.api_port(), creds.client_config().unwrap());
    assert!(
        matches!(api.call(Request::NodeLs), Response::Nodes { .. }),
        "a manager certificate may use the API"
    );
    match m.call(Request::NodeRm {
        node: "m2".into(),
        force: true,
    }) {
        Response::Removed { id: removed } => assert_eq!(removed, id),
        other => panic!("node rm --force: {other:?}"),
    }
    let mut after = Conn::tls(m.api_port(), creds.client_config().unwrap());
    after.send(&Request::NodeLs);
    let (bytes, _) = read_rest(&mut after.stream, Duration::from_secs(2));
    assert_no_state(&bytes, "a removed manager's certificate on the TCP API");
}

/// 6. Rotating the worker token: the old one no longer joins, the new one does, and nodes that
///    joined before keep connecting with their certificates, also after a restart.
#[test]
fn a_rotated_token_no_longer_joins_but_joined_nodes_stay() {
    let tmp = TempDir::new("rotate");
    let m = Manager::start(&tmp.0, false);
    let old = m.token(Role::Worker, false);
    let manager_token = m.token(Role::Manager, false);
    let (id, creds) = m
        .join_with(&old, "node2", "127.0.0.2")
        .expect("join with the first token");
    let (mut agent, _) = m.agent(&creds, "node2", "127.0.0.2");
    agent.assignment();

    let new = m.token(Role::Worker, true);
    assert_ne!(new, old);
    // Same cluster (CA digest), new secret.
    assert_eq!(new[..60], old[..60]);
    assert_eq!(
        m.token(Role::Worker, false),
        new,
        "the rotation did not stick"
    );
    assert_eq!(
        m.token(Role::Manager, false),
        manager_token,
        "rotating the worker token changed the manager token"
    );
    match m.join_with(&old, "node3", "127.0.0.3") {
        Err(trust::Error::Refused(reason)) => {
            assert!(reason.contains("rotated"), "{reason}")
        }
        other => panic!("the old token still joins: {other:?}"),
    }
    let (id3, _) = m
        .join_with(&new, "node3", "127.0.0.3")
        .expect("join with the new token");

    // The node that joined before reconnects with its certificate.
    drop(agent);
    let (mut agent, welcomed) = m.agent(&creds, "node2", "127.0.0.2");
    assert_eq!(welcomed, id);
    agent.assignment();
    drop(agent);

    // A restart keeps the rotation.
    let m = m.restart();
    assert_eq!(m.token(Role::Worker, false), new);
    match m.join_with(&old, "node4", "127.0.0.4") {
        Err(trust::Error::Refused(_)) => {}
        other => panic!("the old token joins after a restart: {other:?}"),
    }
    let (_, welcomed) = m.agent(&creds, "node2", "127.0.0.2");
    assert_eq!(welcomed, id);
    let mut ids: Vec<String> = m.nodes().into_iter().map(|n| n.node.id).collect();
    ids.sort();
    let mut want = vec![id, id3];
    want.sort();
    assert_eq!(ids, want);
}

/// 7. What gives control of the cluster is the owner's alone.
#[test]
fn secrets_and_the_api_socket_are_owner_only() {
    let tmp = TempDir::new("modes");
    let m = Manager::start(&tmp.0, true);
    // A save after start too (the first state is written at creation).
    let Response::Network { .. } = m.call(Request::NetworkCreate {
        name: "backend".into(),
        driver: "overlay".into(),
        subnet: None,
        options: Default::default(),
    }) else {
        panic!("network create")
    };
    let data = m.data();
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    for (path, want) in [
        (tmp.0.join("api.sock"), 0o600),
        (data.join("tls/ca-key.pem"), 0o600),
        (data.join("client/key.pem"), 0o600),
        (data.join("state.json"), 0o600),
        (data.join("tls"), 0o700),
        (data.join("client"), 0o700),
    ] {
        assert_eq!(mode(&path), want, "{} is {:o}", path.display(), mode(&path));
    }
    // Nothing else in the data dir holds a private key readable by others.
    for dir in [data.clone(), data.join("tls"), data.join("client")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text.contains("PRIVATE KEY") {
                    assert_eq!(
                        mode(&path) & 0o077,
                        0,
                        "{} is readable by others",
                        path.display()
                    );
                }
            }
        }
    }
}
