//! Chaos under load (lab tier, nftables): while clients keep asking every node's published port
//! and the service's name, objects node2's agent owns are deleted or altered behind its back,
//! one after another: an FDB entry, a task's veth, a task's default route, the node's nftables
//! table, the balancer's backend map (flushed, then one slot edited in place), a bridge, two
//! sysctls (ingress_sbox's forwarding, an overlay sandbox's bridge netfilter). Each must come
//! back within 1 s (the agent's reconcile interval is an hour here, so only its notifications
//! can explain that, and for the sysctls, of which no notification exists, its watch of them
//! between passes), and the sysctls' repairs must be logged as such. Prints how long each took
//! and how many requests failed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::cluster::{Cluster, ClusterOptions};

use crate::discovery::sleeper;
use crate::rolling::{cluster_with, under_load, wait_tag, web};

/// The node whose objects are altered.
const NODE: &str = "node2";

/// `args` run in namespace `ns`; its stdout, or the failure.
fn run(c: &Cluster, ns: &Path, args: &[&str]) -> Result<String, String> {
    let ns = netns::Netns::open(ns).map_err(|e| e.to_string())?;
    let mut cmd = c.lab.command(args[0]);
    cmd.args(&args[1..]);
    let out = ns.output(&mut cmd).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(c: &Cluster, ns: &Path, args: &[&str]) -> String {
    run(c, ns, args).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

/// The namespace files of `node`'s agent whose names start with `prefix`.
fn namespaces(c: &Cluster, node: &str, prefix: &str) -> Vec<PathBuf> {
    let dir = c.state_dir(node).join("netns");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    out.sort();
    out
}

/// One alteration: what it does, how to do it, and when its object is back.
struct Fault<'a> {
    what: &'static str,
    limit: Duration,
    break_it: Box<dyn Fn() + 'a>,
    is_back: Box<dyn Fn() -> bool + 'a>,
}

#[test]
fn objects_deleted_or_altered_under_load_come_back_and_traffic_goes_on() {
    let c = cluster_with(ClusterOptions {
        reconcile_interval: 3600,
        ..ClusterOptions::default()
    });
    web(&c, &["--health-http", "8080/tag"]);
    let probe = sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");

    let node_ns = c.lab.node(NODE).unwrap().ns.path().to_path_buf();
    let sandboxes = namespaces(&c, NODE, "1-");
    assert_eq!(sandboxes.len(), 2, "ingress and app: {sandboxes:?}");
    let task = namespaces(&c, NODE, "web.")
        .into_iter()
        .next()
        .expect("a web task on node2");
    let sbox = namespaces(&c, NODE, "ingress_sbox").remove(0);
    let sandbox = sandboxes[0].clone();

    // An FDB entry of a remote endpoint on the sandbox's vxlan0.
    let fdb_line = must(&c, &sandbox, &["bridge", "fdb", "show", "dev", "vxlan0"])
        .lines()
        .find(|l| l.contains(" dst "))
        .expect("a remote FDB entry")
        .to_string();
    let w: Vec<&str> = fdb_line.split_whitespace().collect();
    let (mac, dst) = (
        w[0].to_string(),
        w[w.iter().position(|x| *x == "dst").unwrap() + 1].to_string(),
    );
    // The task's veth on that sandbox's bridge.
    let veth = must(&c, &sandbox, &["ip", "-o", "link", "show", "master", "br0"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .find(|n| n.starts_with("veth"))
        .expect("a task veth on br0");

    // A slot of the balancer's backend map, as nft lists it (`0x00000100 . 0x00000000 :
    // 10.255.0.5`): edited in place, the map keeps its size.
    let backends = must(
        &c,
        &sbox,
        &["nft", "list", "map", "ip", "meshnet", "backends"],
    );
    let slot = backends
        .split_once("elements = { ")
        .and_then(|(_, rest)| rest.split([',', '}']).next())
        .map(|e| e.trim().to_string())
        .expect("a backend slot");
    let slot_key = slot.split_once(" : ").expect("key : address").0.to_string();
    const NOWHERE: &str = "10.255.255.254";

    // Bridge netfilter, where br_netfilter is loaded: off in every overlay sandbox of every
    // node (ingress's and app's), left as it is (on) in the nodes' namespaces, whose gwbridge
    // icc drop needs it, and in ingress_sbox, which holds no bridge.
    const BRNF: [&str; 3] = [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
        "net.bridge.bridge-nf-call-arptables",
    ];
    let sysctl = |ns: &Path, key: &str| {
        netns::Netns::open(ns)
            .and_then(|ns| ns.read_sysctl(key))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let brnf = Path::new("/proc/sys/net/bridge").exists();
    if brnf {
        for node in ["node1", "node2", "node3"] {
            let node_ns = c.lab.node(node).unwrap().ns.path().to_path_buf();
            let sandboxes = namespaces(&c, node, "1-");
            assert!(!sandboxes.is_empty(), "{node} has the ingress sandbox");
            for key in BRNF {
                for sandbox in &sandboxes {
                    assert_eq!(sysctl(sandbox, key), "0", "{key} in {sandbox:?}");
                }
                assert_eq!(sysctl(&node_ns, key), "1", "{key} in {node}'s namespace");
                let sbox = namespaces(&c, node, "ingress_sbox").remove(0);
                assert_eq!(sysctl(&sbox, key), "1", "{key} in {sbox:?}");
            }
        }
    } else {
        eprintln!("chaos: br_netfilter is not loaded: bridge netfilter not checked");
    }
    let other_sandbox = sandboxes[1].clone();

    let mut faults = vec![
        Fault {
            what: "FDB entry of a remote endpoint",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(
                    &c,
                    &sandbox,
                    &[
                        "bridge", "fdb", "del", &mac, "dev", "vxlan0", "dst", &dst, "self",
                    ],
                );
            }),
            is_back: Box::new(|| {
                run(&c, &sandbox, &["bridge", "fdb", "show", "dev", "vxlan0"])
                    .is_ok_and(|o| o.lines().any(|l| l.starts_with(&mac) && l.contains(&dst)))
            }),
        },
        Fault {
            what: "a task's veth",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(&c, &sandbox, &["ip", "link", "del", &veth]);
            }),
            is_back: Box::new(|| run(&c, &sandbox, &["ip", "link", "show", &veth]).is_ok()),
        },
        Fault {
            what: "a task's default route",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(&c, &task, &["ip", "route", "del", "default"]);
            }),
            is_back: Box::new(|| {
                run(&c, &task, &["ip", "route", "show", "default"])
                    .is_ok_and(|o| !o.trim().is_empty())
            }),
        },
        Fault {
            what: "the node's nftables table",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(&c, &node_ns, &["nft", "delete", "table", "ip", "meshnet"]);
            }),
            is_back: Box::new(|| {
                run(&c, &node_ns, &["nft", "list", "table", "ip", "meshnet"]).is_ok()
            }),
        },
        Fault {
            what: "the balancer's backend map, flushed",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(
                    &c,
                    &sbox,
                    &["nft", "flush", "map", "ip", "meshnet", "backends"],
                );
            }),
            is_back: Box::new(|| {
                run(
                    &c,
                    &sbox,
                    &["nft", "list", "map", "ip", "meshnet", "backends"],
                )
                .is_ok_and(|o| o.contains("elements"))
            }),
        },
        Fault {
            what: "a backend slot pointed elsewhere (the map's size unchanged)",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                let edit = format!(
                    "delete element ip meshnet backends {{ {slot_key} }}; \
                     add element ip meshnet backends {{ {slot_key} : {NOWHERE} }}"
                );
                must(&c, &sbox, &["nft", &edit]);
            }),
            is_back: Box::new(|| {
                run(
                    &c,
                    &sbox,
                    &["nft", "list", "map", "ip", "meshnet", "backends"],
                )
                .is_ok_and(|o| o.contains(&slot) && !o.contains(NOWHERE))
            }),
        },
        Fault {
            what: "the sandbox's bridge",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(&c, &sandbox, &["ip", "link", "del", "br0"]);
            }),
            is_back: Box::new(|| {
                run(&c, &sandbox, &["ip", "-o", "link", "show", "master", "br0"])
                    .is_ok_and(|o| o.contains(&veth))
            }),
        },
        Fault {
            // No notification exists for sysctls: the agent reads them between passes.
            what: "ip_forward in ingress_sbox (set to 0)",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                must(&c, &sbox, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
            }),
            is_back: Box::new(|| {
                run(&c, &sbox, &["sysctl", "-n", "net.ipv4.ip_forward"])
                    .is_ok_and(|o| o.trim() == "1")
            }),
        },
    ];
    if brnf {
        faults.push(Fault {
            what: "bridge-nf-call-iptables in the other overlay sandbox (set to 1)",
            limit: Duration::from_secs(1),
            break_it: Box::new(|| {
                netns::Netns::open(&other_sandbox)
                    .and_then(|ns| ns.write_sysctl(BRNF[0], "1"))
                    .unwrap_or_else(|e| panic!("{e}"));
            }),
            is_back: Box::new(|| sysctl(&other_sandbox, BRNF[0]) == "0"),
        });
    }

    let mut took = Vec::new();
    let started = Instant::now();
    let t = under_load(&c, &probe, || {
        // Load on an undisturbed mesh first, then one fault a second.
        std::thread::sleep(Duration::from_secs(1));
        for f in &faults {
            assert!((f.is_back)(), "{} is not there to begin with", f.what);
            (f.break_it)();
            let t0 = Instant::now();
            while !(f.is_back)() {
                assert!(
                    t0.elapsed() < f.limit,
                    "{} did not come back within {:?}\n{}",
                    f.what,
                    f.limit,
                    c.logs()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            took.push((f.what, t0.elapsed()));
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let secs = started.elapsed().as_secs_f64();
    for (what, d) in &took {
        eprintln!("chaos: {what} back after {d:?}");
    }
    eprintln!(
        "chaos: {} of {} requests failed over {secs:.1} s, {} faults",
        t.failed.len(),
        t.sent,
        faults.len(),
    );
    // Only requests through node2 may fail, and only while a repair is under way: at most the
    // requests one client thread (of four) sends to it in a second, per fault (the issue's
    // bound for a deleted table).
    let per_thread_second = t.sent as f64 / secs / 4.0;
    assert!(
        (t.failed.len() as f64) <= per_thread_second * faults.len() as f64,
        "{} of {} failed: {:?}",
        t.failed.len(),
        t.sent,
        t.failed
    );
    assert!(
        t.failed.iter().all(|f| f.contains("via 192.168.56.12")),
        "only node2's objects were touched: {:?}",
        t.failed
    );
    // Repairs of what no notification tells of are logged as repairs too.
    let log =
        std::fs::read_to_string(c.log_path(&format!("agent-{NODE}"))).expect("the agent's log");
    assert!(
        log.contains("repair: sysctl net.ipv4.ip_forward in ingress_sbox was 0; set to 1"),
        "no repair logged for the sysctl\n{}",
        c.logs()
    );
    // After the faults, the mesh answers everywhere again.
    wait_tag(&c, "v1");
}
