//! B2, load-balancer datapath cost (../shared/reference/performance-anchors.md §3): what the
//! routing mesh costs a client, next to the cheapest forwarding through the same node and to
//! Swarm's own rule set built by hand in the same lab.
//!
//! A 3-node lab running mesh-manager and mesh-agent (`--lb nftables` by default), a client host
//! on the underlay (192.168.56.100), and a service of one hello-server task pinned to node3 by
//! constraint, published as 80:8080. Four paths from the same client, all ending in the same
//! hello-server binary on node3 (direct and floor in the same process, swarm and meshnet each
//! in its own task's), measured in turn in each round (the order rotates per round):
//! - direct: a second hello-server in node3's own namespace on its underlay address, port 8081.
//!   Neither NAT nor overlay: the client's veth, the underlay bridge, node3's veth.
//! - floor: node1:8090, one DNAT in node1 straight to node3:8081 and an SNAT to node1's address
//!   so that replies come back through node1 (table `ip b2floor` in node1's namespace). The
//!   least any path through node1 can cost: node1's forwarding and one NATed conntrack entry,
//!   no overlay.
//! - swarm: node1:8091 through Swarm's ingress rule set (../shared/reference/swarm-dataplane.md
//!   §3), built by hand beside meshnet's with objects of its own: node1's DNAT to a sandbox
//!   namespace (`b2sbox`) over a bridge of its own (`b2gwbr`, 172.30.0.0/24, standing for
//!   docker_gwbridge), the fwmark, the load balancer's DNAT and the SNAT in the sandbox, an
//!   overlay of its own (VNI 4000, 10.254.9.0/24, MTU 1450: br0 + VXLAN with static neighbour
//!   and FDB entries, sandbox namespaces `b2ov1` and `b2ov3`) to a task namespace on node3
//!   (`b2task`, 10.254.9.10) whose REDIRECT sends 8091 to its own hello-server on 8080. With
//!   `--lb nftables` (host kernel, no IPVS) the rules are those of
//!   ../shared/reference/ingress-path-nftables.sh (which sets the fwmark in its NAT chain, so
//!   on a connection's first packet only); with `--lb ipvs` (guest kernel) they are iptables
//!   (iptables-nft) and an IPVS FWM service, rr, masq, as swarm-dataplane.md §3 lists them,
//!   the filter rules and sysctls included (the mangle rule marks every packet).
//! - meshnet: node1:80, a node WITHOUT a local task: node1's DNAT to ingress_sbox, fwmark, the
//!   LB's DNAT and SNAT, the ingress overlay (VXLAN) to node3, the task's redirect.
//!
//! The swarm and meshnet paths cross the same kinds of objects; the floor is what is left when
//! the overlay and the sandbox go. Everything hand-built lives in node1's or node3's namespace
//! or in namespaces bound under the lab's own directory, so the lab's teardown removes it
//! whatever happens. The rules hand-built in node1 see the other paths' packets too (their NAT
//! chains only a connection's first packet; with `--lb ipvs`, Swarm's iptables filter chains
//! every packet node1 forwards, meshnet's and the floor's included), as meshnet's node1 table
//! sees theirs.
//!
//! All servers are pinned to CPU1 with `taskset -a`. Keep-alive req/s (RR): wrk on the client,
//! pinned to CPU0. New connection per request (CRR, conn/s): a Rust loop on the client
//! (threads pinned to CPU0) that connects, sends one GET, reads the whole answer and closes
//! first, so TIME_WAIT stays on the client, which reuses such ports (`tcp_tw_reuse=1`, port
//! range 1024-65535 in the client's own namespace). With wrk and `Connection: close` the
//! servers closed first and kept a TIME_WAIT per connection: after a few rounds the client's
//! ports came back onto them and conn/s collapsed on every path.
//!
//! Ratios per round, median and IQR over rounds: meshnet ÷ floor (goal ≥ 0.85 for conn/s and
//! keep-alive req/s), meshnet ÷ swarm (goal ≥ 1.0), floor ÷ direct (what node1's forwarding
//! costs, for information), and R2 = meshnet ÷ direct (goals on nftables: CRR ≥ 0.85,
//! RR ≥ 0.95; on IPVS: CRR ≥ 0.80). A ratio never fails the benchmark; only a failure to
//! measure does.
//!
//! Usage (root): b2_datapath [--lb nftables|ipvs] [--rounds 5] [--seconds 2] [--connections 4]
//!   [--crr-threads 2]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{header, mesh_and_direct, nft_text, pin, quartiles, row, run_in};
use clap::Parser;
use integration::cluster::{bin, Cluster};
use integration::lab::CLIENT;
use netns::Netns;

