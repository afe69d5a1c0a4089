//! A meshnet cluster in a lab: `mesh-manager` on node1 (or, with [`ClusterOptions::ha`], on
//! each of node1..node3 with an etcd member beside it), `mesh-agent` on every node, and
//! `meshctl` against a manager's API socket. Everything runs as real processes of the built
//! binaries, and is removed with the lab.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{NodeInfo, TaskInfo};
use proto::model::{NodeStatus, TaskState};
use serde::de::DeserializeOwned;

use crate::lab::{Lab, LabConfig, LabError};

/// Upper bounds on waits: generous, because the guest kernel runs under software emulation on
/// a 2-core machine; a passing run never waits for them.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The manager's agent port, as Swarm's 2377.
pub const MANAGER_PORT: u16 = 2377;
/// The managers' TCP API port in HA labs, where followers forward requests to the leader.
pub const API_PORT: u16 = 2378;
/// The nodes that run a manager and an etcd member in HA labs.
pub const HA_NODES: [&str; 3] = ["node1", "node2", "node3"];

/// Seconds between the lab agents' timer passes (`--reconcile-interval`): short, so that tests
/// see a deleted object come back soon.
pub const RECONCILE_INTERVAL: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("`meshctl {args}` failed ({status}): {stderr}")]
    Meshctl {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`meshctl {args}` printed what is not the expected JSON ({cause}): {stdout}")]
    Json {
        args: String,
        cause: serde_json::Error,
        stdout: String,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// Where the built binaries are: beside the running test's own executable (target/debug/deps/..).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

pub struct Cluster {
    pub lab: Lab,
    agents: BTreeMap<String, u32>,
    /// The running managers by node.
    managers: BTreeMap<String, u32>,
    /// HA: the running etcd members by node.
    etcd: BTreeMap<String, u32>,
    ha: bool,
    /// The node whose manager meshctl asks.
    api_node: std::sync::Mutex<String>,
    lb: String,
    /// The agents' `--reconcile-interval`, in seconds.
    reconcile_interval: u64,
    /// Extra flags for mesh-manager, e.g. a short --cert-expiry.
    manager_args: Vec<String>,
    /// Extra flags for every mesh-agent, e.g. --dns-upstream.
    agent_args: Vec<String>,
    /// The worker join token, once asked for.
    token: Option<String>,
}

/// How [`Cluster::up_opts`] starts the manager and agents.
pub struct ClusterOptions<'a> {
    /// Extra flags for mesh-manager, e.g. a short --cert-expiry.
    pub manager_args: &'a [&'a str],
    /// Extra flags for every mesh-agent, e.g. --dns-upstream.
    pub agent_args: &'a [&'a str],
    /// The agents' --reconcile-interval, in seconds.
    pub reconcile_interval: u64,
    /// Three managers, on node1..node3, sharing the state in a three-member etcd (one member
    /// on each of those nodes).
    pub ha: bool,
}

impl Default for ClusterOptions<'_> {
    fn default() -> Self {
        ClusterOptions {
            manager_args: &[],
            agent_args: &[],
            reconcile_interval: RECONCILE_INTERVAL,
            ha: false,
        }
    }
}

impl Cluster {
    /// A lab of `nodes` nodes with the manager on node1 and an agent on each node, joined with
    /// the worker token, all ready.
    pub fn up(nodes: usize, lb: &str) -> Result<Cluster> {
        Cluster::up_with(nodes, lb, &[])
    }

    /// [`Cluster::up`] with extra flags for mesh-manager.
    pub fn up_with(nodes: usize, lb: &str, manager_args: &[&str]) -> Result<Cluster> {
        Cluster::up_opts(
            nodes,
            lb,
            ClusterOptions {
                manager_args,
                ..ClusterOptions::default()
            },
        )
    }

