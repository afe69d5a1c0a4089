//! B14, encrypted overlay throughput (../shared/reference/performance-anchors.md; issue 13):
//! one TCP stream between two tasks on different nodes over an encrypted overlay, against
//! - B14: a hand-built ESP transport-mode reference between the same two nodes' underlay
//!   addresses (`ip xfrm` states and policies for one TCP port, both ways, the same AEAD);
//! - B14b: the same two-task stream over a plain overlay beside it.
//!
//! Needs a kernel with ESP (the QEMU guest). A 2-node lab with mesh-manager and mesh-agent, an
//! encrypted network and a plain one, a hello-server service of two tasks (one per node) on
//! each. Each round runs the three paths one after another, in a rotating order, each sending
//! `--mib` MiB on a new connection; throughput is the bytes the receiver read over the time
//! from connect to its last byte. Ratios per round, median and IQR over the rounds. Under
//! emulation read the ratios, not the absolute figures. Asserts nothing: only a failure to
//! measure fails the benchmark.
//!
//! Usage (root, guest kernel): b14_esp [--rounds 5] [--mib 32]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bench::{header, quartiles, row, run_in};
use clap::Parser;
use integration::cluster::Cluster;
use netns::Netns;
use proto::api::TaskInfo;

#[derive(Parser)]
struct Args {
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// MiB sent per path per round.
    #[arg(long, default_value_t = 32)]
    mib: usize,
}

const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 11);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 12);
/// The reference's TCP port, the only traffic its policies select.
const REF_PORT: u16 = 5301;
const TASK_PORT: u16 = 5302;
/// The reference's key: 16 bytes of AES key and a 4-byte salt, as `rfc4106(gcm(aes))` takes it.
const REF_KEY: &str = "0x0123456789abcdef0123456789abcdef01234567";

/// Sends `bytes` from `from` to `to:port` on a new connection, the listener in `to_ns`;
/// returns bits per second as the receiver saw them.
fn stream(from: &Netns, to_ns: &Netns, to: Ipv4Addr, port: u16, bytes: usize) -> Result<f64> {
    let listener = to_ns
        .run(move || TcpListener::bind((to, port)))?
        .with_context(|| format!("listen on {to}:{port}"))?;
    let server = std::thread::spawn(move || -> std::io::Result<(usize, Instant)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok((got, Instant::now())),
                n => got += n,
            }
        }
    });
    let addr = SocketAddrV4::new(to, port);
    let started = Instant::now();
    let mut client = from
        .run(move || TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10)))?
        .with_context(|| format!("connect to {addr}"))?;
    let chunk = vec![0x5au8; 256 * 1024];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        client.write_all(&chunk[..n])?;
        sent += n;
    }
    drop(client);
    let (got, ended) = server
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(got == bytes, "{got} of {bytes} bytes arrived at {addr}");
    Ok(got as f64 * 8.0 / ended.duration_since(started).as_secs_f64())
}

/// ESP transport mode between the two nodes for TCP port [`REF_PORT`], both ways: a state per
/// direction on each node and an outbound policy on each, as meshnet builds for VXLAN.
fn reference_esp(node1: &Netns, node2: &Netns) -> Result<()> {
    for ns in [node1, node2] {
        for (src, dst, spi) in [(NODE1, NODE2, "0x5301"), (NODE2, NODE1, "0x5302")] {
            let (src, dst) = (src.to_string(), dst.to_string());
            run_in(
                ns,
                &[
                    "ip",
                    "xfrm",
                    "state",
                    "add",
                    "src",
                    &src,
                    "dst",
                    &dst,
                    "proto",
                    "esp",
                    "spi",
                    spi,
                    "reqid",
                    "0x5301",
                    "mode",
                    "transport",
                    "aead",
                    "rfc4106(gcm(aes))",
                    REF_KEY,
                    "128",
                ],
            )?;
        }
    }
    let port = REF_PORT.to_string();
    for (ns, src, dst, side) in [
        (node1, NODE1, NODE2, "dport"),
        (node2, NODE2, NODE1, "sport"),
    ] {
        let (src, dst) = (src.to_string(), dst.to_string());
        run_in(
            ns,
            &[
                "ip",
                "xfrm",
                "policy",
                "add",
                "src",
                &src,
                "dst",
                &dst,
                "proto",
                "tcp",
                side,
                &port,
                "dir",
                "out",
                "tmpl",
                "src",
                &src,
                "dst",
                &dst,
                "proto",
                "esp",
                "reqid",
                "0x5301",
                "mode",
                "transport",
            ],
        )?;
    }
    Ok(())
}

