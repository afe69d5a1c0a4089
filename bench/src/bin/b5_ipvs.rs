//! B5-ipvs: programming IPVS with the `ipvs` crate against `ipvsadm`, side by side in one
//! run. Needs root and a kernel with IPVS (the QEMU guest; `modprobe ip_vs ip_vs_rr`).
//!
//! 1. Program N services x 2 destinations from empty: `Client::apply` vs `ipvsadm -R`
//!    restoring the same rules, each in a fresh network namespace, several runs.
//! 2. With N services present, change one destination's weight: `update_destination` vs
//!    `ipvsadm -e`, many samples (median and max).
//!
//! Prints a table of figures and ratios (crate / ipvsadm: below 1 means the crate is
//! faster). A slow ratio is a result, never a failure.
//!
//! Usage: b5_ipvs [--services N] [--runs R] [--samples S]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ipvs::{Client, Destination, Family, Forward, Op, Protocol, Service, ServiceKey};
use netns::Netns;

struct Args {
    services: u32,
    runs: usize,
    samples: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        services: 10_000,
        runs: 3,
        samples: 21,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--services" => args.services = value.parse().context("--services")?,
            "--runs" => args.runs = value.parse().context("--runs")?,
            "--samples" => args.samples = value.parse().context("--samples")?,
            _ => bail!(
                "unknown argument {flag}; usage: b5_ipvs [--services N] [--runs R] [--samples S]"
            ),
        }
    }
    ensure!(
        args.services > 0 && args.runs > 0 && args.samples > 0,
        "counts must be positive"
    );
    ensure!(
        args.services <= 65_536,
        "at most 65536 services (addresses are 10.1.x.y)"
    );
    Ok(args)
}

/// The benchmark table: half fwmark services (like the routing mesh), half TCP VIPs, each
/// with two masquerading destinations.
struct Table {
    services: Vec<Service>,
    dests: Vec<[Destination; 2]>,
}

impl Table {
    fn new(n: u32) -> Table {
        let mut services = Vec::new();
        let mut dests = Vec::new();
        for i in 0..n {
            let (x, y) = (i >> 8 & 0xff, i & 0xff);
            let (key, port) = if i % 2 == 0 {
                let key = ServiceKey::Fwmark {
                    family: Family::Ipv4,
                    mark: 1000 + i,
                };
                (key, 0)
            } else {
                let addr = format!("10.1.{x}.{y}:80").parse().expect("valid address");
                (
                    ServiceKey::Addr {
                        protocol: Protocol::Tcp,
                        addr,
                    },
                    8080,
                )
            };
            services.push(Service::new(key, "rr"));
            dests.push([16, 17].map(|net| {
                let addr = format!("172.{net}.{x}.{y}:{port}")
                    .parse()
                    .expect("valid address");
                Destination::new(addr, Forward::Masq, i % 5 + 1)
            }));
        }
        Table { services, dests }
    }

    fn ops(&self) -> Vec<Op<'_>> {
        let mut ops = Vec::with_capacity(self.services.len() * 3);
        for (s, ds) in self.services.iter().zip(&self.dests) {
            ops.push(Op::AddService(s));
            ops.extend(ds.iter().map(|d| Op::AddDestination(&s.key, d)));
        }
        ops
    }

    /// The same table as `ipvsadm -R` input.
    fn rules(&self) -> String {
        let mut out = String::new();
        for (s, ds) in self.services.iter().zip(&self.dests) {
            let svc = ipvsadm_service(&s.key);
            writeln!(out, "-A {svc} -s {}", s.scheduler).expect("write to a String");
            for d in ds {
                writeln!(out, "-a {svc} -r {} -m -w {}", d.addr, d.weight)
                    .expect("write to a String");
            }
        }
        out
    }
}

fn ipvsadm_service(key: &ServiceKey) -> String {
    match key {
        ServiceKey::Fwmark { mark, .. } => format!("-f {mark}"),
        ServiceKey::Addr { addr, .. } => format!("-t {addr}"),
    }
}

/// A fresh namespace, removed on drop.
struct Ns(Netns);

impl Ns {
    fn new(tag: &str) -> Result<Ns> {
        let dir: PathBuf = std::env::temp_dir().join("meshnet-bench-ipvs");
        let name = format!("{tag}-{}", std::process::id());
        Ok(Ns(Netns::create(&dir, &name)?))
    }

    fn client(&self) -> Result<Client> {
        Ok(self.0.run(Client::new)??)
    }

    fn count_services(&self) -> Result<usize> {
        Ok(self.client()?.services()?.len())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(self.0.path()) {
            eprintln!("warning: {e}");
        }
    }
}

fn program_with_crate(table: &Table) -> Result<Duration> {
    let ns = Ns::new("crate")?;
    let mut client = ns.client()?;
    let ops = table.ops();
    let start = Instant::now();
    client.apply(&ops)?;
    let took = start.elapsed();
    ensure!(
        ns.count_services()? == table.services.len(),
        "the crate programmed a different table"
    );
    Ok(took)
}

