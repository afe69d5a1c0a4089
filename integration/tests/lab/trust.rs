//! The cluster's trust with real agents: joining takes a valid token of this cluster, a removed
//! node stays out, and certificates renew while traffic flows.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use integration::cluster::{bin, Cluster, CONVERGE_TIMEOUT};
use nix::sys::signal::Signal;
use proto::api::{NodeInfo, TaskInfo};
use proto::model::NodeStatus;

use crate::LB;

const INTRUDER: &str = "intruder";
const INTRUDER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 50);

/// Runs mesh-agent on `node` until it exits (a refused agent exits at once).
fn run_agent(c: &Cluster, node: &str, extra: &[&str]) -> Output {
    let mut cmd = c.agent_command(node, extra).unwrap();
    c.lab.node(node).unwrap().ns.output(&mut cmd).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn hostnames(c: &Cluster) -> Vec<String> {
    let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).unwrap();
    nodes.into_iter().map(|n| n.node.hostname).collect()
}

/// The token with one character of its secret (or, with `digest`, of its CA digest) changed.
fn altered(token: &str, digest: bool) -> String {
    let at = if digest { 12 } else { token.len() - 3 };
    let mut b = token.as_bytes().to_vec();
    b[at] = if b[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(b).unwrap()
}

#[test]
fn only_a_current_token_of_this_cluster_joins_and_the_refused_are_told_why() {
    let mut c = Cluster::up(2, LB).unwrap();
    c.lab.add_host(INTRUDER, INTRUDER_IP).unwrap();
    let token = c.worker_token().unwrap();
    let (wrong, foreign) = (altered(&token, false), altered(&token, true));
    let refusals: [(&str, Vec<&str>, &str); 4] = [
        ("no token", vec![], "meshctl join-token worker"),
        (
            "a malformed token",
            vec!["--join-token", "SWMTKN-1-nope"],
            "invalid join token",
        ),
        (
            "a wrong secret",
            vec!["--join-token", &wrong],
            "invalid join token",
        ),
        (
            "another cluster's CA digest",
            vec!["--join-token", &foreign],
            "the manager's CA does not match the join token",
        ),
    ];
    for (what, flags, why) in refusals {
        let out = run_agent(&c, INTRUDER, &flags);
        assert!(!out.status.success(), "{what}: the agent must not start");
        assert!(stderr(&out).contains(why), "{what}: {}", stderr(&out));
    }
    assert_eq!(hostnames(&c), ["node1", "node2"]);
    assert!(
        !c.state_dir(INTRUDER).join("tls/node.pem").exists(),
        "a refused node holds no certificate"
    );

    // A rotated token: the old one joins nobody any more; nodes that joined stay and reconnect.
    c.meshctl_ok(&["join-token", "worker", "--rotate"]).unwrap();
    let out = run_agent(&c, INTRUDER, &["--join-token", &token]);
    assert!(
        stderr(&out).contains("invalid join token"),
        "{}",
        stderr(&out)
    );
    c.kill_agent("node2", Signal::SIGKILL);
    c.start_agent_with("node2", &[]).unwrap();
    c.wait_for(CONVERGE_TIMEOUT, "node2 back with its certificate", |c| {
        let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).ok()?;
        nodes
            .iter()
            .any(|n| n.node.hostname == "node2" && n.node.status == NodeStatus::Ready)
            .then_some(())
    })
    .unwrap();
    assert_eq!(hostnames(&c), ["node1", "node2"]);
}

