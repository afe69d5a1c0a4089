//! Global mode end to end: a hello-server on every eligible node of a 3-node lab, on a user
//! network with a published port, following a drain, a return to active and a fourth node; and
//! one with a host-mode port following node labels.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use integration::cluster::{bin, Cluster, CONVERGE_TIMEOUT};
use nix::sys::signal::Signal;
use proto::api::{ServiceInfo, TaskInfo};
use proto::model::TaskState;

use crate::mesh::{get as get_at, greetings};
use integration::lab::CLIENT;

/// One `GET /` from the client to `ip:80`; None if it fails.
fn get(c: &Cluster, ip: &str) -> Option<String> {
    get_at(c, ip, 80, "/")
}

/// Waits until every node in `ips` answers on the published port, and the answers of each,
/// over a few rounds, come from exactly the given tasks.
fn assert_every_node_answers(c: &Cluster, ips: &[&str], tasks: &[TaskInfo]) {
    let want = greetings(tasks);
    for ip in ips {
        c.wait_for(
            CONVERGE_TIMEOUT,
            &format!("{ip}:80 answered by {want:?}"),
            |c| {
                let answers: Vec<String> = (0..want.len() * 3).map_while(|_| get(c, ip)).collect();
                (answers.len() == want.len() * 3
                    && answers.iter().cloned().collect::<BTreeSet<_>>() == want)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
}

fn nodes_of(tasks: &[TaskInfo]) -> Vec<String> {
    let mut nodes: Vec<String> = tasks.iter().map(|t| t.node.clone().unwrap()).collect();
    nodes.sort();
    nodes
}

fn inspect(c: &Cluster) -> ServiceInfo {
    c.json(&["service", "inspect", "agent"]).unwrap()
}

fn client_cluster() -> Cluster {
    let mut c = Cluster::up(3, crate::LB).unwrap();
    c.lab
        .add_host(CLIENT, Ipv4Addr::new(192, 168, 56, 100))
        .unwrap();
    c
}

#[test]
fn a_global_service_runs_on_every_node_and_follows_drain_and_joins() {
    let mut c = client_cluster();
    c.network_create("backend", "10.0.9.0/24").unwrap();
    let hello = bin("hello-server").display().to_string();

    // --replicas does not go with global mode: nothing is created.
    let out = c
        .meshctl(&[
            "service",
            "create",
            "--name",
            "agent",
            "--mode",
            "global",
            "--replicas",
            "2",
            "--",
            &hello,
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--replicas can only be used with replicated mode"),
        "{out:?}"
    );

    // Not detached: meshctl waits for a task on each of the three nodes.
    let created = c
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "agent",
            "--mode",
            "global",
            "--network",
            "backend",
            "--publish",
            "80:8080",
            "--",
            &hello,
            "--port",
            "8080",
        ])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(
        created.contains("overall progress: 3 out of 3 tasks"),
        "{created}"
    );
    // Progress by node, as docker shows a global service's.
    for node in ["node1", "node2", "node3"] {
        assert!(
            created.contains(&format!("\n{node}: running\n")),
            "{created}"
        );
    }
    let tasks = c.wait_running("agent", 3).unwrap();
    assert_eq!(nodes_of(&tasks), ["node1", "node2", "node3"]);
    let ls = c.meshctl_ok(&["service", "ls"]).unwrap();
    let row = ls.lines().find(|l| l.contains(" agent ")).unwrap();
    assert!(row.contains(" global ") && row.contains(" 3/3 "), "{ls}");
    let pretty = c
        .meshctl_ok(&["service", "inspect", "--pretty", "agent"])
        .unwrap();
    assert!(pretty.contains("Service Mode:\tGlobal"), "{pretty}");
    let info = inspect(&c);
    assert_eq!(
        (info.spec.mode.as_str(), info.desired, info.running),
        ("global", 3, 3)
    );
    let nodes = ["192.168.56.11", "192.168.56.12", "192.168.56.13"];
    assert_every_node_answers(&c, &nodes, &tasks);

    let out = c.meshctl(&["service", "scale", "agent=5"]).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("scale can only be used with replicated mode"),
        "{out:?}"
    );
    assert_eq!(c.tasks("agent").unwrap().len(), 3);

    // Drain node2: its task goes and is not replaced elsewhere; every node keeps answering,
    // node2 through the routing mesh, from the other two tasks.
    let on2 = tasks
        .iter()
        .find(|t| t.node.as_deref() == Some("node2"))
        .unwrap();
    c.meshctl_ok(&["node", "update", "--availability", "drain", "node2"])
        .unwrap();
    let tasks = c.wait_running("agent", 2).unwrap();
    assert_eq!(nodes_of(&tasks), ["node1", "node3"]);
    assert_eq!(inspect(&c).desired, 2);
    assert_every_node_answers(&c, &nodes, &tasks);

    // Active again: node2 gets a new task, in its old slot.
    c.meshctl_ok(&["node", "update", "--availability", "active", "node2"])
        .unwrap();
    let tasks = c.wait_running("agent", 3).unwrap();
    assert_eq!(nodes_of(&tasks), ["node1", "node2", "node3"]);
    let back = tasks
        .iter()
        .find(|t| t.node.as_deref() == Some("node2"))
        .unwrap();
    assert_ne!(back.id, on2.id);
    assert_eq!((back.slot, &back.name), (on2.slot, &on2.name));
    assert_every_node_answers(&c, &nodes, &tasks);

    // A fourth node joins: it gets a task, and answers on the published port too.
    c.lab
        .add_host("node4", Ipv4Addr::new(192, 168, 56, 14))
        .unwrap();
    c.start_agent("node4").unwrap();
    let tasks = c
        .wait_running("agent", 4)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(nodes_of(&tasks), ["node1", "node2", "node3", "node4"]);
    let all = [
        "192.168.56.11",
        "192.168.56.12",
        "192.168.56.13",
        "192.168.56.14",
    ];
    assert_every_node_answers(&c, &all, &tasks);
    let ls = c.meshctl_ok(&["service", "ls"]).unwrap();
    assert!(ls.contains(" 4/4 "), "{ls}");
    // Tasks are named by node, and node2's history shows why its first task went.
    let ps = c.meshctl_ok(&["service", "ps", "agent"]).unwrap();
    let node4: Vec<proto::api::NodeInfo> = c.json(&["node", "ls"]).unwrap();
    let node4 = node4.iter().find(|n| n.node.hostname == "node4").unwrap();
    assert!(ps.contains(&format!("agent.{}", node4.node.id)), "{ps}");
    assert!(ps.contains("\"node node2 is drained\""), "{ps}");

    // node4 goes silent: once it is down its task is orphaned and not replaced elsewhere; the
    // others keep answering. Back up, it gets a task again.
    let on4 = tasks
        .iter()
        .find(|t| t.node.as_deref() == Some("node4"))
        .unwrap();
    c.kill_agent("node4", Signal::SIGKILL);
    let tasks = c.wait_running("agent", 3).unwrap();
    assert_eq!(nodes_of(&tasks), ["node1", "node2", "node3"]);
    let history: Vec<TaskInfo> = c.json(&["service", "ps", "agent"]).unwrap();
    let orphan = history.iter().find(|t| t.id == on4.id).unwrap();
    assert_eq!(orphan.state, TaskState::Orphaned, "{orphan:?}");
    assert_every_node_answers(&c, &nodes, &tasks);
    c.start_agent("node4").unwrap();
    let tasks = c
        .wait_running("agent", 4)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(nodes_of(&tasks), ["node1", "node2", "node3", "node4"]);
    assert_every_node_answers(&c, &all, &tasks);
}

/// Whether `ip:8081` (host mode) answers, straight from a task there that sees the client.
fn host_port_answers(c: &Cluster, ip: &str) -> bool {
    get_at(c, ip, 8081, "/whoami").is_some_and(|who| who.starts_with("client 192.168.56.100:"))
}

fn wait_host_port(c: &Cluster, ip: &str, answers: bool) {
    c.wait_for(
        CONVERGE_TIMEOUT,
        &format!("{ip}:8081 answers: {answers}"),
        |c| (host_port_answers(c, ip) == answers).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

#[test]
fn a_global_service_follows_node_labels_with_a_host_mode_port() {
    let c = client_cluster();
    let hello = bin("hello-server").display().to_string();
    for node in ["node1", "node3"] {
        c.meshctl_ok(&["node", "update", "--label-add", "edge=yes", node])
            .unwrap();
    }
    let created = c
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "edge",
            "--mode",
            "global",
            "--constraint",
            "node.labels.edge==yes",
            "--publish",
            "mode=host,published=8081,target=8080,protocol=tcp",
            "--",
            &hello,
            "--port",
            "8080",
        ])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(
        created.contains("overall progress: 2 out of 2 tasks"),
        "{created}"
    );
    assert_eq!(
        nodes_of(&c.wait_running("edge", 2).unwrap()),
        ["node1", "node3"]
    );
    wait_host_port(&c, "192.168.56.11", true);
    wait_host_port(&c, "192.168.56.13", true);
    assert!(!host_port_answers(&c, "192.168.56.12"));

    // node2 starts matching: it gets a task, and its host port answers.
    c.meshctl_ok(&["node", "update", "--label-add", "edge=yes", "node2"])
        .unwrap();
    assert_eq!(
        nodes_of(&c.wait_running("edge", 3).unwrap()),
        ["node1", "node2", "node3"]
    );
    wait_host_port(&c, "192.168.56.12", true);

    // node3 stops matching: its task goes, and so does its host port.
    c.meshctl_ok(&["node", "update", "--label-rm", "edge", "node3"])
        .unwrap();
    assert_eq!(
        nodes_of(&c.wait_running("edge", 2).unwrap()),
        ["node1", "node2"]
    );
    wait_host_port(&c, "192.168.56.13", false);
    wait_host_port(&c, "192.168.56.11", true);
    let ls = c.meshctl_ok(&["service", "ls"]).unwrap();
    let row = ls.lines().find(|l| l.contains(" edge ")).unwrap();
    assert!(row.contains(" global ") && row.contains(" 2/2 "), "{ls}");
}
