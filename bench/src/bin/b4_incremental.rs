//! B4, incremental programming latency (../shared/reference/performance-anchors.md §3): the time
//! to add one published service (one port, 3 backends: every map of the table and a service
//! chain touched) and to remove it again, with 10k services already programmed versus none.
//!
//! Four throwaway sbox namespaces under /run, two per path: one holding `synthetic_sbox(0, 2)`,
//! one `synthetic_sbox(10000, 2)`, each programmed once with a full batch. (Each path has its
//! own tables: an `nft` run leaves work behind in its namespace, freeing what it deleted, and
//! its exit waits for it.) Then, per round, path after path, per sample on both tables of the
//! path (interleaved, order alternating), a new service is added and removed again:
//! - netlink, the agent's path: `SboxState::changes(prev, next)` encoded and sent as one
//!   nf_tables netlink batch by `NsNetfilter::apply_changes` on a socket opened in the
//!   namespace by the first change and kept, as the agent's `sync_table` does; both timed;
//! - nft, the previous path (reference): the same change rendered as text
//!   (`SboxState::render(Some(prev), next)`) and applied with `nft -f -` in the namespace.
//!
//! The UDP conntrack flush that `firewall::sync` runs after a removal is not included. Samples
//! are grouped in rounds; per round the p99 (of 30 samples: the slowest) and the median are
//! taken. R4 = p99 with 10k ÷ p99 with 0. Goals (issue 14): p99 ≤ 2 ms at 10k and R4 ≤ 1.5
//! (the anchors' first goal was ≤ 20 ms and ≤ 2). A ratio never fails the benchmark; only a
//! failure to measure does.
//!
//! Usage (root): b4_incremental [--services 10000] [--rounds 5] [--samples 30]

use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bench::{header, ms, quantile, row, Scratch};
use clap::Parser;
use firewall::{
    synthetic_sbox, Fwmark, Netfilter, NfnlSocket, NsNetfilter, PortKey, Ruleset, SboxService,
    SboxState,
};
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Services already programmed in the large table.
    #[arg(long, default_value_t = 10_000)]
    services: u16,
    /// Rounds (each gives one p99 and one median per measure).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Adds and removes per table per round.
    #[arg(long, default_value_t = 30)]
    samples: usize,
}

#[derive(Clone, Copy)]
enum Path {
    Netlink,
    Nft,
}

const PATHS: [(Path, &str); 2] = [(Path::Netlink, "netlink"), (Path::Nft, "nft -f")];

/// One table in its namespace, with its last applied state.
struct Table {
    ns: Netns,
    state: SboxState,
    nfnl: OnceLock<NfnlSocket>,
}

impl Table {
    fn new(scratch: &mut Scratch, name: &str, services: u16) -> Result<Table> {
        let ns = scratch.ns(name)?;
        let state = synthetic_sbox(services, 2);
        NsNetfilter::new(&ns)
            .apply(&SboxState::render(None, &state)?)
            .with_context(|| format!("program {services} services"))?;
        Ok(Table {
            ns,
            state,
            nfnl: OnceLock::new(),
        })
    }

    /// Moves the table to `next` incrementally by `path`; returns the time taken (render or
    /// encode, and apply).
    fn change(&mut self, next: SboxState, path: Path) -> Result<Duration> {
        let nf = NsNetfilter::with_nfnl(&self.ns, &self.nfnl);
        let t0 = Instant::now();
        match path {
            Path::Netlink => {
                let changes =
                    SboxState::changes(&self.state, &next)?.context("an incremental change")?;
                nf.apply_changes(&changes)?;
            }
            Path::Nft => nf.apply(&SboxState::render(Some(&self.state), &next)?)?,
        }
        let took = t0.elapsed();
        self.state = next;
        Ok(took)
    }

    /// Adds service `k` (fwmark 100000+k, port 60000+k, backends 10.250.k.1-3), then removes
    /// it: the two times.
    fn add_remove(&mut self, k: u8, path: Path) -> Result<(Duration, Duration)> {
        let before = self.state.clone();
        let mut next = before.clone();
        next.services.insert(
            Fwmark::new(100_000 + u32::from(k))?,
            SboxService {
                ports: [PortKey::tcp(60_000 + u16::from(k))].into(),
                backends: (1..=3).map(|j| Ipv4Addr::new(10, 250, k, j)).collect(),
                vip: None,
            },
        );
        let add = self.change(next, path)?;
        let remove = self.change(before, path)?;
        Ok((add, remove))
    }
}

