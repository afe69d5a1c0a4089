//! B3, overlay efficiency (../shared/reference/performance-anchors.md): a 2-node lab running
//! mesh-manager and mesh-agent, one task per node on an overlay network. Measured side by side,
//! interleaved, in one run:
//! - R3a: single-stream TCP throughput task→task over VXLAN ÷ node→node on the same underlay;
//! - R3b: CPU-seconds per GB (both ends, as iperf3 reports them), overlay ÷ underlay;
//! - R3c: request/response latency (HTTP keep-alive, one byte-sized request at a time),
//!   overlay ÷ underlay.
//!
//! Run as root after `cargo build --workspace --bins`: `target/debug/b3-overlay [--rounds 5]`.
//! A benchmark never fails on a ratio: it prints the figures.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use integration::cluster::{bin, Cluster};
use proto::api::TaskInfo;

#[derive(Parser)]
struct Args {
    /// Interleaved rounds of each measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Request/response round trips per latency sample.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
}

struct Stream {
    gbps: f64,
    /// CPU-seconds spent per GB moved, sender and receiver together.
    cpu_s_per_gb: f64,
}

fn iperf(out: &[u8]) -> Result<Stream> {
    let v: serde_json::Value = serde_json::from_slice(out).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let bytes = end["sum_received"]["bytes"]
        .as_f64()
        .context("received bytes")?;
    let secs = end["sum_received"]["seconds"].as_f64().context("seconds")?;
    let cpu = &end["cpu_utilization_percent"];
    let cpu_pct =
        cpu["host_total"].as_f64().unwrap_or(0.0) + cpu["remote_total"].as_f64().unwrap_or(0.0);
    Ok(Stream {
        gbps: bytes * 8.0 / secs / 1e9,
        cpu_s_per_gb: cpu_pct / 100.0 * secs / (bytes / 1e9),
    })
}

/// Median round trip of `n` keep-alive HTTP requests on one connection opened inside `ns`.
fn rr(ns: &Path, target: &str, n: usize) -> Result<Duration> {
    let ns = netns::Netns::open(ns)?;
    let stream = ns.run(|| TcpStream::connect(target))??;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut samples = Vec::with_capacity(n);
    let mut line = String::new();
    for _ in 0..n {
        let t0 = Instant::now();
        writer.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")?;
        // Headers, blank line, then the one-line body.
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line == "\r\n" {
                break;
            }
        }
        line.clear();
        reader.read_line(&mut line)?;
        samples.push(t0.elapsed());
    }
    samples.sort();
    Ok(samples[n / 2])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn quartiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 4], v[(3 * v.len()) / 4])
}

fn deploy(c: &Cluster, name: &str, cmd: &[&str]) -> Result<Vec<TaskInfo>> {
    let mut args = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        "2",
        "--network",
        "bench",
        "--detach",
        "--",
    ];
    args.extend(cmd);
    c.meshctl_ok(&args)?;
    let tasks = c.wait_running(name, 2)?;
    if tasks[0].node == tasks[1].node {
        bail!("both {name} tasks landed on one node");
    }
    Ok(tasks)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let c = Cluster::up(2, "nftables")?;
    c.network_create("bench", "10.0.99.0/24")?;
    let iperf3 = "/usr/bin/iperf3";
    let hello = bin("hello-server").display().to_string();
    let perf = deploy(&c, "iperf", &[iperf3, "-s"])?;
    let web = deploy(&c, "web", &[&hello, "--port", "8080"])?;
    let on = |tasks: &[TaskInfo], node: &str| {
        tasks
            .iter()
            .find(|t| t.node.as_deref() == Some(node))
            .cloned()
            .unwrap()
    };
    let (client, server) = (on(&perf, "node1"), on(&perf, "node2"));
    let server_ip = server.endpoints[0].ip().to_string();
    let web_client = on(&web, "node1");
    let web_server_ip = on(&web, "node2").endpoints[0].ip();
    // The underlay side: the same servers on node2's own address.
    c.lab
        .spawn("node2", Command::new(iperf3).args(["-s", "-p", "5202"]))?;
    c.lab
        .spawn("node2", Command::new(&hello).args(["--port", "8081"]))?;
    std::thread::sleep(Duration::from_millis(500));

    let secs = args.seconds.to_string();
    let (mut r3a, mut r3b, mut r3c) = (Vec::new(), Vec::new(), Vec::new());
    let (mut under_gbps, mut over_gbps) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // Client on CPU 0, server on CPU 1, for both paths.
        let u = c.lab.exec(
            "node1",
            &[
                iperf3,
                "-c",
                "192.168.56.12",
                "-p",
                "5202",
                "-t",
                &secs,
                "-A",
                "0,1",
                "-J",
            ],
        )?;
        let under = iperf(&u.stdout)?;
        let o = c.task_exec(
            &client,
            &[iperf3, "-c", &server_ip, "-t", &secs, "-A", "0,1", "-J"],
        )?;
        let over = iperf(&o.stdout)?;
        let node1 = c.lab.node("node1")?.ns.path().to_path_buf();
        let rr_under = rr(&node1, "192.168.56.12:8081", args.requests)?;
        let rr_over = rr(
            Path::new(web_client.netns.as_deref().unwrap()),
            &format!("{web_server_ip}:8080"),
            args.requests,
        )?;
        println!(
            "round {round}: underlay {:.2} Gbit/s, overlay {:.2} Gbit/s; rr underlay {:?}, overlay {:?}",
            under.gbps, over.gbps, rr_under, rr_over
        );
        under_gbps.push(under.gbps);
        over_gbps.push(over.gbps);
        r3a.push(over.gbps / under.gbps);
        r3b.push(over.cpu_s_per_gb / under.cpu_s_per_gb);
        r3c.push(rr_over.as_secs_f64() / rr_under.as_secs_f64());
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%F").output()?.stdout)
        .trim()
        .to_string();
    let mtu_note = "overlay MTU = underlay 1500 - 50";
    println!(
        "\nB3 overlay efficiency, {date}, kernel {}, {} rounds interleaved, {mtu_note}",
        kernel.trim(),
        args.rounds
    );
    println!("| ratio | median | IQR | goal |");
    println!("|---|---|---|---|");
    for (name, v, goal) in [
        ("R3a throughput overlay / underlay", &mut r3a, ">= 0.90"),
        ("R3b CPU-s per GB overlay / underlay", &mut r3b, "<= 1.15"),
        (
            "R3c request/response latency overlay / underlay",
            &mut r3c,
            "<= 1.3",
        ),
    ] {
        let (q1, q3) = quartiles(v);
        println!("| {name} | {:.2} | {q1:.2}-{q3:.2} | {goal} |", median(v));
    }
    println!(
        "(absolute, informational: underlay {:.1} Gbit/s, overlay {:.1} Gbit/s)",
        median(&mut under_gbps),
        median(&mut over_gbps)
    );
    Ok(())
}