/// The two tasks of `service`, the one on node1 first.
fn pair(c: &Cluster, service: &str, network: &str) -> Result<(TaskInfo, TaskInfo)> {
    let mut tasks = c.hello_service(service, 2, &["--network", network])?;
    tasks.sort_by(|a, b| a.node.cmp(&b.node));
    ensure!(
        tasks[0].node != tasks[1].node,
        "{service}: both tasks on one node"
    );
    let b = tasks.pop().expect("two tasks");
    let a = tasks.pop().expect("two tasks");
    Ok((a, b))
}

fn task_ns(t: &TaskInfo) -> Result<Netns> {
    let path = t.netns.as_deref().context("a task without a namespace")?;
    Ok(Netns::open(Path::new(path))?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let c = Cluster::up(2, "nftables")?;
    c.encrypted_network_create("secure", "10.0.71.0/24")?;
    c.network_create("plain", "10.0.72.0/24")?;
    let secure = pair(&c, "over-esp", "secure")?;
    let plain = pair(&c, "over-vxlan", "plain")?;
    let node1 = Netns::open(c.lab.node("node1")?.ns.path())?;
    let node2 = Netns::open(c.lab.node("node2")?.ns.path())?;
    reference_esp(&node1, &node2)?;

    let bytes = args.mib << 20;
    // From the pair's task on node1 to its task on node2, over their network.
    let over = |(from, to): &(TaskInfo, TaskInfo)| {
        stream(
            &task_ns(from)?,
            &task_ns(to)?,
            to.endpoints[0].ip(),
            TASK_PORT,
            bytes,
        )
    };
    let (mut b14, mut b14b) = (Vec::new(), Vec::new());
    let mut absolute: [Vec<f64>; 3] = Default::default();
    for round in 0..args.rounds {
        let mut bps = [0.0; 3];
        for k in 0..3 {
            let path = (k + round) % 3;
            bps[path] = match path {
                0 => over(&secure)?,
                1 => over(&plain)?,
                _ => stream(&node1, &node2, NODE2, REF_PORT, bytes)?,
            };
            absolute[path].push(bps[path] / 1e6);
        }
        println!(
            "round {}: encrypted overlay {:.0} Mbit/s, plain overlay {:.0}, hand-built ESP {:.0}",
            round + 1,
            bps[0] / 1e6,
            bps[1] / 1e6,
            bps[2] / 1e6
        );
        b14.push(bps[0] / bps[2]);
        b14b.push(bps[0] / bps[1]);
    }

    println!();
    header(
        "B14 encrypted overlay throughput",
        &format!(
            "{} rounds, one TCP stream of {} MiB per path, 2 nodes; under emulation read the ratios",
            args.rounds, args.mib
        ),
    );
    row(
        "B14 encrypted overlay / hand-built ESP (underlay)",
        &b14,
        ">= 0.95",
    );
    row("B14b encrypted overlay / plain overlay", &b14b, "reported");
    let med = |v: &[f64]| quartiles(v).1;
    println!(
        "(absolute, median Mbit/s: encrypted overlay {:.0}, plain overlay {:.0}, hand-built ESP {:.0})",
        med(&absolute[0]),
        med(&absolute[1]),
        med(&absolute[2])
    );
    Ok(())
}
