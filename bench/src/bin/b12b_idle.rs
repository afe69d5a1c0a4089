//! B12b, the idle agent's footprint (issue 10): RSS and CPU of each `mesh-agent` while nothing
//! changes, with 100 services and 300 tasks in the cluster; goals ≤ 30 MiB and ≤ 0.5 % of one
//! core per agent. The manager's figures are reported beside them.
//!
//! A 3-node lab (integration's `Cluster`: nodes as network namespaces on an underlay bridge, the
//! release `mesh-manager` on node1 and a `mesh-agent` on every node as real processes, driven
//! with `meshctl`), nftables load balancer, the agents at their default reconcile interval
//! (10 s; the lab's tests use 2 s). Two phases with the same processes, each measured over one
//! idle window after every node has applied its latest assignment and a settling time:
//! - empty: no service;
//! - loaded: `--services` services of `--replicas` replicas of `sleep infinity` (100 × 3 spread
//!   over 3 nodes: 100 tasks per agent). Services 0, 4, 8… publish a port and join the user
//!   overlay `bench`, 1, 5, 9… publish a port, 2, 6, 10… join `bench`, the rest neither: half
//!   the services have routing-mesh entries on every node, half an endpoint on the overlay.
//!
//! Measured per process over the window, from /proc/<pid>: CPU = Δ(utime + stime) of
//! /proc/<pid>/stat ÷ wall time, in % of one core (the process's own threads, not its task
//! processes); the reaped helpers' CPU (Δ(cutime + cstime): the `nft`, `ip` and `conntrack`
//! runs the agent waited for) beside it; VmRSS (highest of one sample per second), VmHWM (peak
//! since start, creation included) and RssAnon of /proc/<pid>/status at the end. The window
//! should be a multiple of the reconcile interval, so that each holds as many timer passes.
//! Printed: each process in each phase, then the highest agent's figures against the goals
//! (measured ÷ goal) and loaded ÷ empty for RSS and CPU.
//! The figures never fail the benchmark; only a failure to measure does. The lab is removed
//! whatever happens (its Drop, or its signal handler on SIGINT/SIGTERM).
//!
//! Usage (root): b12b_idle [--services 100] [--replicas 3] [--window 30] [--settle 15]
//!   [--reconcile-interval 10] [--timeout 600]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::title;
use clap::Parser;
use integration::cluster::{Cluster, ClusterOptions};
use proto::api::{NodeInfo, ServiceInfo};

#[derive(Parser)]
struct Args {
    /// Services of the loaded phase.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Replicas per service.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Seconds of each idle window (best a multiple of --reconcile-interval).
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// Seconds between the last assignment applied on every node and the window's start.
    #[arg(long, default_value_t = 15)]
    settle: u64,
    /// The agents' --reconcile-interval, in seconds (the agent's default).
    #[arg(long, default_value_t = 10)]
    reconcile_interval: u64,
    /// Seconds allowed for every task to run and every node to apply its assignment.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

const NODES: usize = 3;
const LB: &str = "nftables";
const GOAL_RSS_MIB: f64 = 30.0;
const GOAL_CPU_PCT: f64 = 0.5;
/// The user overlay half the services join.
const NETWORK: &str = "bench";
const SUBNET: &str = "10.0.16.0/22";
/// Published ports are FIRST_PORT + the service's index.
const FIRST_PORT: usize = 30000;

/// One reading of /proc/<pid>/stat and /proc/<pid>/status.
struct Reading {
    /// utime + stime, in clock ticks.
    cpu: u64,
    /// cutime + cstime: children waited for, in clock ticks.
    children: u64,
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    threads: u64,
}

fn read(pid: u32) -> Result<Reading> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses: state is field 3,
    // utime 14, stime 15, cutime 16, cstime 17.
    let rest = &stat[stat.rfind(')').context("/proc/<pid>/stat has no command")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        f.get(i)
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))?
            .parse()
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))
    };
    let (cpu, children) = (tick(11)? + tick(12)?, tick(13)? + tick(14)?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("/proc/{pid}/status has no {key}"))
    };
    Ok(Reading {
        cpu,
        children,
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
        anon_kib: field("RssAnon")?,
        threads: field("Threads")?,
    })
}

