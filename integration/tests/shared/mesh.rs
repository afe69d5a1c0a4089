//! The routing mesh end to end: published ports on every node, balanced over every task.
//! Shared by the lab tier (host kernel, `crate::LB` = "nftables") and the guest tier (QEMU
//! kernel with IPVS, `crate::LB` = "ipvs"): both backends must behave the same.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use integration::cluster::{bin, Cluster, CONVERGE_TIMEOUT};
use integration::http;
use integration::lab::{CLIENT, CLIENT_IP, NODE_IPS};
use nix::sys::signal::Signal;
use proto::api::{ServiceInfo, TaskInfo};

fn cluster(nodes: usize) -> Cluster {
    let mut c = Cluster::up(nodes, crate::LB).unwrap();
    c.lab.add_host(CLIENT, CLIENT_IP).unwrap();
    c
}

fn hello() -> String {
    bin("hello-server").display().to_string()
}

/// Creates a service of hello-servers (TCP and UDP on 8080) with the given extra flags.
fn service(c: &Cluster, name: &str, replicas: usize, flags: &[&str]) -> Vec<TaskInfo> {
    let hello = hello();
    let replicas_s = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        &replicas_s,
        "--detach",
    ];
    args.extend(flags);
    args.extend(["--", &hello, "--port", "8080", "--udp"]);
    c.meshctl_ok(&args).unwrap();
    c.wait_running(name, replicas).unwrap()
}

pub(crate) fn ingress_ip(t: &TaskInfo) -> String {
    t.endpoints
        .iter()
        .find(|e| e.network == "ingress")
        .unwrap_or_else(|| panic!("{} has no ingress endpoint: {t:?}", t.name))
        .ip()
        .to_string()
}

fn greeting(ip: &str) -> String {
    format!("Hello World! from {ip}\n")
}

