//! B13, manager failover: several managers sharing the cluster state in etcd (one leader on a
//! 2 s lease, followers forwarding API requests to it). Two 3-node labs one after the other
//! (integration's `Cluster`: the release `mesh-manager`, `mesh-agent`s and `meshctl` as real
//! processes, nftables load balancer): an HA lab (`ClusterOptions::ha`: a manager and an etcd
//! member on each of node1..node3, agents knowing the three managers) and the default lab (one
//! manager on its embedded file store).
//!
//! - **B13**: kill -9 of the leader's `mesh-manager` → the end of the first write accepted
//!   through another manager (`meshctl network create` of a fresh name, polled every
//!   `--poll-ms` through a manager that was not leading). Each round kills whichever node leads
//!   then, and restarts it afterwards so the next round has three managers again. Median over
//!   `--rounds`; goal ≤ 3 s. References: Swarm ~10 s (Raft election after a lost leader),
//!   Kubernetes ~15 s (the controller-manager and scheduler leases).
//! - **B13b**: wall time of `meshctl service create --detach` of a 1-replica service, sent to
//!   the leader, over `--creates` creates (each once the previous task runs, then all removed):
//!   median and p90 with the etcd store ÷ the same with the file store. Goal ≤ 2 (median).
//! - **B13c**: failed requests through the routing mesh during each failover: a client on the
//!   underlay asks every node's published port (a thread per node, a new connection every
//!   `--pace-ms`) from 300 ms before the kill until 2 s after the write is accepted. Goal 0.
//!
//! The figures never fail the benchmark; only a failure to measure does. The labs are removed
//! whatever happens (their Drop, or their signal handler on SIGINT/SIGTERM).
//!
//! Usage (root): b13_failover [--rounds 3] [--creates 20] [--poll-ms 25] [--pace-ms 10]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{ms, quantile, quartiles, title};
use clap::Parser;
use integration::cluster::{Cluster, ClusterOptions, CONVERGE_TIMEOUT, HA_NODES};
use integration::http;
use integration::lab::{CLIENT, CLIENT_IP, NODE_IPS};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{ManagerStatus, NodeInfo};
use proto::model::TaskState;

#[derive(Parser)]
struct Args {
    /// Failovers (B13, B13c).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `service create` calls timed per store (B13b).
    #[arg(long, default_value_t = 20)]
    creates: usize,
    /// Milliseconds between write attempts after the kill.
    #[arg(long, default_value_t = 25)]
    poll_ms: u64,
    /// Milliseconds between one load thread's requests.
    #[arg(long, default_value_t = 10)]
    pace_ms: u64,
}

/// Past this, no write after a kill is a failure to measure, not a figure.
const WRITE_WAIT: Duration = Duration::from_secs(60);
/// The load goes on this long after the write is accepted, to catch late failures.
const AFTER_WRITE: Duration = Duration::from_secs(2);

/// One failover: which node led, when the write came back, what the load saw.
struct Round {
    leader: String,
    via: String,
    took: Duration,
    attempts: usize,
    /// The first refusal's message, to see how a write fails meanwhile.
    refusal: String,
    sent: usize,
    /// Each failed request: its start relative to the kill, the node asked and the error.
    failed: Vec<String>,
}

/// Waits until `node ls` (through the manager meshctl asks) shows one Leader and two
/// Reachable; returns the leader.
fn wait_managers(c: &Cluster) -> Result<String> {
    Ok(
        c.wait_for(CONVERGE_TIMEOUT, "one Leader and two Reachable", |c| {
            let nodes: Vec<NodeInfo> = c.json(&["node", "ls"]).ok()?;
            let with = |s: ManagerStatus| nodes.iter().filter(move |n| n.manager_status == Some(s));
            let leaders: Vec<&NodeInfo> = with(ManagerStatus::Leader).collect();
            (leaders.len() == 1 && with(ManagerStatus::Reachable).count() == 2)
                .then(|| leaders[0].node.hostname.clone())
        })?,
    )
}

