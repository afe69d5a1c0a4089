//! B6, updates under load (issue 11), in a 3-node lab (integration's `Cluster`: the release
//! `mesh-manager` and `mesh-agent`s as real processes, nftables load balancer), with a client on
//! the underlay sending one request per new connection to every node's published port (a
//! thread per node, every `--pace-ms`) and a task asking the service by name (its VIP) in a
//! loop:
//!
//! - **B6**: failed requests while 3 replicas of `web` (hello-server with an HTTP health
//!   check) are replaced, in the same run, two ways, alternately for `--rounds`:
//!   - meshnet: `meshctl service update --env-add HELLO_TAG=…` (stop-first, parallelism 1):
//!     each old task leaves every node's balancer, the manager waits for every node's applied
//!     revision, then it is stopped;
//!   - the reference, Swarm's way: each old task is stopped first (SIGTERM to its process, as a
//!     container stop that beats the balancers' update) and the balancers follow once the
//!     manager learns it ended; once its replacement is healthy, a fixed 2 s sleep (Swarm's
//!     wait for gossip) before the next slot. Two of the three tasks serve throughout.
//!
//!   Goal: meshnet 0, against the reference's count.
//! - **B6b**: one task killed (SIGKILL, not stopped): the time from the kill to the start of
//!   the last request through any node that failed, i.e. how long a dead task kept getting new
//!   connections. Goal ≤ 50 ms on the host kernel.
//! - **B6c**: a rolling update of 30 tasks with parallelism 3 and a `--monitor` period: the
//!   time from the update to `UpdateStatus: completed` ÷ the periods it must wait (10 slots of
//!   3 × the monitor period; hello-server exits at SIGTERM, so no grace period is spent).
//!   Goal ≤ 1.2.
//!
//! The figures never fail the benchmark; only a failure to measure does. The lab is removed
//! whatever happens.
//!
//! Usage (root): b6_update [--rounds 3] [--pace-ms 10] [--monitor-ms 1000]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{ms, quartiles, title};
use clap::Parser;
use integration::cluster::{bin, Cluster};
use integration::http;
use integration::lab::{CLIENT, CLIENT_IP, NODE_IPS};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{ServiceInfo, TaskInfo};
use proto::model::{TaskState, UpdateState};

#[derive(Parser)]
struct Args {
    /// Rounds of B6 (each: one meshnet update and one reference replacement) and of B6b.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Milliseconds between one thread's requests.
    #[arg(long, default_value_t = 10)]
    pace_ms: u64,
    /// B6c's --update-monitor, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    monitor_ms: u64,
}

const WAIT: Duration = Duration::from_secs(120);
/// Swarm's fixed wait between taking a task out and stopping the next.
const SWARM_SLEEP: Duration = Duration::from_secs(2);

