//! B5, cold start / full sync on nftables (../shared/reference/performance-anchors.md §3): the
//! time to program an ingress_sbox table of 10k services × 2 backends from empty with the
//! firewall crate (`SboxState::render(None, state)` + `NsNetfilter::apply`, as the agent does at
//! start) ÷ `nft -f -` of the same script rendered beforehand (the CLI + kernel floor), each in
//! a fresh throwaway namespace under /run, several rounds, order alternating.
//! Goals: ratio ≤ 2 and ≤ 1 s absolute.
//!
//! Then, while traffic flows: a client → sbox → backend path whose sbox holds the same 10k
//! services, a thread connecting to service 0 in a loop while the table is fully re-synced
//! (one atomic batch: `add table`, `delete table`, the whole table) several times; prints how
//! many connects failed and the slowest one, against the same loop without syncs.
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root): b5_nft [--services 10000] [--rounds 5] [--syncs 5]

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench::{
    close_with_reset, connect_times, header, listen, ms, nft_text, pin, row, us, SboxPath, Scratch,
};
use clap::Parser;
use firewall::{synthetic_sbox, Netfilter, NsNetfilter, Ruleset, SboxState};
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Services (2 backends each).
    #[arg(long, default_value_t = 10_000)]
    services: u16,
    /// Rounds of each way of programming.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Full re-syncs under traffic.
    #[arg(long, default_value_t = 5)]
    syncs: usize,
}

fn with_crate(scratch: &mut Scratch, state: &SboxState, k: usize) -> Result<Duration> {
    let ns = scratch.ns(&format!("crate{k}"))?;
    let t0 = Instant::now();
    NsNetfilter::new(&ns).apply(&SboxState::render(None, state)?)?;
    let took = t0.elapsed();
    scratch.remove(ns)?;
    Ok(took)
}

fn with_nft(scratch: &mut Scratch, script: &str, k: usize) -> Result<Duration> {
    let ns = scratch.ns(&format!("nft{k}"))?;
    let t0 = Instant::now();
    nft_text(&ns, script)?;
    let took = t0.elapsed();
    scratch.remove(ns)?;
    Ok(took)
}

/// Connect times (None: failed) from `client` to `to` until `stop` is set.
fn connect_until(
    client: &Netns,
    to: SocketAddr,
    stop: &AtomicBool,
) -> Result<Vec<Option<Duration>>> {
    client
        .run(|| {
            pin(0);
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                    Ok(s) => {
                        out.push(Some(t0.elapsed()));
                        close_with_reset(s);
                    }
                    Err(_) => out.push(None),
                }
            }
            out
        })
        .context("enter the client namespace")
}

struct Traffic {
    connects: usize,
    failed: usize,
    /// Connects that took over 900 ms: a dropped SYN, retransmitted after 1 s.
    stalled: usize,
    slowest: Duration,
}

/// Runs the connect loop while `during` runs on this thread.
fn traffic_while(
    client: &Netns,
    to: SocketAddr,
    during: impl FnOnce() -> Result<()>,
) -> Result<Traffic> {
    let stop = AtomicBool::new(false);
    let times = std::thread::scope(|s| -> Result<Vec<Option<Duration>>> {
        let h = s.spawn(|| connect_until(client, to, &stop));
        // Let the loop get going before the change, and run on after it.
        std::thread::sleep(Duration::from_millis(100));
        let r = during();
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let times = h.join().expect("connect loop does not panic")?;
        r.map(|()| times)
    })?;
    Ok(Traffic {
        connects: times.len(),
        failed: times.iter().filter(|t| t.is_none()).count(),
        stalled: times
            .iter()
            .flatten()
            .filter(|t| **t > Duration::from_millis(900))
            .count(),
        slowest: times.iter().flatten().copied().max().unwrap_or_default(),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut scratch = Scratch::new("b5")?;
    let state = synthetic_sbox(args.services, 2);
    let script = SboxState::render(None, &state)?.as_str().to_string();
    let (mut crate_t, mut nft_t) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if round % 2 == 0 {
            crate_t.push(with_crate(&mut scratch, &state, round)?);
            nft_t.push(with_nft(&mut scratch, &script, round)?);
        } else {
            nft_t.push(with_nft(&mut scratch, &script, round)?);
            crate_t.push(with_crate(&mut scratch, &state, round)?);
        }
        println!(
            "round {}: crate {:.1} ms, nft -f {:.1} ms",
            round + 1,
            ms(crate_t[round]),
            ms(nft_t[round])
        );
    }

    // Traffic to an existing service during full syncs.
    let SboxPath {
        client,
        sbox,
        backend,
    } = SboxPath::build(&mut scratch, "sync", "10.0.0.1")?;
    let nf = NsNetfilter::new(&sbox);
    nf.apply(&SboxState::render(None, &state)?)?;
    listen(&backend, "10.0.0.1:1024".parse()?, 1)?;
    // Service 0 (port 1024) has backends 10.0.0.1 and 10.0.0.2: only the first exists, so
    // take the second off the map; the change itself is an incremental batch.
    let mut live = state.clone();
    if let Some(s) = live.services.values_mut().next() {
        s.backends.retain(|b| b.octets()[3] == 1);
    }
    nf.apply(&SboxState::render(Some(&state), &live)?)?;
    let to: SocketAddr = "192.168.77.2:1024".parse()?;
    // New veths drop packets until the kernel activates their queues (up to a second later):
    // warm up first, so the loops below only see what the syncs do.
    connect_times(&client, to, 200, 0).context("warm up the traffic path")?;
    let quiet = traffic_while(&client, to, || {
        std::thread::sleep(Duration::from_millis(1500));
        Ok(())
    })?;
    let mut sync_t = Vec::new();
    let busy = traffic_while(&client, to, || {
        for _ in 0..args.syncs {
            let t0 = Instant::now();
            nf.apply(&SboxState::render(None, &live)?)?;
            sync_t.push(t0.elapsed());
        }
        Ok(())
    })?;

    let ratios: Vec<f64> = crate_t
        .iter()
        .zip(&nft_t)
        .map(|(c, n)| c.as_secs_f64() / n.as_secs_f64())
        .collect();
    header(
        "B5 cold start on nftables (firewall crate vs nft -f of the pre-rendered script)",
        &format!(
            "{} services x 2 backends, {} rounds alternating, fresh namespaces",
            args.services, args.rounds
        ),
    );
    row("R5 program from empty, crate / nft -f", &ratios, "<= 2");
    println!("\n| absolute (ms) | median over rounds | IQR | goal |");
    println!("|---|---|---|---|");
    let abs = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<f64>>();
    row("program from empty, crate", &abs(&crate_t), "<= 1000 ms");
    row("program from empty, nft -f (floor)", &abs(&nft_t), "(info)");
    row("full re-sync under traffic, crate", &abs(&sync_t), "(info)");
    println!(
        "\ntraffic to an existing service: {} connects during {} full syncs, {} failed, {} over 900 ms, slowest {:.0} µs; \
         without syncs: {} connects, {} failed, {} over 900 ms, slowest {:.0} µs",
        busy.connects,
        args.syncs,
        busy.failed,
        busy.stalled,
        us(busy.slowest),
        quiet.connects,
        quiet.failed,
        quiet.stalled,
        us(quiet.slowest)
    );
    Ok(())
}
