//! Lab tier (root, host kernel): the lab itself, and meshnet clusters built in it.

mod chaos;
mod cleanup;
mod encrypted;
mod global;
mod ha;
mod overlay;
mod trust;
mod updates;

/// The load balancer of the host kernel, which has no IPVS.
const LB: &str = "nftables";
#[path = "../shared/discovery.rs"]
mod discovery;
#[path = "../shared/mesh.rs"]
mod mesh;
#[path = "../shared/rolling.rs"]
mod rolling;
#[path = "../shared/vip.rs"]
mod vip;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::lab::{self, Lab, LabConfig};

const HELLO: &str = env!("CARGO_BIN_EXE_hello-server");
const LAB: &str = env!("CARGO_BIN_EXE_lab");

fn mounts_under(root: &Path) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(root))
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has no namespaces left: it no longer holds anything of the lab.
    fs::metadata(format!("/proc/{pid}/ns/net")).is_ok()
}

fn assert_gone(root: &Path, pids: &[u32]) {
    assert!(!root.exists(), "{} left behind", root.display());
    assert_eq!(
        mounts_under(root),
        Vec::<String>::new(),
        "mounts left behind"
    );
    for &pid in pids {
        assert!(!pid_alive(pid), "process {pid} left behind");
    }
}

/// Waits until `url` answers from `node` and returns the body.
fn curl(lab: &Lab, node: &str, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = lab
            .exec(node, &["curl", "-s", "--max-time", "2", url])
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_reach_each_other_over_the_underlay() {
    let lab = Lab::up(LabConfig::default()).unwrap();
    let names: Vec<_> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    assert_eq!(names, ["node1", "node2", "node3"]);
    for node in lab.nodes() {
        let addrs = lab.check(&node.name, &["ip", "-4", "-o", "addr"]).unwrap();
        assert!(
            addrs.contains(&format!("eth0    inet {}/24", node.ip)),
            "{addrs}"
        );
        for other in lab.nodes().iter().filter(|o| o.name != node.name) {
            let out = lab
                .exec(&node.name, &["ping", "-c1", "-W2", &other.ip.to_string()])
                .unwrap();
            assert!(
                out.status.success(),
                "{} cannot ping {}: {}",
                node.name,
                other.ip,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    lab.spawn("node2", Command::new(HELLO).args(["--port", "8080"]))
        .unwrap();
    assert_eq!(
        curl(&lab, "node1", "http://192.168.56.12:8080/"),
        "Hello World! from 192.168.56.12\n"
    );
    assert!(curl(&lab, "node3", "http://192.168.56.12:8080/whoami")
        .starts_with("client 192.168.56.13:"));
}

#[test]
fn two_labs_run_at_once_without_clashing() {
    let a = Lab::up(LabConfig {
        nodes: 2,
        ..LabConfig::default()
    })
    .unwrap();
    let b = Lab::up(LabConfig {
        nodes: 2,
        ..LabConfig::default()
    })
    .unwrap();
    assert_ne!(a.prefix(), b.prefix());
    a.spawn("node2", Command::new(HELLO).args(["--port", "8080"]))
        .unwrap();
    assert_eq!(
        curl(&a, "node1", "http://192.168.56.12:8080/"),
        "Hello World! from 192.168.56.12\n"
    );
    // The same address in lab b is another host: nothing listens there.
    let out = b
        .exec(
            "node1",
            &[
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://192.168.56.12:8080/",
            ],
        )
        .unwrap();
    assert!(!out.status.success(), "lab b reached lab a's server");
    // Lab b's underlay still works on its own.
    assert!(b
        .exec("node1", &["ping", "-c1", "-W2", "192.168.56.12"])
        .unwrap()
        .status
        .success());
    let root_b = b.root().to_path_buf();
    drop(b);
    assert_gone(&root_b, &[]);
    assert_eq!(
        curl(&a, "node1", "http://192.168.56.12:8080/"),
        "Hello World! from 192.168.56.12\n",
        "removing one lab leaves the other intact"
    );
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::up(LabConfig::default()).unwrap();
        lab.add_host("client", "192.168.56.100".parse().unwrap())
            .unwrap();
        let pid = lab
            .spawn("node1", Command::new("sleep").arg("300"))
            .unwrap();
        // A grandchild that is not the lab's child, as an agent's task would be.
        let out = lab
            .exec(
                "node2",
                &["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"],
            )
            .unwrap();
        let grandchild: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        seen = Some((lab.root().to_path_buf(), vec![pid, grandchild]));
        assert!(pid_alive(pid) && pid_alive(grandchild));
        panic!("a failed assertion");
    }));
    assert!(result.is_err());
    let (root, pids) = seen.unwrap();
    assert_gone(&root, &pids);
}

/// Starts `lab hold` and returns it with its lab root.
fn hold() -> (std::process::Child, std::path::PathBuf) {
    let mut child = Command::new(LAB)
        .args(["hold", "--nodes", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let root = line
        .split_whitespace()
        .last()
        .expect("lab hold prints its root")
        .into();
    (child, root)
}

#[test]
fn an_interrupted_lab_removes_itself() {
    let (mut child, root) = hold();
    assert_eq!(mounts_under(&root).len(), 3, "ul, node1, node2 are bound");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_gone(&root, &[]);
}

#[test]
fn a_killed_lab_is_removed_by_the_next_one() {
    let (mut child, root) = hold();
    child.kill().unwrap();
    child.wait().unwrap();
    // Another lab starting (here: the explicit call it makes first) removes the orphan.
    lab::remove_orphans();
    assert_gone(&root, &[]);
}
