//! The service-VIP scenario both load balancers must pass. Network `backend` (10.0.9.0/24,
//! this node's lb address .250) holds:
//! - service `api`, VIP .100, fwmark 300, tasks a1 (.2) and a2 (.3) running here, plus .9,
//!   listed as running on another node that does not exist (so one round-robin slot in three
//!   never answers: the spread shows);
//! - service `idle`, VIP .101, no task: refused at once;
//! - service `db` in dnsrr mode: no VIP, nothing balanced;
//! - the client task c (.10), of another service.
//!
//! a1 and a2 answer TCP on 7000 with `<task> <peer IP>` and UDP on 7001 with `<task>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::agent::TaskSpec;
use proto::agent::{Assignment, ManagerMsg, NetworkService, NetworkSpec, Peer, ServiceTask};
use proto::model::{endpoint_mac, Attachment, EndpointMode, TaskState};

use super::{Lab, Manager, NET, REMOTE};

pub const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 100);
pub const IDLE_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 101);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 250);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 10);
pub const A1: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
pub const A2: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 3);
/// Listed as a task of `api` on another node: never answers.
pub const GHOST: Ipv4Addr = REMOTE.0;
pub const API_MARK: u32 = 300;
pub const LB_NETNS: &str = "lb_backend";
pub const TCP_PORT: u16 = 7000;
pub const UDP_PORT: u16 = 7001;
/// How long a probe waits for an answer.
const PROBE: Duration = Duration::from_secs(1);

fn service_task(service: &str, id: &str, ip: Ipv4Addr) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        name: format!("{service}.1.{id}"),
        service_id: service.into(),
        service_name: service.into(),
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

/// a1, a2 (service api) and the client c.
pub fn tasks() -> [TaskSpec; 3] {
    [
        service_task("api", "a1", A1),
        service_task("api", "a2", A2),
        service_task("cli", "c", CLIENT),
    ]
}

fn service(name: &str, vip: Option<Ipv4Addr>, fwmark: u32, tasks: &[Ipv4Addr]) -> NetworkService {
    NetworkService {
        service_id: name.into(),
        name: name.into(),
        aliases: vec![],
        endpoint_mode: if vip.is_some() {
            EndpointMode::Vip
        } else {
            EndpointMode::Dnsrr
        },
        vip,
        fwmark,
        tasks: tasks
            .iter()
            .enumerate()
            .map(|(i, addr)| ServiceTask {
                task_id: format!("{name}{i}"),
                slot: i as u64 + 1,
                addr: *addr,
            })
            .collect(),
    }
}

/// The three tasks run; `api` lists `api_tasks` as its running tasks.
pub fn assignment(revision: u64, api_tasks: &[Ipv4Addr]) -> ManagerMsg {
    ManagerMsg::Assign(std::sync::Arc::new(Assignment {
        revision,
        networks: vec![NetworkSpec {
            id: NET.into(),
            name: "backend".into(),
            subnet: "10.0.9.0/24".parse().unwrap(),
            gateway: "10.0.9.1/24".parse().unwrap(),
            vni: 4096,
            peers: vec![Peer {
                ip: GHOST,
                mac: endpoint_mac(GHOST),
                vtep: IpAddr::V4(REMOTE.1),
            }],
            lb_addr: Some(format!("{LB_ADDR}/24").parse().unwrap()),
            draining: vec![],
            encrypted: false,
            services: vec![
                service("api", Some(API_VIP), API_MARK, api_tasks),
                service("idle", Some(IDLE_VIP), 301, &[]),
                service("db", None, 0, &[A1]),
            ],
        }],
        tasks: tasks().to_vec(),
        ..Assignment::default()
    }))
}

/// Sends revision 1 (api over a1, a2 and the ghost) and waits until it runs and is applied.
pub fn start(lab: &Lab, m: &mut Manager) {
    m.send(&assignment(1, &[A1, A2, GHOST]));
    for t in tasks() {
        m.wait_status(lab, &t.id, TaskState::Running);
    }
    m.wait_applied(lab, 1);
}

