//! Replacing tasks under load loses nothing: rolling updates in both orders and a rollback,
//! under a steady request loop from a client on the underlay to every node's published port
//! and from a task to the service's name. Shared by the lab tier (nftables) and the guest tier
//! (IPVS), with a node drain and an open connection to a stopping task; lab/updates.rs adds a
//! failing update and churn beside a service.
//!
//! The services have a health check: without one a new task gets traffic once its process
//! runs, which may be before it listens (in the emulated guest, seconds before).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration::cluster::{bin, Cluster, ClusterOptions, CONVERGE_TIMEOUT};
use integration::http;
use proto::api::{ServiceInfo, TaskInfo};
use proto::model::{TaskState, UpdateState};

use crate::discovery::{in_task, sleeper};
use integration::lab::{CLIENT, CLIENT_IP, NODE_IPS};

pub(crate) fn cluster() -> Cluster {
    cluster_with(ClusterOptions::default())
}

/// [`cluster`] with other options.
pub(crate) fn cluster_with(opts: ClusterOptions) -> Cluster {
    let mut c = Cluster::up_opts(3, crate::LB, opts).unwrap();
    c.lab.add_host(CLIENT, CLIENT_IP).unwrap();
    c.network_create("app", "10.0.42.0/24").unwrap();
    c
}

/// Three hello-servers tagged v1 on `app`, published on 80, with the given extra flags.
pub(crate) fn web(c: &Cluster, flags: &[&str]) -> Vec<TaskInfo> {
    let hello = bin("hello-server").display().to_string();
    let mut args = vec![
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "app",
        "--publish",
        "80:8080",
        "--env",
        "HELLO_TAG=v1",
        "--update-monitor",
        "1s",
    ];
    args.extend(flags);
    args.extend(["--", &hello, "--port", "8080"]);
    c.meshctl_ok(&args).unwrap();
    c.wait_running("web", 3).unwrap()
}

/// Wall-clock time, to match a failure with the processes' logs.
fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs() % 86400, d.subsec_millis())
}

/// Requests sent and failed by the load loops.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) sent: usize,
    pub(crate) failed: Vec<String>,
}

