//! Lab tier (root, host kernel): the real `mesh-agent` binary in a throwaway node namespace,
//! against a fake manager played by this test (mutual TLS with a CA of its own; the node's
//! credentials are put in the agent's state dir, as a join would). It builds the overlay and runs the tasks;
//! after a crash it adopts them without breaking an established TCP connection between two
//! tasks, puts back what was deleted and removes what is stale; tasks that leave are stopped and
//! the overlay sandbox goes with the last of them.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netns::Netns;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::agent::{AgentMsg, Assignment, ManagerMsg, NetworkSpec, Peer, TaskSpec};
use proto::model::{endpoint_mac, Attachment, Role, TaskState};
use proto::wire::{read_frame, write_frame};
use proto::{decode_frame, PROTOCOL_VERSION};
use vxlan::{FdbOwner, LinkKind, RemotePeer, Sandbox};

const WAIT: Duration = Duration::from_secs(15);
const NET: &str = "labnet0123456789";
const SANDBOX: &str = "1-labnet0123";
const REMOTE: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(10, 0, 9, 9), Ipv4Addr::new(192, 168, 56, 12));

/// The node namespace, the agent and everything it made; all of it goes in `drop`, also when
/// the test panics.
struct Lab {
    dir: PathBuf,
    node: Netns,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agent: Option<Child>,
}

/// A CA, the manager's TLS side, and the node's credentials stored where the agent keeps them.
fn pki(state_dir: &Path) -> tokio_rustls::TlsAcceptor {
    let ca = trust::Ca::generate("lab").unwrap();
    let subject = |cn: &str, role| trust::Subject {
        common_name: cn.into(),
        role,
        cluster_id: "lab".into(),
    };
    let life = Duration::from_secs(3600);
    let (cert, key) = ca
        .issue(
            &subject("mesh-manager", trust::CertRole::Manager),
            &[],
            life,
        )
        .unwrap();
    let slot = trust::tls::CertSlot::new(trust::tls::certified_key(&cert, &key).unwrap());
    let config =
        trust::tls::server_config(ca.cert_pem(), slot, trust::tls::ClientAuth::Optional).unwrap();
    let (cert_pem, key_pem) = ca
        .issue(&subject("node-lab", trust::CertRole::Worker), &[], life)
        .unwrap();
    trust::Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    }
    .store_node(&state_dir.join("tls"))
    .unwrap();
    tokio_rustls::TlsAcceptor::from(config)
}