fn program_with_ipvsadm(table: &Table, rules: &str) -> Result<Duration> {
    let ns = Ns::new("ipvsadm")?;
    let start = Instant::now();
    let mut child = ns.0.spawn(
        Command::new("ipvsadm")
            .arg("-R")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    child
        .stdin
        .take()
        .context("ipvsadm stdin")?
        .write_all(rules.as_bytes())
        .context("write rules to ipvsadm -R")?;
    let out = child.wait_with_output().context("wait for ipvsadm -R")?;
    let took = start.elapsed();
    ensure!(
        out.status.success(),
        "ipvsadm -R: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        ns.count_services()? == table.services.len(),
        "ipvsadm -R programmed a different table"
    );
    Ok(took)
}

/// Weight changes on spread-out services of a full table: crate samples, ipvsadm samples.
fn weight_changes(table: &Table, samples: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let ns = Ns::new("weight")?;
    let mut client = ns.client()?;
    client.apply(&table.ops())?;
    let n = table.services.len();
    let pick = |k: usize| (k * 7919 + 13) % n;
    let mut crate_times = Vec::new();
    for k in 0..samples {
        let i = pick(k);
        let d = Destination {
            weight: 10 + k as u32,
            ..table.dests[i][0]
        };
        let start = Instant::now();
        client.update_destination(&table.services[i].key, &d)?;
        crate_times.push(start.elapsed());
    }
    let mut ipvsadm_times = Vec::new();
    for k in 0..samples {
        let i = pick(k + samples);
        let d = &table.dests[i][0];
        let svc = ipvsadm_service(&table.services[i].key);
        let mut cmd = Command::new("ipvsadm");
        cmd.arg("-e").args(svc.split(' ')).args([
            "-r",
            &d.addr.to_string(),
            "-m",
            "-w",
            &(20 + k).to_string(),
        ]);
        let start = Instant::now();
        let out = ns.0.output(&mut cmd)?;
        ipvsadm_times.push(start.elapsed());
        ensure!(
            out.status.success(),
            "ipvsadm -e: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((crate_times, ipvsadm_times))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

fn show(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.3} ms", s * 1e3)
    }
}

/// Three significant digits, also for ratios far below 1.
fn show_ratio(r: f64) -> String {
    if r >= 0.01 {
        format!("{r:.3}")
    } else {
        format!("{r:.2e}")
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // Fail early and clearly where there is nothing to measure.
    Ns::new("probe")?
        .client()
        .context("B5-ipvs needs root and a kernel with IPVS")?;

    let table = Table::new(args.services);
    let rules = table.rules();
    let mut crate_runs = Vec::new();
    let mut ipvsadm_runs = Vec::new();
    for run in 0..args.runs {
        // Alternate the order so neither side always runs on a warmer system.
        if run % 2 == 0 {
            crate_runs.push(program_with_crate(&table)?);
            ipvsadm_runs.push(program_with_ipvsadm(&table, &rules)?);
        } else {
            ipvsadm_runs.push(program_with_ipvsadm(&table, &rules)?);
            crate_runs.push(program_with_crate(&table)?);
        }
    }
    let (crate_w, ipvsadm_w) = weight_changes(&table, args.samples)?;

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let rows = [
        (
            format!(
                "program {}x2 from empty, median of {}",
                args.services, args.runs
            ),
            median(crate_runs.clone()),
            median(ipvsadm_runs.clone()),
        ),
        (
            format!(
                "program {}x2 from empty, best of {}",
                args.services, args.runs
            ),
            crate_runs.iter().copied().min().unwrap_or_default(),
            ipvsadm_runs.iter().copied().min().unwrap_or_default(),
        ),
        (
            format!("change one weight, median of {}", args.samples),
            median(crate_w.clone()),
            median(ipvsadm_w.clone()),
        ),
        (
            format!("change one weight, max of {}", args.samples),
            max(&crate_w),
            max(&ipvsadm_w),
        ),
    ];
    println!(
        "B5-ipvs  {}  kernel {}  ({} services x 2 destinations)",
        command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        command_output("uname", &["-r"]),
        args.services
    );
    println!(
        "{:<44} {:>12} {:>12} {:>16}",
        "measure", "ipvs crate", "ipvsadm", "crate/ipvsadm"
    );
    for (name, c, i) in rows {
        println!(
            "{name:<44} {:>12} {:>12} {:>16}",
            show(c),
            show(i),
            show_ratio(ratio(c, i))
        );
    }
    println!("(ipvsadm -e is one process per change, as a shell-driven agent would pay; the crate keeps one socket)");
    println!(
        "all runs (crate / ipvsadm -R): {} / {}",
        crate_runs
            .iter()
            .map(|d| show(*d))
            .collect::<Vec<_>>()
            .join(", "),
        ipvsadm_runs
            .iter()
            .map(|d| show(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
