//! Root tests on the host kernel: real namespaces, bind mounts and processes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use netns::{Error, Netns};

/// A scratch directory for namespace files, removed with everything bound in it.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/run/meshnet-test-netns-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        for ns in netns::list(&self.0).unwrap_or_default() {
            if let Ok(n) = Netns::open(&ns) {
                for pid in n.pids().unwrap_or_default() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = netns::delete(&ns);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn current_inode() -> u64 {
    fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

fn is_mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

#[test]
fn create_open_delete() {
    let dir = Dir::new();
    let ns = Netns::create(&dir.0, "a").unwrap();
    assert_eq!(ns.path(), dir.0.join("a"));
    assert_eq!(ns.name(), "a");
    assert!(is_mounted(ns.path()), "namespace file is a bind mount");
    assert_ne!(ns.inode().unwrap(), current_inode(), "a new namespace");
    assert_eq!(
        Netns::open(ns.path()).unwrap().inode().unwrap(),
        ns.inode().unwrap()
    );
    assert!(matches!(
        Netns::create(&dir.0, "a"),
        Err(Error::Exists(p)) if p == dir.0.join("a")
    ));
    assert_eq!(
        Netns::open_or_create(&dir.0, "a").unwrap().inode().unwrap(),
        ns.inode().unwrap()
    );
    assert_eq!(netns::list(&dir.0).unwrap(), vec![dir.0.join("a")]);

    netns::delete(ns.path()).unwrap();
    assert!(!ns.path().exists());
    assert!(!is_mounted(ns.path()));
    netns::delete(ns.path()).expect("deleting a namespace that is gone is fine");
    let err = Netns::open(&dir.0.join("a")).unwrap_err().to_string();
    assert!(
        err.contains("open network namespace") && err.contains(&*dir.0.to_string_lossy()),
        "error names the operation and the namespace: {err}"
    );
}

#[test]
fn a_plain_file_is_not_a_namespace() {
    let dir = Dir::new();
    let f = dir.0.join("plain");
    fs::write(&f, "").unwrap();
    assert!(matches!(Netns::open(&f), Err(Error::NotANamespace(p)) if p == f));
    assert!(netns::list(&dir.0).unwrap().is_empty());
    // A stale empty file left by a crash is replaced by create.
    let ns = Netns::create(&dir.0, "plain").unwrap();
    assert!(is_mounted(ns.path()));
}

#[test]
fn run_enters_the_namespace_on_its_own_thread() {
    let dir = Dir::new();
    let ns = Netns::create(&dir.0, "r").unwrap();
    let before = current_inode();
    let inside = ns.run(current_inode).unwrap();
    assert_eq!(inside, ns.inode().unwrap());
    assert_eq!(current_inode(), before, "the calling thread never moves");
    // Only loopback exists, and it is up.
    let out = ns
        .output(Command::new("ip").args(["-o", "link", "show"]))
        .unwrap();
    let links = String::from_utf8(out.stdout).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(
        links.contains("lo:") && links.contains("UP"),
        "lo is up: {links}"
    );
}

#[test]
fn output_runs_in_the_namespace_and_the_caller_stays() {
    let dir = Dir::new();
    let ns = Netns::create(&dir.0, "o").unwrap();
    let before = current_inode();
    let out = ns
        .output(Command::new("stat").args(["-L", "-c", "%i", "/proc/self/ns/net"]))
        .unwrap();
    assert!(out.status.success());
    let inside: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(inside, ns.inode().unwrap());
    assert_eq!(current_inode(), before, "the calling thread never moves");
    // A program that does not exist is an error of the spawn, as with Command::output.
    assert!(ns
        .output(&mut Command::new("/nonexistent/program"))
        .is_err());
}

#[test]
fn a_panic_inside_run_reaches_the_caller() {
    let dir = Dir::new();
    let ns = Netns::create(&dir.0, "p").unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run(|| panic!("boom")).unwrap();
    }));
    assert!(r.is_err());
    assert_ne!(current_inode(), ns.inode().unwrap());
}

#[test]
fn spawned_processes_live_in_the_namespace() {
    let dir = Dir::new();
    let ns = Netns::create(&dir.0, "s").unwrap();
    let mut child = ns.spawn(Command::new("sleep").arg("30")).unwrap();
    let ino = fs::metadata(format!("/proc/{}/ns/net", child.id()))
        .unwrap()
        .ino();
    assert_eq!(ino, ns.inode().unwrap());
    assert_eq!(ns.pids().unwrap(), vec![child.id()]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ns.pids().unwrap().is_empty());
}

#[test]
fn sysctls_are_per_namespace() {
    let dir = Dir::new();
    let a = Netns::create(&dir.0, "a").unwrap();
    let b = Netns::create(&dir.0, "b").unwrap();
    a.write_sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(a.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(b.read_sysctl("net/ipv4/ip_forward").unwrap(), "0");
    let err = a
        .write_sysctl("net.ipv4.nope", "1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("write sysctl in network namespace") && err.contains("/a"),
        "{err}"
    );
    // Several at once, from one thread in the namespace.
    b.write_sysctls(&[
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.tcp_fin_timeout", "17"),
    ])
    .unwrap();
    assert_eq!(b.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "17");
    assert_eq!(b.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    // The one that fails is named, and those before it were written.
    let err = b
        .write_sysctls(&[("net.ipv4.tcp_fin_timeout", "23"), ("net.ipv4.nope", "1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("net.ipv4.nope"), "{err}");
    assert_eq!(b.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "23");
    // Synced: only what differs is written, and returned with what it was.
    let diff = b
        .sync_sysctls(
            &[
                ("net.ipv4.tcp_fin_timeout", "31"),
                ("net.ipv4.ip_forward", "1"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        diff,
        vec![netns::SysctlDiff {
            key: "net.ipv4.tcp_fin_timeout".into(),
            was: "23".into(),
            want: "31".into(),
        }]
    );
    assert_eq!(b.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "31");
    // A handle opened inside the namespace reads its value from this thread, outside it.
    let handles = b
        .open_sysctls(&["net.ipv4.ip_forward", "net.nomodule.key"], true)
        .unwrap();
    assert_eq!(handles.len(), 1);
    assert_eq!(netns::read_sysctl_handle(&handles[0].1).unwrap(), "1");
    a.write_sysctl("net.ipv4.ip_forward", "0").unwrap();
    assert_eq!(netns::read_sysctl_handle(&handles[0].1).unwrap(), "1");
    b.write_sysctl("net.ipv4.ip_forward", "0").unwrap();
    assert_eq!(netns::read_sysctl_handle(&handles[0].1).unwrap(), "0");
    b.write_sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert!(b.open_sysctls(&["net.nomodule.key"], false).is_err());
    // Keys the namespace lacks (a key, or a whole directory of a module not loaded) skipped.
    let diff = b
        .sync_sysctls(
            &[
                ("net.ipv4.nope", "1"),
                ("net.nomodule.key", "1"),
                ("net.ipv4.tcp_fin_timeout", "29"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(diff.len(), 1);
    assert_eq!(b.read_sysctl("net.ipv4.tcp_fin_timeout").unwrap(), "29");
    // ... but not otherwise, and any other failure is still one.
    let err = b
        .sync_sysctls(&[("net.ipv4.nope", "1")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("net.ipv4.nope"), "{err}");
    let err = b
        .sync_sysctls(&[("net.ipv4.tcp_fin_timeout", "not a number")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("net.ipv4.tcp_fin_timeout"), "{err}");
}
