//! B10, control-plane scale: one real `mesh-manager` (release) and `--nodes` simulated agents in
//! this process (`bench::sim`: real join, TLS and protocol, no kernel). Each simulated agent
//! does with its assignments what a real one tells the manager: a task new to it is reported
//! Running (with a pid and a namespace file), a task gone from it is reported Shutdown, and
//! every assignment is answered with Applied; heartbeats as usual.
//!
//! On an overlay network (a /16) with a port published in ingress mode, so every task change
//! reaches every node's assignment, as in a real routing mesh:
//! - `service create --replicas R` (1000), `scale` to S (3000) and back to 10: the time until
//!   the simulated nodes hold exactly the replica count (every node has applied the change),
//!   and until `service ls` shows every replica running; the manager's CPU per agent message
//!   (status and Applied) while it converges;
//! - under a steady load of task-status messages (`--rate`, 1000/s in all, spread over the
//!   agents: each a running task re-reported with a new pid, a change the manager must keep),
//!   with S tasks and again with 10: the manager's CPU per status message, the p99 of
//!   `service ls` (one every 20 ms), and the bytes the manager writes per status message
//!   (`wchar`), which must not grow with the cluster;
//! - `--pending` (10,000) replicas that no node can take (`node.hostname==nope`): `service ls`
//!   p99 while they are pending, and how long `service rm` of that service takes.
//!
//! Goals (issue #14): converge to 3000 in ≤ 3 s; ≤ 100 µs of manager CPU per status message;
//! `service ls` p99 ≤ 50 ms under the load and with 10,000 pending; `service rm` ≤ 1 s; bytes
//! per change independent of the cluster's size. A figure never fails the benchmark; only a
//! failure to measure does.
//!
//! Usage: b10_scale [--nodes 100] [--replicas 1000] [--scale-to 3000] [--rate 1000]
//! [--load-secs 5] [--pending 10000]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::sim::{self, AgentReader, AgentWriter, Manager};
use bench::{ms, quantile, us};
use clap::Parser;
use proto::agent::{AgentMsg, Assignment, ManagerMsg, TaskStatus};
use proto::api::{Request, Response, ServiceSpec};
use proto::model::TaskState;
use proto::wire::{read_frame, write_frame};

#[derive(Parser)]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Replicas of the first service create.
    #[arg(long, default_value_t = 1000)]
    replicas: u64,
    /// The scale-up target, before scaling back to 10.
    #[arg(long, default_value_t = 3000)]
    scale_to: u64,
    /// Task-status messages per second, all agents together, in the load phases.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 5)]
    load_secs: u64,
    /// Unplaceable replicas of the pending phase.
    #[arg(long, default_value_t = 10000)]
    pending: u64,
}

const SERVICE: &str = "web";
/// A status rate low enough that each one is a batch of its own.
const SINGLE_RATE: u64 = 5;
/// Converging must end within this, or the benchmark fails.
const CONVERGE_LIMIT: Duration = Duration::from_secs(120);

/// What the simulated agents share with the benchmark.
#[derive(Default)]
struct Shared {
    /// Tasks each agent holds now (from its latest assignment).
    held: Vec<AtomicUsize>,
    /// Agents that hold a task: they share the load's rate.
    holders: AtomicUsize,
    /// Status messages the agents have sent, and Applied messages.
    statuses: AtomicU64,
    applied: AtomicU64,
    /// Task-status re-reports per second, all agents together (0: none).
    rate: AtomicU64,
    /// Set when an agent's session ends with an error.
    failed: AtomicBool,
}

impl Shared {
    fn held(&self) -> usize {
        self.held.iter().map(|h| h.load(Ordering::Relaxed)).sum()
    }
    fn messages(&self) -> u64 {
        self.statuses.load(Ordering::Relaxed) + self.applied.load(Ordering::Relaxed)
    }
}

fn running(task_id: &str, pid: u32) -> AgentMsg {
    AgentMsg::TaskStatus(TaskStatus {
        task_id: task_id.to_string(),
        state: TaskState::Running,
        error: None,
        pid: Some(pid),
        netns: Some(format!("/run/meshnet/netns/{task_id}")),
        health: None,
        health_log: None,
    })
}

/// How often an agent looks whether its share of the load is due.
const LOAD_TICK: Duration = Duration::from_millis(10);

