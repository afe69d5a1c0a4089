//! B2, load-balancer datapath cost (../shared/reference/performance-anchors.md §3): what the
//! routing mesh costs a client, as a ratio to going straight to the server.
//!
//! A 3-node lab running mesh-manager and mesh-agent (`--lb nftables` by default), a client host
//! on the underlay, and a service of one hello-server task pinned to node3 by constraint,
//! published as 80:8080. Two paths from the same client, measured alternately in each round:
//! - mesh: node1:80, a node WITHOUT a local task: node1's DNAT to ingress_sbox, fwmark, the
//!   nftables LB's DNAT and SNAT, the ingress overlay (VXLAN) to node3, the task's redirect;
//! - direct: a second hello-server (same binary) in node3's own namespace on its underlay
//!   address, port 8081. The task's own address is only reachable over the overlay, so this
//!   is the same server software on the same node with neither mesh nor overlay in between.
//!
//! Both servers are pinned to CPU1 with `taskset -a`. Keep-alive req/s (R2-RR): wrk on the
//! client, pinned to CPU0. New connection per request (R2-CRR, conn/s): a Rust loop on the
//! client (threads pinned to CPU0) that connects, sends one GET, reads the whole answer and
//! closes first, so TIME_WAIT stays on the client, which reuses such ports
//! (`tcp_tw_reuse=1`, port range 1024-65535 in the client's own namespace). With wrk and
//! `Connection: close` the servers closed first and kept a TIME_WAIT per connection: after a
//! few rounds the client's ports came back onto them and conn/s collapsed on both paths.
//! R2 = mesh ÷ direct. Goals on nftables: CRR ≥ 0.85, RR ≥ 0.95.
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root): b2_datapath [--lb nftables|ipvs] [--rounds 5] [--seconds 2] [--connections 4]
//!   [--crr-threads 2]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{header, mesh_and_direct, pin, row};
use clap::Parser;
use integration::cluster::Cluster;
use integration::lab::CLIENT;
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Load balancer behind the mesh: nftables (host kernel) or ipvs (guest kernel).
    #[arg(long, default_value = "nftables")]
    lb: String,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 2)]
    seconds: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Client threads of the new-connection loop.
    #[arg(long, default_value_t = 2)]
    crr_threads: usize,
}

const MESH: &str = "http://192.168.56.11:80/";
const DIRECT: &str = "http://192.168.56.13:8081/";
const MESH_ADDR: &str = "192.168.56.11:80";
const DIRECT_ADDR: &str = "192.168.56.13:8081";

/// One request on a new connection: connect, GET, read headers and the Content-Length body,
/// then close (the client's FIN goes first).
fn one_request(to: &SocketAddr) -> Result<()> {
    let s = TcpStream::connect_timeout(to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")?;
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    let mut len = 0;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(())
}

/// New connections per second from the client namespace: `threads` loops of
/// [`one_request`] for `seconds`, pinned to CPU0. Failed requests are counted, not fatal.
fn crr(client: &Netns, to: &str, seconds: u32, threads: usize) -> Result<(f64, usize)> {
    let to: SocketAddr = to.parse()?;
    let end = Instant::now() + Duration::from_secs(seconds.into());
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    client.run(|| {
                        pin(0);
                        let (mut ok, mut failed) = (0usize, 0usize);
                        while Instant::now() < end {
                            match one_request(&to) {
                                Ok(()) => ok += 1,
                                Err(_) => failed += 1,
                            }
                        }
                        (ok, failed)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request loop does not panic"))
            .collect::<Vec<_>>()
    });
    let (mut ok, mut failed) = (0, 0);
    for r in results {
        let (o, f) = r?;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / f64::from(seconds), failed))
}

