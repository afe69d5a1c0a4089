//! B9, service VIP cost (issue 8): what reaching a task through its service's VIP costs a
//! client task, as a ratio to connecting straight to the task's overlay address.
//!
//! Two task namespaces on one overlay bridge, as on a node: the client c (10.0.9.10) and the
//! task t (10.0.9.2), each with a veth on `br0` in a sandbox namespace. VIP 10.0.9.100 → t,
//! balanced as mesh-agent does it:
//! - `--lb nftables` (host kernel): in the client's own table (`firewall::TaskState`), DNAT in
//!   its nat output chain (vmap, numgen); `--services N` puts N-1 more VIPs in its map, each
//!   over other addresses, so the lookup is measured with a populated map;
//! - `--lb ipvs` (guest kernel): Swarm's layout, a load-balancer namespace `lb` on `br0`
//!   (10.0.9.250 + the VIP as /32) with the `firewall::SboxState` table (VIP → fwmark 300,
//!   SNAT to 10.0.9.250), Swarm's sysctls and an IPVS FWM rr service with t as masq
//!   destination: one more hop, and the task sees the lb address.
//!
//! Two paths from the client, alternately in each round: vip (10.0.9.100:8080) and direct
//! (10.0.9.2:8080).
//!
//! t's listener (pinned to CPU1) accepts and closes; the client (pinned to CPU0) connects and
//! resets, so no TIME_WAIT piles up. Per round: p99 of `--connects` connect() times and
//! connections per second over `--seconds`. B9 = vip ÷ direct; goals p99 ≤ 1.10, conn/s ≥ 0.90.
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (root): b9_vip [--lb nftables|ipvs] [--rounds 5] [--connects 2000] [--seconds 2]
//!   [--services 100]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench::{close_with_reset, connect_times, header, listen, pin, quantile, row, run_in, Scratch};
use clap::{Parser, ValueEnum};
use firewall::{Fwmark, NsNetfilter, SboxConfig, SboxService, SboxState, TaskState};
use ipvs::{Client, Destination, Family, Forward, Service, ServiceKey};
use netns::Netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lb {
    Nftables,
    Ipvs,
}

#[derive(Parser)]
struct Args {
    /// Where the VIP is balanced: the client's namespace (nftables) or lb_ (ipvs, guest).
    #[arg(long, value_enum, default_value_t = Lb::Nftables)]
    lb: Lb,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// connect() times per path and round, for the p99.
    #[arg(long, default_value_t = 2000)]
    connects: usize,
    /// Seconds of back-to-back connections per path and round.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// VIPs in the client's map (the measured one included; nftables only).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=250))]
    services: u16,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 100);
const TASK: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
const PORT: u16 = 8080;

/// A veth from `ns` (`eth0` with `cidr`) to a port `port` of `br0` in `sb`.
fn attach(sb: &Netns, port: &str, ns: &Netns, cidr: &str) -> Result<()> {
    let path = ns.path().display().to_string();
    run_in(
        sb,
        &[
            "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &path,
        ],
    )?;
    run_in(sb, &["ip", "link", "set", port, "master", "br0", "up"])?;
    run_in(ns, &["ip", "addr", "add", cidr, "dev", "eth0"])?;
    run_in(ns, &["ip", "link", "set", "eth0", "up"])?;
    Ok(())
}

/// The client's table: VIP → the task, and `services - 1` more VIPs over other addresses.
fn client_table(services: u16) -> TaskState {
    let mut vips: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = (1..services)
        .map(|i| {
            let [_, lo] = i.to_be_bytes();
            (
                Ipv4Addr::new(10, 0, 10, lo),
                [Ipv4Addr::new(10, 0, 11, lo)].into(),
            )
        })
        .collect();
    vips.insert(VIP, [TASK].into());
    TaskState {
        ingress_ip: None,
        redirects: BTreeMap::new(),
        vips,
    }
}