/// Times `n` `service create --detach` calls of a 1-replica `sleep` service, each once the
/// previous task runs (so every call meets a settled cluster), then removes the services.
fn time_creates(c: &Cluster, n: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    let names: Vec<String> = (0..n).map(|i| format!("create{i}")).collect();
    for name in &names {
        let t0 = Instant::now();
        c.meshctl_ok(&[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            "1",
            "--detach",
            "--",
            "sleep",
            "infinity",
        ])?;
        times.push(t0.elapsed());
        c.wait_for(CONVERGE_TIMEOUT, &format!("{name} running"), |c| {
            let tasks = c.tasks(name).ok()?;
            (tasks.len() == 1 && tasks[0].state == TaskState::Running).then_some(())
        })?;
    }
    let mut rm = vec!["service", "rm"];
    rm.extend(names.iter().map(String::as_str));
    c.meshctl_ok(&rm)?;
    Ok(times)
}

/// `web`: 3 hello-servers on `app` published on port 80; returns once every node answers.
fn web(c: &Cluster) -> Result<()> {
    c.hello_service(
        "web",
        3,
        &[
            "--network",
            "app",
            "--publish",
            "80:8080",
            "--health-http",
            "8080/tag",
        ],
    )?;
    let client = &c.lab.node(CLIENT)?.ns;
    c.wait_for(CONVERGE_TIMEOUT, "every node answers on port 80", |_| {
        NODE_IPS
            .iter()
            .all(|n| (0..6).all(|_| http::get(client, n, 80, "/tag").is_ok()))
            .then_some(())
    })?;
    Ok(())
}

