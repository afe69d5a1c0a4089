//! Several managers on etcd: three managers (node1..node3) on a three-member etcd beside them.
//! A killed leader is replaced and nothing it held is lost; etcd without quorum stops writes
//! with a clear error while the data plane serves on; the routing mesh never stops answering.

use std::time::{Duration, Instant};

use integration::cluster::{bin, Cluster, ClusterOptions, CONVERGE_TIMEOUT, HA_NODES};
use integration::http;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{ManagerStatus, NodeInfo, ServiceInfo};

use crate::rolling::{assert_no_failures, cluster_with, under_load, wait_tag, web};

fn ha() -> Cluster {
    cluster_with(ClusterOptions {
        ha: true,
        ..ClusterOptions::default()
    })
}

/// `node ls`'s MANAGER STATUS by hostname.
fn statuses(c: &Cluster) -> Vec<(String, Option<ManagerStatus>)> {
    let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).unwrap();
    nodes
        .into_iter()
        .map(|n| (n.node.hostname, n.manager_status))
        .collect()
}

fn create_after(c: &Cluster) -> Result<String, String> {
    let hello = bin("hello-server").display().to_string();
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "after",
        "--replicas",
        "2",
        "--network",
        "app",
        "--detach",
        "--",
        &hello,
        "--port",
        "8080",
    ])
    .map_err(|e| e.to_string())
}

#[test]
fn a_killed_leader_is_replaced_and_nothing_stops_or_is_lost() {
    let c = ha();
    let leader = c.leader().expect("a leader");
    // A node whose manager registered after it joined is made a manager node within a poll.
    c.wait_for(
        Duration::from_secs(10),
        "one Leader and two Reachable",
        |c| {
            let st = statuses(c);
            let count = |s: ManagerStatus| st.iter().filter(|(_, m)| *m == Some(s)).count();
            (
                count(ManagerStatus::Leader),
                count(ManagerStatus::Reachable),
            )
                .eq(&(1, 2))
                .then_some(())
        },
    )
    .unwrap();
    web(&c, &[]);
    let probe = crate::discovery::sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");

    // meshctl goes on through a manager that is not the leader: it forwards to whichever leads.
    let other = HA_NODES.iter().find(|n| **n != leader).unwrap();
    c.use_manager(other);
    let mut failover = Duration::ZERO;
    let t = under_load(&c, &probe, || {
        let pid = c.manager_pid_on(&leader).unwrap();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            match create_after(&c) {
                Ok(_) => {
                    failover = killed.elapsed();
                    break;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !failover.is_zero(),
            "no write accepted 30 s after the leader was killed: {last}"
        );
        c.wait_running("after", 2).unwrap();
    });
    eprintln!("leader on {leader} killed: a write was accepted again after {failover:?}");
    assert_no_failures("leader failover", &t, &c);

    let now = c.leader().expect("a new leader");
    assert_ne!(now, leader);
    let st = statuses(&c);
    assert!(
        st.contains(&(leader.clone(), Some(ManagerStatus::Unreachable))),
        "the killed manager's node: {st:?}"
    );
    // Nothing the old leader held is lost.
    let services: Vec<ServiceInfo> = c.json(&["service", "ls"]).unwrap();
    let mut names: Vec<&str> = services.iter().map(|s| s.spec.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["after", "probe", "web"]);
    c.wait_running("web", 3).unwrap();
}

#[test]
fn etcd_without_quorum_refuses_writes_clearly_while_the_mesh_serves() {
    let mut c = ha();
    web(&c, &[]);
    wait_tag(&c, "v1");
    let answers = |c: &Cluster| {
        let client = &c.lab.node("client").unwrap().ns;
        ["192.168.56.11", "192.168.56.12", "192.168.56.13"]
            .iter()
            .all(|n| http::get(client, n, 80, "/tag").ok().as_deref() == Some("v1\n"))
    };

    // One member of three down: etcd keeps its quorum and the managers go on.
    c.kill_etcd("node3", Signal::SIGKILL);
    c.wait_for(CONVERGE_TIMEOUT, "a write with one etcd member down", |c| {
        c.meshctl_ok(&["service", "scale", "web=4"]).ok()
    })
    .unwrap();
    c.wait_running("web", 4).unwrap();

    // Two down: no quorum. Writes are refused, saying why; the routing mesh still answers.
    c.kill_etcd("node2", Signal::SIGKILL);
    let refused = c
        .wait_for(
            Duration::from_secs(30),
            "writes refused without quorum",
            |c| {
                c.meshctl(&["service", "scale", "web=3"])
                    .ok()
                    .filter(|o| !o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            },
        )
        .unwrap();
    assert!(
        refused.contains("no manager is now") || refused.contains("etcd"),
        "an unclear refusal: {refused}"
    );
    for _ in 0..5 {
        assert!(
            answers(&c),
            "the routing mesh stopped answering without etcd's quorum"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Quorum back: writes work again.
    c.start_etcd("node2").unwrap();
    c.start_etcd("node3").unwrap();
    c.wait_for(CONVERGE_TIMEOUT, "a write once etcd is back", |c| {
        c.meshctl_ok(&["service", "scale", "web=3"]).ok()
    })
    .unwrap();
    c.wait_running("web", 3).unwrap();
    assert!(answers(&c));
}