/// One `GET /` from the client to `node:port`; None if it fails.
pub(crate) fn get(c: &Cluster, node: &str, port: u16, path: &str) -> Option<String> {
    let url = format!("http://{node}:{port}{path}");
    let out = c
        .lab
        .exec(CLIENT, &["curl", "-s", "--max-time", "3", &url])
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until `n` requests in a row to `node:port` are answered by exactly `want`, each
/// equally often (round robin), and returns the answers in order.
fn assert_balanced(c: &Cluster, node: &str, port: u16, want: &BTreeSet<String>) -> Vec<String> {
    let n = want.len() * 3;
    let what = format!("{node}:{port} balanced over {want:?}");
    c.wait_for(CONVERGE_TIMEOUT, &what, |c| {
        let answers: Vec<String> = (0..n).map_while(|_| get(c, node, port, "/")).collect();
        let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
        for a in &answers {
            *counts.entry(a).or_default() += 1;
        }
        (answers.len() == n
            && counts.keys().copied().cloned().collect::<BTreeSet<_>>() == *want
            && counts.values().all(|&k| k == 3))
        .then_some(answers)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

pub(crate) fn greetings(tasks: &[TaskInfo]) -> BTreeSet<String> {
    tasks.iter().map(|t| greeting(&ingress_ip(t))).collect()
}

#[test]
fn every_node_answers_from_every_task_in_turn() {
    let c = cluster(3);
    // Two tasks on three nodes: one node has none and answers all the same.
    let tasks = service(&c, "web", 2, &["--publish", "80:8080"]);
    let nodes: BTreeSet<_> = tasks.iter().map(|t| t.node.clone().unwrap()).collect();
    assert_eq!(nodes.len(), 2);
    let want = greetings(&tasks);
    for node in NODE_IPS {
        let answers = assert_balanced(&c, node, 80, &want);
        // Round robin: consecutive answers differ.
        assert!(
            answers.windows(2).all(|w| w[0] != w[1]),
            "{node}: {answers:?}"
        );
    }
    // The node itself and its localhost reach the mesh too.
    let out = c
        .lab
        .exec(
            "node1",
            &["curl", "-s", "--max-time", "3", "http://127.0.0.1:80/"],
        )
        .unwrap();
    assert!(
        want.contains(&*String::from_utf8_lossy(&out.stdout)),
        "localhost: {out:?}"
    );

    // Each node reports the same load balancer state: the service's fwmark over both tasks.
    let svc: ServiceInfo = c.json(&["service", "inspect", "web"]).unwrap();
    let mark = svc.fwmark.expect("an ingress service has a fwmark");
    assert!(mark >= 256);
    let backends: BTreeSet<String> = tasks.iter().map(ingress_ip).collect();
    let svc: ServiceInfo = c
        .wait_for(CONVERGE_TIMEOUT, "LB state from every node", |c| {
            let s: ServiceInfo = c.json(&["service", "inspect", "web"]).ok()?;
            (s.lb.len() == 3).then_some(s)
        })
        .unwrap();
    for node in &svc.lb {
        assert_eq!(node.backend.as_str(), crate::LB, "{node:?}");
        let lb = node.services.iter().find(|s| s.fwmark == mark).unwrap();
        let got: BTreeSet<String> = lb.backends.iter().map(|b| b.ip.to_string()).collect();
        assert_eq!(got, backends, "{}", node.hostname);
        assert!(lb.backends.iter().all(|b| b.weight == 1));
    }
}

#[test]
fn scaling_to_five_and_to_one_every_node_follows() {
    let c = cluster(3);
    service(&c, "web", 2, &["--publish", "80:8080"]);
    c.meshctl_ok(&["service", "scale", "web=5", "--detach"])
        .unwrap();
    let five = c.wait_running("web", 5).unwrap();
    for node in NODE_IPS {
        assert_balanced(&c, node, 80, &greetings(&five));
    }
    c.meshctl_ok(&["service", "scale", "web=1", "--detach"])
        .unwrap();
    let one = c.wait_running("web", 1).unwrap();
    for node in NODE_IPS {
        assert_balanced(&c, node, 80, &greetings(&one));
    }
}

#[test]
fn a_udp_port_is_balanced_too() {
    let c = cluster(2);
    let tasks = service(&c, "dns", 2, &["--publish", "5353:8080/udp"]);
    let want = greetings(&tasks);
    let client = &c.lab.node(CLIENT).unwrap().ns;
    for node in NODE_IPS.iter().take(2) {
        c.wait_for(CONVERGE_TIMEOUT, "UDP answers from every task", |_| {
            let mut seen = BTreeSet::new();
            // A new source port per datagram: a new flow, balanced afresh.
            for _ in 0..want.len() * 3 {
                let answer = client
                    .run(|| -> std::io::Result<String> {
                        let s = UdpSocket::bind("0.0.0.0:0")?;
                        s.set_read_timeout(Some(Duration::from_secs(1)))?;
                        s.send_to(b"hi", format!("{node}:5353"))?;
                        let mut buf = [0u8; 256];
                        let n = s.recv(&mut buf)?;
                        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                    })
                    .unwrap();
                if let Ok(a) = answer {
                    seen.insert(a);
                }
            }
            (seen == want).then_some(())
        })
        .unwrap();
    }
}

#[test]
fn host_mode_answers_only_where_a_task_runs_and_keeps_the_client_ip() {
    let c = cluster(3);
    let tasks = service(
        &c,
        "edge",
        2,
        &[
            "--publish",
            "mode=host,published=8081,target=8080,protocol=tcp",
        ],
    );
    let with_task: BTreeSet<String> = tasks
        .iter()
        .map(|t| {
            c.lab
                .node(t.node.as_deref().unwrap())
                .unwrap()
                .ip
                .to_string()
        })
        .collect();
    for node in NODE_IPS {
        if with_task.contains(node) {
            let who = c
                .wait_for(CONVERGE_TIMEOUT, "host-mode port answers", |c| {
                    get(c, node, 8081, "/whoami")
                })
                .unwrap();
            assert!(
                who.starts_with(&format!("client {CLIENT_IP}:")),
                "{node}: the task must see the client's address: {who}"
            );
        } else {
            assert_eq!(
                get(&c, node, 8081, "/"),
                None,
                "{node} has no task but answered"
            );
        }
    }
}

#[test]
fn a_killed_task_leaves_every_node_and_steady_load_barely_notices() {
    let c = cluster(3);
    let tasks = service(&c, "web", 3, &["--publish", "80:8080"]);
    for node in NODE_IPS {
        assert_balanced(&c, node, 80, &greetings(&tasks));
    }
    let victim = &tasks[1];
    let dead = greeting(&ingress_ip(victim));
    // Steady sequential load through node1, a new connection per request, while the task dies.
    let client = &c.lab.node(CLIENT).unwrap().ns;
    for i in 0..30 {
        assert!(
            http::get(client, NODE_IPS[0], 80, "/").is_ok(),
            "request {i} failed before the kill"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let killed = std::time::Instant::now();
    let victim_ip = ingress_ip(victim);
    // When node1's load balancer stopped sending new connections to the dead task, as it
    // reports (a report comes after the change, so this errs on the lenient side).
    let converged = std::sync::OnceLock::new();
    let results = std::thread::scope(|scope| {
        scope.spawn(|| {
            while killed.elapsed() < CONVERGE_TIMEOUT {
                let s: Option<ServiceInfo> = c.json(&["service", "inspect", "web"]).ok();
                let takes_new = s.is_some_and(|s| {
                    s.lb.iter().filter(|n| n.hostname == "node1").any(|n| {
                        n.services.iter().any(|l| {
                            l.backends
                                .iter()
                                .any(|b| b.ip.to_string() == victim_ip && b.weight > 0)
                        })
                    })
                });
                if !takes_new {
                    let _ = converged.set(killed.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut results = Vec::new();
        while converged
            .get()
            .is_none_or(|t| killed.elapsed() < *t + Duration::from_secs(3))
            || results.len() < 60
        {
            let sent = killed.elapsed();
            results.push((sent, http::get(client, NODE_IPS[0], 80, "/").ok()));
            std::thread::sleep(Duration::from_millis(5));
            assert!(
                killed.elapsed() < CONVERGE_TIMEOUT + Duration::from_secs(10),
                "node1 never stopped balancing to the dead task"
            );
        }
        results
    });
    let converged = *converged.get().unwrap();
    // Only requests that the balancer sent to the dead task before it learnt of its death
    // may fail; after that, none, and the dead task never answers.
    let failures: Vec<Duration> = results
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(t, _)| *t)
        .collect();
    eprintln!(
        "{} of {} requests failed after the kill; node1 stopped using the dead task after {converged:?}",
        failures.len(),
        results.len(),
    );
    assert!(
        failures.iter().all(|t| *t < converged),
        "requests failed after node1 converged at {converged:?}: {failures:?}"
    );
    let settled: Vec<&String> = results
        .iter()
        .filter(|(t, _)| *t >= converged)
        .filter_map(|(_, r)| r.as_ref())
        .collect();
    assert!(settled.len() >= 10, "too few requests after convergence");
    assert!(
        !settled.contains(&&dead),
        "the dead task answers after convergence"
    );
    // The dead backend leaves every node's load balancer.
    c.wait_for(
        CONVERGE_TIMEOUT,
        "the dead backend leaves every node",
        |c| {
            let s: ServiceInfo = c.json(&["service", "inspect", "web"]).ok()?;
            let ip = ingress_ip(victim);
            (s.lb.len() == 3
                && s.lb.iter().all(|n| {
                    n.services
                        .iter()
                        .all(|l| l.backends.iter().all(|b| b.ip.to_string() != ip))
                }))
            .then_some(())
        },
    )
    .unwrap();
}

#[test]
fn foreign_rules_survive_and_a_published_port_cannot_be_taken_twice() {
    let c = cluster(2);
    let node1 = c.lab.node("node1").unwrap().ns.path().to_path_buf();
    let nft = |args: &[&str]| {
        let ns = netns::Netns::open(&node1).unwrap();
        let out = ns
            .output(std::process::Command::new("nft").args(args))
            .unwrap();
        assert!(out.status.success(), "nft {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    nft(&["add table ip foreign; add chain ip foreign keep { type filter hook input priority 10 ; }; add rule ip foreign keep tcp dport 9999 counter accept"]);
    let foreign = nft(&["list", "table", "ip", "foreign"]);
    service(&c, "web", 2, &["--publish", "80:8080"]);
    // What the user asked for; the live LB reports in `service ls` move on their own.
    let specs = |c: &Cluster| {
        let services: Vec<ServiceInfo> = c.json(&["service", "ls"]).unwrap();
        services
            .into_iter()
            .map(|s| (s.id, s.spec, s.fwmark))
            .collect::<Vec<_>>()
    };
    let before = specs(&c);
    let hello = hello();
    let out = c
        .meshctl(&[
            "service", "create", "--name", "other", "-p", "80:9090", "--detach", "--", &hello,
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already published by service web"),
        "{out:?}"
    );
    assert_eq!(specs(&c), before, "a refused request changed the services");
    c.meshctl_ok(&["service", "scale", "web=3", "--detach"])
        .unwrap();
    let three = c.wait_running("web", 3).unwrap();
    assert_balanced(&c, NODE_IPS[0], 80, &greetings(&three));
    c.meshctl_ok(&["publish", "8082:8080", "--service", "web", "--detach"])
        .unwrap();
    assert_balanced(&c, NODE_IPS[0], 8082, &greetings(&three));
    assert_eq!(
        nft(&["list", "table", "ip", "foreign"]),
        foreign,
        "our updates touched a foreign table"
    );
}

#[test]
fn an_agent_restart_keeps_connections_through_the_mesh() {
    let mut c = cluster(2);
    let tasks = service(&c, "web", 2, &["--publish", "80:8080"]);
    assert_balanced(&c, NODE_IPS[0], 80, &greetings(&tasks));
    let client = &c.lab.node(CLIENT).unwrap().ns;
    let stream = client
        .run(|| TcpStream::connect(format!("{}:80", NODE_IPS[0])))
        .unwrap()
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = || -> String {
        write!(writer, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        loop {
            let mut l = String::new();
            reader.read_line(&mut l).unwrap();
            if l == "\r\n" {
                break;
            }
        }
        let mut body = String::new();
        reader.read_line(&mut body).unwrap();
        body
    };
    let first = ask();
    assert!(greetings(&tasks).contains(&first));
    c.kill_agent("node1", Signal::SIGKILL);
    c.start_agent("node1").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        ask(),
        first,
        "the same connection, the same task, after the restart"
    );
    assert_balanced(&c, NODE_IPS[0], 80, &greetings(&tasks));
}