/// One process over one idle window.
struct Idle {
    /// Highest VmRSS sampled, KiB.
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    threads: u64,
    /// % of one core.
    cpu: f64,
    helpers: f64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples every process once a second for `window` and returns its figures, in order.
fn measure(procs: &[(String, u32)], window: Duration) -> Result<Vec<Idle>> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    let read_all = || -> Result<Vec<Reading>> {
        procs
            .iter()
            .map(|(name, pid)| read(*pid).with_context(|| format!("{name} (pid {pid})")))
            .collect()
    };
    let first = read_all()?;
    let t0 = Instant::now();
    let mut rss: Vec<u64> = first.iter().map(|r| r.rss_kib).collect();
    loop {
        let left = window.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_secs(1)));
        for (max, r) in rss.iter_mut().zip(read_all()?) {
            *max = (*max).max(r.rss_kib);
        }
    }
    let last = read_all()?;
    let wall = t0.elapsed().as_secs_f64();
    let pct = |ticks: u64| ticks as f64 / hz / wall * 100.0;
    Ok(first
        .iter()
        .zip(last)
        .zip(rss)
        .map(|((a, b), rss_kib)| Idle {
            rss_kib: rss_kib.max(b.rss_kib),
            hwm_kib: b.hwm_kib,
            anon_kib: b.anon_kib,
            threads: b.threads,
            cpu: pct(b.cpu - a.cpu),
            helpers: pct(b.children - a.children),
        })
        .collect())
}

/// Waits until every node has applied its latest assignment, then `settle`.
fn wait_applied(c: &Cluster, timeout: Duration, settle: Duration) -> Result<Vec<NodeInfo>> {
    let nodes = c.wait_for(timeout, "every node applied its assignment", |c| {
        let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).ok()?;
        (nodes.len() == NODES
            && nodes
                .iter()
                .all(|n| n.revision > 0 && n.applied_revision == n.revision))
        .then_some(nodes)
    })?;
    std::thread::sleep(settle);
    Ok(nodes)
}

