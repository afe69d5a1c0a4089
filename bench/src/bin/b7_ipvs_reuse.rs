//! B7, IPVS connection reuse (../shared/reference/performance-anchors.md §3, anchor A24): with
//! one client IP reusing a small set of source ports in rapid short connections, does the IPVS
//! routing mesh add the 1 s SYN-retransmit plateau (before kernel 5.9, `conn_reuse_mode=1` with
//! conntrack drops the SYN of a reused port while the old IPVS entry is in TIME_WAIT, which is
//! why Swarm sets 0; from 5.9 meshnet keeps 1, which also stops a reused port from reaching a
//! draining task)?
//!
//! Needs a kernel with IPVS (the QEMU guest). A 2-node lab with mesh-manager and mesh-agent
//! `--lb ipvs`, a client host on the underlay, one hello-server task pinned to node2 and
//! published as 80:8080. Two paths, alternating in each round:
//! - mesh: node1:80 (no local task): node1's DNAT, ingress_sbox's fwmark, the IPVS FWM service,
//!   the ingress overlay to node2;
//! - direct: a second hello-server in node2's namespace on its underlay address, port 8081
//!   (the task's address is only reachable over the overlay).
//!
//! The client loop binds each connection to the next port of a range of 300 (`SO_REUSEADDR`,
//! like `ab -c 300` recycling ports), times connect(), sends a `Connection: close` GET, reads
//! to the end (the server closes first, so the client keeps no TIME_WAIT and the port is taken
//! again 300 connections later). Connects give up after 3 s and count as failed.
//! R7 = p99 connect time via the mesh ÷ direct. Goal: R7 ≤ 2, no connect over 900 ms.
//! Prints `conn_reuse_mode` and `expire_nodest_conn` as read in node1's ingress_sbox. Asserts
//! nothing: a ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root, guest kernel): b7_ipvs_reuse [--rounds 3] [--connections 600]

use std::io::{Read, Write};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench::{connect_from, header, mesh_and_direct, ms, pin, quantile, row};
use clap::Parser;
use integration::cluster::Cluster;
use integration::lab::{CLIENT, CLIENT_IP};
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections per path per round.
    #[arg(long, default_value_t = 600)]
    connections: usize,
    /// Seconds after which a path's round stops early (the guest is emulated and slow).
    #[arg(long, default_value_t = 20)]
    max_seconds: u64,
}

const PORTS: u16 = 300;

struct Run {
    connects: Vec<Duration>,
    failed: usize,
}

/// One request per connection from the client, source ports cycling over
/// `first_port..first_port+PORTS`.
fn run(client: &Netns, to: SocketAddrV4, first_port: u16, args: &Args) -> Result<Run> {
    client
        .run(|| {
            pin(0);
            let end = Instant::now() + Duration::from_secs(args.max_seconds);
            let mut out = Run {
                connects: Vec::with_capacity(args.connections),
                failed: 0,
            };
            for i in 0..args.connections {
                if Instant::now() > end {
                    break;
                }
                let from = SocketAddrV4::new(CLIENT_IP, first_port + (i as u16 % PORTS));
                let t0 = Instant::now();
                let Ok(mut s) = connect_from(from, to, Duration::from_secs(3)) else {
                    out.failed += 1;
                    continue;
                };
                out.connects.push(t0.elapsed());
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut sink = Vec::new();
                let done = s
                    .write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                    .and_then(|()| s.read_to_end(&mut sink));
                if done.is_err() || !sink.starts_with(b"HTTP/1.1 200") {
                    out.failed += 1;
                }
            }
            out
        })
        .context("enter the client namespace")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut c = Cluster::up(2, "ipvs")?;
    c.lab.add_host(CLIENT, CLIENT_IP)?;
    let client = Netns::open(c.lab.node(CLIENT)?.ns.path())?;
    mesh_and_direct(&c, CLIENT, "node2")?;
    let mesh: SocketAddrV4 = "192.168.56.11:80".parse()?;
    let direct: SocketAddrV4 = "192.168.56.12:8081".parse()?;
    let sbox = Netns::open(&c.state_dir("node1").join("netns/ingress_sbox"))?;
    let sysctl = |key: &str| {
        sbox.read_sysctl(key)
            .unwrap_or_else(|e| format!("unreadable ({e})"))
    };
    let reuse = sysctl("net.ipv4.vs.conn_reuse_mode");
    let nodest = sysctl("net.ipv4.vs.expire_nodest_conn");

    let mut r7 = Vec::new();
    let (mut p99s, mut stalls, mut fails, mut counts) = ([vec![], vec![]], [0; 2], [0; 2], [0; 2]);
    for round in 0..args.rounds {
        let mut p99 = [Duration::ZERO; 2];
        for k in 0..2 {
            let side = (k + round) % 2; // 0 = mesh, 1 = direct
            let (to, first_port) = [(mesh, 20_000), (direct, 30_000)][side];
            let r = run(&client, to, first_port, &args)?;
            anyhow::ensure!(
                !r.connects.is_empty(),
                "no connection to {to} succeeded ({} failed)",
                r.failed
            );
            p99[side] = quantile(&r.connects, 0.99);
            p99s[side].push(p99[side]);
            stalls[side] += r
                .connects
                .iter()
                .filter(|d| **d > Duration::from_millis(900))
                .count();
            fails[side] += r.failed;
            counts[side] += r.connects.len();
        }
        println!(
            "round {}: p99 connect mesh {:.2} ms, direct {:.2} ms",
            round + 1,
            ms(p99[0]),
            ms(p99[1])
        );
        r7.push(p99[0].as_secs_f64() / p99[1].as_secs_f64());
    }
    header(
        "B7 IPVS connection reuse (one client IP, 300 recycled source ports)",
        &format!(
            "{} rounds interleaved, up to {} connections per path per round",
            args.rounds, args.connections
        ),
    );
    row("R7 p99 connect, IPVS mesh / direct", &r7, "<= 2");
    let med = |v: &[Duration]| ms(quantile(v, 0.5));
    println!(
        "(absolute, median over rounds: p99 connect mesh {:.2} ms, direct {:.2} ms)",
        med(&p99s[0]),
        med(&p99s[1])
    );
    println!(
        "connects over 900 ms (1 s plateau): mesh {} of {}, direct {} of {}; failed: mesh {}, direct {}",
        stalls[0], counts[0], stalls[1], counts[1], fails[0], fails[1]
    );
    println!(
        "node1 ingress_sbox: net.ipv4.vs.conn_reuse_mode={reuse} (want 1 from kernel 5.9, 0 before), net.ipv4.vs.expire_nodest_conn={nodest} (want 1)"
    );
    Ok(())
}
