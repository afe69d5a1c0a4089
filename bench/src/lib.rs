//! Shared pieces of meshnet's benchmarks (../shared/reference/performance-anchors.md §3):
//! statistics over interleaved rounds, the result table, throwaway namespaces joined by veth
//! pairs, CPU pinning, a TCP listener and connect loops.

use std::io::Write as _;
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netns::Netns;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

pub mod sim;

/// First quartile, median and third quartile.
pub fn quartiles(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

/// The `p`-quantile (0..=1) of durations, nearest rank.
pub fn quantile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    let rank = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

/// Prints the title line: benchmark, UTC date, kernel, notes.
pub fn title(title: &str, notes: &str) {
    println!(
        "\n{title}, {}, kernel {}, {notes}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        command_line("uname", &["-r"])
    );
}

/// Prints the title line and the ratio table's header.
pub fn header(name: &str, notes: &str) {
    title(name, notes);
    println!("| ratio | median | IQR | goal |");
    println!("|---|---|---|---|");
}

/// One table row: median and interquartile range of per-round ratios, next to the goal.
pub fn row(name: &str, ratios: &[f64], goal: &str) {
    let (q1, med, q3) = quartiles(ratios);
    println!("| {name} | {med:.3} | {q1:.3}-{q3:.3} | {goal} |");
}

/// Pins the calling thread to one CPU (best effort: a machine with fewer CPUs is not an error).
pub fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Throwaway namespaces under a unique directory in /run, deleted on drop (also on panic).
pub struct Scratch {
    dir: PathBuf,
    made: Vec<PathBuf>,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch> {
        let dir = PathBuf::from(format!("/run/meshnet-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Scratch {
            dir,
            made: Vec::new(),
        })
    }

    /// A new empty namespace (loopback up).
    pub fn ns(&mut self, name: &str) -> Result<Netns> {
        let ns = Netns::create(&self.dir, name)?;
        self.made.push(ns.path().to_path_buf());
        Ok(ns)
    }

    /// Deletes one namespace made here now (its processes must be gone).
    pub fn remove(&mut self, ns: Netns) -> Result<()> {
        let path = ns.path().to_path_buf();
        drop(ns);
        self.made.retain(|p| *p != path);
        netns::delete(&path)?;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in self.made.drain(..) {
            if let Err(e) = netns::delete(&p) {
                eprintln!("warning: {e}");
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs a command inside `ns`; fails with its stderr on a non-zero exit.
pub fn run_in(ns: &Netns, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]).stdin(Stdio::null());
    let out = ns.output(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` in {}: {}",
            args.join(" "),
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A veth pair: `a_if` in `a` with address `a_cidr`, `b_if` in `b` with `b_cidr`, both up.
/// A client, an ingress_sbox stand-in and a backend in a row: client 192.168.77.1 →
/// sbox 192.168.77.2 (`up0`), sbox eth0 10.255.255.254/8 (the ingress leg and SNAT source
/// `firewall::synthetic_sbox` expects) → backend at `backend`/8, forwarding on in the sbox.
pub struct SboxPath {
    pub client: Netns,
    pub sbox: Netns,
    pub backend: Netns,
}

impl SboxPath {
    /// The client side of the sbox, where published ports are reached.
    pub const SBOX_IP: &'static str = "192.168.77.2";

    pub fn build(scratch: &mut Scratch, tag: &str, backend: &str) -> Result<SboxPath> {
        let client = scratch.ns(&format!("c{tag}"))?;
        let sbox = scratch.ns(&format!("s{tag}"))?;
        let backend_ns = scratch.ns(&format!("b{tag}"))?;
        veth(
            &client,
            "eth0",
            "192.168.77.1/24",
            &sbox,
            "up0",
            "192.168.77.2/24",
        )?;
        veth(
            &sbox,
            "eth0",
            "10.255.255.254/8",
            &backend_ns,
            "eth0",
            &format!("{backend}/8"),
        )?;
        sbox.write_sysctl("net.ipv4.ip_forward", "1")?;
        Ok(SboxPath {
            client,
            sbox,
            backend: backend_ns,
        })
    }
}

pub fn veth(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: &str,
) -> Result<()> {
    let b_path = b.path().display().to_string();
    run_in(
        a,
        &[
            "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b_path,
        ],
    )?;
    for (ns, ifname, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        run_in(ns, &["ip", "addr", "add", cidr, "dev", ifname])?;
        run_in(ns, &["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A TCP listener in `ns` on `addr` whose thread (pinned to `cpu`) accepts and closes
/// connections until the process ends. Its accept queue is long (4096, std's is 128), so a
/// moment without CPU for that thread does not drop SYNs (a 1 s retransmit for the client).
pub fn listen(ns: &Netns, addr: SocketAddrV4, cpu: usize) -> Result<()> {
    let listener = ns.run(|| -> Result<TcpListener> {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))
            .with_context(|| format!("bind {addr}"))?;
        socket::listen(&fd, socket::Backlog::new(4096)?)?;
        Ok(TcpListener::from(fd))
    })??;
    std::thread::spawn(move || {
        pin(cpu);
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    Ok(())
}

/// Closes with a reset, so the client keeps no TIME_WAIT socket and its ports never run out.
pub fn close_with_reset(stream: TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = socket::setsockopt(&stream, sockopt::Linger, &linger);
}

/// `n` connect() times from a thread in `ns` pinned to `cpu`; each connection is reset at once.
pub fn connect_times(ns: &Netns, to: SocketAddr, n: usize, cpu: usize) -> Result<Vec<Duration>> {
    ns.run(|| -> Result<Vec<Duration>> {
        pin(cpu);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .with_context(|| format!("connect to {to}"))?;
            out.push(t0.elapsed());
            close_with_reset(s);
        }
        Ok(out)
    })?
}

/// A blocking TCP connection from a fixed local address (`SO_REUSEADDR`, so a port whose last
/// connection was just closed is taken again), giving up after `timeout`.
pub fn connect_from(from: SocketAddrV4, to: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    // A blocking connect() gives up after the send timeout.
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(from))
        .with_context(|| format!("bind {from}"))?;
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .with_context(|| format!("connect {from} -> {to}"))?;
    Ok(TcpStream::from(fd))
}

/// Applies an nft script with `nft -f -` inside `ns`.
pub fn nft_text(ns: &Netns, text: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ns.spawn(&mut cmd)?;
    let mut stdin = child.stdin.take().context("nft stdin")?;
    let written = std::thread::scope(|s| {
        let w = s.spawn(move || stdin.write_all(text.as_bytes()));
        let out = child.wait_with_output();
        (w.join().expect("writer does not panic"), out)
    });
    let out = written.1.context("wait for nft -f -")?;
    if !out.status.success() {
        bail!(
            "nft -f - in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.0.context("write the script to nft")
}

/// The two paths B2 and B7 compare: one `web` task pinned to `node`, published as 80:8080 and
/// reached through the mesh at node1:80, and a hello-server in `node`'s own namespace on 8081,
/// reached directly. Returns once `client` gets answers on both, with the task and the pid of
/// the direct server.
pub fn mesh_and_direct(
    c: &integration::cluster::Cluster,
    client: &str,
    node: &str,
) -> Result<(proto::api::TaskInfo, u32)> {
    let hello = integration::cluster::bin("hello-server")
        .display()
        .to_string();
    let constraint = format!("node.hostname=={node}");
    let task = c
        .hello_service(
            "web",
            1,
            &["--constraint", &constraint, "--publish", "80:8080"],
        )?
        .remove(0);
    let direct = c
        .lab
        .spawn(node, Command::new(&hello).args(["--port", "8081"]))?;
    let node_ip = c.lab.node(node)?.ip;
    let mesh_url = "http://192.168.56.11:80/".to_string();
    let direct_url = format!("http://{node_ip}:8081/");
    for url in [&mesh_url, &direct_url] {
        c.wait_for(Duration::from_secs(60), url, |c| {
            let out = c
                .lab
                .exec(client, &["curl", "-s", "--max-time", "3", url])
                .ok()?;
            out.status.success().then_some(())
        })?;
    }
    Ok((task, direct))
}