impl Lab {
    fn new() -> Lab {
        // Tests run in parallel, each lab in its own directory and node namespace.
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/run/meshnet-test-agent-{}-{n}",
            std::process::id()
        ));
        let node = Netns::create(&dir, "node").expect("create the node namespace");
        // The manager listens inside the node namespace, where the agent runs.
        let listener = node
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .expect("listen in the node namespace");
        listener.set_nonblocking(true).unwrap();
        let tls = pki(&dir.join("state"));
        Lab {
            dir,
            node,
            listener,
            tls,
            agent: None,
        }
    }

    fn netns_dir(&self) -> PathBuf {
        self.dir.join("state/netns")
    }

    fn ns(&self, name: &str) -> Netns {
        Netns::open(&self.netns_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[String]) {
        let port = self.listener.local_addr().unwrap().port();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
        cmd.args(["--manager", &format!("127.0.0.1:{port}")])
            .args([
                "--advertise-addr",
                "192.168.56.11",
                "--hostname",
                "lab-node",
            ])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args([
                "--mtu",
                "1450",
                "--reconcile-interval",
                "1",
                "--stop-grace-period",
                "1",
            ])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.agent = Some(self.node.spawn(&mut cmd).expect("start mesh-agent"));
    }

    /// Kills the agent as a crash would: no chance to clean up.
    fn crash_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill().unwrap();
            a.wait().unwrap();
        }
    }

    /// Accepts the agent's connection and plays the manager's side of the handshake.
    fn accept(&self) -> Manager {
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("the agent did not connect: {e}\n{}", self.log()),
            }
        };
        // The manager's side runs on its own thread: TLS in, decoded messages out to `rx`,
        // and whatever `send` queues written back.
        let (in_tx, rx) = mpsc::channel();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<ManagerMsg>();
        let acceptor = self.tls.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                stream.set_nonblocking(true).unwrap();
                let tcp = tokio::net::TcpStream::from_std(stream).unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (rd, mut wr) = tokio::io::split(tls);
                let mut rd = tokio::io::BufReader::new(rd);
                let mut buf = Vec::new();
                loop {
                    tokio::select! {
                        out = out_rx.recv() => {
                            let Some(msg) = out else { return };
                            if write_frame(&mut wr, &msg).await.is_err() {
                                return;
                            }
                        }
                        got = read_frame(&mut rd, &mut buf, proto::MAX_FRAME_BYTES) => {
                            if !matches!(got, Ok(true)) {
                                return;
                            }
                            let msg = decode_frame::<AgentMsg>(&buf).unwrap();
                            buf.clear();
                            if in_tx.send(msg).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        });
        let mut m = Manager { out: out_tx, rx };
        match m.wait_for(self, "hello", |msg| Some(msg.clone())) {
            AgentMsg::Hello {
                version, hostname, ..
            } => {
                assert_eq!((version, hostname.as_str()), (PROTOCOL_VERSION, "lab-node"))
            }
            other => panic!("expected hello, got {other:?}"),
        }
        m.send(&ManagerMsg::Welcome {
            version: PROTOCOL_VERSION,
            node_id: "node-lab".into(),
            role: Role::Worker,
        });
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn sandbox(&self) -> vxlan::Observed {
        Sandbox::open(&self.netns_dir(), SANDBOX)
            .and_then(|s| s.observe())
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    fn namespaces(&self) -> Vec<String> {
        netns::list(&self.netns_dir())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Waits until `f` holds, or fails with the agent's log.
    fn eventually(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting: {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.crash_agent();
        let dir = self.netns_dir();
        for path in netns::list(&dir).unwrap_or_default() {
            if let Ok(ns) = Netns::open(&path) {
                for pid in ns.pids().unwrap_or_default() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            let _ = netns::delete(&path);
        }
        let _ = netns::delete(self.node.path());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Manager {
    out: tokio::sync::mpsc::UnboundedSender<ManagerMsg>,
    rx: Receiver<AgentMsg>,
}

impl Manager {
    fn send(&mut self, msg: &ManagerMsg) {
        self.out.send(msg.clone()).unwrap();
    }

    /// The first message from the agent that `f` picks, skipping others.
    fn wait_for<T>(&self, lab: &Lab, what: &str, f: impl Fn(&AgentMsg) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => {
                    if let Some(t) = f(&msg) {
                        return t;
                    }
                }
                Err(_) => panic!("timed out waiting for {what}\n{}", lab.log()),
            }
        }
    }

    fn wait_status(&self, lab: &Lab, task_id: &str, state: TaskState) -> Option<u32> {
        self.wait_for(lab, &format!("{task_id} {state:?}"), |m| match m {
            AgentMsg::TaskStatus(s) if s.task_id == task_id && s.state == state => Some(s.pid),
            _ => None,
        })
    }

    fn wait_applied(&self, lab: &Lab, revision: u64) {
        self.wait_for(lab, &format!("applied {revision}"), |m| {
            (*m == AgentMsg::Applied { revision }).then_some(())
        })
    }
}

fn task(id: &str, ip: Ipv4Addr) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        name: format!("web.{id}.{id}"),
        service_id: "svc".into(),
        service_name: "web".into(),
        command: vec!["sleep".into(), "1000".into()],
        attachments: vec![Attachment {
            network_id: NET.into(),
            addr: format!("{ip}/24").parse().unwrap(),
            mac: endpoint_mac(ip),
        }],
    }
}

fn assignment(revision: u64, tasks: Vec<TaskSpec>) -> ManagerMsg {
    let networks = if tasks.is_empty() {
        vec![]
    } else {
        vec![NetworkSpec {
            id: NET.into(),
            name: "backend".into(),
            subnet: "10.0.9.0/24".parse().unwrap(),
            gateway: "10.0.9.1/24".parse().unwrap(),
            vni: 4096,
            peers: vec![Peer {
                ip: REMOTE.0,
                mac: endpoint_mac(REMOTE.0),
                vtep: IpAddr::V4(REMOTE.1),
            }],
            lb_addr: None,
            services: vec![],
        }]
    };
    ManagerMsg::Assign(Assignment {
        revision,
        networks,
        tasks,
        ..Assignment::default()
    })
}

fn has_remote_fdb(seen: &vxlan::Observed) -> bool {
    seen.fdb.iter().any(|e| {
        e.owner == FdbOwner::Device
            && e.dst == Some(REMOTE.1)
            && e.mac.to_string() == endpoint_mac(REMOTE.0)
    })
}

fn echo(client: &mut TcpStream, server: &mut TcpStream, word: &[u8]) {
    client.write_all(word).unwrap();
    let mut buf = vec![0; word.len()];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(buf, word);
}

#[test]
fn agent_builds_adopts_repairs_and_tears_down() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests build namespaces: run them as root"
    );
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 0, 9, 2), Ipv4Addr::new(10, 0, 9, 3));
    let (a, b) = (task("a", a_ip), task("b", b_ip));
    let mut lab = Lab::new();
    lab.start_agent();
    let mut m = lab.accept();
    m.send(&assignment(1, vec![a.clone(), b.clone()]));
    let pid_a = m.wait_status(&lab, "a", TaskState::Running).expect("a pid");
    let pid_b = m.wait_status(&lab, "b", TaskState::Running).expect("b pid");
    m.wait_applied(&lab, 1);

    let seen = lab.sandbox();
    let br = seen.link("br0").expect("br0");
    assert_eq!(br.addrs, ["10.0.9.1/24".parse().unwrap()]);
    let vx = seen.link("vxlan0").expect("vxlan0");
    assert!(
        matches!(vx.kind, LinkKind::Vxlan(v) if v.vni == 4096 && v.port == 4789 && v.underlay_elsewhere)
    );
    assert_eq!((vx.mtu, vx.master.as_deref()), (1450, Some("br0")));
    assert!(has_remote_fdb(&seen), "{seen:?}");
    assert_eq!(seen.endpoints().count(), 2);

    // A TCP connection from task b to task a, across the sandbox's bridge.
    let listener = lab
        .ns(&a.name)
        .run(|| TcpListener::bind(SocketAddr::from((a_ip, 7000))))
        .unwrap()
        .unwrap();
    let mut client = lab
        .ns(&b.name)
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((a_ip, 7000)), Duration::from_secs(3)))
        .unwrap()
        .expect("connect from b to a over the overlay");
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(b_ip));
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    echo(&mut client, &mut server, b"before");

    // Crash; meanwhile a peer entry is deleted and a stale namespace appears.
    lab.crash_agent();
    drop(m);
    Sandbox::open(&lab.netns_dir(), SANDBOX)
        .unwrap()
        .remove_peer("vxlan0", &RemotePeer::new(REMOTE.0, REMOTE.1))
        .unwrap();
    assert!(!has_remote_fdb(&lab.sandbox()));
    Netns::create(&lab.netns_dir(), "web.9.stale").unwrap();

    lab.start_agent();
    let mut m = lab.accept();
    // Before any new assignment: the tasks are adopted with the same processes.
    assert_eq!(m.wait_status(&lab, "a", TaskState::Running), Some(pid_a));
    assert_eq!(m.wait_status(&lab, "b", TaskState::Running), Some(pid_b));
    m.send(&assignment(1, vec![a.clone(), b.clone()]));
    m.wait_applied(&lab, 1);
    lab.eventually("the peer entry comes back", || {
        has_remote_fdb(&lab.sandbox())
    });
    lab.eventually("the stale namespace goes", || {
        !lab.namespaces().contains(&"web.9.stale".to_string())
    });
    echo(&mut client, &mut server, b"after the restart");
    echo(&mut server, &mut client, b"and back");

    // b leaves: stopped, then its namespace and endpoint go; a keeps running.
    m.send(&assignment(2, vec![a.clone()]));
    m.wait_status(&lab, "b", TaskState::Shutdown);
    lab.eventually("b's namespace goes", || !lab.namespaces().contains(&b.name));
    lab.eventually("b's endpoint goes", || {
        lab.sandbox().endpoints().count() == 1
    });
    assert!(Path::new(&format!("/proc/{pid_a}")).exists());
    assert!(
        !Path::new(&format!("/proc/{pid_b}/ns")).exists() || {
            // A zombie of an exited task stays until its parent (the crashed agent's parent) reaps it.
            std::fs::read_to_string(format!("/proc/{pid_b}/stat")).is_ok_and(|s| s.contains(") Z"))
        }
    );

    // The last task leaves: the overlay sandbox goes with it.
    m.send(&assignment(3, vec![]));
    m.wait_status(&lab, "a", TaskState::Shutdown);
    lab.eventually("every namespace goes", || lab.namespaces().is_empty());
}

