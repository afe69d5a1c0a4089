//! Service VIPs end to end: the real manager allocates each service a VIP on its network, and
//! every node's agent balances it over the service's running tasks, wherever they run.
//! Shared by the lab tier (`crate::LB` = "nftables": DNAT in the client's namespace) and the
//! guest tier (`crate::LB` = "ipvs": Swarm's `lb_<network>` namespaces).

use std::collections::BTreeSet;

use integration::cluster::{Cluster, CONVERGE_TIMEOUT};
use proto::api::{ServiceInfo, TaskInfo};

/// The task's address on its (only) network.
fn addr(t: &TaskInfo) -> String {
    t.endpoints[0].ip().to_string()
}

/// Who answers `count` new connections to `url` from inside `client`.
fn answers(c: &Cluster, client: &TaskInfo, url: &str, count: usize) -> BTreeSet<String> {
    (0..count)
        .filter_map(|_| {
            let out = c
                .task_exec(client, &["curl", "-s", "--max-time", "2", url])
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .collect()
}

fn greetings(tasks: &[TaskInfo]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|t| format!("Hello World! from {}", addr(t)))
        .collect()
}

/// Every node's `lb_internal` shows, in `ipvsadm -Ln`, the service's FWM service with a Masq
/// line per task (Swarm's layout).
fn assert_ipvs(c: &Cluster, mark: u32, tasks: &[TaskInfo]) {
    let mut want: Vec<String> = tasks
        .iter()
        .map(|t| format!("-> {}:0 Masq 1", addr(t)))
        .collect();
    want.sort();
    for node in ["node1", "node2"] {
        let path = c.state_dir(node).join("netns/lb_internal");
        c.wait_for(CONVERGE_TIMEOUT, "IPVS in lb_internal", |_| {
            let ns = netns::Netns::open(&path).ok()?;
            let out = ns
                .output(std::process::Command::new("ipvsadm").arg("-Ln"))
                .ok()?;
            let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            let mut got: Vec<String> = lines
                .iter()
                .skip_while(|l| **l != format!("FWM {mark} rr"))
                .skip(1)
                .take_while(|l| l.starts_with("-> "))
                .map(|l| l.split(' ').take(4).collect::<Vec<_>>().join(" "))
                .collect();
            got.sort();
            (got == want).then_some(())
        })
        .unwrap_or_else(|e| panic!("{node}: {e}\n{}", c.logs()));
    }
}

/// The seeds' flow: `nodejs` (2 hello-servers) and `busybox` (2 sleeps) on `internal`; from
/// each busybox task, `http://<nodejs VIP>:8080/` answers from both nodejs tasks in turn, on
/// either node; scaled to one task, only that one answers.
#[test]
fn a_service_vip_is_balanced_over_its_tasks_from_every_node() {
    let c = Cluster::up(2, crate::LB).unwrap();
    c.network_create("internal", "172.32.0.0/24").unwrap();
    let nodejs = c
        .hello_service("nodejs", 2, &["--network", "internal"])
        .unwrap();
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "busybox",
        "--replicas",
        "2",
        "--network",
        "internal",
        "--detach",
        "--",
        "sleep",
        "100000",
    ])
    .unwrap();
    let clients = c.wait_running("busybox", 2).unwrap();
    let svc: ServiceInfo = c.json(&["service", "inspect", "nodejs"]).unwrap();
    let vip = svc
        .virtual_ips
        .iter()
        .find(|v| v.network == "internal")
        .unwrap_or_else(|| panic!("nodejs has no VIP on internal: {svc:?}"))
        .addr
        .addr();
    assert!(nodejs.iter().all(|t| addr(t) != vip.to_string()));
    let url = format!("http://{vip}:8080/");
    let both = greetings(&nodejs);
    for client in &clients {
        c.wait_for(CONVERGE_TIMEOUT, "the VIP answers from both tasks", |c| {
            (answers(c, client, &url, 4) == both).then_some(())
        })
        .unwrap_or_else(|e| panic!("{} -> {url}: {e}\n{}", client.name, c.logs()));
    }

    if crate::LB == "ipvs" {
        let mark = svc.fwmark.expect("a vip-mode service has a fwmark");
        assert_ipvs(&c, mark, &nodejs);
    }

    c.meshctl_ok(&["service", "scale", "nodejs=1", "--detach"])
        .unwrap();
    let left = c.wait_running("nodejs", 1).unwrap();
    let one = greetings(&left);
    for client in &clients {
        c.wait_for(CONVERGE_TIMEOUT, "only the remaining task answers", |c| {
            (answers(c, client, &url, 4) == one).then_some(())
        })
        .unwrap_or_else(|e| panic!("{} -> {url}: {e}\n{}", client.name, c.logs()));
    }
}
