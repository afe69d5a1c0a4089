//! `mesh-agent --cleanup` on a node that runs a task on an overlay and the routing mesh.

use std::path::Path;
use std::process::Stdio;

use integration::cluster::Cluster;
use nix::sys::signal::Signal;

fn out(c: &Cluster, node: &str, args: &[&str]) -> (bool, String) {
    let o = c.lab.exec(node, args).unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn cleanup_removes_everything_meshnet_made_on_the_node() {
    let mut c = Cluster::up(2, super::LB).unwrap();
    c.network_create("backend", "10.0.31.0/24").unwrap();
    let tasks = c
        .hello_service("web", 2, &["--network", "backend", "--publish", "80:8080"])
        .unwrap();
    let task = tasks
        .iter()
        .find(|t| t.node.as_deref() == Some("node2"))
        .expect("a task on node2");
    let pid = task.pid.expect("the task's pid");
    let netns_dir = c.state_dir("node2").join("netns");
    let (_, links) = out(&c, "node2", &["ip", "-o", "link"]);
    assert!(links.contains("mesh_gwbridge"), "{links}");
    assert!(out(&c, "node2", &["nft", "list", "table", "ip", "meshnet"]).0);
    assert!(
        netns_dir.read_dir().unwrap().count() >= 4,
        "ingress, its sbox, backend, the task"
    );

    // Stopped like systemd does (KillMode=process): the task and the data plane stay.
    c.kill_agent("node2", Signal::SIGTERM);
    assert!(super::pid_alive(pid), "the task outlives its agent");
    let mut cmd = c.agent_command("node2", &["--cleanup"]).unwrap();
    let node2 = c.lab.node("node2").unwrap();
    let res = node2
        .ns
        .output(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .unwrap();
    assert!(
        res.status.success(),
        "mesh-agent --cleanup: {}",
        String::from_utf8_lossy(&res.stderr)
    );

    assert!(!super::pid_alive(pid), "the task's process is gone");
    let left: Vec<_> = netns_dir.read_dir().unwrap().collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert_eq!(super::mounts_under(&netns_dir), Vec::<String>::new());
    let (_, links) = out(&c, "node2", &["ip", "-o", "link"]);
    for ours in ["mesh_gwbridge", "mgw", "vxlan", "veth"] {
        assert!(!links.contains(ours), "{ours} left on node2:\n{links}");
    }
    let (_, tables) = out(&c, "node2", &["nft", "list", "tables"]);
    assert!(!tables.contains("meshnet"), "nft tables left: {tables}");
    // The node keeps its identity: the next start needs no token.
    assert!(Path::new(&c.state_dir("node2"))
        .join("tls/node.pem")
        .exists());

    // A second cleanup finds nothing to do and succeeds.
    let mut again = c.agent_command("node2", &["--cleanup"]).unwrap();
    let res = node2.ns.output(again.stderr(Stdio::piped())).unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}
