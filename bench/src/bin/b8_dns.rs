//! B8, the embedded DNS resolver (issue 8): queries/s and p99 latency answering cluster names
//! from inside a task, as a ratio to dnsmasq serving the same names in the same namespace, in
//! one run. B8b: name freshness, a killed task gone from `tasks.<service>` on every node.
//!
//! A 3-node lab (real manager and agents, `--lb nftables`), an overlay `internal`, 10 services
//! of 2 hello-server tasks each on it, and one probe task per node (`sleep`, pinned by
//! constraint). In node1's probe namespace:
//! - meshnet: mesh-agent's resolver at 127.0.0.11:53;
//! - dnsmasq: `dnsmasq --host-record` with the same names and addresses (each service's VIP
//!   and `tasks.<service>` with every task address) at 127.0.0.12:53, no upstream.
//!
//! The query file holds every name (A), looked up round and round. dnsperf is pinned to CPU0;
//! node1's whole mesh-agent (every thread) and dnsmasq to CPU1. Throughput: dnsperf with 8
//! clients and 200 outstanding queries for `--seconds`; latency: dnsperf at a fixed `--qps`
//! with per-query timing (`-v`), p99 over every answer. Rounds alternate the two servers.
//! Goals: qps ≥ 1.0×, p99 ≤ 1.0× dnsmasq; ≥ 17k qps on one core (CoreDNS's published figure).
//!
//! B8b: from each probe, a Rust loop asks `tasks.svc00` every 10 ms; the bench kills one task
//! of svc00 with SIGKILL and reports the time until no probe's answer holds its address any
//! more (the agent sees the exit, the manager recomputes and pushes, every agent swaps its
//! records). Goal ≤ 1 s.
//!
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root): b8_dns [--rounds 3] [--seconds 3] [--qps 5000] [--kills 3]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{header, quantile, row};
use clap::Parser;
use integration::cluster::Cluster;
use netns::Netns;
use proto::api::{ServiceInfo, TaskInfo};

#[derive(Parser)]
struct Args {
    /// Interleaved rounds of each measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// Offered queries per second of the latency runs.
    #[arg(long, default_value_t = 5000)]
    qps: u32,
    /// Tasks killed for B8b, one at a time.
    #[arg(long, default_value_t = 3)]
    kills: usize,
}

const SERVICES: usize = 10;
const DNSMASQ: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
const MESH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

fn meshctl(c: &Cluster, args: &[&str]) -> Result<String> {
    c.meshctl_ok(args)
        .with_context(|| format!("meshctl {}", args.join(" ")))
}

/// Every service's name → its VIP, and tasks.<name> → its task addresses on `internal`.
fn records(c: &Cluster) -> Result<Vec<(String, Vec<Ipv4Addr>)>> {
    let mut out = Vec::new();
    for i in 0..SERVICES {
        let name = format!("svc{i:02}");
        let info: ServiceInfo = c.json(&["service", "inspect", &name])?;
        let vip = info
            .virtual_ips
            .first()
            .with_context(|| format!("{name} has no VIP"))?
            .addr
            .addr();
        let tasks = c.wait_running(&name, 2)?;
        out.push((name.clone(), vec![vip]));
        out.push((format!("tasks.{name}"), tasks.iter().map(addr).collect()));
    }
    Ok(out)
}

fn addr(t: &TaskInfo) -> Ipv4Addr {
    t.endpoints[0].addr.addr()
}

/// Runs dnsperf in the probe's namespace, pinned to CPU0; returns its standard output.
fn dnsperf(ns: &Path, server: Ipv4Addr, file: &Path, extra: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["taskset", "-c", "0", "dnsperf", "-s"])
        .arg(server.to_string())
        .arg("-d")
        .arg(file)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .context("run dnsperf (Debian package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn throughput(ns: &Path, server: Ipv4Addr, file: &Path, seconds: u32) -> Result<f64> {
    let text = dnsperf(
        ns,
        server,
        file,
        &["-l", &seconds.to_string(), "-c", "8", "-q", "200"],
    )?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no qps in dnsperf's output: {text}"))
}

fn p99(ns: &Path, server: Ipv4Addr, file: &Path, qps: u32) -> Result<Duration> {
    let text = dnsperf(ns, server, file, &["-l", "2", "-Q", &qps.to_string(), "-v"])?;
    let lat: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.strip_prefix("> NOERROR "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    if lat.len() < 100 {
        bail!("only {} answered queries from {server}", lat.len());
    }
    Ok(quantile(&lat, 0.99))
}

/// A minimal A query for `name` (the only kind this benchmark asks).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A records of an answer to [`query`] (names compressed to the question, as every server
/// here answers).
fn a_records(reply: &[u8], question_len: usize) -> Vec<Ipv4Addr> {
    let count = reply
        .get(6..8)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let mut at = question_len;
    let mut out = Vec::new();
    for _ in 0..count {
        // Name: a pointer (2 bytes) or labels ending in 0.
        while let Some(&b) = reply.get(at) {
            if b & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + b as usize;
            if b == 0 {
                break;
            }
        }
        let Some(rr) = reply.get(at..at + 10) else {
            break;
        };
        let (kind, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        if let (1, 4, Some(ip)) = (kind, len, reply.get(at + 10..at + 14)) {
            out.push(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]));
        }
        at += 10 + len;
    }
    out
}

