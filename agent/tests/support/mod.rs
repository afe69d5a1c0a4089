//! The agent's lab harness, shared by the lab tier (host kernel) and the guest tier (guest
//! kernel with IPVS): the real `mesh-agent` binary in a throwaway node namespace, against a
//! fake manager played by the test (mutual TLS with a CA of its own; the node's credentials
//! are put in the agent's state dir, as a join would).
// Each test target uses its own part of the harness.
#![allow(dead_code)]

pub mod vip;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use netns::Netns;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::agent::{AgentMsg, Assignment, ManagerMsg, NetworkSpec, Peer, TaskSpec};
use proto::model::{endpoint_mac, Attachment, Role, TaskState};
use proto::wire::{read_frame, write_frame};
use proto::{decode_frame, PROTOCOL_VERSION};
use vxlan::{FdbOwner, Sandbox};

pub const WAIT: Duration = Duration::from_secs(15);
pub const NET: &str = "labnet0123456789";
pub const SANDBOX: &str = "1-labnet0123";
pub const REMOTE: (Ipv4Addr, Ipv4Addr) =
    (Ipv4Addr::new(10, 0, 9, 9), Ipv4Addr::new(192, 168, 56, 12));

/// The node namespace, the agent and everything it made; all of it goes in `drop`, also when
/// the test panics.
pub struct Lab {
    pub dir: PathBuf,
    pub node: Netns,
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agent: Option<Child>,
}

/// A CA, the manager's TLS side, and the node's credentials stored where the agent keeps them.
pub fn pki(state_dir: &Path) -> tokio_rustls::TlsAcceptor {
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
    pub fn new() -> Lab {
        // Tests of one binary run in parallel: one directory each.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let n = LABS.fetch_add(1, Ordering::SeqCst);
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

    pub fn netns_dir(&self) -> PathBuf {
        self.dir.join("state/netns")
    }

    pub fn ns(&self, name: &str) -> Netns {
        Netns::open(&self.netns_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Starts the agent with more flags (e.g. `--lb ipvs`); a pass every second unless they say
    /// otherwise.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        let mut extra = extra.to_vec();
        if !extra.contains(&"--reconcile-interval") {
            extra.extend(["--reconcile-interval", "1"]);
        }
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
            .args(["--mtu", "1450"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.agent = Some(self.node.spawn(&mut cmd).expect("start mesh-agent"));
    }

    /// Kills the agent as a crash would: no chance to clean up.
    pub fn crash_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill().unwrap();
            a.wait().unwrap();
        }
    }

    /// Accepts the agent's connection and plays the manager's side of the handshake.
    pub fn accept(&self) -> Manager {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn sandbox(&self) -> vxlan::Observed {
        Sandbox::open(&self.netns_dir(), SANDBOX)
            .and_then(|s| s.observe())
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    pub fn namespaces(&self) -> Vec<String> {
        netns::list(&self.netns_dir())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Waits until `f` holds, or fails with the agent's log.
    pub fn eventually(&self, what: &str, f: impl Fn() -> bool) {
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

pub struct Manager {
    out: tokio::sync::mpsc::UnboundedSender<ManagerMsg>,
    rx: Receiver<AgentMsg>,
}

impl Manager {
    pub fn send(&mut self, msg: &ManagerMsg) {
        self.out.send(msg.clone()).unwrap();
    }

    /// The first message from the agent that `f` picks, skipping others.
    pub fn wait_for<T>(&self, lab: &Lab, what: &str, f: impl Fn(&AgentMsg) -> Option<T>) -> T {
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

    pub fn wait_status(&self, lab: &Lab, task_id: &str, state: TaskState) -> Option<u32> {
        self.wait_for(lab, &format!("{task_id} {state:?}"), |m| match m {
            AgentMsg::TaskStatus(s) if s.task_id == task_id && s.state == state => Some(s.pid),
            _ => None,
        })
    }

    pub fn wait_applied(&self, lab: &Lab, revision: u64) {
        self.wait_for(lab, &format!("applied {revision}"), |m| {
            (*m == AgentMsg::Applied { revision }).then_some(())
        })
    }
}

pub fn task(id: &str, ip: Ipv4Addr) -> TaskSpec {
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
        env: Default::default(),
        stop_grace_ms: 10_000,
        health: None,
    }
}

pub fn assignment(revision: u64, tasks: Vec<TaskSpec>) -> ManagerMsg {
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
            draining: vec![],
            services: vec![],
            encrypted: false,
        }]
    };
    ManagerMsg::Assign(std::sync::Arc::new(Assignment {
        revision,
        networks,
        tasks,
        ..Assignment::default()
    }))
}

pub fn has_remote_fdb(seen: &vxlan::Observed) -> bool {
    seen.fdb.iter().any(|e| {
        e.owner == FdbOwner::Device
            && e.dst == Some(REMOTE.1)
            && e.mac.to_string() == endpoint_mac(REMOTE.0)
    })
}

pub fn echo(client: &mut TcpStream, server: &mut TcpStream, word: &[u8]) {
    client.write_all(word).unwrap();
    let mut buf = vec![0; word.len()];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(buf, word);
}
