//! End to end, without root: the real mesh-manager binary on loopback with a temp data dir and
//! API socket, fake agents speaking proto::agent over TCP, requests over the API socket, then a
//! hard kill and a restart that must lose nothing.

mod common;

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent::{AgentMsg, LbBackendReport, LbReport, LbServiceReport, ManagerMsg};
use proto::api::{Request, Response, ServiceSpec, TaskInfo};
use proto::model::{PortConfig, Protocol, PublishMode, Role, TaskState};

use common::{free_port, Conn, TempDir};

/// The manager process; killed when dropped, so a failing test leaves nothing running.
struct Manager {
    child: Child,
    log: PathBuf,
}

impl Manager {
    fn start(dir: &Path, port: u16, run: &str) -> Manager {
        let log = dir.join(format!("manager-{run}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mesh-manager"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .args(["--log-format", "json"])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start mesh-manager");
        let m = Manager { child, log };
        m.wait_for(
            || UnixStream::connect(dir.join("api.sock")).is_ok(),
            "the API socket",
        );
        m.wait_for(
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "the agent port",
        );
        m
    }

    fn wait_for(&self, ready: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "{what} never came up; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: nothing gets a chance to flush, as in a crash.
    fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Joins a node through the real join protocol with the cluster's worker token.
fn join(dir: &Path, port: u16, hostname: &str, addr: &str) -> trust::Credentials {
    let Response::JoinToken { token, .. } =
        Conn::unix(&dir.join("api.sock")).call(Request::JoinToken {
            role: Role::Worker,
            rotate: false,
        })
    else {
        panic!("join-token")
    };
    let token: trust::JoinToken = token.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, creds) = rt
        .block_on(trust::join::join(
            &format!("127.0.0.1:{port}"),
            &token,
            hostname,
            addr.parse().unwrap(),
        ))
        .expect("join");
    creds
}

fn tasks(api: &mut Conn<UnixStream>, service: &str) -> Vec<TaskInfo> {
    match api.call(Request::ServicePs {
        service: service.into(),
    }) {
        Response::Tasks { tasks } => tasks,
        other => panic!("service ps: {other:?}"),
    }
}

fn wait_running(api: &mut Conn<UnixStream>, service: &str, n: usize) -> Vec<TaskInfo> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ts = tasks(api, service);
        if ts.iter().filter(|t| t.state == TaskState::Running).count() == n {
            return ts;
        }
        assert!(Instant::now() < deadline, "tasks never ran: {ts:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agents_get_their_tasks_and_a_restart_loses_nothing() {
    let tmp = TempDir::new("control");
    let port = free_port();
    let manager = Manager::start(&tmp.0, port, "first");

    // node1 advertises the manager's listen IP: it is the manager node.
    let c1 = join(&tmp.0, port, "node1", "127.0.0.1");
    let c2 = join(&tmp.0, port, "node2", "127.0.0.2");

    // An agent of another protocol version is refused with a reason.
    let mut old = Conn::agent(port, &c2);
    old.send(&AgentMsg::Hello {
        version: proto::PROTOCOL_VERSION + 1,
        hostname: "node2".into(),
        advertise_addr: "127.0.0.2".parse().unwrap(),
        gwbridge_subnet: None,
        esp: None,
    });
    match old.recv::<ManagerMsg>() {
        ManagerMsg::Refused { reason } => assert!(reason.contains("not supported"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }

    // So is one whose first line is not a Hello at all.
    let mut garbage = Conn::agent(port, &c2);
    garbage
        .stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    match garbage.recv::<ManagerMsg>() {
        ManagerMsg::Refused { reason } => assert!(reason.starts_with("decode hello"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }

    let mut a1 = Conn::agent(port, &c1);
    let (id1, role1) = a1.hello("node1", "127.0.0.1");
    assert_eq!(role1, Role::Manager);
    assert!(a1.assignment().tasks.is_empty());
    let mut a2 = Conn::agent(port, &c2);
    let (id2, role2) = a2.hello_with_gwbridge("node2", "127.0.0.2", Some("172.30.0.0/16"));
    assert_eq!(role2, Role::Worker);
    assert!(a2.assignment().tasks.is_empty());

    let mut api = Conn::unix(&tmp.0.join("api.sock"));
    let Response::Network { network } = api.call(Request::NetworkCreate {
        name: "backend".into(),
        driver: "overlay".into(),
        subnet: Some("10.0.9.0/24".into()),
        options: Default::default(),
    }) else {
        panic!("network create failed; log:\n{}", manager.logs())
    };
    let Response::Service { service } = api.call(Request::ServiceCreate {
        spec: ServiceSpec {
            name: "web".into(),
            mode: Default::default(),
            replicas: 2,
            networks: vec!["backend".into()],
            constraints: vec![],
            command: vec!["hello-server".into(), "--port".into(), "8080".into()],
            ports: vec![],
            endpoint_mode: Default::default(),
            aliases: Default::default(),
            env: Default::default(),
            update_config: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        },
    }) else {
        panic!("service create failed; log:\n{}", manager.logs())
    };
    // A negative replica count is not even a request; the connection keeps serving.
    api.stream
        .get_mut()
        .write_all(b"{\"type\":\"service_scale\",\"service\":\"web\",\"replicas\":-1}\n")
        .unwrap();
    match api.recv::<Response>() {
        Response::Error { message } => assert!(message.starts_with("decode request:"), "{message}"),
        other => panic!("a negative replica count was accepted: {other:?}"),
    }
    // A decoder's error quotes the input; a huge one comes back as an excerpt.
    let huge = format!("{{\"type\":\"{}\"}}\n", "x".repeat(10_000));
    api.stream.get_mut().write_all(huge.as_bytes()).unwrap();
    match api.recv::<Response>() {
        Response::Error { message } => {
            assert!(
                message.starts_with("decode request: malformed frame: unknown variant"),
                "{message}"
            );
            assert!(message.len() < 400, "{} bytes", message.len());
        }
        other => panic!("an unknown request was accepted: {other:?}"),
    }
    // No overlay may overlap a node's gwbridge: node2 reported its own, node1 has the default.
    for (subnet, owner) in [
        (
            "172.30.5.0/24",
            "172.30.0.0/16, the gwbridge subnet of node node2",
        ),
        (
            "172.18.0.0/24",
            "172.18.0.0/16, the gwbridge subnet of node node1",
        ),
    ] {
        match api.call(Request::NetworkCreate {
            name: "clash".into(),
            driver: "overlay".into(),
            subnet: Some(subnet.into()),
            options: Default::default(),
        }) {
            Response::Error { message } => assert!(message.contains(owner), "{message}"),
            other => panic!("{subnet} was accepted: {other:?}"),
        }
    }
    // A refused request on the same connection, and the connection still serves.
    assert!(matches!(
        api.call(Request::NetworkCreate {
            name: "x".into(),
            driver: "overlay".into(),
            subnet: Some("10.0.9.0/16".into()),
            options: Default::default(),
        }),
        Response::Error { .. }
    ));

    let as1 = a1.assignment_with(1);
    let as2 = a2.assignment_with(1);
    for (a, me, other_vtep) in [(&as1, "node1", "127.0.0.2"), (&as2, "node2", "127.0.0.1")] {
        let task = &a.tasks[0];
        assert_eq!(task.service_name, "web", "{me}");
        assert!(task.name.starts_with("web."), "{}", task.name);
        assert_eq!(task.command, ["hello-server", "--port", "8080"]);
        assert_eq!(a.networks.len(), 1);
        let net = &a.networks[0];
        assert_eq!(
            (net.id.as_str(), net.vni),
            (network.network.id.as_str(), network.network.vni)
        );
        assert_eq!(net.gateway.to_string(), "10.0.9.1/24");
        // The peers are every endpoint of the network, each behind its node's address: the
        // other node's task and load balancer, and this node's own, which the agent skips.
        assert_eq!(net.peers.len(), 4, "{me}: {:?}", net.peers);
        let own = [task.attachments[0].addr.addr(), net.lb_addr.unwrap().addr()];
        for peer in &net.peers {
            let behind_other = peer.vtep == other_vtep.parse::<IpAddr>().unwrap();
            assert_eq!(behind_other, !own.contains(&peer.ip), "{me}: {peer:?}");
        }
        // Both see the service, with its VIP, outside every task's and balancer's address.
        assert_eq!(net.services.len(), 1);
        let vip = net.services[0].vip.expect("vip mode");
        assert!(!own.contains(&vip) && net.peers.iter().all(|p| p.ip != vip));
    }
    a1.report_running(&as1);
    a2.report_running(&as2);
    // Running tasks enter the service's records on every node: one more revision, applied.
    let mut latest = Vec::new();
    for a in [&mut a1, &mut a2] {
        let next = a.assignment_until(|x| x.networks[0].services[0].tasks.len() == 2);
        a.send(&AgentMsg::Applied {
            revision: next.revision,
        });
        latest.push(next);
    }
    let as1 = latest.swap_remove(0);
    let before = wait_running(&mut api, "web", 2);
    assert!(before
        .iter()
        .all(|t| t.netns.is_some() && t.pid == Some(1000)));
    // Applied follows the task reports on the same connection: wait for it to be recorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Response::Nodes { nodes } = api.call(Request::NodeLs) else {
            panic!("node ls failed")
        };
        assert_eq!(nodes.len(), 2);
        if nodes
            .iter()
            .all(|n| n.applied_revision == n.revision && n.revision > 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "applied revisions never recorded: {nodes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let revision1 = as1.revision;

    drop((a1, a2, api));
    manager.crash();
    let manager = Manager::start(&tmp.0, port, "second");
    let mut api = Conn::unix(&tmp.0.join("api.sock"));
    let after = tasks(&mut api, "web");
    assert_eq!(after, before, "tasks changed across the restart");
    let Response::Service { service: again } = api.call(Request::ServiceInspect {
        service: "web".into(),
    }) else {
        panic!(
            "service inspect failed after restart; log:\n{}",
            manager.logs()
        )
    };
    assert_eq!(*again, service_with_running(*service, 2));
    let Response::Network { network: net_again } = api.call(Request::NetworkInspect {
        network: "backend".into(),
    }) else {
        panic!("network inspect failed after restart")
    };
    assert_eq!(net_again.network, network.network);
    assert_eq!(net_again.endpoints.len(), 2);
    assert_eq!(net_again.peers.len(), 2);

    // The agent comes back with its id and gets the same desired state, never an older revision.
    let mut a1 = Conn::agent(port, &c1);
    let (id1_again, _) = a1.hello("node1", "127.0.0.1");
    assert_eq!(id1_again, id1);
    let back = a1.assignment();
    assert!(back.revision >= revision1);
    assert_eq!(
        (back.tasks.clone(), back.networks.clone()),
        (as1.tasks, as1.networks)
    );
    // node2 is known by hostname even without its id.
    let mut a2 = Conn::agent(port, &c2);
    assert_eq!(a2.hello("node2", "127.0.0.2").0, id2);

    // Scaling down to one removes the highest slot: its node's assignment empties.
    let Response::Service { .. } = api.call(Request::ServiceScale {
        service: "web".into(),
        replicas: 1,
    }) else {
        panic!("service scale failed")
    };
    let removed_node = before
        .iter()
        .find(|t| t.slot == 2)
        .unwrap()
        .node_id
        .clone()
        .unwrap();
    let emptied = if removed_node == id1 {
        a1.assignment_with(0)
    } else {
        a2.assignment_with(0)
    };
    assert!(emptied.networks.is_empty());
}

fn service_with_running(mut s: proto::api::ServiceInfo, running: usize) -> proto::api::ServiceInfo {
    s.running = running;
    s
}

/// The routing mesh from the manager's side: every agent gets the ingress network with its
/// sbox, and the published service with the running tasks' ingress addresses as backends;
/// what an agent reports of its load balancer shows in `service inspect`.
#[test]
fn a_published_service_reaches_every_agent_with_its_backends() {
    let tmp = TempDir::new("control");
    let port = free_port();
    let manager = Manager::start(&tmp.0, port, "publish");
    let c1 = join(&tmp.0, port, "node1", "127.0.0.1");
    let mut a1 = Conn::agent(port, &c1);
    a1.hello("node1", "127.0.0.1");
    let first = a1.assignment();
    let ingress = first.ingress.expect("every node gets the ingress network");
    assert_eq!(ingress.network.name, "ingress");
    assert_eq!(ingress.sbox_addr.to_string(), "10.255.0.2/16");
    let c2 = join(&tmp.0, port, "node2", "127.0.0.2");
    let mut a2 = Conn::agent(port, &c2);
    let (id2, _) = a2.hello("node2", "127.0.0.2");
    let second = a2.assignment();
    // Both nodes' sboxes are the ingress network's endpoints, each behind its node's address,
    // and node1 is told about node2's.
    let sboxes = |peers: &[proto::agent::Peer]| -> Vec<(String, String)> {
        peers
            .iter()
            .map(|p| (p.ip.to_string(), p.vtep.to_string()))
            .collect()
    };
    let both = vec![
        ("10.255.0.2".to_string(), "127.0.0.1".to_string()),
        ("10.255.0.3".to_string(), "127.0.0.2".to_string()),
    ];
    assert_eq!(
        sboxes(&second.ingress.as_ref().unwrap().network.peers),
        both
    );
    let a = a1.assignment_until(|a| {
        a.ingress
            .as_ref()
            .is_some_and(|i| i.network.peers.len() == 2)
    });
    assert_eq!(sboxes(&a.ingress.unwrap().network.peers), both);

    let mut api = Conn::unix(&tmp.0.join("api.sock"));
    let web = |published: u16| PortConfig {
        protocol: Protocol::Tcp,
        published,
        target: 8080,
        mode: PublishMode::Ingress,
    };
    let spec = |ports: Vec<PortConfig>| ServiceSpec {
        mode: Default::default(),
        name: "web".into(),
        replicas: 1,
        networks: vec![],
        constraints: vec![proto::model::Constraint::parse("node.hostname==node2").unwrap()],
        command: vec!["hello-server".into()],
        ports,
        endpoint_mode: Default::default(),
        aliases: Default::default(),
        env: Default::default(),
        update_config: Default::default(),
        stop_grace_ms: 10_000,
        health: None,
    };
    // The manager's own agent port cannot be published.
    match api.call(Request::ServiceCreate {
        spec: spec(vec![web(port)]),
    }) {
        Response::Error { message } => assert!(
            message.contains(&format!("port {port}/tcp is reserved")),
            "{message}"
        ),
        other => panic!("publishing the agent port was accepted: {other:?}"),
    }
    let Response::Service { service } = api.call(Request::ServiceCreate {
        spec: spec(vec![web(80)]),
    }) else {
        panic!("service create failed; log:\n{}", manager.logs())
    };
    assert_eq!(service.fwmark, Some(256));

    let on2 = a2.assignment_with(1);
    let task_ip = on2.tasks[0].attachments[0].addr.addr();
    assert_eq!(on2.tasks[0].attachments[0].network_id, ingress.network.id);
    assert!(on2.published[0].backends.is_empty(), "not running yet");
    a2.report_running(&on2);
    // Both nodes, also node1 without a task, get the running task as the backend.
    for agent in [&mut a1, &mut a2] {
        let a =
            agent.assignment_until(|a| a.published.first().is_some_and(|p| !p.backends.is_empty()));
        assert_eq!(a.published[0].fwmark, 256);
        assert_eq!(a.published[0].ports, [web(80)]);
        assert_eq!(a.published[0].backends, [task_ip]);
    }

    a2.send(&AgentMsg::LbState(LbReport {
        backend: proto::model::LbKind::Nftables,
        services: vec![LbServiceReport {
            fwmark: 256,
            backends: vec![LbBackendReport {
                ip: task_ip,
                weight: 1,
            }],
        }],
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Response::Service { service } = api.call(Request::ServiceInspect {
            service: "web".into(),
        }) else {
            panic!("service inspect failed")
        };
        if let Some(lb) = service.lb.first() {
            assert_eq!(
                (lb.node_id.as_str(), lb.backend.as_str()),
                (id2.as_str(), "nftables")
            );
            assert_eq!(lb.services[0].backends[0].ip, task_ip);
            break;
        }
        assert!(Instant::now() < deadline, "the LB report never showed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