/// The loaded phase's services, created one by one; returns once every task runs.
fn create_services(c: &Cluster, args: &Args, timeout: Duration) -> Result<()> {
    c.network_create(NETWORK, SUBNET)?;
    let t0 = Instant::now();
    let replicas = args.replicas.to_string();
    for i in 0..args.services {
        let name = format!("s{i:03}");
        let publish = format!("{}:8080", FIRST_PORT + i);
        let mut cmd = vec![
            "service",
            "create",
            "--name",
            &name,
            "--replicas",
            &replicas,
        ];
        if i % 4 < 2 {
            cmd.extend(["--publish", &publish]);
        }
        if i % 2 == 0 {
            cmd.extend(["--network", NETWORK]);
        }
        cmd.extend(["--detach", "--", "sleep", "infinity"]);
        c.meshctl_ok(&cmd)?;
    }
    println!(
        "created {} services in {:.1} s",
        args.services,
        t0.elapsed().as_secs_f64()
    );
    let want = args.services * args.replicas;
    c.wait_for(timeout, &format!("{want} running tasks"), |c| {
        let services: Vec<ServiceInfo> = c.json(&["service", "ls"]).ok()?;
        let running: usize = services.iter().map(|s| s.running).sum();
        (services.len() == args.services && running == want).then_some(())
    })?;
    println!(
        "{want} tasks running {:.1} s after the first create",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ratio(loaded: f64, empty: f64) -> String {
    if empty > 0.0 {
        format!("{:.2}", loaded / empty)
    } else {
        "n/a (0 when empty)".into()
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.window == 0 || args.replicas == 0 {
        bail!("--window and --replicas must be at least 1");
    }
    let timeout = Duration::from_secs(args.timeout);
    let settle = Duration::from_secs(args.settle);
    let window = Duration::from_secs(args.window);
    let c = Cluster::up_opts(
        NODES,
        LB,
        ClusterOptions {
            reconcile_interval: args.reconcile_interval,
            ..ClusterOptions::default()
        },
    )?;
    let mut procs: Vec<(String, u32)> = Vec::new();
    for n in c.lab.nodes() {
        let pid = c.agent_pid(&n.name).context("the lab started no agent")?;
        procs.push((format!("agent {}", n.name), pid));
    }
    procs.push((
        "manager".into(),
        c.manager_pid().context("the lab started no manager")?,
    ));

    wait_applied(&c, timeout, settle)?;
    println!("empty cluster: measuring {} s", args.window);
    let empty = measure(&procs, window)?;

    create_services(&c, &args, timeout)?;
    let nodes = wait_applied(&c, timeout, settle)?;
    // Each agent's tasks; the manager holds them all.
    let mut tasks: BTreeMap<String, usize> = nodes
        .iter()
        .map(|n| (format!("agent {}", n.node.hostname), n.tasks))
        .collect();
    tasks.insert("manager".into(), nodes.iter().map(|n| n.tasks).sum());
    println!("loaded cluster: measuring {} s", args.window);
    let loaded = measure(&procs, window)?;

    title(
        "B12b idle agent",
        &format!(
            "{NODES} nodes, {} services × {} replicas of `sleep infinity` (half published, half \
             on an overlay), {LB} LB, reconcile every {} s, {} s windows after {} s settling",
            args.services, args.replicas, args.reconcile_interval, args.window, args.settle
        ),
    );
    println!(
        "| process | cluster | tasks | VmRSS MiB | VmHWM MiB | RssAnon MiB | threads | CPU % of a core | helpers' CPU % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (phase, figures) in [("empty", &empty), ("loaded", &loaded)] {
        for ((name, _), f) in procs.iter().zip(figures.iter()) {
            let n = match phase {
                "loaded" => tasks.get(name).copied().unwrap_or_default(),
                _ => 0,
            };
            println!(
                "| {name} | {phase} | {n} | {:.1} | {:.1} | {:.1} | {} | {:.3} | {:.3} |",
                mib(f.rss_kib),
                mib(f.hwm_kib),
                mib(f.anon_kib),
                f.threads,
                f.cpu,
                f.helpers
            );
        }
    }

    let agents = procs.len() - 1;
    let max = |v: &[Idle], f: fn(&Idle) -> f64| v[..agents].iter().map(f).fold(0.0, f64::max);
    let rss = |i: &Idle| mib(i.rss_kib);
    let hwm = |i: &Idle| mib(i.hwm_kib);
    let cpu = |i: &Idle| i.cpu;
    let with_helpers = |i: &Idle| i.cpu + i.helpers;
    println!();
    println!("| agent, highest of {agents} | loaded | goal | ÷ goal | empty | loaded ÷ empty |");
    println!("|---|---|---|---|---|---|");
    for (name, f, unit, goal) in [
        ("VmRSS", rss as fn(&Idle) -> f64, "MiB", Some(GOAL_RSS_MIB)),
        ("VmHWM", hwm, "MiB", None),
        ("CPU, % of a core", cpu, "%", Some(GOAL_CPU_PCT)),
        ("CPU with reaped helpers", with_helpers, "%", None),
    ] {
        let (l, e) = (max(&loaded, f), max(&empty, f));
        let (goal, of_goal) = match goal {
            Some(g) => (format!("≤ {g} {unit}"), format!("{:.2}", l / g)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {name} | {l:.3} {unit} | {goal} | {of_goal} | {e:.3} {unit} | {} |",
            ratio(l, e)
        );
    }
    Ok(())
}