/// TCP and UDP servers in a1 and a2; they stop when dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(lab: &Lab) -> Servers {
        let mut s = Servers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for t in &tasks()[..2] {
            let ns = lab.ns(&t.name);
            let tcp = ns
                .run(|| TcpListener::bind(("0.0.0.0", TCP_PORT)))
                .unwrap()
                .unwrap();
            tcp.set_nonblocking(true).unwrap();
            let udp = ns
                .run(|| UdpSocket::bind(("0.0.0.0", UDP_PORT)))
                .unwrap()
                .unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let (stop, id) = (s.stop.clone(), t.id.clone());
            s.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match tcp.accept() {
                        Ok((mut stream, peer)) => {
                            let _ = stream.write_all(format!("{id} {}\n", peer.ip()).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            let (stop, id) = (s.stop.clone(), t.id.clone());
            s.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(id.as_bytes(), from);
                    }
                }
            }));
        }
        s
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn client(lab: &Lab) -> netns::Netns {
    lab.ns(&tasks()[2].name)
}

/// A new TCP connection from the client: `(task, peer the task saw)`.
pub fn tcp_probe(lab: &Lab, to: Ipv4Addr) -> std::io::Result<(String, String)> {
    let stream = client(lab)
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((to, TCP_PORT)), PROBE))
        .unwrap()?;
    stream.set_read_timeout(Some(PROBE))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let (id, peer) = line
        .trim_end()
        .split_once(' ')
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    Ok((id.to_string(), peer.to_string()))
}

/// A new UDP flow from the client: the task that answered, if one did.
pub fn udp_probe(lab: &Lab, to: Ipv4Addr) -> Option<String> {
    let socket = client(lab)
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    socket.set_read_timeout(Some(PROBE)).unwrap();
    socket.send_to(b"hi", (to, UDP_PORT)).unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Round robin over api's three tasks, TCP and UDP: every window of three new connections
/// (flows) meets a1, a2 and the silent ghost once each. Tasks see `peer` as the client.
/// The idle VIP refuses at once.
pub fn check_balancing(lab: &Lab, peer: Ipv4Addr) {
    let answers: Vec<Option<String>> = (0..6)
        .map(|_| match tcp_probe(lab, API_VIP) {
            Ok((id, seen)) => {
                assert_eq!(seen, peer.to_string(), "the address {id} saw");
                Some(id)
            }
            Err(_) => None,
        })
        .collect();
    for window in answers.chunks(3) {
        let mut w: Vec<Option<&str>> = window.iter().map(Option::as_deref).collect();
        w.sort();
        assert_eq!(
            w,
            [None, Some("a1"), Some("a2")],
            "TCP: {answers:?}\n{}",
            lab.log()
        );
    }
    let mut udp: Vec<Option<String>> = (0..3).map(|_| udp_probe(lab, API_VIP)).collect();
    udp.sort();
    assert_eq!(udp, [None, Some("a1".into()), Some("a2".into())], "UDP");

    let t0 = Instant::now();
    let err = tcp_probe(lab, IDLE_VIP).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t0.elapsed() < PROBE, "refused fast, not timed out");
}

/// Revision 2 drops a2 and the ghost from api: from then on a1 takes every new connection
/// and flow, although a2 still runs and listens.
pub fn check_removal(lab: &Lab, m: &mut Manager) {
    m.send(&assignment(2, &[A1]));
    m.wait_applied(lab, 2);
    for _ in 0..4 {
        let (id, _) = tcp_probe(lab, API_VIP).unwrap_or_else(|e| panic!("{e}\n{}", lab.log()));
        assert_eq!(id, "a1");
    }
    for _ in 0..2 {
        assert_eq!(udp_probe(lab, API_VIP).as_deref(), Some("a1"));
    }
}