type PerTable<T> = [[T; 2]; 2];

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.samples > 0 && args.samples <= 200, "--samples 1..=200");
    let mut scratch = Scratch::new("b4")?;
    // [path][empty=0/full=1]
    let mut tables = [
        [
            Table::new(&mut scratch, "nl-empty", 0)?,
            Table::new(&mut scratch, "nl-full", args.services)?,
        ],
        [
            Table::new(&mut scratch, "nft-empty", 0)?,
            Table::new(&mut scratch, "nft-full", args.services)?,
        ],
    ];
    // One warm-up change each (page cache, nft's first run, the netlink socket).
    for (p, (path, _)) in PATHS.iter().enumerate() {
        for t in &mut tables[p] {
            t.add_remove(0, *path)?;
        }
    }
    // [path][table][add=0/remove=1][round] -> (p99, median)
    let mut p99: [PerTable<Vec<Duration>>; 2] = Default::default();
    let mut p50: [PerTable<Vec<Duration>>; 2] = Default::default();
    for round in 0..args.rounds {
        let mut times: [PerTable<Vec<Duration>>; 2] = Default::default();
        // The paths one after the other (nft's processes and what they leave behind would
        // load the machine under the netlink samples), the two table sizes interleaved.
        for (p, (path, _)) in PATHS.iter().enumerate() {
            for k in 0..args.samples {
                let order = if (k + round) % 2 == 0 { [0, 1] } else { [1, 0] };
                for t in order {
                    let (a, r) = tables[p][t].add_remove(k as u8, *path)?;
                    times[p][t][0].push(a);
                    times[p][t][1].push(r);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in 0..2 {
            for t in 0..2 {
                for op in 0..2 {
                    p99[p][t][op].push(quantile(&times[p][t][op], 0.99));
                    p50[p][t][op].push(quantile(&times[p][t][op], 0.5));
                }
            }
            println!(
                "round {} {}: add p99/p50 0: {:.2}/{:.2} ms, {}: {:.2}/{:.2} ms; remove p99/p50 0: {:.2}/{:.2} ms, {}: {:.2}/{:.2} ms",
                round + 1,
                PATHS[p].1,
                ms(p99[p][0][0][round]),
                ms(p50[p][0][0][round]),
                args.services,
                ms(p99[p][1][0][round]),
                ms(p50[p][1][0][round]),
                ms(p99[p][0][1][round]),
                ms(p50[p][0][1][round]),
                args.services,
                ms(p99[p][1][1][round]),
                ms(p50[p][1][1][round]),
            );
        }
    }
    let ratio = |a: &[Duration], b: &[Duration]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect()
    };
    let n = args.services;
    header(
        "B4 incremental programming (firewall crate, sbox table: netlink batch, and nft -f - for reference)",
        &format!(
            "{} rounds x {} samples, interleaved; service = 1 port, 3 backends",
            args.rounds, args.samples
        ),
    );
    for (p, (_, path)) in PATHS.iter().enumerate() {
        let goal = |g: &'static str| if p == 0 { g } else { "(reference)" };
        for (op, name) in [(0, "add"), (1, "remove")] {
            row(
                &format!("{path}: R4 p99 {name} one service, {n} present / 0"),
                &ratio(&p99[p][1][op], &p99[p][0][op]),
                goal("<= 1.5"),
            );
            row(
                &format!("{path}: median {name} one service, {n} present / 0"),
                &ratio(&p50[p][1][op], &p50[p][0][op]),
                "(info)",
            );
        }
    }
    for (op, name) in [(0, "add"), (1, "remove")] {
        row(
            &format!("p99 {name} at {n}, netlink / nft -f"),
            &ratio(&p99[0][1][op], &p99[1][1][op]),
            "(info)",
        );
    }
    println!("\n| absolute (ms) | median over rounds | IQR | goal |");
    println!("|---|---|---|---|");
    let abs = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<f64>>();
    for (p, (_, path)) in PATHS.iter().enumerate() {
        let goal = |g: &'static str| if p == 0 { g } else { "(reference)" };
        for (op, name) in [(0, "add"), (1, "remove")] {
            row(
                &format!("{path}: p99 {name}, {n} present"),
                &abs(&p99[p][1][op]),
                goal("<= 2 ms"),
            );
            row(
                &format!("{path}: median {name}, {n} present"),
                &abs(&p50[p][1][op]),
                "(info)",
            );
            row(
                &format!("{path}: p99 {name}, 0 present"),
                &abs(&p99[p][0][op]),
                "(info)",
            );
            row(
                &format!("{path}: median {name}, 0 present"),
                &abs(&p50[p][0][op]),
                "(info)",
            );
        }
    }
    Ok(())
}