// --- The embedded DNS resolver ---------------------------------------------------------------

const NET2: &str = "labnetB0123456789";

/// A fake upstream DNS server in the node namespace (where the agent forwards from), over UDP
/// and TCP: it answers `external.example.` with 192.0.2.1, everything else with NXDOMAIN, and
/// keeps the names it was asked. Its threads stop when it is dropped.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start(node: &Netns) -> Upstream {
        let (udp, tcp) = node
            .run(|| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let tcp = TcpListener::bind(udp.local_addr()?)?;
                Ok::<_, std::io::Error>((udp, tcp))
            })
            .unwrap()
            .unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let up = Upstream {
            addr: udp.local_addr().unwrap(),
            seen: Arc::default(),
            stop: Arc::default(),
        };
        let (seen, stop) = (up.seen.clone(), up.stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    if let Some(r) = Upstream::reply(&buf[..n], &seen) {
                        let _ = udp.send_to(&r, peer);
                    }
                }
            }
        });
        let (seen, stop) = (up.seen.clone(), up.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).is_err() {
                        break;
                    }
                    let Some(r) = Upstream::reply(&q, &seen) else {
                        break;
                    };
                    let mut out = (r.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&r);
                    let _ = s.write_all(&out);
                }
            }
        });
        up
    }

    fn reply(query: &[u8], seen: &Mutex<Vec<String>>) -> Option<Vec<u8>> {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::{rdata::A, RData, Record};
        let q = Message::from_vec(query).ok()?;
        let question = q.queries().first()?.clone();
        let name = question.name().to_ascii();
        seen.lock().unwrap().push(name.clone());
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .add_query(question.clone());
        if name == "external.example." {
            let a = RData::A(A(Ipv4Addr::new(192, 0, 2, 1)));
            r.add_answer(Record::from_rdata(question.name().clone(), 60, a));
        } else {
            r.set_response_code(ResponseCode::NXDomain);
        }
        r.to_vec().ok()
    }

    fn asked(&self, name: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|n| n == name)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