/// One keep-alive wrk run from the client; requests per second. Socket errors or non-2xx answers are
/// reported on stderr and kept in the figure (they are part of what the path does).
fn wrk(c: &Cluster, args: &Args, url: &str) -> Result<f64> {
    let secs = format!("{}s", args.seconds);
    let conns = args.connections.to_string();
    let cmd = [
        "taskset", "-c", "0", "wrk", "-t1", "-c", &conns, "-d", &secs, url,
    ];
    let out = c.lab.exec(CLIENT, &cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {url}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for l in text.lines() {
        if l.contains("Socket errors") || l.contains("Non-2xx") {
            eprintln!("wrk {url}: {}", l.trim());
        }
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

/// Pins every thread of `pid` (and those it starts later) to CPU1.
fn pin_to_cpu1(pid: u32) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &pid.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "taskset pid {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut c = Cluster::up(3, &args.lb)?;
    c.lab.add_host(CLIENT, Ipv4Addr::new(192, 168, 56, 100))?;
    let client = Netns::open(c.lab.node(CLIENT)?.ns.path())?;
    client.write_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.write_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let (task, direct) = mesh_and_direct(&c, CLIENT, "node3")?;
    pin_to_cpu1(direct)?;
    let task_ns = Netns::open(std::path::Path::new(
        task.netns.as_deref().context("task has no namespace")?,
    ))?;
    for pid in task_ns.pids()? {
        pin_to_cpu1(pid)?;
    }

    let (mut r2_rr, mut r2_crr) = (Vec::new(), Vec::new());
    let (mut abs_rr, mut abs_crr) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which path goes first.
        let mut rr_pair = [0.0; 2];
        let mut crr_pair = [0.0; 2];
        for k in 0..2 {
            let side = (k + round) % 2; // 0 = mesh, 1 = direct
            let (url, addr) = [(MESH, MESH_ADDR), (DIRECT, DIRECT_ADDR)][side];
            rr_pair[side] = wrk(&c, &args, url)?;
            let (rate, failed) = crr(&client, addr, args.seconds, args.crr_threads)?;
            if failed > 0 {
                eprintln!("{addr}: {failed} new-connection requests failed");
            }
            crr_pair[side] = rate;
        }
        let [m_rr, d_rr] = rr_pair;
        let [m_crr, d_crr] = crr_pair;
        println!(
            "round {}: keep-alive req/s mesh {m_rr:.0} direct {d_rr:.0}; new-connection conn/s mesh {m_crr:.0} direct {d_crr:.0}",
            round + 1
        );
        r2_rr.push(m_rr / d_rr);
        r2_crr.push(m_crr / d_crr);
        abs_rr.push((m_rr, d_rr));
        abs_crr.push((m_crr, d_crr));
    }
    header(
        &format!(
            "B2 routing-mesh datapath ({}), node without a local task vs direct to the server",
            args.lb
        ),
        &format!(
            "{} rounds interleaved, {} s per run, RR: wrk -t1 -c{}, CRR: {} client threads; client CPU0, servers CPU1",
            args.rounds, args.seconds, args.connections, args.crr_threads
        ),
    );
    let (rr_goal, crr_goal) = if args.lb == "ipvs" {
        ("(info)", ">= 0.80")
    } else {
        (">= 0.95", ">= 0.85")
    };
    row("R2-CRR conn/s, mesh / direct", &r2_crr, crr_goal);
    row("R2-RR keep-alive req/s, mesh / direct", &r2_rr, rr_goal);
    let med = |v: &[(f64, f64)], side: usize| {
        let x: Vec<f64> = v
            .iter()
            .map(|p| if side == 0 { p.0 } else { p.1 })
            .collect();
        bench::quartiles(&x).1
    };
    println!(
        "(absolute medians: conn/s mesh {:.0}, direct {:.0}; keep-alive req/s mesh {:.0}, direct {:.0})",
        med(&abs_crr, 0),
        med(&abs_crr, 1),
        med(&abs_rr, 0),
        med(&abs_rr, 1)
    );
    Ok(())
}