#[derive(Parser)]
struct Args {
    /// Load balancer behind the mesh and Swarm's rules: nftables (host kernel) or ipvs (guest
    /// kernel).
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

/// The four paths by name and address, in the order of the `[f64; 4]` figures below.
const PATHS: [(&str, &str); 4] = [
    ("direct", "192.168.56.13:8081"),
    ("floor", "192.168.56.11:8090"),
    ("swarm", "192.168.56.11:8091"),
    ("meshnet", "192.168.56.11:80"),
];
const DIRECT: usize = 0;
const FLOOR: usize = 1;
const SWARM: usize = 2;
const MESH: usize = 3;

/// The floor: one DNAT to node3's direct server, and the SNAT that brings replies back through
/// node1 (`ct status dnat`: only what the DNAT made).
const FLOOR_NODE1: &str = r#"table ip b2floor {
  chain pre {
    type nat hook prerouting priority -100; policy accept;
    ip daddr 192.168.56.11 tcp dport 8090 dnat to 192.168.56.13:8081
  }
  chain post {
    type nat hook postrouting priority 100; policy accept;
    ip daddr 192.168.56.13 tcp dport 8081 ct status dnat snat to 192.168.56.11
  }
}
"#;

/// Addresses of the hand-built Swarm path (names as in swarm-dataplane.md §3).
const SWARM_GW_CIDR: &str = "172.30.0.1/24";
const SWARM_SBOX_GW_IP: &str = "172.30.0.2";
const SWARM_OVERLAY_GW_CIDR: &str = "10.254.9.1/24";
const SWARM_SBOX_IP: &str = "10.254.9.2";
const SWARM_SBOX_MAC: &str = "02:42:0a:fe:09:02";
const SWARM_TASK_IP: &str = "10.254.9.10";
const SWARM_TASK_MAC: &str = "02:42:0a:fe:09:0a";
/// Under the 4096 meshnet's manager starts its VNIs at, so never one of meshnet's.
const SWARM_VNI: u32 = 4000;
/// The lab's underlay MTU (1500) − 50, as Swarm's default.
const SWARM_MTU: u32 = 1450;

/// Swarm's rules with nftables, as in ingress-path-nftables.sh: node1, sandbox, task.
const SWARM_NFT_NODE1: &str = r#"table ip b2swarm {
  chain pre {
    type nat hook prerouting priority -100; policy accept;
    fib daddr type local tcp dport 8091 dnat to 172.30.0.2:8091
  }
}
"#;
const SWARM_NFT_SBOX: &str = r#"table ip b2swarm {
  chain pre {
    type nat hook prerouting priority -100; policy accept;
    tcp dport 8091 meta mark set 0x100 dnat to numgen inc mod 1 map { 0 : 10.254.9.10 }
  }
  chain post {
    type nat hook postrouting priority 100; policy accept;
    ip daddr 10.254.9.0/24 oifname "eth0" snat to 10.254.9.2
  }
}
"#;
const SWARM_NFT_TASK: &str = r#"table ip b2swarm {
  chain pre {
    type nat hook prerouting priority -100; policy accept;
    tcp dport 8091 redirect to :8080
  }
}
"#;

