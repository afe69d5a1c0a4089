//! Overlay networks across nodes: manager, agents and meshctl as real processes in a 3-node lab.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::cluster::{bin, Cluster};
use nix::sys::signal::Signal;
use proto::api::{NetworkDetail, TaskInfo};

fn hello() -> String {
    bin("hello-server").display().to_string()
}

/// Creates network `net` and a service `svc` of hello-server tasks on it.
fn deploy(c: &Cluster, net: &str, subnet: &str, svc: &str, replicas: u32) -> Vec<TaskInfo> {
    c.network_create(net, subnet).unwrap();
    c.hello_service(svc, replicas as usize, &["--network", net])
        .unwrap()
}

fn ip(t: &TaskInfo) -> String {
    t.endpoints[0].ip().to_string()
}

/// `GET /` on `to:8080` from inside task `from`, retried briefly while the mesh converges.
fn http(c: &Cluster, from: &TaskInfo, to: &str) -> String {
    let url = format!("http://{to}:8080/");
    c.wait_for(
        Duration::from_secs(10),
        &format!("{} -> {url}", from.name),
        |c| {
            let out = c
                .task_exec(from, &["curl", "-s", "--max-time", "2", &url])
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .unwrap()
}

fn ping(c: &Cluster, from: &TaskInfo, to: &str) -> bool {
    c.task_exec(from, &["ping", "-c1", "-W2", to])
        .unwrap()
        .status
        .success()
}

fn assert_full_mesh(c: &Cluster, tasks: &[TaskInfo]) {
    for a in tasks {
        for b in tasks.iter().filter(|b| b.id != a.id) {
            assert!(ping(c, a, &ip(b)), "{} cannot ping {}", a.name, b.name);
            assert_eq!(
                http(c, a, &ip(b)),
                format!("Hello World! from {}\n", ip(b)),
                "{} -> {}",
                a.name,
                b.name
            );
        }
    }
}

fn sandbox(c: &Cluster, node: &str, network_id: &str) -> PathBuf {
    c.state_dir(node)
        .join("netns")
        .join(format!("1-{}", &network_id[..10]))
}

fn in_ns(c: &Cluster, ns: &Path, args: &[&str]) -> String {
    let ns = netns::Netns::open(ns).unwrap();
    let mut cmd = c.lab.command(args[0]);
    cmd.args(&args[1..]);
    let out = ns.output(&mut cmd).unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The name of the VXLAN device in a sandbox.
fn vxlan_dev(c: &Cluster, ns: &Path) -> String {
    let links = in_ns(c, ns, &["ip", "-o", "link", "show", "type", "vxlan"]);
    let name = links.split(": ").nth(1).expect("a vxlan device");
    name.split('@').next().unwrap().to_string()
}

type Pairs = BTreeSet<(String, String)>;

/// (mac, vtep) of the static FDB entries and (ip, mac) of the neighbour entries on the VXLAN
/// device of the sandbox.
fn peer_entries(c: &Cluster, ns: &Path) -> (Pairs, Pairs) {
    let dev = vxlan_dev(c, ns);
    let fdb = in_ns(c, ns, &["bridge", "fdb", "show", "dev", &dev])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let dst = w.iter().position(|x| *x == "dst")?;
            Some((w[0].to_string(), w[dst + 1].to_string()))
        })
        .collect();
    let neigh = in_ns(c, ns, &["ip", "neigh", "show", "dev", &dev])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let mac = w.iter().position(|x| *x == "lladdr")?;
            Some((w[0].to_string(), w[mac + 1].to_string()))
        })
        .collect();
    (fdb, neigh)
}

/// A node's load-balancer endpoint on a network, as its agent last applied it (the API does not
/// show it): every other node carrying the network has a peer entry for it.
fn lb_addr(c: &Cluster, node: &str, network_id: &str) -> Option<String> {
    let text = std::fs::read_to_string(c.state_dir(node).join("assignment.json")).ok()?;
    let a: proto::agent::Assignment = serde_json::from_str(&text).ok()?;
    let net = a.networks.into_iter().find(|n| n.id == network_id)?;
    Some(net.lb_addr?.addr().to_string())
}

