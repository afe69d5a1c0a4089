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
use std::sync::mpsc::{self, Receiver};
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
        let dir = PathBuf::from(format!("/run/meshnet-test-agent-{}", std::process::id()));
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