mod dnsq {
    use super::*;
    pub use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    pub use hickory_proto::rr::{Name, RData, RecordType};

    pub const RESOLVER: &str = "127.0.0.11:53";

    pub fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(rand_id())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn rand_id() -> u16 {
        (Instant::now().elapsed().subsec_nanos() ^ std::process::id()) as u16
    }

    /// One UDP query from inside `ns` to 127.0.0.11:53.
    pub fn udp(ns: &Netns, name: &str, rtype: RecordType) -> Message {
        let sock = ns
            .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let q = query(name, rtype);
        sock.send_to(&q, RESOLVER).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no UDP answer for {name}: {e}"));
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.id(), u16::from_be_bytes([q[0], q[1]]));
        m
    }

    /// A TCP connection from inside `ns` to 127.0.0.11:53.
    pub fn connect(ns: &Netns) -> TcpStream {
        let s = ns
            .run(|| TcpStream::connect(RESOLVER))
            .unwrap()
            .expect("connect to 127.0.0.11:53 over TCP");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    }

    /// One query on an open TCP connection.
    pub fn tcp(s: &mut TcpStream, name: &str, rtype: RecordType) -> Message {
        let q = query(name, rtype);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        s.write_all(&out).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        Message::from_vec(&body).unwrap()
    }

    /// The A records of a reply, sorted.
    pub fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }
}

fn attached(id: &str, service: &str, slot: u64, net: &str, ip: Ipv4Addr) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        name: format!("{service}.{slot}.{id}"),
        service_id: format!("svc-{service}"),
        service_name: service.into(),
        command: vec!["sleep".into(), "1000".into()],
        attachments: vec![Attachment {
            network_id: net.into(),
            addr: format!("{ip}/24").parse().unwrap(),
            mac: endpoint_mac(ip),
        }],
    }
}

fn net_service(
    name: &str,
    vip: Ipv4Addr,
    aliases: &[&str],
    tasks: &[(&str, u64, Ipv4Addr)],
) -> proto::agent::NetworkService {
    proto::agent::NetworkService {
        service_id: format!("svc-{name}"),
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        endpoint_mode: proto::model::EndpointMode::Vip,
        vip: Some(vip),
        fwmark: 0,
        tasks: tasks
            .iter()
            .map(|(id, slot, addr)| proto::agent::ServiceTask {
                task_id: (*id).into(),
                slot: *slot,
                addr: *addr,
            })
            .collect(),
    }
}