/// Asks the resolver in `ns` for `name` until `done` holds for the answer; returns when.
fn ask_until(
    ns: &Netns,
    name: &str,
    deadline: Instant,
    done: impl Fn(&[Ipv4Addr]) -> bool + Send + 'static,
) -> Result<Instant> {
    let name = name.to_string();
    ns.run(move || -> Result<Instant> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let server = SocketAddr::from((MESH, 53));
        let mut buf = [0u8; 1500];
        for id in 0u16.. {
            if Instant::now() > deadline {
                bail!("{name}: no change before the deadline");
            }
            let q = query(id, &name);
            sock.send_to(&q, server)?;
            if let Ok(n) = sock.recv(&mut buf) {
                if buf[..2] == id.to_be_bytes() && done(&a_records(&buf[..n], q.len())) {
                    return Ok(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        unreachable!("the loop ends by its deadline")
    })?
}

fn main() -> Result<()> {
    let args = Args::parse();
    let c = Cluster::up(3, "nftables")?;
    c.network_create("internal", "172.32.0.0/24")?;
    for i in 0..SERVICES {
        c.hello_service(&format!("svc{i:02}"), 2, &["--network", "internal"])?;
    }
    let mut probes = Vec::new();
    for node in ["node1", "node2", "node3"] {
        let name = format!("probe-{node}");
        let constraint = format!("node.hostname=={node}");
        meshctl(
            &c,
            &[
                "service",
                "create",
                "--name",
                &name,
                "--network",
                "internal",
                "--constraint",
                &constraint,
                "--detach",
                "--",
                "sleep",
                "1000000",
            ],
        )?;
        let task = c.wait_running(&name, 1)?.remove(0);
        let ns = task.netns.clone().context("probe has no namespace")?;
        probes.push(Netns::open(Path::new(&ns))?);
    }
    let records = records(&c)?;
    let probe = probes[0].path().to_path_buf();

    // dnsmasq beside the agent's resolver, with the same records, on the same CPU.
    let mut dnsmasq = Command::new("nsenter");
    dnsmasq
        .arg(format!("--net={}", probe.display()))
        .args([
            "taskset",
            "-c",
            "1",
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
        ])
        .args([
            "--no-hosts",
            "--port=53",
            "--bind-interfaces",
            "--cache-size=10000",
        ])
        .arg(format!("--listen-address={DNSMASQ}"));
    for (name, ips) in &records {
        for ip in ips {
            dnsmasq.arg(format!("--host-record={name},{ip}"));
        }
    }
    let mut dnsmasq = dnsmasq
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start dnsmasq (Debian package dnsmasq-base)")?;
    let agent = c
        .agent_pid("node1")
        .context("node1's agent is not running")?;
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &agent.to_string()])
        .output()?;
    if !pinned.status.success() {
        bail!(
            "pin mesh-agent: {}",
            String::from_utf8_lossy(&pinned.stderr)
        );
    }
    let file = c.lab.root().join("b8-queries.txt");
    let mut text = String::new();
    for (name, _) in &records {
        let _ = writeln!(text, "{name} A");
    }
    std::fs::write(&file, text)?;
    // Both answer before anything is measured.
    for server in [MESH, DNSMASQ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while p99(&probe, server, &file, 500).is_err() {
            if Instant::now() > deadline {
                bail!("{server} does not answer in node1's probe");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let (mut qps_mesh, mut qps_ratio, mut p99_mesh, mut p99_ratio) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..args.rounds {
        let m = throughput(&probe, MESH, &file, args.seconds)?;
        let d = throughput(&probe, DNSMASQ, &file, args.seconds)?;
        qps_mesh.push(m);
        qps_ratio.push(m / d);
        let m = p99(&probe, MESH, &file, args.qps)?;
        let d = p99(&probe, DNSMASQ, &file, args.qps)?;
        p99_mesh.push(m.as_secs_f64() * 1e6);
        p99_ratio.push(m.as_secs_f64() / d.as_secs_f64());
    }
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();

    // B8b: a killed task leaves every node's answers.
    let mut fresh = Vec::new();
    for _ in 0..args.kills {
        let tasks = c.wait_running("svc00", 2)?;
        let victim = tasks[0].clone();
        let gone = addr(&victim);
        let start = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim.pid.context("no pid")? as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = start + Duration::from_secs(20);
        let mut last = start;
        for ns in &probes {
            let seen = ask_until(ns, "tasks.svc00", deadline, move |a| !a.contains(&gone))?;
            last = last.max(seen);
        }
        fresh.push(last.duration_since(start).as_secs_f64() * 1e3);
        // The replacement runs before the next kill.
        c.wait_for(Duration::from_secs(30), "svc00 replaced", |c| {
            let now: BTreeSet<String> = c
                .wait_running("svc00", 2)
                .ok()?
                .iter()
                .map(|t| t.id.clone())
                .collect();
            (!now.contains(&victim.id)).then_some(())
        })?;
    }

    header(
        "B8 embedded DNS from a task (÷ dnsmasq, same names, same namespace, same CPU)",
        &format!(
            "{} names, {} rounds; qps: 8 clients, {} s; p99 at {} qps offered",
            records.len(),
            args.rounds,
            args.seconds,
            args.qps
        ),
    );
    row("qps meshnet ÷ dnsmasq", &qps_ratio, "≥ 1.0");
    row("p99 meshnet ÷ dnsmasq", &p99_ratio, "≤ 1.0");
    row("qps meshnet (one core)", &qps_mesh, "≥ 17000");
    row("p99 meshnet (µs)", &p99_mesh, "");
    row("B8b killed task gone on every node (ms)", &fresh, "≤ 1000");
    Ok(())
}
