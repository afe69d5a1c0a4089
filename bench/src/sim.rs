//! A real `mesh-manager` on 127.0.0.1 and simulated agents in this process (B10, B11): each
//! joins and connects with TLS as a real agent does, from an address of its own (127.1.x.y),
//! but has no kernel: what it does with its assignments is up to the benchmark.

use std::fs::File;
use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::agent::{AgentMsg, Assignment, ManagerMsg};
use proto::api::{Request, Response};
use proto::model::Role;
use proto::wire::{read_frame, write_frame};
use tokio::io::{BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use trust::JoinToken;

/// Each step of an agent (connect, handshake, answer) must finish within this.
pub const STEP: Duration = trust::join::STEP_TIMEOUT;

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;
pub type AgentReader = BufReader<ReadHalf<Tls>>;
pub type AgentWriter = WriteHalf<Tls>;

/// A `mesh-manager` (the release binary beside this one) with a fresh data dir under the
/// system's temp dir (its fsyncs are part of what is measured), stopped and removed on drop.
pub struct Manager {
    child: Child,
    dir: PathBuf,
    api: PathBuf,
    pub addr: SocketAddr,
}

impl Manager {
    pub fn start(tag: &str, extra: &[&str]) -> Result<Manager> {
        let dir = std::env::temp_dir().join(format!("meshnet-sim-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // A port free a moment ago; the manager takes it at once.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let api = dir.join("api.sock");
        let log = File::create(dir.join("manager.log"))?;
        let bin = integration::cluster::bin("mesh-manager");
        let child = Command::new(&bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (cargo build --release -p mesh-manager)",
                    bin.display()
                )
            })?;
        let mut m = Manager {
            child,
            dir,
            api,
            addr,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&m.api).is_err() {
            if let Some(status) = m.child.try_wait()? {
                bail!("mesh-manager exited ({status}): {}", m.log_tail());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "mesh-manager did not open its API socket in 20 s: {}",
                    m.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("manager.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// One API request over the Unix socket, as meshctl sends it.
    pub fn call(&self, req: &Request) -> Result<Response> {
        let mut s = UnixStream::connect(&self.api)
            .with_context(|| format!("connect to {}", self.api.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(&proto::encode_frame(req))?;
        let mut line = Vec::new();
        StdBufReader::new(s)
            .take(proto::MAX_FRAME_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .context("read the manager's answer")?;
        match proto::decode_frame(&line)? {
            Response::Error { message } => bail!("the manager refused {req:?}: {message}"),
            r => Ok(r),
        }
    }

    pub fn worker_token(&self) -> Result<JoinToken> {
        match self.call(&Request::JoinToken {
            role: Role::Worker,
            rotate: false,
        })? {
            Response::JoinToken { token, .. } => Ok(token.parse::<JoinToken>()?),
            other => bail!("join-token: unexpected answer {other:?}"),
        }
    }

    /// The manager's user and system CPU time so far.
    pub fn cpu(&self) -> Result<(Duration, Duration)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces) in parentheses: state is
        // field 3, utime 14, stime 15, in clock ticks.
        let rest = &stat[stat.rfind(')').context("/proc/<pid>/stat")? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
        let secs = |field: &str| -> Result<Duration> {
            Ok(Duration::from_secs_f64(field.parse::<u64>()? as f64 / hz))
        };
        Ok((secs(f[11])?, secs(f[12])?))
    }

    /// Bytes the manager has asked to write so far (`wchar` of /proc/<pid>/io: what reaches
    /// the page cache, the state file's included, whatever the disk does later).
    pub fn written(&self) -> Result<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id()))?;
        io.lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .context("wchar in /proc/<pid>/io")?
            .trim()
            .parse()
            .context("wchar")
    }

    /// Waits until the manager uses under 2 % of a CPU over 200 ms (at most 10 s) and returns
    /// its user and system CPU time then.
    pub fn settle(&self) -> Result<(Duration, Duration)> {
        let mut last = self.cpu()?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.cpu()?;
            let busy = (now.0 + now.1) - (last.0 + last.1);
            last = now;
            if busy < Duration::from_millis(4) {
                break;
            }
        }
        Ok(last)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn timed<T, E: Into<anyhow::Error>>(
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(STEP, f).await {
        Ok(r) => r.map_err(Into::into).with_context(|| what.to_string()),
        Err(_) => bail!("{what}: timed out after {STEP:?}"),
    }
}

/// What an unexpected message from the manager was, for errors.
pub fn kind(msg: &ManagerMsg) -> String {
    match msg {
        ManagerMsg::Refused { reason } => format!("refused: {reason}"),
        other => format!("an unexpected {} message", other.kind()),
    }
}

/// Simulated agent `i`'s own address: 127.1.x.y. The manager admits only so many
/// unauthenticated connections per peer address, so agents sharing one would be turned away.
pub fn agent_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// Joins simulated agent `i` as `hostname` and connects it, dialling from its own address.
pub async fn join(i: usize, to: SocketAddr, token: &JoinToken, hostname: &str) -> Result<Tls> {
    let local = agent_addr(i);
    let to = to.to_string();
    let (_, creds) = trust::join::join_from(&to, Some(local), token, hostname, local).await?;
    Ok(trust::join::connect_from(&to, Some(local), creds.client_config()?).await?)
}

/// Says Hello on a connected stream and reads Welcome and the first assignment.
pub async fn hello(
    stream: Tls,
    hostname: String,
    advertise: IpAddr,
) -> Result<(AgentReader, AgentWriter, Arc<Assignment>)> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let hello = AgentMsg::Hello {
        version: proto::PROTOCOL_VERSION,
        hostname,
        advertise_addr: advertise,
        gwbridge_subnet: None,
        esp: None,
    };
    write_frame(&mut wr, &hello).await.context("send hello")?;
    let mut buf = Vec::new();
    let mut first = None;
    for want in ["welcome", "assign"] {
        buf.clear();
        let got = timed(
            "read from the manager",
            read_frame(&mut rd, &mut buf, proto::MAX_FRAME_BYTES),
        )
        .await?;
        if !got {
            bail!("the manager closed the connection before {want}");
        }
        match (want, proto::decode_frame::<ManagerMsg>(&buf)?) {
            ("welcome", ManagerMsg::Welcome { .. }) => {}
            ("assign", ManagerMsg::Assign(a)) => first = Some(a),
            (_, other) => bail!("expected {want}, got {}", kind(&other)),
        }
    }
    Ok((rd, wr, first.expect("read above")))
}
