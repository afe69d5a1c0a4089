//! B1, lookup scaling (../shared/reference/performance-anchors.md §3): does the nftables load
//! balancer's first-packet cost stay flat as services grow?
//!
//! Three copies of the path client ns → sbox ns → backend ns (veth pairs, throwaway namespaces
//! under /run), the sbox programmed by the firewall crate exactly as an agent programs
//! ingress_sbox (`SboxState`, `proto::model::LbKind::Nftables`, one full batch through `nft -f -`):
//! - N=1: `synthetic_sbox(1, 1)`;
//! - N=10k: `synthetic_sbox(10000, 1)`;
//! - control: N=1 plus a linear chain of 10k non-matching rules (`ip saddr … counter`) hooked
//!   before the DNAT, which must show that the measurement can see a per-rule cost.
//!
//! The client connects to the sbox's published port 1024 (marked, DNATed to the backend,
//! SNATed), from a thread pinned to CPU0; the backend's accept thread is pinned to CPU1. Each
//! round measures every path in turn (interleaved, order rotating) with thousands of connect()
//! calls and takes their p99.
//! R1 = p99(N=10k) ÷ p99(N=1). Goal: R1 ≤ 1.05; the control must be ≥ 2.
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root): b1_lookup [--services 10000] [--rounds 7] [--connects 3000]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bench::{connect_times, header, listen, nft_text, quantile, row, us, SboxPath, Scratch};
use clap::Parser;
use firewall::{synthetic_sbox, Netfilter, NsNetfilter, Ruleset, SboxState};
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Services in the large load balancer.
    #[arg(long, default_value_t = 10_000)]
    services: u16,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// connect() calls per path per round.
    #[arg(long, default_value_t = 3000)]
    connects: usize,
}

/// The published port of synthetic service 0, and its one backend.
const PORT: u16 = 1024;
const BACKEND: &str = "10.0.0.1";

struct Path {
    name: &'static str,
    client: Netns,
}

/// Builds client → sbox → backend, programs the sbox with `services` services, adds `control`
/// non-matching rules before the DNAT, and starts the backend's listener.
fn build(
    scratch: &mut Scratch,
    k: usize,
    name: &'static str,
    services: u16,
    control: usize,
) -> Result<Path> {
    let SboxPath {
        client,
        sbox,
        backend,
    } = SboxPath::build(scratch, &k.to_string(), BACKEND)?;
    let state = synthetic_sbox(services, 1);
    let nf = NsNetfilter::new(&sbox);
    nf.apply(&SboxState::render(None, &state)?)
        .with_context(|| format!("program {services} services"))?;
    if control > 0 {
        let mut text = String::from(
            "add table ip control\nadd chain ip control pre { type nat hook prerouting priority dstnat - 10; policy accept; }\n",
        );
        for i in 0..control {
            writeln!(
                text,
                "add rule ip control pre ip saddr 198.18.{}.{} counter",
                i >> 8 & 0xff,
                i & 0xff
            )?;
        }
        nft_text(&sbox, &text).context("program the control chain")?;
    }
    listen(&backend, format!("{BACKEND}:{PORT}").parse()?, 1)?;
    Ok(Path { name, client })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut scratch = Scratch::new("b1")?;
    let paths = [
        build(&mut scratch, 0, "N=1", 1, 0)?,
        build(&mut scratch, 1, "N=large", args.services, 0)?,
        build(&mut scratch, 2, "control", 1, usize::from(args.services))?,
    ];
    let to: SocketAddr = format!("192.168.77.2:{PORT}").parse()?;
    for p in &paths {
        connect_times(&p.client, to, 1000, 0).with_context(|| format!("warm up {}", p.name))?;
    }
    let mut p99 = vec![Vec::new(); paths.len()];
    let mut p50 = vec![Vec::new(); paths.len()];
    for round in 0..args.rounds {
        for i in 0..paths.len() {
            let k = (i + round) % paths.len();
            let t = connect_times(&paths[k].client, to, args.connects, 0)
                .with_context(|| format!("measure {}", paths[k].name))?;
            p99[k].push(quantile(&t, 0.99));
            p50[k].push(quantile(&t, 0.50));
        }
        println!(
            "round {}: p99 connect N=1 {:.1} µs, N={} {:.1} µs, control {:.1} µs",
            round + 1,
            us(p99[0][round]),
            args.services,
            us(p99[1][round]),
            us(p99[2][round])
        );
    }
    let ratio = |a: &[Duration], b: &[Duration]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect()
    };
    let r1 = ratio(&p99[1], &p99[0]);
    let ctrl = ratio(&p99[2], &p99[0]);
    header(
        "B1 lookup scaling (nftables LB in an sbox namespace)",
        &format!(
            "{} rounds interleaved x {} connects per path",
            args.rounds, args.connects
        ),
    );
    row(
        &format!("R1 p99 connect, {} services / 1", args.services),
        &r1,
        "<= 1.05",
    );
    row(
        &format!("p50 connect, {} services / 1", args.services),
        &ratio(&p50[1], &p50[0]),
        "(info)",
    );
    row(
        &format!(
            "control p99 connect, {} linear rules / 1 service",
            args.services
        ),
        &ctrl,
        ">= 2 (sensitivity)",
    );
    row(
        &format!(
            "control p50 connect, {} linear rules / 1 service",
            args.services
        ),
        &ratio(&p50[2], &p50[0]),
        "(info)",
    );
    let med = |v: &[Duration]| us(quantile(v, 0.5));
    println!(
        "(absolute, median over rounds: p99 N=1 {:.1} µs, N={} {:.1} µs, control {:.1} µs; p50 N=1 {:.1} µs)",
        med(&p99[0]),
        args.services,
        med(&p99[1]),
        med(&p99[2]),
        med(&p50[0])
    );
    let (_, c, _) = bench::quartiles(&ctrl);
    println!(
        "control {} the sensitivity check (median {c:.2}, needs >= 2)",
        if c >= 2.0 { "passes" } else { "does NOT pass" }
    );
    Ok(())
}
