//! B11 and B11b: what mutual TLS on the agent port costs.
//!
//! B11, agents joining at once: a real `mesh-manager` (the release binary beside this one) on
//! 127.0.0.1 with a fresh data dir and API socket; the worker token from its API socket; then
//! `--agents` simulated agents in one tokio runtime, all started at once, each as a real agent
//! does: fetch the CA and check it against the token, generate a key, join with a CSR over a
//! connection that verifies the manager, connect with the node certificate, Hello, and wait for
//! Welcome and the first Assign; then, until the round ends, read what the manager pushes and
//! send heartbeats, as a connected agent does. Measured: the time from the start until every
//! agent has its first assignment (goal ≤ 5 s for 100), each agent's time (p50, p99), and the
//! manager's CPU (utime + stime of /proc/<pid>/stat, from before the first agent starts until
//! the manager is idle after the last one got its assignment) per join. Then `node ls` must
//! show every agent ready. Several rounds, a fresh manager each; the data dir is under the
//! system's temp dir (its fsyncs are part of a join).
//!
//! Every agent has its own address, as real nodes do: 127.1.x.y, used both as the source of its
//! connections (`trust::join::{join_from, connect_from}`) and as its advertise address. The
//! manager admits at most 16 unauthenticated connections per peer address
//! (limits::MAX_PENDING_PER_PEER), so agents sharing one address would be turned away; `--one-source` runs them all from 127.0.0.1 through
//! `trust::join::{join, connect}` unchanged, retrying what the manager turns away, to show it.
//!
//! B11b, assignment push latency: in this process, a server with the manager's TLS
//! configuration (`trust::tls::server_config`, client certificates optional, as on the agent
//! port) and a client with a node certificate, and the same pair over plain TCP; both with
//! `proto::wire` framing. The server pushes a realistic `ManagerMsg::Assign` (20 tasks,
//! 5 networks of 50 peers, the ingress network, 10 published services) and the client, after
//! decoding it, answers `AgentMsg::Applied`; the server times each round trip. Rounds of
//! `--pushes` pushes alternate between TLS and plain (the order flips every round); the ratio
//! of the rounds' medians, TLS ÷ plain, has a goal of ≤ 1.2. Server on CPU1, client on CPU0.
//!
//! A ratio never fails the benchmark; only a failure to measure does.
//!
//! Usage (no root needed): b11_join [--agents 100] [--rounds 3] [--pushes 2000]
//! [--push-rounds 5] [--one-source]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::sim::{self, Manager, Tls};
use bench::{header, ms, pin, quantile, row, us};
use clap::Parser;
use proto::agent::{
    AgentMsg, Assignment, IngressSpec, ManagerMsg, NetworkSpec, Peer, PublishedService, TaskSpec,
};
use proto::api::{Request, Response};
use proto::model::{endpoint_mac, Attachment, NodeStatus, PortConfig, Protocol, PublishMode};
use proto::wire::{read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trust::tls::{certified_key, server_config, CertSlot, ClientAuth};
use trust::{Ca, CertRole, Credentials, JoinToken, KeyRequest, Subject};

#[derive(Parser)]
struct Args {
    /// Simulated agents joining at once (B11).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Rounds of B11, a fresh manager each.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pushes per round of B11b.
    #[arg(long, default_value_t = 2000)]
    pushes: usize,
    /// Rounds of each transport in B11b.
    #[arg(long, default_value_t = 5)]
    push_rounds: usize,
    /// B11 agents all from 127.0.0.1 through trust::join as it is (see the module doc).
    #[arg(long)]
    one_source: bool,
}

// ---------------------------------------------------------------------------------------------
// B11: one simulated agent.

/// A connected agent: its time to the first assignment, how often it was turned away and
/// retried, and the task that keeps it connected until the round ends.
struct Ready {
    took: Duration,
    retries: usize,
    session: tokio::task::JoinHandle<()>,
}

/// What an agent does once it has its assignment, as far as the manager can tell: reads every
/// later assignment (each join changes every node's ingress peers) and sends heartbeats. The
/// assignments are not decoded: that is each node's own CPU, not this machine's.
async fn stay_connected(mut rd: BufReader<ReadHalf<Tls>>, mut wr: WriteHalf<Tls>) {
    let mut buf = Vec::new();
    let mut beat = tokio::time::interval(Duration::from_secs(proto::agent::HEARTBEAT_SECS));
    loop {
        tokio::select! {
            got = read_frame(&mut rd, &mut buf, proto::MAX_FRAME_BYTES) => match got {
                Ok(true) => buf.clear(),
                _ => return,
            },
            _ = beat.tick() => {
                if write_frame(&mut wr, &AgentMsg::Heartbeat).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn agent(
    i: usize,
    to: SocketAddr,
    token: JoinToken,
    t0: Instant,
    one_source: bool,
) -> Result<Ready> {
    let local = sim::agent_addr(i);
    let hostname = format!("b11-agent{i:03}");
    let addr = to.to_string();
    let mut retries = 0;
    let stream = if one_source {
        // trust::join as it is, from 127.0.0.1; what the manager turns away is retried.
        let creds = loop {
            match trust::join::join(&addr, &token, &hostname, local).await {
                Ok((_, creds)) => break creds,
                Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(60) => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).context("join"),
            }
        };
        let config = creds.client_config()?;
        loop {
            match trust::join::connect(&addr, config.clone()).await {
                Ok(s) => break s,
                Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(60) => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).context("connect"),
            }
        }
    } else {
        sim::join(i, to, &token, &hostname).await?
    };
    let (rd, wr, _) = sim::hello(stream, hostname, local).await?;
    Ok(Ready {
        took: t0.elapsed(),
        retries,
        session: tokio::spawn(stay_connected(rd, wr)),
    })
}

struct JoinRound {
    total: Duration,
    per_agent: Vec<Duration>,
    cpu_per_join: Duration,
    /// Of which in the kernel (system time).
    sys_per_join: Duration,
    ready: usize,
    retries: usize,
}

fn join_round(args: &Args, round: usize) -> Result<JoinRound> {
    let m = Manager::start(&format!("b11-r{round}"), &[])?;
    let token = m.worker_token()?;
    let rt = tokio::runtime::Runtime::new()?;
    let cpu0 = m.cpu()?;
    let (ready, total) = rt
        .block_on(async {
            let t0 = Instant::now();
            let tasks: Vec<_> = (0..args.agents)
                .map(|i| tokio::spawn(agent(i, m.addr, token, t0, args.one_source)))
                .collect();
            let mut ready = Vec::new();
            for (i, t) in tasks.into_iter().enumerate() {
                ready.push(t.await?.with_context(|| format!("agent {i}"))?);
            }
            let total = t0.elapsed();
            anyhow::Ok((ready, total))
        })
        .with_context(|| format!("manager log:\n{}", m.log_tail()))?;
    // The joins' cost includes what follows the last Welcome: every join changes every node's
    // ingress peers, so the manager pushes new assignments to all. Count until it is idle
    // (the agents' heartbeats cost less).
    let cpu1 = m.settle()?;
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let nodes = match m.call(&Request::NodeLs)? {
        Response::Nodes { nodes } => nodes,
        other => bail!("node ls: unexpected answer {other:?}"),
    };
    let ready_nodes = nodes
        .iter()
        .filter(|n| n.node.status == NodeStatus::Ready)
        .count();
    let r = JoinRound {
        total,
        per_agent: ready.iter().map(|r| r.took).collect(),
        cpu_per_join: (user + sys) / args.agents as u32,
        sys_per_join: sys / args.agents as u32,
        ready: ready_nodes,
        retries: ready.iter().map(|r| r.retries).sum(),
    };
    for r in ready {
        r.session.abort();
    }
    drop(rt);
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// B11b: push latency, TLS vs plain.

fn id(kind: &str, n: usize) -> String {
    // Ids of the manager's length (25 base-36 digits).
    format!("{kind}{n:0>width$}", width = 25 - kind.len())
}

/// A node's assignment in a mid-sized cluster: 20 tasks of 10 services, 5 overlays with
/// 50 remote endpoints each, the ingress network with 50 more, 10 published services.
fn realistic_assignment() -> Assignment {
    let vtep = |j: usize| IpAddr::V4(Ipv4Addr::new(192, 168, 56, 11 + (j % 20) as u8));
    let network = |k: usize, name: String, base: [u8; 3]| NetworkSpec {
        id: id("net", k),
        name,
        subnet: format!("{}.{}.{}.0/24", base[0], base[1], base[2])
            .parse()
            .unwrap(),
        gateway: format!("{}.{}.{}.1/24", base[0], base[1], base[2])
            .parse()
            .unwrap(),
        vni: 4097 + k as u32,
        peers: (0..50)
            .map(|j| {
                let ip = Ipv4Addr::new(base[0], base[1], base[2], 10 + j as u8);
                Peer {
                    ip,
                    mac: endpoint_mac(ip),
                    vtep: vtep(j),
                }
            })
            .collect(),
        lb_addr: None,
        draining: vec![],
        services: vec![],
        encrypted: false,
    };
    let networks: Vec<NetworkSpec> = (0..5)
        .map(|k| network(k, format!("backend{k}"), [10, 0, k as u8]))
        .collect();
    let ingress = network(99, "ingress".into(), [10, 255, 0]);
    let tasks = (0..20)
        .map(|t| {
            let service = t % 10;
            let net = &networks[t % 5];
            let attach = |n: &NetworkSpec| {
                let [a, b, c, _] = n.subnet.network().octets();
                let ip = Ipv4Addr::new(a, b, c, 100 + t as u8);
                Attachment {
                    network_id: n.id.clone(),
                    addr: format!("{ip}/24").parse().unwrap(),
                    mac: endpoint_mac(ip),
                }
            };
            TaskSpec {
                id: id("task", t),
                name: format!("web{service}.{}.{}", t / 10 + 1, id("task", t)),
                service_id: id("svc", service),
                service_name: format!("web{service}"),
                command: vec![
                    "/usr/local/bin/hello-server".into(),
                    "--port".into(),
                    "8080".into(),
                ],
                attachments: vec![attach(net), attach(&ingress)],
                env: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            }
        })
        .collect();
    let published = (0..10)
        .map(|s| PublishedService {
            service_id: id("svc", s),
            service_name: format!("web{s}"),
            fwmark: 256 + s as u32,
            ports: vec![
                PortConfig {
                    protocol: Protocol::Tcp,
                    published: 8000 + s as u16,
                    target: 8080,
                    mode: PublishMode::Ingress,
                },
                PortConfig {
                    protocol: Protocol::Udp,
                    published: 9000 + s as u16,
                    target: 53,
                    mode: PublishMode::Ingress,
                },
            ],
            backends: (0..20)
                .map(|b| Ipv4Addr::new(10, 255, 1 + s as u8, 10 + b))
                .collect(),
            vip: None,
        })
        .collect();
    Assignment {
        revision: 1,
        networks,
        tasks,
        ingress: Some(Box::new(IngressSpec {
            network: ingress,
            sbox_addr: "10.255.0.2/16".parse().unwrap(),
        })),
        published,
        encryption: None,
    }
}

/// The agent's side: decode each assignment, answer Applied, until the server closes.
async fn answer_pushes<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Result<()> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if !read_frame(&mut rd, &mut buf, proto::MAX_FRAME_BYTES).await? {
            return Ok(());
        }
        match proto::decode_frame::<ManagerMsg>(&buf)? {
            ManagerMsg::Assign(a) => {
                write_frame(
                    &mut wr,
                    &AgentMsg::Applied {
                        revision: a.revision,
                    },
                )
                .await?
            }
            other => bail!("expected an assignment, got {}", sim::kind(&other)),
        }
    }
}

/// The manager's side of one connection.
struct Pusher<S> {
    rd: BufReader<ReadHalf<S>>,
    wr: WriteHalf<S>,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pusher<S> {
    fn new(stream: S) -> Pusher<S> {
        let (rd, wr) = tokio::io::split(stream);
        Pusher {
            rd: BufReader::new(rd),
            wr,
            buf: Vec::new(),
        }
    }

    /// `n` pushes of `a` (revision bumped each time): the time from sending each to the
    /// agent's Applied for it.
    async fn push(&mut self, a: &mut Assignment, n: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            a.revision += 1;
            let msg = ManagerMsg::Assign(std::sync::Arc::new(a.clone()));
            let t0 = Instant::now();
            write_frame(&mut self.wr, &msg).await?;
            self.buf.clear();
            if !read_frame(&mut self.rd, &mut self.buf, proto::AGENT_FRAME_BYTES).await? {
                bail!("the agent closed the connection");
            }
            let answer = proto::decode_frame::<AgentMsg>(&self.buf)?;
            out.push(t0.elapsed());
            if answer
                != (AgentMsg::Applied {
                    revision: a.revision,
                })
            {
                bail!("expected applied {}, got {answer:?}", a.revision);
            }
        }
        Ok(out)
    }
}

struct PushResult {
    tls: Vec<Vec<Duration>>,
    plain: Vec<Vec<Duration>>,
    frame_bytes: usize,
}

fn push_bench(args: &Args) -> Result<PushResult> {
    // The cluster's PKI as the manager makes it.
    let ca = Ca::generate("b11b")?;
    let (cert, key) = ca.issue(
        &Subject {
            common_name: trust::pki::MANAGER_SERVER_NAME.into(),
            role: CertRole::Manager,
            cluster_id: "b11b".into(),
        },
        &["127.0.0.1".into()],
        trust::pki::DEFAULT_CERT_EXPIRY,
    )?;
    let server_tls = server_config(
        ca.cert_pem(),
        CertSlot::new(certified_key(&cert, &key)?),
        ClientAuth::Optional,
    )?;
    let req = KeyRequest::generate()?;
    let node = Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: ca.sign_request(
            &req.csr_pem,
            &Subject {
                common_name: "node1".into(),
                role: CertRole::Worker,
                cluster_id: "b11b".into(),
            },
            trust::pki::DEFAULT_CERT_EXPIRY,
        )?,
        key_pem: req.key_pem,
    };
    let client_tls = node.client_config()?;

    let tls_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let plain_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let (tls_addr, plain_addr) = (tls_listener.local_addr()?, plain_listener.local_addr()?);
    let client = std::thread::spawn(move || -> Result<()> {
        pin(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let tcp = TcpStream::connect(tls_addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(client_tls)
                .connect(trust::tls::manager_name(), tcp)
                .await?;
            let plain = TcpStream::connect(plain_addr).await?;
            plain.set_nodelay(true)?;
            let (a, b) = tokio::join!(answer_pushes(tls), answer_pushes(plain));
            a.and(b)
        })
    });

    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let tls_listener = TcpListener::from_std({
            tls_listener.set_nonblocking(true)?;
            tls_listener
        })?;
        let plain_listener = TcpListener::from_std({
            plain_listener.set_nonblocking(true)?;
            plain_listener
        })?;
        let (tcp, _) = tls_listener.accept().await?;
        tcp.set_nodelay(true)?;
        let tls = TlsAcceptor::from(server_tls).accept(tcp).await?;
        if trust::tls::peer_identity(tls.get_ref().1).is_none() {
            bail!("the client presented no certificate");
        }
        let (plain, _) = plain_listener.accept().await?;
        plain.set_nodelay(true)?;
        let mut tls = Pusher::new(tls);
        let mut plain = Pusher::new(plain);
        let mut a = realistic_assignment();
        let frame_bytes =
            proto::encode_frame(&ManagerMsg::Assign(std::sync::Arc::new(a.clone()))).len();
        // Warm both paths (allocations, TCP windows, TLS session keys).
        tls.push(&mut a, 100).await?;
        plain.push(&mut a, 100).await?;
        let mut r = PushResult {
            tls: Vec::new(),
            plain: Vec::new(),
            frame_bytes,
        };
        for round in 0..args.push_rounds {
            if round % 2 == 0 {
                r.tls.push(tls.push(&mut a, args.pushes).await?);
                r.plain.push(plain.push(&mut a, args.pushes).await?);
            } else {
                r.plain.push(plain.push(&mut a, args.pushes).await?);
                r.tls.push(tls.push(&mut a, args.pushes).await?);
            }
            println!(
                "B11b round {}: push round trip median mTLS {:.0} µs, plain {:.0} µs",
                round + 1,
                us(quantile(&r.tls[round], 0.5)),
                us(quantile(&r.plain[round], 0.5))
            );
        }
        // A clean close (TLS close_notify) ends the client's loops.
        tls.wr.shutdown().await?;
        plain.wr.shutdown().await?;
        anyhow::Ok(r)
    });
    // Closing the connections ends the client.
    drop(rt);
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the push client panicked"))??;
    result
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let r = join_round(&args, round)?;
        println!(
            "B11 round {}: {} agents ready in {:.2} s (per agent p50 {:.0} ms, p99 {:.0} ms), \
             manager CPU {:.2} ms per join ({:.2} ms system), node ls: {} ready{}",
            round + 1,
            args.agents,
            r.total.as_secs_f64(),
            ms(quantile(&r.per_agent, 0.5)),
            ms(quantile(&r.per_agent, 0.99)),
            ms(r.cpu_per_join),
            ms(r.sys_per_join),
            r.ready,
            if args.one_source {
                format!(", {} connections turned away and retried", r.retries)
            } else {
                String::new()
            }
        );
        if r.ready != args.agents {
            bail!("node ls shows {} ready nodes, not {}", r.ready, args.agents);
        }
        rounds.push(r);
    }
    let push = push_bench(&args)?;

    let med = |v: &[Duration]| us(quantile(v, 0.5));
    let ratios: Vec<f64> = push
        .tls
        .iter()
        .zip(&push.plain)
        .map(|(t, p)| med(t) / med(p))
        .collect();
    header(
        "B11 agents joining at once, B11b assignment push over mutual TLS vs plain TCP",
        &format!(
            "B11: {} agents in one process{}, real mesh-manager (release) on 127.0.0.1, {} rounds, \
             a fresh manager each; B11b: {}-byte assignment, {} pushes x {} rounds per transport, \
             alternating, server CPU1, client CPU0",
            args.agents,
            if args.one_source {
                " from 127.0.0.1 (trust::join as is)"
            } else {
                " from 127.1.x.y each"
            },
            args.rounds,
            push.frame_bytes,
            args.pushes,
            args.push_rounds
        ),
    );
    row(
        "R11b assignment push latency, mTLS / plain",
        &ratios,
        "<= 1.2",
    );
    println!("\n| absolute | median over rounds | IQR | goal |");
    println!("|---|---|---|---|");
    let each = |f: &dyn Fn(&JoinRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    row(
        &format!(
            "B11 {} agents joining at once, until all have an assignment (s)",
            args.agents
        ),
        &each(&|r| r.total.as_secs_f64()),
        "<= 5 s",
    );
    row(
        "B11 time to first assignment per agent, p50 (ms)",
        &each(&|r| ms(quantile(&r.per_agent, 0.5))),
        "(info)",
    );
    row(
        "B11 time to first assignment per agent, p99 (ms)",
        &each(&|r| ms(quantile(&r.per_agent, 0.99))),
        "(info)",
    );
    row(
        "B11 manager CPU per join (ms)",
        &each(&|r| ms(r.cpu_per_join)),
        "(report)",
    );
    let per_round =
        |v: &[Vec<Duration>], p: f64| v.iter().map(|r| us(quantile(r, p))).collect::<Vec<f64>>();
    row(
        "B11b push round trip, mTLS, median (µs)",
        &per_round(&push.tls, 0.5),
        "(info)",
    );
    row(
        "B11b push round trip, plain, median (µs)",
        &per_round(&push.plain, 0.5),
        "(info)",
    );
    row(
        "B11b push round trip, mTLS, p99 (µs)",
        &per_round(&push.tls, 0.99),
        "(info)",
    );
    row(
        "B11b push round trip, plain, p99 (µs)",
        &per_round(&push.plain, 0.99),
        "(info)",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_assignment_is_the_size_described() {
        let a = super::realistic_assignment();
        assert_eq!(a.tasks.len(), 20);
        assert_eq!(a.networks.len(), 5);
        assert!(a.networks.iter().all(|n| n.peers.len() == 50));
        assert_eq!(a.published.len(), 10);
    }
}
