//! A lab: N nodes as network namespaces on one underlay bridge.
//!
//! ```text
//!   <prefix> root: /run/meshnet-lab/<prefix>/
//!     netns/ul      underlay namespace holding bridge `ulbr`
//!     netns/node1   eth0 192.168.56.11/24 ──veth── u-node1 ∈ ulbr
//!     netns/node2   eth0 192.168.56.12/24 ──veth── u-node2 ∈ ulbr
//!     nodes/node1/  a state directory per node, for the agent running there
//! ```
//! Everything is removed when the [`Lab`] is dropped (also on panic), on SIGINT/SIGTERM/SIGHUP,
//! or, after a SIGKILL, by the next lab that starts ([`remove_orphans`]).

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use netns::Netns;

use crate::teardown::{self, LABS_DIR, LAB_ENV};

pub use crate::teardown::remove_orphans;

/// The underlay subnet, as in the project's Vagrantfile.
pub const UNDERLAY_PREFIX: &str = "192.168.56";
/// The host that tests and benchmarks send traffic from, on the underlay beside the nodes
/// (`Lab::add_host(CLIENT, CLIENT_IP)`).
pub const CLIENT: &str = "client";
pub const CLIENT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 56, 100);
/// The underlay addresses of node1..node3, where a published port answers.
pub const NODE_IPS: [&str; 3] = ["192.168.56.11", "192.168.56.12", "192.168.56.13"];
const UNDERLAY_BRIDGE: &str = "ulbr";
const UNDERLAY_NS: &str = "ul";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("lab {prefix}: `{cmd}` in {ns} failed ({status}): {stderr}")]
    Command {
        prefix: String,
        ns: String,
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("lab {prefix}: {what}: {cause}")]
    Io {
        prefix: String,
        what: String,
        cause: std::io::Error,
    },
    #[error("invalid lab prefix {0:?}: use 1-12 characters of [a-z0-9]")]
    InvalidPrefix(String),
    #[error("lab {0} already exists (remove it with `lab down --prefix {0}`)")]
    Exists(String),
    #[error("lab {prefix} has no node or host named {name:?}")]
    UnknownNode { prefix: String, name: String },
    #[error("lab {prefix} already has a host named {name} or at {ip}")]
    HostExists {
        prefix: String,
        name: String,
        ip: Ipv4Addr,
    },
    #[error("a lab has 1 to 50 nodes, not {0}")]
    NodeCount(usize),
}

pub type Result<T> = std::result::Result<T, LabError>;

/// Who removes the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This process: the lab goes when the [`Lab`] is dropped or the process dies.
    Process,
    /// The `lab` command line: the lab stays until `lab down`.
    Cli,
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub nodes: usize,
    /// A unique one is chosen when `None`, so that labs can run side by side.
    pub prefix: Option<String>,
    pub owner: Owner,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 3,
            prefix: None,
            owner: Owner::Process,
        }
    }
}

/// A node or an extra host on the underlay.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

#[derive(Debug)]
pub struct Lab {
    prefix: String,
    root: PathBuf,
    underlay: Netns,
    nodes: Vec<Node>,
    hosts: Vec<Node>,
    children: Mutex<Vec<Child>>,
    owner: Owner,
}

fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 12
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidPrefix(prefix.to_string()))
    }
}

/// A prefix no other lab of this or any other process uses at the same time.
fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{:x}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The root directory of the lab named `prefix`.
pub fn lab_root(prefix: &str) -> PathBuf {
    Path::new(LABS_DIR).join(prefix)
}

/// The underlay address of node `i` (1-based): 192.168.56.11, .12, …
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 56, 10 + i as u8)
}

impl Lab {
    /// Builds a lab. Labs left behind by crashed runs are removed first.
    pub fn up(config: LabConfig) -> Result<Lab> {
        if !(1..=50).contains(&config.nodes) {
            return Err(LabError::NodeCount(config.nodes));
        }
        let prefix = config.prefix.clone().unwrap_or_else(unique_prefix);
        validate_prefix(&prefix)?;
        remove_orphans();
        let root = lab_root(&prefix);
        if root.exists() {
            return Err(LabError::Exists(prefix));
        }
        let lab_name = prefix.clone();
        let io = |what: &str| {
            let prefix = lab_name.clone();
            let what = what.to_string();
            move |cause| LabError::Io {
                prefix,
                what,
                cause,
            }
        };
        fs::create_dir_all(&root).map_err(io("create lab directory"))?;
        if config.owner == Owner::Process {
            teardown::register(&root);
        }
        let owner_line = match config.owner {
            Owner::Process => teardown::owner_line(),
            Owner::Cli => "cli".to_string(),
        };
        teardown::write_owner(&root, &owner_line).map_err(io("write owner file"))?;
        // From here on, Drop removes whatever was built if a later step fails.
        let underlay = Netns::create(&root.join("netns"), UNDERLAY_NS)?;
        let mut lab = Lab {
            prefix,
            root,
            underlay,
            nodes: Vec::new(),
            hosts: Vec::new(),
            children: Mutex::new(Vec::new()),
            owner: Owner::Process,
        };
        lab.run_in(
            &lab.underlay,
            &["ip", "link", "add", UNDERLAY_BRIDGE, "type", "bridge"],
        )?;
        lab.run_in(&lab.underlay, &["ip", "link", "set", UNDERLAY_BRIDGE, "up"])?;
        for i in 1..=config.nodes {
            let node = lab.attach(&format!("node{i}"), node_ip(i))?;
            fs::create_dir_all(lab.node_dir(&node.name)).map_err(io("create node directory"))?;
            lab.nodes.push(node);
        }
        lab.owner = config.owner;
        Ok(lab)
    }