/// Every node with tasks of the network holds exactly the entries of the other nodes' tasks and
/// load-balancer endpoints.
fn assert_peers_exact(c: &Cluster, network_id: &str, tasks: &[TaskInfo]) {
    let vtep = |node: &str| c.lab.node(node).unwrap().ip.to_string();
    for node in c.lab.nodes() {
        let ns = sandbox(c, &node.name, network_id);
        let local = tasks
            .iter()
            .any(|t| t.node.as_deref() == Some(node.name.as_str()));
        if !local {
            c.wait_for(Duration::from_secs(15), "an unused sandbox goes", |_| {
                (!ns.exists()).then_some(())
            })
            .unwrap_or_else(|e| panic!("{} has no task but keeps a sandbox: {e}", node.name));
            continue;
        }
        let remote: Vec<&TaskInfo> = tasks
            .iter()
            .filter(|t| t.node.as_deref() != Some(node.name.as_str()))
            .collect();
        let remote_nodes: BTreeSet<&str> =
            remote.iter().filter_map(|t| t.node.as_deref()).collect();
        let want = |c: &Cluster| -> (Pairs, Pairs) {
            let lbs: Vec<(String, String, String)> = remote_nodes
                .iter()
                .filter_map(|n| {
                    let ip = lb_addr(c, n, network_id)?;
                    let mac = proto::model::endpoint_mac(ip.parse().ok()?);
                    Some((ip, mac, vtep(n)))
                })
                .collect();
            let fdb = remote
                .iter()
                .map(|t| (t.endpoints[0].mac.clone(), vtep(t.node.as_deref().unwrap())))
                .chain(lbs.iter().map(|(_, mac, vtep)| (mac.clone(), vtep.clone())))
                .collect();
            let neigh = remote
                .iter()
                .map(|t| (ip(t), t.endpoints[0].mac.clone()))
                .chain(lbs.iter().map(|(ip, mac, _)| (ip.clone(), mac.clone())))
                .collect();
            (fdb, neigh)
        };
        let got = c
            .wait_for(Duration::from_secs(15), "peer entries converge", |c| {
                let got = peer_entries(c, &ns);
                (got == want(c)).then_some(got)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}: got {:?}, want {:?}",
                    node.name,
                    peer_entries(c, &ns),
                    want(c)
                )
            });
        assert_eq!(got, want(c));
    }
}

fn network(c: &Cluster, name: &str) -> NetworkDetail {
    c.json(&["network", "inspect", name]).unwrap()
}

#[test]
fn a_replicated_service_spans_the_nodes_over_vxlan() {
    let c = Cluster::up(3, "nftables").unwrap();
    let tasks = deploy(&c, "backend", "10.0.9.0/24", "web", 3);
    let nodes: BTreeSet<_> = tasks.iter().map(|t| t.node.clone().unwrap()).collect();
    assert_eq!(nodes.len(), 3, "one task per node: {tasks:?}");
    for t in &tasks {
        assert!(
            t.endpoints[0].addr.to_string().starts_with("10.0.9."),
            "{t:?}"
        );
        assert_eq!(
            t.endpoints[0].mac,
            proto::model::endpoint_mac(t.endpoints[0].ip())
        );
    }
    // Count VXLAN datagrams arriving at node2's underlay while the tasks talk.
    in_ns(
        &c,
        c.lab.node("node2").unwrap().ns.path(),
        &["nft", "add table ip probe; add chain ip probe in { type filter hook input priority 0 ; }; add rule ip probe in udp dport 4789 counter"],
    );
    assert_full_mesh(&c, &tasks);
    let counters = in_ns(
        &c,
        c.lab.node("node2").unwrap().ns.path(),
        &["nft", "list", "table", "ip", "probe"],
    );
    let packets: u64 = counters
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        packets > 0,
        "no VXLAN on UDP 4789 reached node2: {counters}"
    );

    let net = network(&c, "backend");
    assert!(
        net.network.vni >= 4096,
        "VNIs start at 4096: {}",
        net.network.vni
    );
    assert_eq!(net.endpoints.len(), 3);
    let peers: BTreeSet<_> = net.peers.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(
        peers,
        ["192.168.56.11", "192.168.56.12", "192.168.56.13"]
            .map(String::from)
            .into()
    );
    // The VXLAN device follows the underlay MTU, not a fixed 1450.
    let sb = sandbox(&c, "node1", &net.network.id);
    let dev = vxlan_dev(&c, &sb);
    let details = in_ns(&c, &sb, &["ip", "-d", "link", "show", &dev]);
    assert!(details.contains("mtu 1450"), "{details}");
    assert!(
        details.contains(&format!("id {} ", net.network.vni)) && details.contains("dstport 4789"),
        "{details}"
    );
    assert_peers_exact(&c, &net.network.id, &tasks);
}

