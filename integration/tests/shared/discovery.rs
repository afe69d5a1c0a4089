//! Service discovery end to end: names resolve at 127.0.0.11 inside every task, through the
//! task's own resolv.conf, and a service's VIP balances over its tasks on any node. Shared by the
//! lab tier (host kernel, `crate::LB` = "nftables") and the guest tier (IPVS in `lb_<network>`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

use integration::cluster::{Cluster, ClusterOptions, CONVERGE_TIMEOUT};
use integration::lab::{CLIENT, CLIENT_IP};
use proto::api::{ServiceInfo, TaskInfo};

/// A resolver on the underlay that the agents forward other names to (dnsmasq, a real peer).
const UPSTREAM: &str = "upstream";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 53);
const EXTERNAL_NAME: &str = "www.example.test";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

pub(crate) fn cluster() -> Cluster {
    let upstream = UPSTREAM_IP.to_string();
    let opts = ClusterOptions {
        agent_args: &["--dns-upstream", upstream.as_str()],
        ..ClusterOptions::default()
    };
    let mut c = Cluster::up_opts(3, crate::LB, opts).unwrap();
    c.lab.add_host(UPSTREAM, UPSTREAM_IP).unwrap();
    c.lab.add_host(CLIENT, CLIENT_IP).unwrap();
    let mut dnsmasq = c.lab.command("dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
        ])
        .arg(format!("--listen-address={UPSTREAM_IP}"))
        .arg("--bind-interfaces")
        .arg(format!("--address=/{EXTERNAL_NAME}/{EXTERNAL_IP}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c.lab.spawn(UPSTREAM, &mut dnsmasq).unwrap();
    c
}

/// Runs `args` as the task's own process sees the world: in its network and mount namespaces,
/// so with its own /etc/resolv.conf and /etc/hosts.
pub(crate) fn in_task(t: &TaskInfo, args: &[&str]) -> Output {
    let pid = t.pid.unwrap_or_else(|| panic!("{} has no pid", t.name));
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "-m", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The IPv4 addresses `name` resolves to inside the task (getaddrinfo through its resolv.conf),
/// in the order given; empty if it does not resolve.
pub(crate) fn resolve(t: &TaskInfo, name: &str) -> Vec<Ipv4Addr> {
    let out = in_task(t, &["getent", "ahostsv4", name]);
    let mut seen = Vec::new();
    for ip in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<Ipv4Addr>().ok())
    {
        if !seen.contains(&ip) {
            seen.push(ip);
        }
    }
    seen
}

/// Waits until `name` resolves inside `t` to exactly `want` (as a set).
pub(crate) fn wait_resolves(c: &Cluster, t: &TaskInfo, name: &str, want: &BTreeSet<Ipv4Addr>) {
    let what = format!("{name} -> {want:?} in {}", t.name);
    c.wait_for(CONVERGE_TIMEOUT, &what, |_| {
        (resolve(t, name).into_iter().collect::<BTreeSet<_>>() == *want).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: last answer {:?}\n{}", resolve(t, name), c.logs()));
}

/// The task's address on `network`.
pub(crate) fn addr_on(t: &TaskInfo, network: &str) -> Ipv4Addr {
    t.endpoints
        .iter()
        .find(|e| e.network == network)
        .unwrap_or_else(|| panic!("{} is not on {network}", t.name))
        .addr
        .addr()
}

pub(crate) fn vip_on(c: &Cluster, service: &str, network: &str) -> Ipv4Addr {
    let info: ServiceInfo = c.json(&["service", "inspect", service]).unwrap();
    info.virtual_ips
        .iter()
        .find(|v| v.network == network)
        .unwrap_or_else(|| panic!("{service} has no VIP on {network}: {info:?}"))
        .addr
        .addr()
}

/// A service whose task only sleeps: the client the seeds call busybox.
pub(crate) fn sleeper(c: &Cluster, name: &str, network: &str) -> TaskInfo {
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        name,
        "--network",
        network,
        "--detach",
        "--",
        "sleep",
        "1000000",
    ])
    .unwrap();
    c.wait_running(name, 1).unwrap().remove(0)
}

/// One `GET /` from inside the task, by URL (names resolved by the task's resolver).
fn curl(t: &TaskInfo, url: &str) -> Option<String> {
    let out = in_task(t, &["curl", "-s", "--max-time", "3", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn greeting(ip: Ipv4Addr) -> String {
    format!("Hello World! from {ip}\n")
}

/// The seeds' flow (002): `internal` 172.32.0.0/24, `nodejs` published on 80, `busybox`
/// reaching it by name.
#[test]
fn the_seeds_flow_resolves_names_and_balances_the_vip() {
    let c = cluster();
    c.network_create("internal", "172.32.0.0/24").unwrap();
    let nodejs = c
        .hello_service(
            "nodejs",
            2,
            &["--network", "internal", "--publish", "80:8080"],
        )
        .unwrap();
    let node_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let busybox = sleeper(&c, "busybox", "internal");

    // The task's own view, and the node's files untouched.
    let resolv = String::from_utf8(in_task(&busybox, &["cat", "/etc/resolv.conf"]).stdout).unwrap();
    assert!(
        resolv.lines().any(|l| l == "nameserver 127.0.0.11"),
        "{resolv}"
    );
    assert!(resolv.contains("ndots:0"), "{resolv}");
    let hosts = String::from_utf8(in_task(&busybox, &["cat", "/etc/hosts"]).stdout).unwrap();
    assert!(hosts.contains(&busybox.id), "{hosts}");
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        node_resolv
    );

    // nodejs is its VIP on internal, never a task's address; tasks.nodejs is both tasks.
    let vip = vip_on(&c, "nodejs", "internal");
    let task_ips: BTreeSet<Ipv4Addr> = nodejs.iter().map(|t| addr_on(t, "internal")).collect();
    assert!(!task_ips.contains(&vip));
    wait_resolves(&c, &busybox, "nodejs", &[vip].into());
    wait_resolves(&c, &busybox, "tasks.nodejs", &task_ips);
    let slot1 = nodejs.iter().find(|t| t.slot == 1).unwrap();
    wait_resolves(
        &c,
        &busybox,
        "nodejs.1",
        &[addr_on(slot1, "internal")].into(),
    );

    // curl http://nodejs:8080/ answers from both tasks in turn.
    let want: BTreeSet<String> = task_ips.iter().map(|ip| greeting(*ip)).collect();
    let answers: Vec<String> = c
        .wait_for(
            CONVERGE_TIMEOUT,
            "nodejs:8080 balanced over both tasks",
            |_| {
                let answers: Vec<String> = (0..4)
                    .map_while(|_| curl(&busybox, "http://nodejs:8080/"))
                    .collect();
                (answers.len() == 4 && answers.iter().cloned().collect::<BTreeSet<_>>() == want)
                    .then_some(answers)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_ne!(answers[0], answers[1], "not in turn: {answers:?}");
    assert_ne!(answers[2], answers[3], "not in turn: {answers:?}");

    // Other names go to the node's upstream.
    wait_resolves(&c, &busybox, EXTERNAL_NAME, &[EXTERNAL_IP].into());

    // The routing mesh still answers on every node, beside the VIP.
    for node in ["192.168.56.11", "192.168.56.12", "192.168.56.13"] {
        let out = c
            .lab
            .exec(
                CLIENT,
                &["curl", "-s", "--max-time", "3", &format!("http://{node}/")],
            )
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("Hello World! from "),
            "{node}: {out:?}"
        );
    }
}

#[test]
fn names_follow_networks_modes_and_task_changes() {
    let c = cluster();
    c.network_create("front", "10.70.0.0/24").unwrap();
    c.network_create("back", "10.71.0.0/24").unwrap();
    c.hello_service("api", 2, &["--network", "name=front,alias=api-v1"])
        .unwrap();
    c.hello_service("db", 1, &["--network", "back"]).unwrap();
    let rr = c
        .hello_service(
            "cache",
            2,
            &["--network", "front", "--endpoint-mode", "dnsrr"],
        )
        .unwrap();
    let probe = sleeper(&c, "probe", "front");

    // A service on a network the task is not on does not resolve.
    let api_vip = vip_on(&c, "api", "front");
    wait_resolves(&c, &probe, "api-v1", &[api_vip].into());
    assert!(resolve(&probe, "db").is_empty(), "db resolved from front");
    // dnsrr: the tasks' addresses, no VIP.
    let rr_ips: BTreeSet<Ipv4Addr> = rr.iter().map(|t| addr_on(t, "front")).collect();
    wait_resolves(&c, &probe, "cache", &rr_ips);
    let info: ServiceInfo = c.json(&["service", "inspect", "cache"]).unwrap();
    assert!(info.virtual_ips.is_empty());

    // Scaling 2 → 4 → 1, and a killed task replaced: tasks.api follows; the VIP stays.
    for n in [4, 1] {
        c.meshctl_ok(&["service", "scale", "--detach", &format!("api={n}")])
            .unwrap();
        let tasks = c.wait_running("api", n).unwrap();
        let ips = tasks.iter().map(|t| addr_on(t, "front")).collect();
        wait_resolves(&c, &probe, "tasks.api", &ips);
        wait_resolves(&c, &probe, "tasks.api-v1", &ips);
    }
    let victim = c.wait_running("api", 1).unwrap().remove(0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = c
        .wait_for(CONVERGE_TIMEOUT, "api's task replaced", |c| {
            let t = c.wait_running("api", 1).ok()?.remove(0);
            (t.id != victim.id).then_some(t)
        })
        .unwrap();
    wait_resolves(
        &c,
        &probe,
        "tasks.api",
        &[addr_on(&replaced, "front")].into(),
    );
    wait_resolves(&c, &probe, "api", &[api_vip].into());
    assert_eq!(vip_on(&c, "api", "front"), api_vip);
}
