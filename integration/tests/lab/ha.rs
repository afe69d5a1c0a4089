//! Several managers on etcd: three managers (node1..node3) on a three-member etcd beside them.
//! A killed leader is replaced and nothing it held is lost; etcd without quorum stops writes
//! with a clear error while the data plane serves on; the routing mesh never stops answering.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::cluster::{bin, Cluster, ClusterOptions, CONVERGE_TIMEOUT, HA_NODES};
use integration::http;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{ManagerStatus, NodeInfo, ServiceInfo};
use proto::model::NodeStatus;

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
    // Roles: a node whose manager runs stays a manager; the dead manager's node may go.
    let err = c
        .meshctl_ok(&["node", "demote", &now])
        .unwrap_err()
        .to_string();
    assert!(err.contains("a manager runs there"), "{err}");
    c.meshctl_ok(&["node", "demote", &leader]).unwrap();
    assert!(statuses(&c).contains(&(leader.clone(), None)));
    c.meshctl_ok(&["node", "promote", &leader]).unwrap();
    assert!(statuses(&c).contains(&(leader.clone(), Some(ManagerStatus::Unreachable))));
    let join = c.meshctl_ok(&["join-token", "manager"]).unwrap();
    assert!(
        HA_NODES
            .iter()
            .filter(|n| **n != leader)
            .all(|n| join.contains(&format!("{}:2377", c.lab.node(n).unwrap().ip))),
        "the join command names every running manager: {join}"
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
        integration::lab::NODE_IPS
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

/// A single manager's state moves into an empty etcd with `--import`: the services, the
/// nodes and their certificates carry on; an etcd that holds a cluster is never overwritten.
#[test]
fn a_single_managers_state_is_imported_into_an_empty_etcd_once() {
    let mut c = cluster_with(ClusterOptions::default());
    web(&c, &[]);
    wait_tag(&c, "v1");
    c.kill_manager(Signal::SIGTERM);

    let root = c.lab.root().to_path_buf();
    let etcd = |c: &Cluster| {
        let mut cmd = c.lab.command("etcd");
        cmd.args(["--name", "solo", "--data-dir"])
            .arg(root.join("etcd-solo"))
            .args([
                "--listen-client-urls",
                "http://192.168.56.11:2379",
                "--advertise-client-urls",
                "http://192.168.56.11:2379",
                "--listen-peer-urls",
                "http://192.168.56.11:2380",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.lab.spawn("node1", &mut cmd).unwrap();
    };
    etcd(&c);
    let manager = |data_dir: &str, socket: &std::path::Path| {
        let mut cmd = Command::new(bin("mesh-manager"));
        cmd.args([
            "--listen",
            "192.168.56.11:2377",
            "--api-listen",
            "192.168.56.11:2378",
            "--store",
            "etcd://192.168.56.11:2379",
            "--import",
        ])
        .arg(c.manager_data_dir())
        .arg("--data-dir")
        .arg(root.join(data_dir))
        .arg("--api-socket")
        .arg(socket);
        cmd
    };
    let log = std::fs::File::create(c.log_path("manager-imported")).unwrap();
    let mut first = manager("manager-etcd", &c.api_socket());
    first
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    c.lab.spawn("node1", &mut first).unwrap();

    // The agents come back to the same address and find their tasks as they left them.
    c.wait_for(
        CONVERGE_TIMEOUT,
        "the imported cluster with every node ready",
        |c| {
            let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).ok()?;
            (nodes.len() == 3 && nodes.iter().all(|n| n.node.status == NodeStatus::Ready))
                .then_some(())
        },
    )
    .unwrap();
    let services: Vec<ServiceInfo> = c.json(&["service", "ls"]).unwrap();
    assert_eq!(services.len(), 1, "{services:?}");
    c.wait_running("web", 3).unwrap();
    c.meshctl_ok(&["service", "scale", "web=4"]).unwrap();
    c.wait_running("web", 4).unwrap();
    wait_tag(&c, "v1");

    // A second import into the now busy etcd is refused, saying why.
    let out = c
        .lab
        .node("node1")
        .unwrap()
        .ns
        .output(manager("manager-again", &root.join("again.sock")).stdin(Stdio::null()))
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("already holds a cluster"), "{err}");
}

/// etcd kept private with TLS and client certificates (`--etcd-ca/--etcd-cert/--etcd-key`):
/// the manager reaches it over https, is elected and writes.
#[test]
fn a_manager_reaches_etcd_over_tls_with_its_client_certificate() {
    let lab = integration::lab::Lab::up(integration::lab::LabConfig {
        nodes: 1,
        ..Default::default()
    })
    .unwrap();
    let dir = lab.root().join("etcd-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = trust::Ca::generate("etcd-test").unwrap();
    let issue = |cn: &str, sans: &[String]| {
        let subject = trust::Subject {
            common_name: cn.into(),
            role: trust::CertRole::Manager,
            cluster_id: "etcd-test".into(),
        };
        ca.issue(&subject, sans, Duration::from_secs(3600)).unwrap()
    };
    let (server, server_key) = issue("etcd", &["192.168.56.11".into()]);
    let (client, client_key) = issue("mesh-manager", &[]);
    for (name, body) in [
        ("ca.pem", ca.cert_pem()),
        ("server.pem", &server),
        ("server-key.pem", &server_key),
        ("client.pem", &client),
        ("client-key.pem", &client_key),
    ] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let path = |f: &str| dir.join(f).display().to_string();
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut etcd = lab.command("etcd");
    etcd.args(["--name", "solo", "--data-dir", &path("data")])
        .args(["--listen-client-urls", "https://192.168.56.11:2379"])
        .args(["--advertise-client-urls", "https://192.168.56.11:2379"])
        .args(["--listen-peer-urls", "http://192.168.56.11:2380"])
        .args([
            "--cert-file",
            &path("server.pem"),
            "--key-file",
            &path("server-key.pem"),
        ])
        .args(["--trusted-ca-file", &path("ca.pem"), "--client-cert-auth"])
        .stdin(Stdio::null())
        .stdout(log("etcd.log"))
        .stderr(log("etcd.err"));
    lab.spawn("node1", &mut etcd).unwrap();
    let socket = path("manager.sock");
    let mut manager = lab.command(bin("mesh-manager"));
    manager
        .args([
            "--listen",
            "192.168.56.11:2377",
            "--api-listen",
            "192.168.56.11:2378",
        ])
        .args(["--store", "etcd://192.168.56.11:2379"])
        .args(["--etcd-ca", &path("ca.pem")])
        .args([
            "--etcd-cert",
            &path("client.pem"),
            "--etcd-key",
            &path("client-key.pem"),
        ])
        .args(["--data-dir", &path("manager"), "--api-socket", &socket])
        .stdin(Stdio::null())
        .stdout(log("manager.log"))
        .stderr(log("manager.err"));
    lab.spawn("node1", &mut manager).unwrap();

    let meshctl = bin("meshctl").display().to_string();
    let host = format!("unix://{socket}");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = lab
            .exec(
                "node1",
                &[
                    &meshctl, "--host", &host, "network", "create", "--driver", "overlay", "tls",
                ],
            )
            .unwrap();
        if out.status.success() {
            let listed = lab
                .exec("node1", &[&meshctl, "--host", &host, "network", "ls"])
                .unwrap();
            assert!(String::from_utf8_lossy(&listed.stdout).contains(" tls "));
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "no write through etcd over TLS: {last}\n{}",
        std::fs::read_to_string(dir.join("manager.err")).unwrap_or_default()
    );
}
