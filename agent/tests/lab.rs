//! Lab tier (root, host kernel): the real `mesh-agent` binary in a throwaway node namespace,
//! against a fake manager played by this test (see `support`). It builds the overlay and runs
//! the tasks; after a crash it adopts them without breaking an established TCP connection
//! between two tasks, puts back what was deleted and removes what is stale; tasks that leave
//! are stopped and the overlay sandbox goes with the last of them. Service VIPs are balanced
//! by the nftables load balancer in the client task's namespace.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netns::Netns;
use proto::agent::{AgentMsg, Assignment, ManagerMsg, NetworkSpec, TaskSpec};
use proto::model::{endpoint_mac, Attachment, Health, HealthCheck, HealthTest, TaskState};
use vxlan::{LinkKind, RemotePeer, Sandbox};

use support::vip;
use support::*;

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

    // The nf_tables generations of the namespaces with our tables: a restart that finds them
    // right writes nothing to them.
    let generations = |lab: &Lab| {
        [&lab.node, &lab.ns(&a.name), &lab.ns(&b.name)].map(|ns| firewall::generation(ns).unwrap())
    };
    let before_crash = generations(&lab);

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
    assert_eq!(
        generations(&lab),
        before_crash,
        "no nft transaction after the restart"
    );
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

/// nftables: the client's own namespace balances a VIP over the service's tasks (the tasks see
/// the client's address); a task that leaves the list leaves the balancing with the applied
/// revision; a VIP without tasks refuses; no lb_ namespace is made.
#[test]
fn vips_are_balanced_in_the_client_namespace_with_nftables() {
    assert!(nix::unistd::geteuid().is_root(), "lab tests need root");
    let mut lab = Lab::new();
    lab.start_agent_with(&["--lb", "nftables"]);
    let mut m = lab.accept();
    vip::start(&lab, &mut m);
    let _servers = vip::Servers::start(&lab);
    vip::check_balancing(&lab, vip::CLIENT);
    assert!(!lab.namespaces().contains(&vip::LB_NETNS.to_string()));
    // The client's table deleted behind the agent's back, after passes that found it right:
    // its namespace's nf_tables generation moves, so the next check lists it and rebuilds it.
    let client = vip::client(&lab);
    let nft = |args: &[&str]| client.output(Command::new("nft").args(args)).unwrap();
    assert!(nft(&["delete", "table", "ip", "meshnet"]).status.success());
    lab.eventually("the client's table comes back", || {
        nft(&["list", "table", "ip", "meshnet"]).status.success()
    });
    vip::check_balancing(&lab, vip::CLIENT);
    vip::check_removal(&lab, &mut m);
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
        env: Default::default(),
        stop_grace_ms: 10_000,
        health: None,
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
        draining: vec![],
        services,
        encrypted: false,
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
        ManagerMsg::Assign(std::sync::Arc::new(Assignment {
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
        }))
    };

    let mut lab = Lab::new();
    let upstream = Upstream::start(&lab.node);
    lab.start_agent_with(&["--dns-upstream", &upstream.addr.to_string()]);
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
    lab.start_agent_with(&["--dns-upstream", &upstream.addr.to_string()]);
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
            let a_mut = std::sync::Arc::make_mut(&mut a);
            a_mut.tasks.retain(|t| t.name != other.name);
            a_mut.networks.truncate(1);
            a
        }
        _ => unreachable!(),
    }));
    m.wait_status(&lab, "oo", TaskState::Shutdown);
    lab.eventually("the task's files go", || !files.exists());
}