/// Runs `during` while a thread per node sends requests to that node's port 80 and another
/// asks the service by name from a task on `app`; returns what they saw.
pub(crate) fn under_load(c: &Cluster, probe: &TaskInfo, during: impl FnOnce()) -> Tally {
    let stop = AtomicBool::new(false);
    let client = &c.lab.node(CLIENT).unwrap().ns;
    std::thread::scope(|scope| {
        let mesh: Vec<_> = NODE_IPS
            .iter()
            .map(|node| {
                let stop = &stop;
                scope.spawn(move || {
                    let mut t = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        t.sent += 1;
                        let started = now();
                        if let Err(e) = http::get(client, node, 80, "/tag") {
                            t.failed
                                .push(format!("mesh via {node} from {started} to {}: {e}", now()));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    t
                })
            })
            .collect();
        let by_name = scope.spawn(|| {
            let mut t = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                t.sent += 1;
                let started = now();
                let out = in_task(
                    probe,
                    &["curl", "-sSf", "--max-time", "3", "http://web:8080/tag"],
                );
                if !out.status.success() {
                    // curl's exit code and message tell a timeout from a name or a refusal.
                    t.failed.push(format!(
                        "by name from a task from {started} to {}: {} {}",
                        now(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            t
        });
        // Stops the load threads however `during` ends: a panic in it must not leave the scope
        // waiting for them forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        during();
        drop(guard);
        let mut all = Tally::default();
        for h in mesh.into_iter().chain([by_name]) {
            let t = h.join().unwrap();
            all.sent += t.sent;
            all.failed.extend(t.failed);
        }
        all
    })
}

/// Waits until every node answers only `tag`.
pub(crate) fn wait_tag(c: &Cluster, tag: &str) {
    let client = &c.lab.node(CLIENT).unwrap().ns;
    let want = format!("{tag}\n");
    c.wait_for(
        CONVERGE_TIMEOUT,
        &format!("every node answers {tag}"),
        |_| {
            NODE_IPS
                .iter()
                .all(|n| {
                    (0..6).all(|_| http::get(client, n, 80, "/tag").ok().as_deref() == Some(&want))
                })
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

pub(crate) fn inspect(c: &Cluster) -> ServiceInfo {
    c.json(&["service", "inspect", "web"]).unwrap()
}

pub(crate) fn assert_no_failures(what: &str, t: &Tally, c: &Cluster) {
    assert!(t.sent > 50, "{what}: only {} requests sent", t.sent);
    assert!(
        t.failed.is_empty(),
        "{what}: {} of {} requests failed: {:?}\n{}",
        t.failed.len(),
        t.sent,
        t.failed,
        c.logs()
    );
    eprintln!("{what}: {} requests, none failed", t.sent);
}

/// How long `service update|rollback` wait for the three slots, in seconds. meshctl's 60 s
/// default is ample on real machines; under the guest tier's software emulation an agent pass
/// takes several seconds, and a slot waits for a few of them. What the test checks is that no
/// request fails and every task ends on the new spec, not how fast.
const UPDATE_WAIT: &str = "240";

#[test]
fn rolling_updates_and_a_rollback_lose_no_request() {
    let c = cluster();
    // Without a check a new task gets traffic once its process runs, which may be before it
    // listens: the check is what says it is ready.
    let old = web(&c, &["--health-http", "8080/tag"]);
    let probe = sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");
    for (tag, order) in [("v2", "stop-first"), ("v3", "start-first")] {
        let env = format!("HELLO_TAG={tag}");
        let t = under_load(&c, &probe, || {
            c.meshctl_ok(&[
                "service",
                "update",
                "--env-add",
                &env,
                "--update-order",
                order,
                "--timeout",
                UPDATE_WAIT,
                "web",
            ])
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        });
        assert_no_failures(order, &t, &c);
        wait_tag(&c, tag);
        let s = inspect(&c);
        assert_eq!(s.update_status.unwrap().state, UpdateState::Completed);
        let tasks = c.wait_running("web", 3).unwrap();
        assert!(
            tasks.iter().all(|t| t.spec_version == s.version),
            "{tasks:?}"
        );
    }
    let t = under_load(&c, &probe, || {
        c.meshctl_ok(&["service", "rollback", "--timeout", UPDATE_WAIT, "web"])
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    });
    assert_no_failures("rollback", &t, &c);
    wait_tag(&c, "v2");
    let s = inspect(&c);
    assert_eq!(
        s.update_status.unwrap().state,
        UpdateState::RollbackCompleted
    );
    // The replaced tasks are history, as `service ps` shows them.
    let all: Vec<TaskInfo> = c.json(&["service", "ps", "web"]).unwrap();
    for o in &old {
        let t = all.iter().find(|t| t.id == o.id);
        assert!(
            t.is_none_or(|t| t.desired_state == TaskState::Shutdown),
            "{t:?}"
        );
    }
}

#[test]
fn an_open_connection_to_a_stopping_task_lasts_its_grace_period() {
    let c = cluster();
    let hello = bin("hello-server").display().to_string();
    // The task ignores SIGTERM, as a server finishing its requests would: it runs until the
    // SIGKILL at the end of its grace period.
    let cmd = format!("trap '' TERM; exec {hello} --port 8080");
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "slow",
        "--constraint",
        "node.hostname==node3",
        "--publish",
        "81:8080",
        "--stop-grace-period",
        "9s",
        "--env",
        "HELLO_TAG=slow",
        "--",
        "/bin/sh",
        "-c",
        &cmd,
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let task = c.wait_running("slow", 1).unwrap().remove(0);
    // Through node1: the task is on node3, across the ingress overlay.
    let client = &c.lab.node(CLIENT).unwrap().ns;
    let mut conn = c
        .wait_for(CONVERGE_TIMEOUT, "node1 answers on 81", |_| {
            let mut k = http::KeepAlive::open(client, NODE_IPS[0], 81).ok()?;
            (k.get("/tag").ok()? == "slow\n").then_some(k)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    c.meshctl_ok(&["service", "scale", "--detach", "slow=0"])
        .unwrap();
    // Well past the drain (every node's confirmation) and the agents' own 2 s IPVS grace.
    let stopped = Instant::now();
    let mut answered = 0;
    while stopped.elapsed() < Duration::from_secs(5) {
        match conn.get("/tag") {
            Ok(body) => assert_eq!(body, "slow\n"),
            Err(e) => panic!(
                "the open connection failed {:?} after the stop: {e}\n{}",
                stopped.elapsed(),
                c.logs()
            ),
        }
        answered += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    // All that time it was told to stop, and still ran.
    let all: Vec<TaskInfo> = c.json(&["service", "ps", "slow"]).unwrap();
    let t = all.iter().find(|t| t.id == task.id).unwrap();
    assert_eq!(
        (t.desired_state, t.state),
        (TaskState::Shutdown, TaskState::Running),
        "{t:?}"
    );
    // It ends at the end of its grace period, and the manager hears of it.
    c.wait_for(CONVERGE_TIMEOUT, "the stopped task ended", |_| {
        let all: Vec<TaskInfo> = c.json(&["service", "ps", "slow"]).ok()?;
        all.iter()
            .all(|t| t.state == TaskState::Shutdown)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("the open connection answered {answered} requests while its task stopped");
}

#[test]
fn draining_a_node_under_load_loses_no_request() {
    let c = cluster();
    web(&c, &["--health-http", "8080/tag"]);
    let probe = sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");
    let before = c.tasks("web").unwrap();
    let victim = before
        .iter()
        .find(|t| t.node.as_deref() != probe.node.as_deref())
        .and_then(|t| t.node.clone())
        .unwrap();
    let t = under_load(&c, &probe, || {
        c.meshctl_ok(&["node", "update", "--availability", "drain", &victim])
            .unwrap();
        c.wait_for(CONVERGE_TIMEOUT, "tasks off the drained node", |c| {
            let tasks = c.wait_running("web", 3).ok()?;
            tasks
                .iter()
                .all(|t| t.node.as_deref() != Some(victim.as_str()))
                .then_some(())
        })
        .unwrap();
        // Some more load on the new layout.
        std::thread::sleep(Duration::from_secs(1));
    });
    assert_no_failures("node drain", &t, &c);
}