#[test]
fn an_agent_refuses_a_manager_of_another_cluster() {
    let mut c = Cluster::up(1, LB).unwrap();
    c.lab.add_host(INTRUDER, INTRUDER_IP).unwrap();
    // A second cluster's manager on the same node, another port.
    let other = c.lab.root().join("other");
    let mut cmd = c.lab.command(bin("mesh-manager"));
    cmd.args(["--listen", "192.168.56.11:2390", "--data-dir"])
        .arg(other.join("data"))
        .arg("--api-socket")
        .arg(other.join("api.sock"))
        .stderr(std::fs::File::create(c.lab.root().join("logs/other-manager.log")).unwrap());
    c.lab.spawn("node1", &mut cmd).unwrap();
    let host = format!("unix://{}", other.join("api.sock").display());
    let other_token = c
        .wait_for(Duration::from_secs(30), "the other manager's token", |c| {
            let out = c
                .lab
                .exec(
                    "node1",
                    &[
                        bin("meshctl").to_str().unwrap(),
                        "--host",
                        &host,
                        "join-token",
                        "worker",
                        "-q",
                    ],
                )
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap();
    // This cluster's manager at --manager, the other cluster's token: refused before any state.
    let out = run_agent(&c, INTRUDER, &["--join-token", &other_token]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the manager's CA does not match the join token"),
        "{}",
        stderr(&out)
    );
    assert_eq!(hostnames(&c), ["node1"]);
}

#[test]
fn a_removed_node_is_refused_and_its_tasks_move() {
    let c = Cluster::up(3, LB).unwrap();
    c.hello_service("web", 3, &[]).unwrap();

    let out = c.meshctl(&["node", "rm", "node3"]).unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    c.meshctl_ok(&["node", "rm", "--force", "node3"]).unwrap();
    assert_eq!(hostnames(&c), ["node1", "node2"]);

    // Its slot is refilled elsewhere; its agent is refused whenever it tries again.
    c.wait_for(
        CONVERGE_TIMEOUT,
        "web running on node1 and node2 only",
        |c| {
            let tasks: Vec<TaskInfo> = c.json(&["service", "ps", "web"]).ok()?;
            let running: Vec<&TaskInfo> = tasks
                .iter()
                .filter(|t| t.state == proto::model::TaskState::Running)
                .collect();
            (running.len() == 3 && running.iter().all(|t| t.node.as_deref() != Some("node3")))
                .then_some(())
        },
    )
    .unwrap();
    c.wait_for(CONVERGE_TIMEOUT, "node3's agent told it was removed", |c| {
        let log = std::fs::read_to_string(c.log_path("agent-node3")).ok()?;
        log.contains("was removed from the cluster").then_some(())
    })
    .unwrap();
    assert_eq!(hostnames(&c), ["node1", "node2"]);
}

/// One `GET /` from `ns` to `addr` on a new connection.
fn fetch(ns: &netns::Netns, addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2))) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut body = String::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut body).is_ok()
        && body.starts_with("HTTP/1.1 200")
}

#[test]
fn certificates_renew_while_traffic_flows() {
    // Node and manager certificates of 20 s: each renews 10-16 s after issue.
    let mut c = Cluster::up_with(3, LB, &["--cert-expiry", "20s"]).unwrap();
    c.lab
        .add_host("client", Ipv4Addr::new(192, 168, 56, 100))
        .unwrap();
    c.hello_service("web", 3, &["--publish", "80:8080"])
        .unwrap();
    let client = &c.lab.node("client").unwrap().ns;
    let nodes: Vec<SocketAddr> = ["192.168.56.11:80", "192.168.56.12:80", "192.168.56.13:80"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    c.wait_for(CONVERGE_TIMEOUT, "every node answers on port 80", |_| {
        nodes.iter().all(|a| fetch(client, *a)).then_some(())
    })
    .unwrap();

    // Past the first certificates' whole life, with requests all along.
    let started = Instant::now();
    let (mut sent, mut failed) = (0, 0);
    while started.elapsed() < Duration::from_secs(26) {
        if !fetch(client, nodes[sent % nodes.len()]) {
            failed += 1;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during renewals"
    );
    for node in ["node1", "node2", "node3"] {
        let log = std::fs::read_to_string(c.log_path(&format!("agent-{node}"))).unwrap();
        assert!(
            log.contains("renewed the node's certificate"),
            "{node}: {log}"
        );
    }
    let log = std::fs::read_to_string(c.log_path("manager")).unwrap();
    assert!(log.contains("renewed the manager's certificate"), "{log}");
    let nodes_ls: Vec<NodeInfo> = c.json(&["node", "ls"]).unwrap();
    assert!(nodes_ls.iter().all(|n| n.node.status == NodeStatus::Ready));

    // The first certificates have expired: a new connection needs the renewed ones.
    c.kill_agent("node2", Signal::SIGKILL);
    let log_len = std::fs::metadata(c.log_path("agent-node2")).unwrap().len();
    c.start_agent_with("node2", &[]).unwrap();
    c.wait_for(
        CONVERGE_TIMEOUT,
        "node2 reconnected with its renewed certificate",
        |c| {
            let log = std::fs::read(c.log_path("agent-node2")).ok()?;
            let fresh = String::from_utf8_lossy(&log[log_len as usize..]).into_owned();
            fresh.contains("connected to the manager").then_some(())
        },
    )
    .unwrap();
}