/// One simulated agent's session: answers assignments as a real agent does and, while a load
/// is on, re-reports its running tasks in turn, its share of the rate.
async fn session(
    i: usize,
    mut rd: AgentReader,
    mut wr: AgentWriter,
    first: Arc<Assignment>,
    shared: Arc<Shared>,
) -> Result<()> {
    let mut held: Vec<String> = Vec::new();
    let mut pid = 1000u32;
    let mut buf = Vec::new();
    let mut beat = tokio::time::interval(Duration::from_secs(proto::agent::HEARTBEAT_SECS));
    // Agents start their load ticks at different moments, so the rate is even.
    let offset = LOAD_TICK.mul_f64((i as f64 * 0.618).fract());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, LOAD_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = (i as f64 * 0.618).fract();
    let mut next = Some(first);
    let mut turn = 0usize;
    loop {
        if let Some(a) = next.take() {
            let now: HashSet<&str> = a.tasks.iter().map(|t| t.id.as_str()).collect();
            let before: HashSet<String> = held.iter().cloned().collect();
            for gone in held.iter().filter(|t| !now.contains(t.as_str())) {
                let msg = AgentMsg::TaskStatus(TaskStatus {
                    task_id: gone.clone(),
                    state: TaskState::Shutdown,
                    error: None,
                    pid: None,
                    netns: None,
                    health: None,
                    health_log: None,
                });
                write_frame(&mut wr, &msg).await?;
                shared.statuses.fetch_add(1, Ordering::Relaxed);
            }
            for new in a.tasks.iter().filter(|t| !before.contains(&t.id)) {
                pid += 1;
                write_frame(&mut wr, &running(&new.id, pid)).await?;
                shared.statuses.fetch_add(1, Ordering::Relaxed);
            }
            let had = !held.is_empty();
            held = a.tasks.iter().map(|t| t.id.clone()).collect();
            match (had, held.is_empty()) {
                (false, false) => shared.holders.fetch_add(1, Ordering::Relaxed),
                (true, true) => shared.holders.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            write_frame(
                &mut wr,
                &AgentMsg::Applied {
                    revision: a.revision,
                },
            )
            .await?;
            shared.applied.fetch_add(1, Ordering::Relaxed);
            shared.held[i].store(held.len(), Ordering::Relaxed);
        }
        tokio::select! {
            got = read_frame(&mut rd, &mut buf, proto::MAX_FRAME_BYTES) => {
                if !got? {
                    bail!("the manager closed the session");
                }
                if let ManagerMsg::Assign(a) = proto::decode_frame::<ManagerMsg>(&buf)? {
                    next = Some(a);
                }
                buf.clear();
            }
            _ = beat.tick() => write_frame(&mut wr, &AgentMsg::Heartbeat).await?,
            _ = tick.tick() => {
                let rate = shared.rate.load(Ordering::Relaxed);
                if rate == 0 || held.is_empty() {
                    // The next load starts each agent at a different point of its period, so
                    // even a low rate is spread over the agents from the start.
                    due = (i as f64 * 0.618).fract();
                    continue;
                }
                let holders = shared.holders.load(Ordering::Relaxed).max(1);
                due += rate as f64 / holders as f64 * LOAD_TICK.as_secs_f64();
                while due >= 1.0 {
                    due -= 1.0;
                    turn = (turn + 1) % held.len();
                    pid += 1;
                    write_frame(&mut wr, &running(&held[turn], pid)).await?;
                    shared.statuses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn service_spec(name: &str, replicas: u64, extra: serde_json::Value) -> Result<ServiceSpec> {
    let mut spec = serde_json::json!({
        "name": name,
        "replicas": replicas,
        "networks": ["b10"],
        "command": ["/usr/local/bin/hello-server", "--port", "8080"],
        "ports": [{"protocol": "tcp", "published": 80, "target": 8080, "mode": "ingress"}],
    });
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    Ok(serde_json::from_value(spec)?)
}

/// `service ls`: how many tasks of `name` run, and the call's latency.
fn running_of(m: &Manager, name: &str) -> Result<(usize, Duration)> {
    let t0 = Instant::now();
    let services = match m.call(&Request::ServiceLs)? {
        Response::Services { services } => services,
        other => bail!("service ls: unexpected answer {other:?}"),
    };
    let took = t0.elapsed();
    let n = services
        .iter()
        .find(|s| s.spec.name == name)
        .map_or(0, |s| s.running);
    Ok((n, took))
}

struct Converged {
    applied: Duration,
    running: Duration,
    cpu_per_msg: Duration,
    messages: u64,
}

/// Sends `req` and waits until the agents hold `target` tasks and `service ls` shows them all
/// running; then until the manager is idle, for its CPU.
fn converge(m: &Manager, shared: &Shared, req: &Request, target: usize) -> Result<Converged> {
    let cpu0 = m.cpu()?;
    let msgs0 = shared.messages();
    let t0 = Instant::now();
    m.call(req)?;
    while shared.held() != target {
        if t0.elapsed() > CONVERGE_LIMIT || shared.failed.load(Ordering::Relaxed) {
            bail!(
                "the agents hold {} tasks, not {target}, after {:?}:\n{}",
                shared.held(),
                t0.elapsed(),
                m.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let applied = t0.elapsed();
    while running_of(m, SERVICE)?.0 != target {
        if t0.elapsed() > CONVERGE_LIMIT {
            bail!(
                "service ls does not show {target} running:\n{}",
                m.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let running = t0.elapsed();
    let cpu1 = m.settle()?;
    let messages = shared.messages() - msgs0;
    Ok(Converged {
        applied,
        running,
        cpu_per_msg: ((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1)) / messages.max(1) as u32,
        messages,
    })
}

struct Load {
    statuses: u64,
    cpu_per_status: Duration,
    bytes_per_status: f64,
    ls_p50: Duration,
    ls_p99: Duration,
    ls_calls: usize,
}

/// `service ls` every 20 ms for `secs`, with the agents re-reporting `rate` statuses a second.
fn under_load(m: &Manager, shared: &Shared, secs: u64, rate: u64) -> Result<Load> {
    let cpu0 = m.cpu()?;
    let bytes0 = m.written()?;
    let statuses0 = shared.statuses.load(Ordering::Relaxed);
    shared.rate.store(rate, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut lat = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        lat.push(running_of(m, SERVICE)?.1);
        std::thread::sleep(Duration::from_millis(20));
    }
    shared.rate.store(0, Ordering::Relaxed);
    let statuses = shared.statuses.load(Ordering::Relaxed) - statuses0;
    // What the manager still has queued is part of the load's cost.
    let cpu1 = m.settle()?;
    let bytes = m.written()? - bytes0;
    Ok(Load {
        statuses,
        cpu_per_status: ((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1)) / statuses.max(1) as u32,
        bytes_per_status: bytes as f64 / statuses.max(1) as f64,
        ls_p50: quantile(&lat, 0.5),
        ls_p99: quantile(&lat, 0.99),
        ls_calls: lat.len(),
    })
}

fn print_converged(what: &str, c: &Converged, goal: &str) {
    println!(
        "| {what} | applied on every node {:.2} s, all running {:.2} s; {} agent messages, \
         manager CPU {:.0} µs each | {goal} |",
        c.applied.as_secs_f64(),
        c.running.as_secs_f64(),
        c.messages,
        us(c.cpu_per_msg)
    );
}

fn print_load(what: &str, l: &Load, secs: u64) {
    println!(
        "| {what} | {} status messages in {secs} s ({:.0}/s); manager CPU {:.0} µs per message; \
         {:.0} bytes written per message; service ls p50 {:.1} ms, p99 {:.1} ms ({} calls) | \
         ≤ 100 µs, bytes independent of size, p99 ≤ 50 ms |",
        l.statuses,
        l.statuses as f64 / secs as f64,
        us(l.cpu_per_status),
        l.bytes_per_status,
        ms(l.ls_p50),
        ms(l.ls_p99),
        l.ls_calls
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let m = Manager::start("b10", &[])?;
    let token = m.worker_token()?;
    let rt = tokio::runtime::Runtime::new()?;
    let shared = Arc::new(Shared {
        held: (0..args.nodes).map(|_| AtomicUsize::new(0)).collect(),
        ..Default::default()
    });
    let t0 = Instant::now();
    rt.block_on(async {
        let joins: Vec<_> = (0..args.nodes)
            .map(|i| {
                let (to, token) = (m.addr, token);
                tokio::spawn(async move {
                    let hostname = format!("b10-node{i:03}");
                    let stream = sim::join(i, to, &token, &hostname).await?;
                    sim::hello(stream, hostname, sim::agent_addr(i)).await
                })
            })
            .collect();
        for (i, j) in joins.into_iter().enumerate() {
            let (rd, wr, first) = j.await?.with_context(|| format!("agent {i}"))?;
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = session(i, rd, wr, first, shared.clone()).await {
                    eprintln!("agent {i}: {e:#}");
                    shared.failed.store(true, Ordering::Relaxed);
                }
            });
        }
        anyhow::Ok(())
    })?;
    println!(
        "B10: {} simulated nodes joined in {:.2} s",
        args.nodes,
        t0.elapsed().as_secs_f64()
    );
    m.call(&Request::NetworkCreate {
        name: "b10".into(),
        driver: "overlay".into(),
        subnet: Some("10.10.0.0/16".into()),
        options: Default::default(),
    })?;

    bench::title(
        "B10 control-plane scale",
        &format!(
            "real mesh-manager (release, file store), {} simulated nodes in one process, \
             service on an overlay with an ingress port",
            args.nodes
        ),
    );
    println!("| step | measured | goal |");
    println!("|---|---|---|");
    let spec = service_spec(SERVICE, args.replicas, serde_json::json!({}))?;
    let c = converge(
        &m,
        &shared,
        &Request::ServiceCreate { spec },
        args.replicas as usize,
    )?;
    print_converged(
        &format!("service create --replicas {}", args.replicas),
        &c,
        "(info)",
    );
    let scale = |n: u64| Request::ServiceScale {
        service: SERVICE.into(),
        replicas: n,
    };
    let c = converge(&m, &shared, &scale(args.scale_to), args.scale_to as usize)?;
    print_converged(
        &format!("scale {} → {}", args.replicas, args.scale_to),
        &c,
        "≤ 3 s",
    );
    let big = under_load(&m, &shared, args.load_secs, args.rate)?;
    print_load(
        &format!("{} tasks, status load {}/s", args.scale_to, args.rate),
        &big,
        args.load_secs,
    );
    // One change at a time: what a single status costs on disk, batching aside.
    let big_one = under_load(&m, &shared, args.load_secs, SINGLE_RATE)?;
    let c = converge(&m, &shared, &scale(10), 10)?;
    print_converged(&format!("scale {} → 10", args.scale_to), &c, "(info)");
    let small = under_load(&m, &shared, args.load_secs, args.rate)?;
    print_load(
        &format!("10 tasks, status load {}/s", args.rate),
        &small,
        args.load_secs,
    );
    let small_one = under_load(&m, &shared, args.load_secs, SINGLE_RATE)?;
    if big_one.statuses == 0 || small_one.statuses == 0 {
        bail!("no status was sent at {SINGLE_RATE}/s");
    }
    println!(
        "| bytes written per status message at {SINGLE_RATE}/s (one per batch), {} tasks ÷ 10 \
         tasks | {:.2} ({:.0} bytes over {} messages vs {:.0} over {}; log lines included) | ≈ 1 |",
        args.scale_to,
        big_one.bytes_per_status / small_one.bytes_per_status,
        big_one.bytes_per_status,
        big_one.statuses,
        small_one.bytes_per_status,
        small_one.statuses
    );

    let spec = service_spec(
        "nowhere",
        args.pending,
        serde_json::json!({"constraints": ["node.hostname==nope"], "ports": []}),
    )?;
    let t = Instant::now();
    m.call(&Request::ServiceCreate { spec })?;
    let created = t.elapsed();
    let idle = under_load(&m, &shared, args.load_secs, 0)?;
    println!(
        "| {} unplaceable replicas pending | create answered in {:.0} ms; service ls p50 {:.1} ms, \
         p99 {:.1} ms ({} calls) | p99 ≤ 50 ms |",
        args.pending,
        ms(created),
        ms(idle.ls_p50),
        ms(idle.ls_p99),
        idle.ls_calls
    );
    let t = Instant::now();
    m.call(&Request::ServiceRm {
        service: "nowhere".into(),
    })?;
    let rm = t.elapsed();
    println!(
        "| service rm of the {} pending replicas | {:.0} ms | ≤ 1 s |",
        args.pending,
        ms(rm)
    );
    if shared.failed.load(Ordering::Relaxed) {
        bail!("an agent session failed (above)");
    }
    Ok(())
}