#[test]
fn scaling_updates_every_node_and_leaves_no_stale_entries() {
    let c = Cluster::up(3, "nftables").unwrap();
    let tasks = deploy(&c, "backend", "10.0.10.0/24", "web", 3);
    let id = network(&c, "backend").network.id;
    assert_peers_exact(&c, &id, &tasks);

    c.meshctl_ok(&["service", "scale", "web=6", "--detach"])
        .unwrap();
    let six = c.wait_running("web", 6).unwrap();
    assert_peers_exact(&c, &id, &six);
    assert_full_mesh(&c, &six[..4]);

    c.meshctl_ok(&["service", "scale", "web=2", "--detach"])
        .unwrap();
    let two = c.wait_running("web", 2).unwrap();
    assert_peers_exact(&c, &id, &two);
    assert_full_mesh(&c, &two);
    // Removed tasks' namespaces are gone from their nodes.
    for gone in six.iter().filter(|t| !two.iter().any(|k| k.id == t.id)) {
        let ns = gone.netns.clone().unwrap();
        c.wait_for(
            Duration::from_secs(15),
            "removed task's namespace goes",
            |_| (!Path::new(&ns).exists()).then_some(()),
        )
        .unwrap();
    }
}

#[test]
fn a_dead_task_is_replaced_and_reachable() {
    let c = Cluster::up(3, "nftables").unwrap();
    let tasks = deploy(&c, "backend", "10.0.11.0/24", "web", 3);
    let victim = &tasks[1];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let replaced = c
        .wait_for(Duration::from_secs(30), "a replacement task", |c| {
            let now = c.tasks("web").ok()?;
            (now.len() == 3
                && !now.iter().any(|t| t.id == victim.id)
                && now
                    .iter()
                    .all(|t| t.state == proto::model::TaskState::Running && t.netns.is_some()))
            .then_some(now)
        })
        .unwrap();
    let history: Vec<TaskInfo> = c.json(&["service", "ps", "web"]).unwrap();
    let old = history.iter().find(|t| t.id == victim.id).unwrap();
    assert_eq!(old.state, proto::model::TaskState::Failed, "{old:?}");
    assert_full_mesh(&c, &replaced);
}

#[test]
fn an_agent_killed_with_sigkill_keeps_connections_and_links() {
    let mut c = Cluster::up(2, "nftables").unwrap();
    let tasks = deploy(&c, "backend", "10.0.12.0/24", "web", 2);
    let (a, b) = (&tasks[0], &tasks[1]);
    let node_a = a.node.clone().unwrap();
    let id = network(&c, "backend").network.id;
    let sb = sandbox(&c, &node_a, &id);
    let links = |c: &Cluster| {
        (
            in_ns(c, &sb, &["ip", "-o", "link"]).lines().count(),
            in_ns(
                c,
                Path::new(a.netns.as_deref().unwrap()),
                &["ip", "-o", "link"],
            )
            .lines()
            .count(),
        )
    };
    let before = links(&c);

    // A keep-alive HTTP connection from task a to task b, opened inside a's namespace.
    let ns = netns::Netns::open(Path::new(a.netns.as_deref().unwrap())).unwrap();
    let target = format!("{}:8080", ip(b));
    let stream = ns.run(|| TcpStream::connect(&target)).unwrap().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = || {
        write!(writer, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        loop {
            let mut l = String::new();
            reader.read_line(&mut l).unwrap();
            if l == "\r\n" {
                break;
            }
        }
        reader.read_line(&mut body).unwrap();
        body
    };
    assert_eq!(ask(), format!("Hello World! from {}\n", ip(b)));

    c.kill_agent(&node_a, Signal::SIGKILL);
    c.start_agent(&node_a).unwrap();
    // Let the new agent adopt and run a few reconcile passes.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        ask(),
        format!("Hello World! from {}\n", ip(b)),
        "connection survives"
    );
    assert_eq!(links(&c), before, "no link was added or duplicated");
    let after = c.tasks("web").unwrap();
    assert_eq!(
        after.iter().map(|t| (&t.id, t.pid)).collect::<Vec<_>>(),
        tasks.iter().map(|t| (&t.id, t.pid)).collect::<Vec<_>>(),
        "the same tasks keep running"
    );
}