fn dns_network(
    id: &str,
    name: &str,
    subnet: &str,
    services: Vec<proto::agent::NetworkService>,
) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        name: name.into(),
        subnet: format!("{subnet}.0/24").parse().unwrap(),
        gateway: format!("{subnet}.1/24").parse().unwrap(),
        vni: if id == NET { 4096 } else { 4097 },
        peers: vec![],
        lb_addr: None,
        services,
    }
}

#[test]
fn agent_serves_dns_to_tasks() {
    use dnsq::{RData, RecordType, ResponseCode};
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests build namespaces: run them as root"
    );
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let (web_ip, client_ip, other_ip) = (ip("10.0.9.2"), ip("10.0.9.3"), ip("10.0.8.2"));
    let web = attached("wa", "web", 1, NET, web_ip);
    let client = attached("cc", "client", 1, NET, client_ip);
    let other = attached("oo", "other", 1, NET2, other_ip);
    let remote = ip("10.0.9.9");
    let assign = |revision: u64, web_tasks: &[(&str, u64, Ipv4Addr)]| {
        ManagerMsg::Assign(Assignment {
            revision,
            networks: vec![
                dns_network(
                    NET,
                    "backend",
                    "10.0.9",
                    vec![
                        net_service("web", ip("10.0.9.100"), &["www"], web_tasks),
                        net_service("client", ip("10.0.9.101"), &[], &[("cc", 1, client_ip)]),
                        proto::agent::NetworkService {
                            endpoint_mode: proto::model::EndpointMode::Dnsrr,
                            vip: None,
                            ..net_service(
                                "rr",
                                ip("10.0.9.100"),
                                &[],
                                &[("r1", 1, ip("10.0.9.20")), ("r2", 2, ip("10.0.9.21"))],
                            )
                        },
                    ],
                ),
                dns_network(
                    NET2,
                    "elsewhere",
                    "10.0.8",
                    vec![net_service(
                        "other",
                        ip("10.0.8.100"),
                        &[],
                        &[("oo", 1, other_ip)],
                    )],
                ),
            ],
            tasks: vec![web.clone(), client.clone(), other.clone()],
            ..Assignment::default()
        })
    };

    let mut lab = Lab::new();
    let upstream = Upstream::start(&lab.node);
    lab.start_agent_with(&["--dns-upstream".into(), upstream.addr.to_string()]);
    let mut m = lab.accept();
    m.send(&assign(1, &[("wa", 1, web_ip)]));
    let client_pid = m
        .wait_status(&lab, "cc", TaskState::Running)
        .expect("client pid");
    m.wait_applied(&lab, 1);
    let ns = lab.ns(&client.name);

    // The cluster's names, from the client's network.
    let r = dnsq::udp(&ns, "web", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert_eq!(dnsq::addrs(&r), [ip("10.0.9.100")]);
    assert!(r.answers().iter().all(|a| a.ttl() <= 5));
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "WWW.", RecordType::A)),
        [ip("10.0.9.100")]
    );
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "tasks.web", RecordType::A)),
        [web_ip]
    );
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "tasks.www", RecordType::A)),
        [web_ip]
    );
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "web.1", RecordType::A)),
        [web_ip]
    );
    // dnsrr: the tasks themselves.
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "rr", RecordType::A)),
        [ip("10.0.9.20"), ip("10.0.9.21")]
    );
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "web.1.wa", RecordType::A)),
        [web_ip]
    );
    let aaaa = dnsq::udp(&ns, "web", RecordType::AAAA);
    assert_eq!(
        (aaaa.response_code(), aaaa.answers().len()),
        (ResponseCode::NoError, 0)
    );
    let ptr = dnsq::udp(&ns, "2.9.0.10.in-addr.arpa.", RecordType::PTR);
    assert!(
        matches!(ptr.answers()[0].data(), RData::PTR(p) if p.0.to_ascii() == "web.1.wa."),
        "{ptr:?}"
    );
    assert!(
        upstream.seen.lock().unwrap().is_empty(),
        "nothing went upstream yet"
    );

    // A service of a network the client is not on is not answered from the cluster: it goes
    // upstream like any other name. The task on that network does resolve it.
    let r = dnsq::udp(&ns, "other", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    assert!(upstream.asked("other."));
    let r = dnsq::udp(&lab.ns(&other.name), "other", RecordType::A);
    assert_eq!(dnsq::addrs(&r), [ip("10.0.8.100")]);
    // An external name, answered by the upstream.
    let r = dnsq::udp(&ns, "external.example", RecordType::A);
    assert_eq!(dnsq::addrs(&r), [ip("192.0.2.1")]);

    // TCP, several queries on one connection.
    let mut conn = dnsq::connect(&ns);
    assert_eq!(
        dnsq::addrs(&dnsq::tcp(&mut conn, "web", RecordType::A)),
        [ip("10.0.9.100")]
    );
    assert_eq!(
        dnsq::addrs(&dnsq::tcp(&mut conn, "external.example", RecordType::A)),
        [ip("192.0.2.1")]
    );

    // Bad input: a truncated TCP query held open blocks nobody, and is closed by the
    // resolver; garbage over UDP gets FORMERR or nothing, and the resolver answers on.
    let mut stuck = dnsq::connect(&ns);
    stuck.write_all(&[0, 100, 0xab, 0xcd, 1, 0, 0]).unwrap();
    let started = Instant::now();
    let mut other_conn = dnsq::connect(&ns);
    assert_eq!(
        dnsq::addrs(&dnsq::tcp(&mut other_conn, "web", RecordType::A)),
        [ip("10.0.9.100")]
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let udp = ns
        .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for junk in [
        &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'x'][..],
        &[1, 2, 3],
        &[0xff; 600],
    ] {
        udp.send_to(junk, dnsq::RESOLVER).unwrap();
        let mut buf = [0u8; 512];
        if let Ok(n) = udp.recv(&mut buf) {
            let r = dnsq::Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(r.response_code(), ResponseCode::FormErr);
        }
    }
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "web", RecordType::A)),
        [ip("10.0.9.100")]
    );
    let mut byte = [0u8; 1];
    stuck
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    assert_eq!(
        stuck.read(&mut byte).ok(),
        Some(0),
        "the resolver closes a connection whose query never completes"
    );

    // The task's own view: its resolv.conf and hosts, the node's files untouched.
    let root = format!("/proc/{client_pid}/root/etc");
    let resolv = std::fs::read_to_string(format!("{root}/resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 127.0.0.11\n"), "{resolv}");
    assert!(resolv.contains("options ndots:0\n"), "{resolv}");
    let hosts = std::fs::read_to_string(format!("{root}/hosts")).unwrap();
    assert!(
        hosts.contains("10.0.9.3\tclient.1.cc client.1\n"),
        "{hosts}"
    );
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    // Its mount namespace holds none of the agent's namespace files (that would keep deleted
    // namespaces alive).
    let mounts = std::fs::read_to_string(format!("/proc/{client_pid}/mountinfo")).unwrap();
    let netns_dir = lab.netns_dir().display().to_string();
    assert!(!mounts.contains(&netns_dir), "{mounts}");
    assert!(!std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .contains("127.0.0.11"));
    assert!(!std::fs::read_to_string("/etc/hosts")
        .unwrap_or_default()
        .contains("client.1.cc"));

    // A change (a task of web on another node) is answered within 1 s of the assignment.
    let sent = Instant::now();
    m.send(&assign(2, &[("wa", 1, web_ip), ("wr", 2, remote)]));
    while dnsq::addrs(&dnsq::udp(&ns, "tasks.web", RecordType::A)) != [web_ip, remote] {
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "tasks.web did not change within 1 s\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.wait_applied(&lab, 2);

    // A restarted agent serves the tasks it adopts.
    lab.crash_agent();
    drop(m);
    lab.start_agent_with(&["--dns-upstream".into(), upstream.addr.to_string()]);
    let mut m = lab.accept();
    m.send(&assign(2, &[("wa", 1, web_ip), ("wr", 2, remote)]));
    m.wait_applied(&lab, 2);
    assert_eq!(
        dnsq::addrs(&dnsq::udp(&ns, "web.2", RecordType::A)),
        [remote]
    );

    // A task that goes takes its files with it.
    let files = lab.dir.join("state/tasks").join(&other.name);
    assert!(files.join("resolv.conf").exists());
    m.send(&ManagerMsg::Assign(match assign(3, &[("wa", 1, web_ip)]) {
        ManagerMsg::Assign(mut a) => {
            a.tasks.retain(|t| t.name != other.name);
            a.networks.truncate(1);
            a
        }
        _ => unreachable!(),
    }));
    m.wait_status(&lab, "oo", TaskState::Shutdown);
    lab.eventually("the task's files go", || !files.exists());
}