/// Waits at most `limit` for `f` to hold; returns how long it took, or fails with the log.
fn within(lab: &Lab, what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}: {what}\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// A sample of the agent's metrics, e.g. `meshnet_agent_repairs_total{kind="route"}`; 0 when
/// absent.
fn metric(lab: &Lab, sample: &str) -> u64 {
    let text = lab
        .node
        .run(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(METRICS)?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lab\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("scrape the metrics: {e}\n{}", lab.log()));
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

const METRICS: &str = "127.0.0.1:9901";

/// With a timer pass only every hour, only kernel notifications can explain a repair: a task's
/// deleted default route, a deleted veth, a deleted FDB entry and a flushed chain of the node's
/// nftables table each come back within 1 s, and each repair is logged and counted once. The
/// pass (for nf_tables, the table comparison) that each repair's own changes set off applies
/// nothing.
#[test]
fn drift_is_repaired_on_kernel_events() {
    let ip_a = Ipv4Addr::new(10, 0, 9, 2);
    let a = task("a", ip_a);
    let mut lab = Lab::new();
    lab.start_agent_with(&["--reconcile-interval", "3600", "--metrics-listen", METRICS]);
    let mut m = lab.accept();
    m.send(&assignment(1, vec![a.clone()]));
    m.wait_status(&lab, "a", TaskState::Running);
    m.wait_applied(&lab, 1);
    let task_ns = || Sandbox::open(&lab.netns_dir(), &a.name).unwrap();
    let default_route = || {
        task_ns()
            .observe()
            .unwrap()
            .routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.dev.as_deref() == Some("eth1"))
    };
    lab.eventually("the task's default route", default_route);
    let ip = |ns: &Netns, args: &[&str]| {
        let out = ns.output(Command::new("ip").args(args)).unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    let limit = Duration::from_secs(1);
    let passes = || metric(&lab, "meshnet_agent_reconcile_passes_total{result=\"ok\"}");
    // The repair's pass, then the one its own notifications set off.
    let two_passes_since = |before: u64| {
        lab.eventually("the repair's pass and the one after it", || {
            passes() >= before + 2
        })
    };

    let before = passes();
    ip(&lab.ns(&a.name), &["route", "del", "default"]);
    assert!(!default_route());
    let took = within(&lab, "the default route comes back", limit, default_route);
    eprintln!("default route back after {took:?}");
    two_passes_since(before);

    let before = passes();
    let veth = lab
        .sandbox()
        .endpoints()
        .next()
        .expect("a's veth")
        .name
        .clone();
    ip(&lab.ns(SANDBOX), &["link", "del", &veth]);
    let paired = || {
        lab.sandbox().link(&veth).is_some() && task_ns().observe().unwrap().link("eth0").is_some()
    };
    let took = within(&lab, "the veth comes back", limit, paired);
    eprintln!("veth back after {took:?}");
    two_passes_since(before);

    let before = passes();
    Sandbox::open(&lab.netns_dir(), SANDBOX)
        .unwrap()
        .remove_peer("vxlan0", &RemotePeer::new(REMOTE.0, REMOTE.1))
        .unwrap();
    assert!(!has_remote_fdb(&lab.sandbox()));
    let took = within(&lab, "the FDB entry comes back", limit, || {
        has_remote_fdb(&lab.sandbox())
    });
    eprintln!("fdb entry back after {took:?}");
    two_passes_since(before);

    let before = passes();
    let nft = |args: &[&str]| lab.node.output(Command::new("nft").args(args)).unwrap();
    let masquerades = || {
        let out = nft(&["list", "chain", "ip", "meshnet", "nat-postrouting"]);
        String::from_utf8_lossy(&out.stdout).contains("masquerade")
    };
    lab.eventually("the node table's masquerade", masquerades);
    let flushed = nft(&["flush", "chain", "ip", "meshnet", "nat-postrouting"]);
    assert!(flushed.status.success(), "{flushed:?}");
    assert!(!masquerades());
    let took = within(&lab, "the masquerade rules come back", limit, masquerades);
    eprintln!("nft chain back after {took:?}");
    // Tables are compared without a pass; the comparison the rebuild's own notifications set
    // off finds them right.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(passes(), before, "no pass for an nf_tables change");

    // One repair each: the passes after them found nothing to do.
    for kind in ["route", "veth", "fdb_neigh", "nft_table"] {
        let sample = format!("meshnet_agent_repairs_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&lab, &sample), 1, "{sample}\n{}", lab.log());
    }
    let logged: Vec<String> = lab
        .log()
        .lines()
        .filter(|l| l.contains(" repair"))
        .map(String::from)
        .collect();
    assert_eq!(logged.len(), 4, "{logged:#?}");
    for what in [
        "EnsureDefaultRoute",
        "EnsureEndpoint",
        "AddFdb",
        "table ip meshnet",
    ] {
        assert!(
            logged.iter().any(|l| l.contains(what)),
            "{what} in {logged:#?}"
        );
    }
}

// --- Task environment, stop grace and health checks ------------------------------------------

/// A file under /tmp (which tasks and their checks share with the node) named for this test,
/// removed when dropped.
struct TmpFile(std::path::PathBuf);

impl TmpFile {
    fn new(what: &str) -> TmpFile {
        TmpFile(std::path::PathBuf::from(format!(
            "/tmp/meshnet-lab-{what}-{}",
            std::process::id()
        )))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The first status of `id` with this health (skipping others).
fn wait_health(m: &Manager, lab: &Lab, id: &str, health: Health) -> proto::agent::TaskStatus {
    m.wait_for(lab, &format!("{id} {health:?}"), |msg| match msg {
        AgentMsg::TaskStatus(s) if s.task_id == id && s.health == Some(health) => Some(s.clone()),
        _ => None,
    })
}

fn checked(mut spec: TaskSpec, test: HealthTest, start_period_ms: u64) -> TaskSpec {
    spec.health = Some(HealthCheck {
        test,
        interval_ms: 200,
        timeout_ms: 1000,
        retries: 2,
        start_period_ms,
    });
    spec
}

/// An HTTP check: the task is Starting while nothing listens in its namespace, failures in
/// the start period do not make it Unhealthy, and it is Healthy as soon as a server on its
/// loopback answers 200. Its process sees the spec's env.
#[test]
fn an_http_check_makes_a_task_healthy_once_its_server_answers() {
    assert!(nix::unistd::geteuid().is_root(), "lab tests need root");
    let env_out = TmpFile::new("env");
    let mut h = task("h", Ipv4Addr::new(10, 0, 9, 2));
    h.command = vec![
        "sh".into(),
        "-c".into(),
        format!("echo \"$GREETING\" > {}; exec sleep 1000", env_out.path()),
    ];
    h.env
        .insert("GREETING".into(), "hello from the spec".into());
    let h = checked(
        h,
        HealthTest::Http {
            port: 8080,
            path: "/healthz".into(),
        },
        60_000,
    );
    let mut lab = Lab::new();
    lab.start_agent();
    let mut m = lab.accept();
    m.send(&assignment(1, vec![h.clone()]));
    let st = m.wait_for(&lab, "h running", |msg| match msg {
        AgentMsg::TaskStatus(s) if s.task_id == "h" && s.state == TaskState::Running => {
            Some(s.clone())
        }
        _ => None,
    });
    assert_eq!(st.health, Some(Health::Starting), "{st:?}");
    lab.eventually("the task wrote its env var", || {
        std::fs::read_to_string(&env_out.0).is_ok_and(|s| s == "hello from the spec\n")
    });

    // A few probes fail (connection refused) within the start period: still Starting.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!lab.log().contains("unhealthy"), "{}", lab.log());

    let server = lab
        .ns(&h.name)
        .run(|| TcpListener::bind("127.0.0.1:8080"))
        .unwrap()
        .unwrap();
    server.set_nonblocking(true).unwrap();
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, stopped) = (asked.clone(), stop.clone());
    // Stopped before the task goes: its socket would keep the task's namespace alive.
    let serving = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = server.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.lock().unwrap().push(request);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let st = wait_health(&m, &lab, "h", Health::Healthy);
    assert_eq!((st.state, st.health_log), (TaskState::Running, None));
    let first = asked.lock().unwrap()[0].clone();
    assert!(first.starts_with("GET /healthz HTTP/1.0\r\n"), "{first:?}");
    stop.store(true, Ordering::Relaxed);
    serving.join().unwrap();

    m.send(&assignment(2, vec![]));
    let st = m.wait_for(&lab, "h shutdown", |msg| match msg {
        AgentMsg::TaskStatus(s) if s.task_id == "h" && s.state == TaskState::Shutdown => {
            Some(s.clone())
        }
        _ => None,
    });
    assert_eq!(st.health, None, "no health once it stopped");
    lab.eventually("every namespace goes", || lab.namespaces().is_empty());
}

/// A command check runs in the task's network namespace (it sees the task's eth0) and mount
/// namespace (its own resolv.conf): Starting, Healthy while the file exists, Unhealthy after
/// `retries` failures once it is removed (with the command's output in the log), Healthy again
/// when it is back. After an agent restart the adopted task keeps its health and is checked
/// on. Probes are counted.
#[test]
fn a_cmd_check_follows_the_task_and_goes_on_after_a_restart() {
    assert!(nix::unistd::geteuid().is_root(), "lab tests need root");
    let marker = TmpFile::new("healthy");
    std::fs::write(&marker.0, b"").unwrap();
    let script = format!(
        "grep -q eth0 /proc/net/dev && grep -q 127.0.0.11 /etc/resolv.conf \
         && test -e {0} || {{ echo no {0}; exit 1; }}",
        marker.path()
    );
    let c = checked(
        task("c", Ipv4Addr::new(10, 0, 9, 2)),
        HealthTest::Cmd {
            argv: vec!["sh".into(), "-c".into(), script],
        },
        0,
    );
    let mut lab = Lab::new();
    lab.start_agent_with(&["--metrics-listen", METRICS]);
    let mut m = lab.accept();
    m.send(&assignment(1, vec![c.clone()]));
    wait_health(&m, &lab, "c", Health::Starting);
    wait_health(&m, &lab, "c", Health::Healthy);

    std::fs::remove_file(&marker.0).unwrap();
    let removed = Instant::now();
    let st = wait_health(&m, &lab, "c", Health::Unhealthy);
    // Two failures 200 ms apart: well within a couple of seconds.
    assert!(
        removed.elapsed() < Duration::from_secs(3),
        "{:?}",
        removed.elapsed()
    );
    let log = st.health_log.expect("the failure's output");
    assert!(
        log.contains("exit status 1") && log.contains(&format!("no {}", marker.path())),
        "{log}"
    );
    assert_eq!(st.state, TaskState::Running, "the agent does not kill it");
    std::fs::write(&marker.0, b"").unwrap();
    wait_health(&m, &lab, "c", Health::Healthy);
    assert!(metric(&lab, "meshnet_agent_health_checks_total{result=\"pass\"}") >= 2);
    assert!(metric(&lab, "meshnet_agent_health_checks_total{result=\"fail\"}") >= 2);

    // A restarted agent adopts the task as Healthy and goes on checking it.
    lab.crash_agent();
    drop(m);
    lab.start_agent();
    let mut m = lab.accept();
    let st = m.wait_for(&lab, "c adopted", |msg| match msg {
        AgentMsg::TaskStatus(s) if s.task_id == "c" => Some(s.clone()),
        _ => None,
    });
    assert_eq!(
        (st.state, st.health),
        (TaskState::Running, Some(Health::Healthy))
    );
    m.send(&assignment(1, vec![c.clone()]));
    std::fs::remove_file(&marker.0).unwrap();
    wait_health(&m, &lab, "c", Health::Unhealthy);

    m.send(&assignment(2, vec![]));
    m.wait_status(&lab, "c", TaskState::Shutdown);
    lab.eventually("every namespace goes", || lab.namespaces().is_empty());
}

/// A task that ignores SIGTERM is killed after its own stop grace period (0.5 s here), not
/// after the 10 s default.
#[test]
fn a_task_that_ignores_sigterm_is_killed_after_its_own_grace() {
    assert!(nix::unistd::geteuid().is_root(), "lab tests need root");
    let ready = TmpFile::new("trapped");
    let mut t = task("t", Ipv4Addr::new(10, 0, 9, 2));
    t.command = vec![
        "sh".into(),
        "-c".into(),
        format!("trap '' TERM; touch {}; sleep 100", ready.path()),
    ];
    t.stop_grace_ms = 500;
    let mut lab = Lab::new();
    lab.start_agent();
    let mut m = lab.accept();
    m.send(&assignment(1, vec![t.clone()]));
    m.wait_status(&lab, "t", TaskState::Running);
    m.wait_applied(&lab, 1);
    // The shell has set its trap before it is told to stop.
    lab.eventually("the task traps SIGTERM", || ready.0.exists());
    let stopped = Instant::now();
    m.send(&assignment(2, vec![]));
    m.wait_status(&lab, "t", TaskState::Shutdown);
    let took = stopped.elapsed();
    eprintln!("shut down after {took:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "killed after {took:?}\n{}",
        lab.log()
    );
    assert!(lab.log().contains("task ignored SIGTERM; killing it"));
    lab.eventually("every namespace goes", || lab.namespaces().is_empty());
}