/// What the load saw: requests sent, and the start of each failed one (since `t0`) with its
/// path.
#[derive(Default)]
struct Tally {
    sent: usize,
    failed: Vec<(Duration, &'static str)>,
    /// What went wrong with each failed request.
    errors: Vec<String>,
}

impl Tally {
    /// Failures by path, e.g. `192.168.56.11: 3, by name: 1`.
    fn paths(&self) -> String {
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for (_, p) in &self.failed {
            *by.entry(p).or_default() += 1;
        }
        let parts: Vec<String> = by.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        parts.join(", ")
    }
}

/// Runs `during` under load on `port` (a thread per node, and by name from `probe` when given).
fn under_load<T>(
    c: &Cluster,
    port: u16,
    probe: Option<&TaskInfo>,
    pace: Duration,
    during: impl FnOnce(Instant) -> Result<T>,
) -> Result<(Tally, T)> {
    let stop = AtomicBool::new(false);
    let client = &c.lab.node(CLIENT)?.ns;
    let tally = Mutex::new(Tally::default());
    let t0 = Instant::now();
    let out = std::thread::scope(|scope| {
        for node in NODE_IPS {
            let (stop, tally) = (&stop, &tally);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = t0.elapsed();
                    let result = http::get(client, node, port, "/tag");
                    let mut t = tally.lock().expect("tally");
                    t.sent += 1;
                    if let Err(e) = result {
                        t.errors
                            .push(format!("{:.0} ms via {node}: {e}", ms(started)));
                        t.failed.push((started, node));
                    }
                    drop(t);
                    std::thread::sleep(pace);
                }
            });
        }
        if let Some(probe) = probe {
            let (stop, tally) = (&stop, &tally);
            scope.spawn(move || {
                let pid = probe.pid.map(|p| p.to_string()).unwrap_or_default();
                while !stop.load(Ordering::Relaxed) {
                    let started = t0.elapsed();
                    let status = Command::new("nsenter")
                        .args([
                            "-t",
                            &pid,
                            "-n",
                            "-m",
                            "--",
                            "curl",
                            "-sf",
                            "--max-time",
                            "3",
                        ])
                        .arg("http://web:8080/tag")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    let mut t = tally.lock().expect("tally");
                    t.sent += 1;
                    if !status.as_ref().is_ok_and(|s| s.success()) {
                        // curl's exit status says which step failed (6: resolve, 7: connect,
                        // 28: timeout).
                        let code = status.ok().and_then(|s| s.code());
                        t.errors
                            .push(format!("{:.0} ms by name: curl exit {code:?}", ms(started)));
                        t.failed.push((started, "by name"));
                    }
                }
            });
        }
        // Some load before the change, so that it is measured in steady state.
        std::thread::sleep(Duration::from_millis(300));
        let out = during(t0);
        // And some after it, to catch what fails late.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        out
    })?;
    Ok((tally.into_inner().expect("tally"), out))
}

fn inspect(c: &Cluster, service: &str) -> Result<ServiceInfo> {
    Ok(c.json(&["service", "inspect", service])?)
}