/// Kills the leading manager under load on every node's port 80, polls a write through another
/// manager until one is accepted, then restarts the killed one and waits for three managers.
fn failover(c: &mut Cluster, round: usize, poll: Duration, pace: Duration) -> Result<Round> {
    let leader = wait_managers(c)?;
    let via = HA_NODES
        .iter()
        .find(|n| **n != leader)
        .context("a manager that does not lead")?
        .to_string();
    c.use_manager(&via);
    let pid = c
        .manager_pid_on(&leader)
        .with_context(|| format!("no manager runs on {leader}"))?;

    let stop = AtomicBool::new(false);
    let sent = Mutex::new(0usize);
    let failed = Mutex::new(Vec::new());
    // Set just before the kill: the load threads give their failures' times relative to it.
    let killed_at = Mutex::new(None::<Instant>);
    let client = &c.lab.node(CLIENT)?.ns;
    let c_ref = &*c;
    let result = std::thread::scope(|scope| {
        for node in NODE_IPS {
            let (stop, sent, failed, killed_at) = (&stop, &sent, &failed, &killed_at);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = http::get(client, node, 80, "/tag");
                    *sent.lock().expect("sent") += 1;
                    if let Err(e) = result {
                        let offset = match *killed_at.lock().expect("killed_at") {
                            Some(k) if started >= k => format!("+{:.0} ms", ms(started - k)),
                            Some(k) => format!("-{:.0} ms", ms(k - started)),
                            None => "before the kill".to_string(),
                        };
                        failed
                            .lock()
                            .expect("failed")
                            .push(format!("{offset} via {node}: {e}"));
                    }
                    std::thread::sleep(pace);
                }
            });
        }
        // Stops the load however the measurement ends, so the scope never waits forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _guard = StopOnDrop(&stop);
        // Some load before the kill, so that it is measured in steady state.
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        *killed_at.lock().expect("killed_at") = Some(killed);
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
        let mut attempts = 0;
        let mut refusal = String::new();
        let took = loop {
            attempts += 1;
            let name = format!("failover{round}-{attempts}");
            let out = c_ref.meshctl(&["network", "create", &name])?;
            if out.status.success() {
                break killed.elapsed();
            }
            if refusal.is_empty() {
                refusal = String::from_utf8_lossy(&out.stderr).trim().to_string();
            }
            if killed.elapsed() > WRITE_WAIT {
                bail!(
                    "no write accepted through {via} {WRITE_WAIT:?} after the leader on {leader} \
                     was killed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(poll);
        };
        std::thread::sleep(AFTER_WRITE);
        Ok::<_, anyhow::Error>((took, attempts, refusal))
    });
    let (took, attempts, refusal) = result?;

    // The harness still holds the dead manager: forget it (it is gone), then start it again.
    c.kill_manager_on(&leader, Signal::SIGKILL);
    c.start_manager_on(&leader)?;
    wait_managers(c)?;
    Ok(Round {
        leader,
        via,
        took,
        attempts,
        refusal,
        sent: sent.into_inner().expect("sent"),
        failed: failed.into_inner().expect("failed"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let poll = Duration::from_millis(args.poll_ms);
    let pace = Duration::from_millis(args.pace_ms);

    title(
        "B13 manager failover",
        "3-node lab, three managers on a three-member etcd (2 s lease), nftables",
    );
    let (etcd_creates, rounds) = {
        let mut c = Cluster::up_opts(
            3,
            "nftables",
            ClusterOptions {
                ha: true,
                ..ClusterOptions::default()
            },
        )?;
        c.lab.add_host(CLIENT, CLIENT_IP)?;
        c.network_create("app", "10.0.42.0/24")?;
        // B13b measures the store, not the forwarding: creates go to the leader.
        let leader = wait_managers(&c)?;
        c.use_manager(&leader);
        let creates = time_creates(&c, args.creates)?;
        web(&c)?;
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let r = failover(&mut c, round, poll, pace)?;
            println!(
                "round {round}: leader on {} killed: a write through {} was accepted after \
                 {:.2} s ({} attempts; the first refused with: {}); routing mesh: {} of {} \
                 requests failed",
                r.leader,
                r.via,
                r.took.as_secs_f64(),
                r.attempts,
                if r.refusal.is_empty() {
                    "none refused"
                } else {
                    r.refusal.as_str()
                },
                r.failed.len(),
                r.sent
            );
            for f in &r.failed {
                println!("  {f}");
            }
            rounds.push(r);
        }
        (creates, rounds)
    };
    let file_creates = {
        let c = Cluster::up(3, "nftables")?;
        c.network_create("app", "10.0.42.0/24")?;
        time_creates(&c, args.creates)?
    };

    let secs: Vec<f64> = rounds.iter().map(|r| r.took.as_secs_f64()).collect();
    let each: Vec<String> = secs.iter().map(|s| format!("{s:.2}")).collect();
    let (_, median, _) = quartiles(&secs);
    println!("| B13 | median s | rounds s | goal | references |");
    println!("|---|---|---|---|---|");
    println!(
        "| kill -9 of the leader's manager → first write accepted through another | {median:.2} \
         | {} | ≤ 3 s | Swarm ~10 s, Kubernetes ~15 s |",
        each.join(", ")
    );

    let (em, e90) = (quantile(&etcd_creates, 0.5), quantile(&etcd_creates, 0.9));
    let (fm, f90) = (quantile(&file_creates, 0.5), quantile(&file_creates, 0.9));
    println!("| B13b `service create --detach` | median ms | p90 ms | goal |");
    println!("|---|---|---|---|");
    println!(
        "| etcd store (3 members), to the leader | {:.1} | {:.1} | |",
        ms(em),
        ms(e90)
    );
    println!(
        "| file store (reference) | {:.1} | {:.1} | |",
        ms(fm),
        ms(f90)
    );
    println!(
        "| etcd ÷ file | {:.2} | {:.2} | ≤ 2 (median) |",
        ms(em) / ms(fm),
        ms(e90) / ms(f90)
    );

    let failed: usize = rounds.iter().map(|r| r.failed.len()).sum();
    let sent: usize = rounds.iter().map(|r| r.sent).sum();
    println!("| B13c | failed requests | sent | goal |");
    println!("|---|---|---|---|");
    println!(
        "| routing mesh during {} failovers | {failed} | {sent} | 0 |",
        rounds.len()
    );
    Ok(())
}