/// Swarm's rules with iptables and IPVS, as swarm-dataplane.md §3 lists them (port 8091,
/// fwmark 256, the ingress VIP 10.254.9.100 alias on the sandbox's eth0).
const SWARM_IPT_NODE1: &[&str] = &[
    "iptables -t nat -N DOCKER-INGRESS",
    "iptables -t nat -A DOCKER-INGRESS -j RETURN",
    "iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER-INGRESS",
    "iptables -t nat -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER-INGRESS",
    "iptables -N DOCKER-FORWARD",
    "iptables -A FORWARD -j DOCKER-FORWARD",
    "iptables -N DOCKER-INGRESS",
    "iptables -A DOCKER-INGRESS -j RETURN",
    "iptables -A DOCKER-FORWARD -j DOCKER-INGRESS",
    "iptables -t nat -A POSTROUTING -m addrtype --src-type LOCAL -o b2gwbr -j MASQUERADE",
    "iptables -t nat -I DOCKER-INGRESS -p tcp --dport 8091 -j DNAT --to-destination 172.30.0.2:8091",
    "iptables -I DOCKER-INGRESS -p tcp --sport 8091 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "iptables -I DOCKER-INGRESS -p tcp --dport 8091 -j ACCEPT",
];
const SWARM_IPT_SBOX: &[&str] = &[
    "ip addr add 10.254.9.100/32 dev eth0",
    "iptables -t mangle -A PREROUTING -p tcp --dport 8091 -j MARK --set-mark 256",
    "iptables -t mangle -A INPUT -d 10.254.9.100/32 -j MARK --set-mark 256",
    "iptables -t nat -A POSTROUTING -m ipvs --ipvs -d 10.254.9.0/24 -j SNAT --to-source 10.254.9.2",
    "ipvsadm -A -f 256 -s rr",
    "ipvsadm -a -f 256 -r 10.254.9.10:0 -m -w 1",
];
const SWARM_IPVS_SYSCTLS: [(&str, &str); 4] = [
    ("net.ipv4.vs.conn_reuse_mode", "0"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.vs.conntrack", "1"),
];
const SWARM_IPT_TASK: &[&str] = &[
    "iptables -t nat -A PREROUTING -d 10.254.9.10 -p tcp --dport 8091 -j REDIRECT --to-port 8080",
    "iptables -I INPUT -d 10.254.9.10 -p tcp --dport 8080 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT",
    "iptables -I OUTPUT -s 10.254.9.10 -p tcp --sport 8080 -m conntrack --ctstate ESTABLISHED -j ACCEPT",
    "iptables -A INPUT -d 10.254.9.10 -p tcp -j DROP",
    "iptables -A INPUT -d 10.254.9.10 -p udp -j DROP",
    "iptables -A INPUT -d 10.254.9.10 -p sctp -j DROP",
    "iptables -A OUTPUT -s 10.254.9.10 -p tcp -j DROP",
    "iptables -A OUTPUT -s 10.254.9.10 -p udp -j DROP",
    "iptables -A OUTPUT -s 10.254.9.10 -p sctp -j DROP",
];

/// Runs one command line (no argument holds a space) in `ns`.
fn sh(ns: &Netns, line: &str) -> Result<()> {
    run_in(ns, &line.split_whitespace().collect::<Vec<_>>())?;
    Ok(())
}

/// Builds Swarm's ingress path for port 8091 from node1 to a task on node3 (see the module
/// comment) and starts the task's hello-server; returns its pid.
fn swarm_path(c: &Cluster, ipvs: bool) -> Result<u32> {
    let dir = c.lab.root().join("netns");
    let n1 = &c.lab.node("node1")?.ns;
    let n3 = &c.lab.node("node3")?.ns;
    let [ov1, sbox, ov3, task] =
        ["b2ov1", "b2sbox", "b2ov3", "b2task"].map(|name| Netns::create(&dir, name));
    let (ov1, sbox, ov3, task) = (ov1?, sbox?, ov3?, task?);
    // The sandbox's leg on node1's gateway bridge, its default route back through node1.
    sh(n1, "ip link add b2gwbr type bridge")?;
    sh(n1, &format!("ip addr add {SWARM_GW_CIDR} dev b2gwbr"))?;
    sh(n1, "ip link set b2gwbr up")?;
    sh(
        n1,
        &format!(
            "ip link add b2gw type veth peer name eth1 netns {}",
            sbox.path().display()
        ),
    )?;
    sh(n1, "ip link set b2gw master b2gwbr up")?;
    sh(
        &sbox,
        &format!("ip addr add {SWARM_SBOX_GW_IP}/24 dev eth1"),
    )?;
    sh(&sbox, "ip link set eth1 up")?;
    sh(&sbox, "ip route add default via 172.30.0.1")?;
    sbox.write_sysctl("net.ipv4.ip_forward", "1")?;
    // The overlay on both nodes: the VXLAN device is made in the node's namespace so that its
    // UDP socket stays on the underlay, then moved into the overlay's namespace.
    for (node, ov, peer_ip, peer_mac, vtep) in [
        (n1, &ov1, SWARM_TASK_IP, SWARM_TASK_MAC, "192.168.56.13"),
        (n3, &ov3, SWARM_SBOX_IP, SWARM_SBOX_MAC, "192.168.56.11"),
    ] {
        sh(ov, "ip link add br0 type bridge")?;
        sh(ov, &format!("ip addr add {SWARM_OVERLAY_GW_CIDR} dev br0"))?;
        sh(ov, &format!("ip link set br0 mtu {SWARM_MTU} up"))?;
        sh(
            node,
            &format!("ip link add b2vx type vxlan id {SWARM_VNI} dstport 4789 nolearning proxy"),
        )?;
        sh(
            node,
            &format!("ip link set b2vx netns {}", ov.path().display()),
        )?;
        sh(
            ov,
            &format!("ip link set b2vx master br0 mtu {SWARM_MTU} up"),
        )?;
        sh(
            ov,
            &format!("ip neigh add {peer_ip} lladdr {peer_mac} dev b2vx nud permanent"),
        )?;
        sh(
            ov,
            &format!("bridge fdb add {peer_mac} dev b2vx dst {vtep} self permanent"),
        )?;
    }
    for (ov, end, ip, mac) in [
        (&ov1, &sbox, SWARM_SBOX_IP, SWARM_SBOX_MAC),
        (&ov3, &task, SWARM_TASK_IP, SWARM_TASK_MAC),
    ] {
        sh(
            ov,
            &format!(
                "ip link add ep type veth peer name eth0 netns {}",
                end.path().display()
            ),
        )?;
        sh(ov, &format!("ip link set ep master br0 mtu {SWARM_MTU} up"))?;
        sh(
            end,
            &format!("ip link set eth0 address {mac} mtu {SWARM_MTU} up"),
        )?;
        sh(end, &format!("ip addr add {ip}/24 dev eth0"))?;
    }
    if ipvs {
        for (ns, lines) in [
            (n1, SWARM_IPT_NODE1),
            (&sbox, SWARM_IPT_SBOX),
            (&task, SWARM_IPT_TASK),
        ] {
            for l in lines {
                sh(ns, l)?;
            }
        }
        sbox.write_sysctls(&SWARM_IPVS_SYSCTLS)?;
    } else {
        nft_text(n1, SWARM_NFT_NODE1)?;
        nft_text(&sbox, SWARM_NFT_SBOX)?;
        nft_text(&task, SWARM_NFT_TASK)?;
    }
    // Marked as the lab's, and in a namespace under its directory: the teardown kills it.
    let mut hello = c.lab.command(bin("hello-server"));
    hello.args(["--port", "8080"]);
    Ok(task.spawn(&mut hello)?.id())
}

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
    let ipvs = args.lb == "ipvs";
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
    nft_text(&c.lab.node("node1")?.ns, FLOOR_NODE1).context("build the floor path")?;
    pin_to_cpu1(swarm_path(&c, ipvs).context("build Swarm's path")?)?;
    for (name, addr) in [PATHS[FLOOR], PATHS[SWARM]] {
        let url = format!("http://{addr}/");
        c.wait_for(Duration::from_secs(30), &url, |c| {
            let out = c
                .lab
                .exec(CLIENT, &["curl", "-s", "--max-time", "3", &url])
                .ok()?;
            out.status.success().then_some(())
        })
        .with_context(|| format!("the {name} path answers"))?;
    }

    // Per round, per path, in the order of PATHS.
    let (mut rr_rounds, mut crr_rounds): (Vec<[f64; 4]>, Vec<[f64; 4]>) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let (mut rr_now, mut crr_now) = ([0.0; 4], [0.0; 4]);
        // Rotate which path goes first.
        for k in 0..PATHS.len() {
            let p = (k + round) % PATHS.len();
            let (_, addr) = PATHS[p];
            rr_now[p] = wrk(&c, &args, &format!("http://{addr}/"))?;
            let (rate, failed) = crr(&client, addr, args.seconds, args.crr_threads)?;
            if failed > 0 {
                eprintln!("{addr}: {failed} new-connection requests failed");
            }
            crr_now[p] = rate;
        }
        let figures = |v: &[f64; 4]| {
            PATHS
                .iter()
                .zip(v)
                .map(|((name, _), x)| format!("{name} {x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "round {}: keep-alive req/s {}; new-connection conn/s {}",
            round + 1,
            figures(&rr_now),
            figures(&crr_now)
        );
        rr_rounds.push(rr_now);
        crr_rounds.push(crr_now);
    }
    let swarm_rules = if ipvs {
        "iptables-nft + IPVS"
    } else {
        "nftables"
    };
    header(
        &format!(
            "B2 routing-mesh datapath ({}), node1 without a local task vs the floor, Swarm's rules ({swarm_rules}) and direct",
            args.lb
        ),
        &format!(
            "{} rounds interleaved, {} s per run, RR: wrk -t1 -c{}, CRR: {} client threads; client CPU0, servers CPU1",
            args.rounds, args.seconds, args.connections, args.crr_threads
        ),
    );
    let ratio = |v: &[[f64; 4]], a: usize, b: usize| -> Vec<f64> {
        v.iter().map(|r| r[a] / r[b]).collect()
    };
    let (r2_rr_goal, r2_crr_goal) = if ipvs {
        ("(info)", ">= 0.80")
    } else {
        (">= 0.95", ">= 0.85")
    };
    row(
        "CRR conn/s, meshnet / floor",
        &ratio(&crr_rounds, MESH, FLOOR),
        ">= 0.85",
    );
    row(
        "RR keep-alive req/s, meshnet / floor",
        &ratio(&rr_rounds, MESH, FLOOR),
        ">= 0.85",
    );
    row(
        "CRR conn/s, meshnet / Swarm's rules",
        &ratio(&crr_rounds, MESH, SWARM),
        ">= 1.0",
    );
    row(
        "RR keep-alive req/s, meshnet / Swarm's rules",
        &ratio(&rr_rounds, MESH, SWARM),
        ">= 1.0",
    );
    row(
        "CRR conn/s, floor / direct",
        &ratio(&crr_rounds, FLOOR, DIRECT),
        "(info)",
    );
    row(
        "RR keep-alive req/s, floor / direct",
        &ratio(&rr_rounds, FLOOR, DIRECT),
        "(info)",
    );
    row(
        "R2-CRR conn/s, meshnet / direct",
        &ratio(&crr_rounds, MESH, DIRECT),
        r2_crr_goal,
    );
    row(
        "R2-RR keep-alive req/s, meshnet / direct",
        &ratio(&rr_rounds, MESH, DIRECT),
        r2_rr_goal,
    );
    let medians = |v: &[[f64; 4]]| {
        PATHS
            .iter()
            .enumerate()
            .map(|(p, (name, _))| {
                let x: Vec<f64> = v.iter().map(|r| r[p]).collect();
                format!("{name} {:.0}", quartiles(&x).1)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "(absolute medians: conn/s {}; keep-alive req/s {})",
        medians(&crr_rounds),
        medians(&rr_rounds)
    );
    Ok(())
}