/// Swarm's layout: `lb` on br0 with the lb address and the VIP, its table and IPVS.
fn ipvs_lb(scratch: &mut Scratch, sb: &Netns) -> Result<Netns> {
    let lb = scratch.ns("lb")?;
    attach(sb, "vl", &lb, "10.0.9.250/24")?;
    run_in(
        &lb,
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "eth0"],
    )?;
    for (key, value) in
        firewall::sbox_sysctls(proto::model::LbKind::Ipvs, &firewall::kernel_release())
    {
        lb.write_sysctl(&key, &value)?;
    }
    let mark = Fwmark::new(300)?;
    let mut table = SboxState::new(SboxConfig {
        ingress_iface: "eth0".into(),
        ingress_subnet: "10.0.9.0/24".parse()?,
        ingress_ip: Ipv4Addr::new(10, 0, 9, 250),
        lb: proto::model::LbKind::Ipvs,
    });
    table.services.insert(
        mark,
        SboxService {
            ports: BTreeSet::new(),
            backends: [TASK].into(),
            vip: Some(VIP),
        },
    );
    firewall::sync(&NsNetfilter::new(&lb), None, &table)?;
    let mut ipvs = lb.run(Client::new)??;
    let key = ServiceKey::Fwmark {
        family: Family::Ipv4,
        mark: mark.get(),
    };
    ipvs.add_service(&Service::new(key, "rr"))?;
    ipvs.add_destination(
        &key,
        &Destination::new(SocketAddr::from((TASK, 0)), Forward::Masq, 1),
    )?;
    Ok(lb)
}

/// Connections per second from `ns` to `to` over `seconds`, pinned to `cpu`.
fn conn_rate(ns: &Netns, to: SocketAddr, seconds: u64, cpu: usize) -> Result<f64> {
    ns.run(|| -> Result<f64> {
        pin(cpu);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(seconds);
        let mut n = 0u64;
        while Instant::now() < end {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .with_context(|| format!("connect to {to}"))?;
            close_with_reset(s);
            n += 1;
        }
        Ok(n as f64 / t0.elapsed().as_secs_f64())
    })?
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut scratch = Scratch::new("b9")?;
    let sb = scratch.ns("sb")?;
    let client = scratch.ns("c")?;
    let task = scratch.ns("t")?;
    run_in(&sb, &["ip", "link", "add", "br0", "type", "bridge"])?;
    run_in(&sb, &["ip", "link", "set", "br0", "up"])?;
    attach(&sb, "vc", &client, "10.0.9.10/24")?;
    attach(&sb, "vt", &task, &format!("{TASK}/24"))?;
    match args.lb {
        Lb::Nftables => firewall::sync(
            &NsNetfilter::new(&client),
            None,
            &client_table(args.services),
        )?,
        Lb::Ipvs => drop(ipvs_lb(&mut scratch, &sb)?),
    }
    listen(&task, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT), 1)?;
    let vip = SocketAddr::from((VIP, PORT));
    let direct = SocketAddr::from((TASK, PORT));
    // Warm up both paths (ARP, caches) before measuring.
    connect_times(&client, vip, 50, 0)?;
    connect_times(&client, direct, 50, 0)?;

    let (mut p99, mut rate) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which path goes first, so drift between the two halves cancels out.
        let order = if round % 2 == 0 {
            [vip, direct]
        } else {
            [direct, vip]
        };
        let mut got = BTreeMap::new();
        for to in order {
            let times = connect_times(&client, to, args.connects, 0)?;
            let per_sec = conn_rate(&client, to, args.seconds, 0)?;
            got.insert(to, (quantile(&times, 0.99), per_sec));
        }
        let (v, d) = (got[&vip], got[&direct]);
        eprintln!(
            "round {round}: p99 vip {:?} direct {:?}; conn/s vip {:.0} direct {:.0}",
            v.0, d.0, v.1, d.1
        );
        p99.push(v.0.as_secs_f64() / d.0.as_secs_f64());
        rate.push(v.1 / d.1);
    }
    let (title, map) = match args.lb {
        Lb::Nftables => (
            "B9 service VIP (nftables, in the client's namespace) vs direct",
            format!(", {} VIPs in the map", args.services),
        ),
        Lb::Ipvs => ("B9-ipvs service VIP (IPVS in lb_) vs direct", String::new()),
    };
    header(
        title,
        &format!(
            "{} rounds, {} connects, {} s{map}",
            args.rounds, args.connects, args.seconds
        ),
    );
    let name = match args.lb {
        Lb::Nftables => "B9",
        Lb::Ipvs => "B9-ipvs",
    };
    row(&format!("{name} p99 connect, vip ÷ direct"), &p99, "≤ 1.10");
    row(&format!("{name} conn/s, vip ÷ direct"), &rate, "≥ 0.90");
    drop(scratch);
    Ok(())
}