#[test]
fn a_manager_restart_loses_nothing() {
    let mut c = Cluster::up(3, "nftables").unwrap();
    let tasks = deploy(&c, "backend", "10.0.13.0/24", "web", 3);
    let nets_before: serde_json::Value = c.json(&["network", "ls"]).unwrap();
    let svcs_before: serde_json::Value = c.json(&["service", "ls"]).unwrap();
    c.kill_manager(Signal::SIGKILL);
    // The data plane keeps serving while the manager is down.
    assert_full_mesh(&c, &tasks);
    c.start_manager().unwrap();
    assert_eq!(
        c.json::<serde_json::Value>(&["network", "ls"]).unwrap(),
        nets_before
    );
    let svcs_after: serde_json::Value = c.json(&["service", "ls"]).unwrap();
    assert_eq!(svcs_after[0]["id"], svcs_before[0]["id"]);
    let after = c.wait_running("web", 3).unwrap();
    assert_eq!(
        after.iter().map(|t| (&t.id, t.pid)).collect::<Vec<_>>(),
        tasks.iter().map(|t| (&t.id, t.pid)).collect::<Vec<_>>(),
        "the same tasks, same processes"
    );
}

#[test]
fn networks_with_the_same_subnet_stay_isolated() {
    let c = Cluster::up(2, "nftables").unwrap();
    let a = deploy(&c, "neta", "10.0.20.0/24", "sa", 2);
    let b = deploy(&c, "netb", "10.0.20.0/24", "sb", 2);
    let (ida, idb) = (network(&c, "neta").network, network(&c, "netb").network);
    assert_ne!(ida.vni, idb.vni);
    // Same addresses on both networks, each answered by its own network's task.
    assert_full_mesh(&c, &a);
    assert_full_mesh(&c, &b);
    for t in &a {
        for o in &b {
            if ip(t) == ip(o) {
                continue;
            }
            // An address that exists only on netb is unreachable from neta.
            if !a.iter().any(|x| ip(x) == ip(o)) {
                assert!(!ping(&c, t, &ip(o)), "{} reached netb's {}", t.name, o.name);
            }
        }
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let c = Cluster::up(1, "nftables").unwrap();
    c.network_create("backend", "10.0.30.0/24").unwrap();
    let hello = hello();
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "backend",
        "--detach",
        "--",
        &hello,
    ])
    .unwrap();
    c.wait_running("web", 1).unwrap();
    let state = |c: &Cluster| {
        (
            c.meshctl_ok(&["network", "ls", "--format", "json"])
                .unwrap(),
            c.meshctl_ok(&["service", "ls", "--format", "json"])
                .unwrap(),
        )
    };
    let before = state(&c);
    let bad: &[&[&str]] = &[
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.0.300.0/24",
            "x",
        ],
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "192.168.0.0/16",
            "x",
        ],
        &["network", "create", "--driver", "overlay", "backend"],
        &[
            "service",
            "create",
            "--name",
            "x",
            "--network",
            "nope",
            "--detach",
            "--",
            &hello,
        ],
        &[
            "service", "create", "--name", "web", "--detach", "--", &hello,
        ],
        &[
            "service",
            "create",
            "--name",
            "x",
            "--replicas",
            "-1",
            "--detach",
            "--",
            &hello,
        ],
        &["service", "create", "--name", "x", "--detach"],
        &["service", "scale", "web=-2"],
        &["service", "scale", "nope=2"],
        &["network", "rm", "backend"],
    ];
    for args in bad {
        let out = c.meshctl(args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains("rror"), "{args:?}: no clear error: {err}");
        assert_eq!(state(&c), before, "{args:?} changed the state");
    }
    let out = c.meshctl(&["network", "rm", "backend"]).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web"),
        "refusal names the attached service"
    );
}