/// Waits until `service`'s rollout is no longer active and every task runs; returns when.
fn wait_rollout(c: &Cluster, service: &str, replicas: usize) -> Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = inspect(c, service)?;
        if let Some(st) = &s.update_status {
            match st.state {
                UpdateState::Completed | UpdateState::RollbackCompleted => {
                    let done = Instant::now();
                    c.wait_running(service, replicas)?;
                    return Ok(done);
                }
                UpdateState::Paused | UpdateState::RollbackPaused => {
                    bail!("the update of {service} paused: {}", st.message)
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("the update of {service} did not complete in {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every current task of `web` runs and is healthy, none of them one of `gone`.
fn wait_healthy(c: &Cluster, gone: &[TaskInfo]) -> Result<()> {
    c.wait_for(WAIT, "web replaced and healthy", |c| {
        let tasks = c.tasks("web").ok()?;
        (tasks.len() == 3
            && tasks.iter().all(|t| {
                t.state == TaskState::Running
                    && t.health == Some(proto::model::Health::Healthy)
                    && gone.iter().all(|o| o.id != t.id)
            }))
        .then_some(())
    })?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pace = Duration::from_millis(args.pace_ms);
    let mut c = Cluster::up(3, "nftables")?;
    c.lab.add_host(CLIENT, CLIENT_IP)?;
    c.network_create("app", "10.0.42.0/24")?;
    let hello = bin("hello-server").display().to_string();
    c.meshctl_ok(&[
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
        "HELLO_TAG=v0",
        "--health-http",
        "8080/tag",
        "--update-monitor",
        "1s",
        "--detach",
        "--",
        &hello,
        "--port",
        "8080",
    ])?;
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "probe",
        "--network",
        "app",
        "--detach",
        "--",
        "sleep",
        "1000000",
    ])?;
    let probe = c.wait_running("probe", 1)?.remove(0);
    wait_healthy(&c, &[])?;

    title(
        "B6 updates under load",
        "3-node lab, nftables, hello-server with --health-http",
    );
    let mut ours = Vec::new();
    let mut swarm = Vec::new();
    for round in 0..args.rounds {
        let tag = format!("HELLO_TAG=v{}", round + 1);
        let (t, ()) = under_load(&c, 80, Some(&probe), pace, |_| {
            c.meshctl_ok(&["service", "update", "--env-add", &tag, "web"])?;
            Ok(())
        })?;
        println!(
            "round {}: meshnet update: {} of {} requests failed ({})",
            round + 1,
            t.failed.len(),
            t.sent,
            t.paths()
        );
        for e in &t.errors {
            println!("  {e}");
        }
        ours.push((t.failed.len(), t.sent));

        let old = c.tasks("web")?;
        let (t, ()) = under_load(&c, 80, Some(&probe), pace, |_| {
            for (i, task) in old.iter().enumerate() {
                let pid = task.pid.context("a running task has a pid")?;
                kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
                wait_healthy(&c, &old[..=i])?;
                std::thread::sleep(SWARM_SLEEP);
            }
            Ok(())
        })?;
        println!(
            "round {}: reference (stop first, 2 s sleep): {} of {} requests failed ({})",
            round + 1,
            t.failed.len(),
            t.sent,
            t.paths()
        );
        swarm.push((t.failed.len(), t.sent));
    }
    let total = |v: &[(usize, usize)]| v.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let (of, os) = total(&ours);
    let (sf, ss) = total(&swarm);
    println!("| B6 | failed requests | sent | goal |");
    println!("|---|---|---|---|");
    println!("| meshnet rolling update | {of} | {os} | 0 |");
    println!("| reference: stop first, fixed 2 s sleep | {sf} | {ss} | (reference) |");

    // B6b: a task killed outright.
    let mut exposure = Vec::new();
    for round in 0..args.rounds {
        let victim = c.tasks("web")?.remove(round % 3);
        let pid = victim.pid.context("a running task has a pid")?;
        let (t, killed) = under_load(&c, 80, None, Duration::from_millis(2), |t0| {
            let at = t0.elapsed();
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
            std::thread::sleep(Duration::from_millis(1500));
            Ok(at)
        })?;
        let last = t
            .failed
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| *f + Duration::from_millis(100) >= killed)
            .max();
        let exposed = last.map_or(Duration::ZERO, |l| l.saturating_sub(killed));
        let offsets: Vec<String> = t
            .failed
            .iter()
            .map(|(f, p)| format!("{:+.1} ms {p}", ms(*f) - ms(killed)))
            .collect();
        println!(
            "round {}: killed task: {} of {} requests failed, the last one started {:.1} ms after the kill [{}]",
            round + 1,
            t.failed.len(),
            t.sent,
            ms(exposed),
            offsets.join(", ")
        );
        exposure.push(ms(exposed));
        // Its replacement runs after the restart delay.
        wait_healthy(&c, &[victim])?;
    }
    let (q1, med, q3) = quartiles(&exposure);
    println!("| B6b | median ms | IQR | goal |");
    println!("|---|---|---|---|");
    println!("| a killed task gets new connections for | {med:.1} | {q1:.1}-{q3:.1} | ≤ 50 ms |");

    // B6c: 30 tasks, parallelism 3.
    let monitor = format!("{}ms", args.monitor_ms);
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "wide",
        "--replicas",
        "30",
        "--update-parallelism",
        "3",
        "--update-monitor",
        &monitor,
        "--detach",
        "--",
        &hello,
        "--port",
        "8080",
    ])?;
    c.wait_running("wide", 30)?;
    let start = Instant::now();
    c.meshctl_ok(&[
        "service",
        "update",
        "--detach",
        "--env-add",
        "HELLO_TAG=wide2",
        "wide",
    ])?;
    let done = wait_rollout(&c, "wide", 30)?;
    let took = done - start;
    let needed = Duration::from_millis(10 * args.monitor_ms);
    println!("| B6c | seconds | needed | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| 30 tasks, parallelism 3, monitor {monitor} | {:.2} | {:.2} | {:.2} | ≤ 1.2 |",
        took.as_secs_f64(),
        needed.as_secs_f64(),
        took.as_secs_f64() / needed.as_secs_f64()
    );
    Ok(())
}