    /// [`Cluster::up`] with options for its processes.
    pub fn up_opts(nodes: usize, lb: &str, opts: ClusterOptions) -> Result<Cluster> {
        let lab = Lab::up(LabConfig {
            nodes,
            ..LabConfig::default()
        })?;
        fs::create_dir_all(lab.root().join("logs")).map_err(|cause| ClusterError::Io {
            what: "create log directory".into(),
            cause,
        })?;
        let mut cluster = Cluster {
            lab,
            agents: BTreeMap::new(),
            managers: BTreeMap::new(),
            etcd: BTreeMap::new(),
            ha: opts.ha,
            api_node: std::sync::Mutex::new("node1".into()),
            lb: lb.to_string(),
            reconcile_interval: opts.reconcile_interval,
            manager_args: opts.manager_args.iter().map(|a| a.to_string()).collect(),
            agent_args: opts.agent_args.iter().map(|a| a.to_string()).collect(),
            token: None,
        };
        if cluster.ha {
            for n in HA_NODES {
                cluster.start_etcd(n)?;
            }
            for n in HA_NODES {
                cluster.start_manager_on(n)?;
            }
        } else {
            cluster.start_manager()?;
        }
        let names: Vec<String> = cluster.lab.nodes().iter().map(|n| n.name.clone()).collect();
        for n in &names {
            cluster.start_agent(n)?;
        }
        cluster.wait_for(START_TIMEOUT, "every node ready", |c| {
            let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).ok()?;
            (nodes.len() == names.len() && nodes.iter().all(|n| n.node.status == NodeStatus::Ready))
                .then_some(())
        })?;
        Ok(cluster)
    }

    /// The API socket of the manager meshctl asks now (see [`Cluster::use_manager`]).
    pub fn api_socket(&self) -> PathBuf {
        self.api_socket_of(&self.api_node.lock().unwrap())
    }

    fn api_socket_of(&self, node: &str) -> PathBuf {
        match node {
            "node1" => self.lab.root().join("manager.sock"),
            n => self.lab.root().join(format!("manager-{n}.sock")),
        }
    }

    /// From now on meshctl asks the manager on `node` (HA labs).
    pub fn use_manager(&self, node: &str) {
        *self.api_node.lock().unwrap() = node.to_string();
    }

    pub fn manager_data_dir(&self) -> PathBuf {
        self.manager_data_dir_of("node1")
    }

    fn manager_data_dir_of(&self, node: &str) -> PathBuf {
        match node {
            "node1" => self.lab.root().join("manager"),
            n => self.lab.root().join(format!("manager-{n}")),
        }
    }

    /// The etcd endpoints of an HA lab, as `--store` takes them.
    pub fn etcd_store(&self) -> String {
        let eps: Vec<String> = HA_NODES
            .iter()
            .filter_map(|n| self.lab.node(n).ok())
            .map(|n| format!("{}:2379", n.ip))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// Starts (or restarts, with its data) the etcd member on `node` of an HA lab.
    pub fn start_etcd(&mut self, node: &str) -> Result<()> {
        let ip = self.lab.node(node)?.ip;
        let initial: Vec<String> = HA_NODES
            .iter()
            .filter_map(|n| {
                self.lab
                    .node(n)
                    .ok()
                    .map(|h| format!("{n}=http://{}:2380", h.ip))
            })
            .collect();
        let (out, err) = self.log_file(&format!("etcd-{node}"))?;
        let mut cmd = self.lab.command("etcd");
        cmd.arg("--name")
            .arg(node)
            .arg("--data-dir")
            .arg(self.lab.root().join(format!("etcd-{node}")))
            .arg("--listen-client-urls")
            .arg(format!("http://{ip}:2379"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{ip}:2379"))
            .arg("--listen-peer-urls")
            .arg(format!("http://{ip}:2380"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{ip}:2380"))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            // A change writes a key per record it touches: a big `service create` is one
            // transaction of that many keys.
            .arg("--max-txn-ops")
            .arg("100000")
            .arg("--max-request-bytes")
            .arg("33554432")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let pid = self.lab.spawn(node, &mut cmd)?;
        self.etcd.insert(node.to_string(), pid);
        Ok(())
    }

    pub fn kill_etcd(&mut self, node: &str, signal: Signal) {
        if let Some(pid) = self.etcd.remove(node) {
            stop(pid, signal);
        }
    }

    /// Starts the manager on `node` of an HA lab, on the lab's etcd.
    pub fn start_manager_on(&mut self, node: &str) -> Result<()> {
        let ip = self.lab.node(node)?.ip;
        let store = self.etcd_store();
        let (out, err) = self.log_file(&format!("manager-{node}"))?;
        let mut cmd = Command::new(bin("mesh-manager"));
        cmd.arg("--listen")
            .arg(format!("{ip}:{MANAGER_PORT}"))
            .arg("--api-listen")
            .arg(format!("{ip}:{API_PORT}"))
            .arg("--store")
            .arg(&store)
            .arg("--data-dir")
            .arg(self.manager_data_dir_of(node))
            .arg("--api-socket")
            .arg(self.api_socket_of(node))
            .args(&self.manager_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let pid = self.lab.spawn(node, &mut cmd)?;
        self.managers.insert(node.to_string(), pid);
        let socket = self.api_socket_of(node);
        self.wait_for(
            START_TIMEOUT,
            &format!("the manager's API on {node}"),
            |c| {
                c.meshctl_at(&socket, &["node", "ls"])
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|_| ())
            },
        )
        .map_err(|e| match e {
            // No cluster exists yet to print its logs on the panic: the message carries them.
            ClusterError::Timeout(after, what) => {
                ClusterError::Timeout(after, format!("{what}\n{}", self.logs()))
            }
            e => e,
        })
    }

    /// The process id of the manager on `node`, if the harness started one that runs.
    pub fn manager_pid_on(&self, node: &str) -> Option<u32> {
        self.managers.get(node).copied()
    }

    /// Sends `signal` to the manager on `node` and waits until it is gone.
    pub fn kill_manager_on(&mut self, node: &str, signal: Signal) {
        if let Some(pid) = self.managers.remove(node) {
            stop(pid, signal);
        }
    }

    /// The hostname of the node whose manager leads, as `node ls` on the current manager says.
    pub fn leader(&self) -> Option<String> {
        let nodes: Vec<NodeInfo> = self.json(&["node", "ls"]).ok()?;
        nodes
            .into_iter()
            .find(|n| n.manager_status == Some(proto::api::ManagerStatus::Leader))
            .map(|n| n.node.hostname)
    }

    /// An agent's state directory (its namespaces are under `netns/` there).
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.lab.node_dir(node)
    }

    pub fn log_path(&self, process: &str) -> PathBuf {
        self.lab.root().join("logs").join(format!("{process}.log"))
    }

    fn log_file(&self, process: &str) -> Result<(File, File)> {
        let open = |p: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|cause| ClusterError::Io {
                    what: format!("open {}", p.display()),
                    cause,
                })
        };
        let f = open(&self.log_path(process))?;
        let g = f.try_clone().map_err(|cause| ClusterError::Io {
            what: "duplicate log file".into(),
            cause,
        })?;
        Ok((f, g))
    }

    pub fn start_manager(&mut self) -> Result<()> {
        let node1 = &self.lab.nodes()[0];
        let (out, err) = self.log_file("manager")?;
        let mut cmd = Command::new(bin("mesh-manager"));
        cmd.arg("--listen")
            .arg(format!("{}:{MANAGER_PORT}", node1.ip))
            .arg("--data-dir")
            .arg(self.manager_data_dir())
            .arg("--api-socket")
            .arg(self.api_socket())
            .args(&self.manager_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let pid = self.lab.spawn("node1", &mut cmd)?;
        self.managers.insert("node1".into(), pid);
        // A socket file may be left by a killed manager: ready means it answers.
        self.wait_for(START_TIMEOUT, "the manager's API", |c| {
            c.meshctl(&["node", "ls"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })
    }

    /// The current worker join token (`meshctl join-token worker --quiet`).
    pub fn worker_token(&mut self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let token = self
            .meshctl_ok(&["join-token", "worker", "--quiet"])?
            .trim()
            .to_string();
        self.token = Some(token.clone());
        Ok(token)
    }

    /// Forgets the cached token, e.g. after a rotation.
    pub fn forget_token(&mut self) {
        self.token = None;
    }

    /// Starts the node's agent; it joins with the worker token unless its state dir already
    /// holds its certificate (it then needs none).
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let token = self.worker_token()?;
        self.start_agent_with(node, &["--join-token", &token])
    }

    /// Starts the node's agent with extra flags and no token of the harness's own.
    pub fn start_agent_with(&mut self, node: &str, extra: &[&str]) -> Result<()> {
        let (out, err) = self.log_file(&format!("agent-{node}"))?;
        let mut cmd = self.agent_command(node, extra)?;
        cmd.stdout(out).stderr(err);
        let pid = self.lab.spawn(node, &mut cmd)?;
        self.agents.insert(node.to_string(), pid);
        Ok(())
    }

    /// The mesh-agent command line for `node` (any host of the lab), with extra flags, to be
    /// spawned or run to completion in the node's namespace.
    pub fn agent_command(&self, node: &str, extra: &[&str]) -> Result<Command> {
        let managers: Vec<&str> = if self.ha {
            HA_NODES.to_vec()
        } else {
            vec!["node1"]
        };
        let ip = self.lab.node(node)?.ip;
        let mut cmd = self.lab.command(bin("mesh-agent"));
        cmd.args(&self.agent_args).args(extra);
        for m in managers {
            cmd.arg("--manager")
                .arg(format!("{}:{MANAGER_PORT}", self.lab.node(m)?.ip));
        }
        cmd.arg("--advertise-addr")
            .arg(ip.to_string())
            .arg("--hostname")
            .arg(node)
            .arg("--state-dir")
            .arg(self.state_dir(node))
            .arg("--lb")
            .arg(&self.lb)
            .arg("--reconcile-interval")
            .arg(self.reconcile_interval.to_string())
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// The process id of the node's agent, if the harness started one that runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents.get(node).copied()
    }

    /// The process id of the manager, if the harness started one that runs.
    pub fn manager_pid(&self) -> Option<u32> {
        self.managers.get("node1").copied()
    }

    /// Sends `signal` to the node's agent and waits until it is gone.
    pub fn kill_agent(&mut self, node: &str, signal: Signal) {
        if let Some(pid) = self.agents.remove(node) {
            stop(pid, signal);
        }
    }

    pub fn kill_manager(&mut self, signal: Signal) {
        self.kill_manager_on("node1", signal)
    }

    /// Runs meshctl with `args` from node1, against the current manager (node1's unless
    /// [`Cluster::use_manager`] chose another).
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        self.meshctl_at(&self.api_socket(), args)
    }

    fn meshctl_at(&self, socket: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = self.lab.command(bin("meshctl"));
        cmd.arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .stdin(Stdio::null());
        Ok(self
            .lab
            .node("node1")?
            .ns
            .output(&mut cmd)
            .map_err(LabError::from)?)
    }

    /// Runs meshctl and returns its stdout; a non-zero exit is an error with its stderr.
    pub fn meshctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.meshctl(args)?;
        if !out.status.success() {
            return Err(ClusterError::Meshctl {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs meshctl with `--format json` and parses its output.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut full = args.to_vec();
        full.extend(["--format", "json"]);
        let stdout = self.meshctl_ok(&full)?;
        serde_json::from_str(&stdout).map_err(|cause| ClusterError::Json {
            args: full.join(" "),
            cause,
            stdout,
        })
    }

    /// `meshctl network create --driver overlay --subnet SUBNET NAME`.
    pub fn network_create(&self, name: &str, subnet: &str) -> Result<String> {
        self.meshctl_ok(&[
            "network", "create", "--driver", "overlay", "--subnet", subnet, name,
        ])
    }

    /// [`Cluster::network_create`] with `--opt encrypted`.
    pub fn encrypted_network_create(&self, name: &str, subnet: &str) -> Result<String> {
        self.meshctl_ok(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--opt",
            "encrypted",
            "--subnet",
            subnet,
            name,
        ])
    }

    /// Creates `name`, `replicas` hello-servers on port 8080 with extra `service create` flags
    /// (networks, ports, constraints), and waits until they all run.
    pub fn hello_service(
        &self,
        name: &str,
        replicas: usize,
        flags: &[&str],
    ) -> Result<Vec<TaskInfo>> {
        let hello = bin("hello-server").display().to_string();
        let replicas_s = replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            &replicas_s,
        ];
        args.extend(flags);
        args.extend(["--detach", "--", &hello, "--port", "8080"]);
        self.meshctl_ok(&args)?;
        self.wait_running(name, replicas)
    }

    /// The service's current tasks (desired running), by slot.
    pub fn tasks(&self, service: &str) -> Result<Vec<TaskInfo>> {
        let mut tasks: Vec<TaskInfo> = self.json(&["service", "ps", service])?;
        tasks.retain(|t| t.desired_state == TaskState::Running);
        tasks.sort_by_key(|t| t.slot);
        Ok(tasks)
    }

    /// Waits until the service has exactly `n` current tasks, all running with a namespace.
    pub fn wait_running(&self, service: &str, n: usize) -> Result<Vec<TaskInfo>> {
        self.wait_for(
            CONVERGE_TIMEOUT,
            &format!("{n} running tasks of {service}"),
            |c| {
                let tasks = c.tasks(service).ok()?;
                (tasks.len() == n
                    && tasks
                        .iter()
                        .all(|t| t.state == TaskState::Running && t.netns.is_some()))
                .then_some(tasks)
            },
        )
    }

    /// Runs a command inside a task's network namespace.
    pub fn task_exec(&self, task: &TaskInfo, args: &[&str]) -> Result<Output> {
        let ns = task.netns.as_deref().ok_or_else(|| {
            ClusterError::Timeout(
                Duration::ZERO,
                format!("task {} has no namespace", task.name),
            )
        })?;
        let ns = netns::Netns::open(Path::new(ns)).map_err(LabError::from)?;
        let mut cmd = self.lab.command(args[0]);
        cmd.args(&args[1..]).stdin(Stdio::null());
        Ok(ns.output(&mut cmd).map_err(LabError::from)?)
    }

    /// Polls `f` every 100 ms until it returns Some, or fails after `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Cluster) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(timeout, what.to_string()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every process log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = fs::read_dir(self.lab.root().join("logs")) else {
            return out;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- {} (last 40 lines)\n", p.display());
            for l in &lines[lines.len().saturating_sub(40)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "cluster logs of lab {}:\n{}",
                self.lab.prefix(),
                self.logs()
            );
        }
    }
}

fn stop(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Our own children become zombies until the lab reaps them: gone means no namespace left.
    while fs::metadata(format!("/proc/{pid}/ns/net")).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