    /// Opens a lab made earlier by `lab up` (for `lab exec`).
    pub fn open(prefix: &str) -> Result<Lab> {
        validate_prefix(prefix)?;
        let root = lab_root(prefix);
        let nsdir = root.join("netns");
        let underlay = Netns::open(&nsdir.join(UNDERLAY_NS))?;
        let mut nodes = Vec::new();
        let mut hosts = Vec::new();
        for path in netns::list(&nsdir)? {
            let ns = Netns::open(&path)?;
            let name = ns.name();
            if name == UNDERLAY_NS {
                continue;
            }
            let ip = read_eth0_ip(&ns).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let node = Node { name, ip, ns };
            if node.name.starts_with("node") {
                nodes.push(node);
            } else {
                hosts.push(node);
            }
        }
        nodes.sort_by_key(|n| n.ip);
        Ok(Lab {
            prefix: prefix.to_string(),
            root,
            underlay,
            nodes,
            hosts,
            children: Mutex::new(Vec::new()),
            owner: Owner::Cli,
        })
    }

    /// Adds a host (a client, say) on the underlay with the given address.
    pub fn add_host(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Node> {
        if self
            .nodes
            .iter()
            .chain(&self.hosts)
            .any(|n| n.name == name || n.ip == ip)
        {
            return Err(LabError::HostExists {
                prefix: self.prefix.clone(),
                name: name.to_string(),
                ip,
            });
        }
        let host = self.attach(name, ip)?;
        self.hosts.push(host);
        Ok(self.hosts.last().unwrap())
    }

    /// A namespace with eth0 at `ip`/24 whose peer is a port of the underlay bridge.
    fn attach(&self, name: &str, ip: Ipv4Addr) -> Result<Node> {
        let ns = Netns::create(&self.root.join("netns"), name)?;
        let port = format!("u-{name}");
        let ns_path = ns.path().to_string_lossy().into_owned();
        self.run_in(
            &self.underlay,
            &[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns_path,
            ],
        )?;
        self.run_in(
            &self.underlay,
            &["ip", "link", "set", &port, "master", UNDERLAY_BRIDGE, "up"],
        )?;
        self.run_in(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        self.run_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
        Ok(Node {
            name: name.to_string(),
            ip,
            ns,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// A node or extra host by name.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .chain(&self.hosts)
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::UnknownNode {
                prefix: self.prefix.clone(),
                name: name.to_string(),
            })
    }

    /// A directory for the node's own state (an agent's `--state-dir`), inside the lab's root so
    /// the namespaces bound there are removed with the lab.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }

    /// A command marked as the lab's, so teardown finds it and every process it starts.
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(LAB_ENV, &self.prefix);
        cmd
    }

    /// Runs `args` in the node's namespace and returns its output (whatever its exit status).
    pub fn exec(&self, node: &str, args: &[&str]) -> Result<Output> {
        let node = self.node(node)?;
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]).stdin(Stdio::null());
        Ok(node.ns.output(&mut cmd)?)
    }

    /// Runs `args` in the node's namespace and returns its stdout; fails on a non-zero exit.
    pub fn check(&self, node: &str, args: &[&str]) -> Result<String> {
        let node = self.node(node)?;
        self.run_in(&node.ns, args)
    }

    /// Starts a long-running process in the node's namespace; it is killed with the lab.
    pub fn spawn(&self, node: &str, cmd: &mut Command) -> Result<u32> {
        let node = self.node(node)?;
        cmd.env(LAB_ENV, &self.prefix);
        let child = node.ns.spawn(cmd)?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    fn run_in(&self, ns: &Netns, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]).stdin(Stdio::null());
        let out = ns.output(&mut cmd)?;
        if !out.status.success() {
            return Err(LabError::Command {
                prefix: self.prefix.clone(),
                ns: ns.name(),
                cmd: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Removes the lab now (Drop does the same).
    pub fn down(mut self) {
        self.owner = Owner::Process;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owner == Owner::Cli {
            return;
        }
        teardown::remove(&self.root);
        for child in self
            .children
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        teardown::unregister(&self.root);
    }
}

/// Removes the lab named `prefix`, whoever owns it.
pub fn remove(prefix: &str) -> Result<()> {
    validate_prefix(prefix)?;
    teardown::remove(&lab_root(prefix));
    Ok(())
}

/// The prefixes of the labs that exist now.
pub fn list() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(LABS_DIR)
        .map(|e| {
            e.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn read_eth0_ip(ns: &Netns) -> Option<Ipv4Addr> {
    let out = ns
        .output(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "eth0"]))
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    cidr.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("lab").is_ok());
        assert!(validate_prefix(&unique_prefix()).is_ok());
        for bad in ["", "Lab", "a-b", "thirteenchars"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unique_prefixes_differ() {
        assert_ne!(unique_prefix(), unique_prefix());
    }

    #[test]
    fn node_addresses_follow_vagrant() {
        assert_eq!(node_ip(1), Ipv4Addr::new(192, 168, 56, 11));
        assert_eq!(node_ip(3), Ipv4Addr::new(192, 168, 56, 13));
    }
}
