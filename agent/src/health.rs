//! Health checks of running tasks, as Docker's HEALTHCHECK: a command run inside the task's
//! network and mount namespaces, or an HTTP GET to the task's own loopback.
//!
//! The decision (what the results so far make of the task, when to probe next) is the pure
//! [`Tracker`]; a [`Checker`] is the tokio task that probes one running task and tells the
//! [`Supervisor`](crate::tasks::Supervisor) each change through the process event channel. The
//! agent only reports: the manager stops sending traffic to a task that is not healthy and
//! replaces an unhealthy one.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proto::agent::TaskSpec;
use proto::model::{Health, HealthCheck, HealthTest};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info};

use crate::lifecycle::{self, Event, HealthState, ProcEvent};
use crate::metrics::AgentMetrics;

/// Until its first pass a task is probed at least this often, so that it gets traffic soon:
/// first after [`FIRST_PROBE_DELAY`], then twice as long each time up to this.
const FIRST_PASS_INTERVAL: Duration = Duration::from_secs(1);
const FIRST_PROBE_DELAY: Duration = Duration::from_millis(50);
/// A floor under the interval: a check configured with 0 must not spin.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Output of a command probe kept per stream; the rest is read and dropped so that the probe
/// never blocks on a full pipe.
const OUTPUT_BYTES: usize = 4096;
/// Characters of a failed probe's output or error the manager is told.
const LOG_CHARS: usize = 300;

/// Why a probe failed. Its text is the health log the manager is told (bounded by [`bound`]).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("the task's process is gone")]
    Gone,
    #[error("open {path}: {source}")]
    OpenNs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the check has an empty command")]
    EmptyCommand,
    #[error("spawn {prog}: {source}")]
    Spawn {
        prog: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wait for {prog}: {source}")]
    Wait {
        prog: String,
        #[source]
        source: std::io::Error,
    },
    /// The command ran and did not exit 0; `output` is its stdout and stderr, trimmed.
    #[error("{}{}", exit_how(status), if output.is_empty() { String::new() } else { format!(": {output}") })]
    Exit { status: ExitStatus, output: String },
    /// The HTTP probe's blocking thread panicked.
    #[error("http probe: {0}")]
    Panicked(#[source] tokio::task::JoinError),
    #[error("invalid path {:?}", proto::excerpt(.0))]
    InvalidPath(String),
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("send GET {path}: {source}")]
    Send {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read the answer to GET {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An answer whose status is not 2xx or 3xx: `line` is its status line.
    #[error("GET {path}: {line}")]
    Status { path: String, line: String },
    #[error("GET {path}: not an HTTP answer: {line:?}")]
    NotHttp { path: String, line: String },
}

/// How a command that did not succeed ended.
fn exit_how(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exited".into(),
    }
}
/// Bytes of an HTTP answer read at most to find its status line.
const STATUS_LINE_BYTES: usize = 1024;

/// The decision logic: the results so far make the current health and the next probe's time.
#[derive(Debug, Clone)]
pub struct Tracker {
    interval: Duration,
    retries: u32,
    start_period: Duration,
    health: Health,
    /// Failures in a row that count (outside the start period, or after a pass).
    failures: u32,
    /// A probe has passed since the task started (or it was healthy before an agent restart).
    passed: bool,
    /// Probes that failed before the first pass: the quick probing of a starting task backs
    /// off with them.
    early_probes: u32,
    log: Option<String>,
}

impl Tracker {
    /// A tracker for a task that just became Running, or one going on from what an earlier
    /// agent found (`last`).
    pub fn new(check: &HealthCheck, last: Option<&HealthState>) -> Tracker {
        let retries = check.retries.max(1);
        let health = last.map_or(Health::Starting, |l| l.health);
        Tracker {
            interval: Duration::from_millis(check.interval_ms).max(MIN_INTERVAL),
            retries,
            start_period: Duration::from_millis(check.start_period_ms),
            health,
            // Unhealthy stays so until a pass, whatever the start period.
            failures: if health == Health::Unhealthy {
                retries
            } else {
                0
            },
            passed: health == Health::Healthy,
            early_probes: 0,
            log: last.and_then(|l| l.log.clone()),
        }
    }

    pub fn state(&self) -> HealthState {
        HealthState {
            health: self.health,
            log: self.log.clone(),
        }
    }

    /// Takes a probe's result, `since_start` after the task (or the tracker) started. Returns
    /// true if the health changed.
    pub fn record(&mut self, since_start: Duration, result: Result<(), String>) -> bool {
        let before = self.health;
        match result {
            Ok(()) => {
                self.passed = true;
                self.failures = 0;
                self.log = None;
                self.health = Health::Healthy;
            }
            Err(log) => {
                self.log = Some(log);
                if !self.passed {
                    self.early_probes = self.early_probes.saturating_add(1);
                }
                // Docker's start period: failures while the task starts up do not count, unless
                // it has already passed once (then it has started). Before a first pass the
                // task is probed faster than its interval, but failures count at most once per
                // interval, so that it turns unhealthy no sooner than Docker's would
                // (`retries` × `interval`).
                let paced =
                    self.passed || since_start >= self.interval * self.failures.saturating_add(1);
                if paced && (self.passed || since_start >= self.start_period) {
                    self.failures = self.failures.saturating_add(1);
                }
                if self.failures >= self.retries {
                    self.health = Health::Unhealthy;
                }
            }
        }
        self.health != before
    }

    /// How long after a probe started the next one starts.
    pub fn next_delay(&self) -> Duration {
        if self.passed {
            self.interval
        } else {
            let quick = FIRST_PROBE_DELAY * 2u32.pow(self.early_probes.min(5));
            self.interval.min(FIRST_PASS_INTERVAL).min(quick)
        }
    }
}

/// The running task a checker probes: its namespaces are those of this process.
#[derive(Debug, Clone)]
pub struct Target {
    pub task: String,
    pub pid: u32,
    pub start_time: u64,
    pub netns_inode: u64,
}

/// One task's checks, probing until dropped.
pub struct Checker(tokio::task::JoinHandle<()>);

impl Drop for Checker {
    fn drop(&mut self) {
        // A probe under way is dropped with it: its process group is killed (see `run_cmd`).
        self.0.abort();
    }
}

impl Checker {
    /// Starts probing `target` with `spec`'s check (the first probe at once), going on from
    /// `last`. Every change of health goes to `events`.
    pub fn start(
        target: Target,
        spec: &TaskSpec,
        check: HealthCheck,
        last: Option<HealthState>,
        events: UnboundedSender<ProcEvent>,
        metrics: AgentMetrics,
    ) -> Checker {
        let env: Vec<(String, String)> = lifecycle::task_env(spec)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Checker(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut tracker = Tracker::new(&check, last.as_ref());
            loop {
                let at = tokio::time::Instant::now();
                let result = probe(&target, &check, &env).await;
                metrics.health_check(result.is_ok());
                if let Err(e) = &result {
                    debug!(task = %target.task, "health check failed: {e}");
                }
                if tracker.record(at - started, result) {
                    let state = tracker.state();
                    info!(task = %target.task, health = state.health.as_str(), "task health");
                    let ev = ProcEvent {
                        task: target.task.clone(),
                        pid: target.pid,
                        event: Event::Health(state),
                    };
                    if events.send(ev).is_err() {
                        return;
                    }
                }
                tokio::time::sleep_until(at + tracker.next_delay()).await;
            }
        }))
    }
}

/// Runs one probe within the check's timeout.
async fn probe(
    target: &Target,
    check: &HealthCheck,
    env: &[(String, String)],
) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    let result = match &check.test {
        HealthTest::Cmd { argv } => run_cmd(target, argv, env, timeout).await,
        HealthTest::Http { port, path } => {
            let (target, path, port) = (target.clone(), path.clone(), *port);
            tokio::task::spawn_blocking(move || http_get(&target, port, &path, timeout))
                .await
                .unwrap_or_else(|e| Err(ProbeError::Panicked(e)))
        }
    };
    result.map_err(|e| bound(&e.to_string()))
}

/// A failed probe's output or error as the manager is told it.
fn bound(text: &str) -> String {
    proto::excerpt_within(text.trim(), LOG_CHARS).to_string()
}

/// The task's namespace file `kind` (`net`, `mnt`), checked to be the task's own: opened
/// first, then the process checked to be still the same, so a reused pid is never entered.
fn task_ns(target: &Target, kind: &str) -> Result<File, ProbeError> {
    let path = format!("/proc/{}/ns/{kind}", target.pid);
    let file = File::open(&path).map_err(|source| ProbeError::OpenNs { path, source })?;
    check_alive(target)?;
    Ok(file)
}

fn check_alive(target: &Target) -> Result<(), ProbeError> {
    if lifecycle::is_alive(target.pid, target.start_time, target.netns_inode) {
        Ok(())
    } else {
        Err(ProbeError::Gone)
    }
}

/// Runs `argv` in the task's network and mount namespaces, in a process group of its own that
/// is killed on timeout (or if the probe is dropped). Exit status 0 passes.
async fn run_cmd(
    target: &Target,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), ProbeError> {
    let (prog, args) = argv.split_first().ok_or(ProbeError::EmptyCommand)?;
    let net = task_ns(target, "net")?;
    let mnt = task_ns(target, "mnt")?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (net_fd, mnt_fd) = (net.as_raw_fd(), mnt.as_raw_fd());
    // SAFETY: two setns calls (async-signal-safe) in the forked child, on descriptors that stay
    // open in `net` and `mnt` until after the spawn. The mount namespace second: the program is
    // then looked up in the task's file system, and the child starts at its root.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, kind) in [(net_fd, libc::CLONE_NEWNET), (mnt_fd, libc::CLONE_NEWNS)] {
                if libc::setns(fd, kind) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            prog: prog.clone(),
            source,
        })?;
    drop((net, mnt));
    let group = KillGroup(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err, status) =
            tokio::join!(read_bounded(stdout), read_bounded(stderr), child.wait());
        (out + &err, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((_, Ok(status))) if status.success() => {
            group.disarm();
            Ok(())
        }
        Ok((output, Ok(status))) => {
            group.disarm();
            Err(ProbeError::Exit {
                status,
                output: output.trim().to_string(),
            })
        }
        Ok((_, Err(source))) => Err(ProbeError::Wait {
            prog: prog.clone(),
            source,
        }),
        Err(_) => {
            drop(group);
            // Reaped here so that no zombie is left; the group was killed.
            let _ = child.wait().await;
            Err(ProbeError::Timeout(timeout))
        }
    }
}

/// Kills a probe's process group when dropped, unless its leader exited by itself (then the
/// group id may be reused).
struct KillGroup(Option<u32>);

impl KillGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            lifecycle::signal_task(pid, Signal::SIGKILL);
        }
    }
}

/// The first [`OUTPUT_BYTES`] of a stream, read to its end.
async fn read_bounded(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// `GET path` over HTTP/1.0 to 127.0.0.1:port in the task's network namespace, all of it
/// within `timeout`; a 2xx or 3xx status passes. Blocking.
fn http_get(target: &Target, port: u16, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    // The path goes into the request line as is: no way to smuggle in another line.
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::InvalidPath(path.to_string()));
    }
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ProbeError::Timeout(timeout))
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let ns = netns::Netns::open(Path::new(&format!("/proc/{}/ns/net", target.pid)))?;
    check_alive(target)?;
    // The socket is made (and so belongs) in the task's namespace; it is used from here on.
    let mut s = ns
        .run(|| TcpStream::connect_timeout(&addr, timeout))?
        .map_err(|source| ProbeError::Connect { addr, source })?;
    s.set_write_timeout(Some(left()?))
        .and_then(|()| {
            s.write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mesh-agent\r\n\r\n")
                    .as_bytes(),
            )
        })
        .map_err(|source| ProbeError::Send {
            path: path.to_string(),
            source,
        })?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let read_err = |source| ProbeError::Read {
        path: path.to_string(),
        source,
    };
    while !got.contains(&b'\n') && got.len() < STATUS_LINE_BYTES {
        s.set_read_timeout(Some(left()?)).map_err(read_err)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ProbeError::Timeout(timeout))
            }
            Err(e) => return Err(read_err(e)),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let line = text.lines().next().unwrap_or_default();
    match status_code(line) {
        Some(200..=399) => Ok(()),
        Some(_) => Err(ProbeError::Status {
            path: path.to_string(),
            line: line.to_string(),
        }),
        None => Err(ProbeError::NotHttp {
            path: path.to_string(),
            line: line.to_string(),
        }),
    }
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    let code = parts.next()?;
    (version.starts_with("HTTP/") && code.len() == 3)
        .then(|| code.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(interval_ms: u64, retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            interval_ms,
            retries,
            start_period_ms,
            ..HealthCheck::new(HealthTest::Cmd {
                argv: vec!["true".into()],
            })
        }
    }

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fail(t: &mut Tracker, at: Duration) -> bool {
        t.record(at, Err(format!("failed at {at:?}")))
    }

    #[test]
    fn a_new_task_is_starting_and_probed_quickly_until_it_passes() {
        let mut t = Tracker::new(&check(30_000, 3, 0), None);
        assert_eq!(t.state().health, Health::Starting);
        // 50 ms, then twice as long after each failure, up to a second.
        let mut at = 0;
        for want in [50, 100, 200, 400, 800, 1000, 1000] {
            assert_eq!(t.next_delay(), ms(want));
            assert!(!fail(&mut t, ms(at)));
            at += want;
        }
        assert!(t.record(ms(at), Ok(())));
        assert_eq!(
            t.state(),
            HealthState {
                health: Health::Healthy,
                log: None
            }
        );
        assert_eq!(t.next_delay(), ms(30_000));
        // A short interval caps the quick probing.
        let mut t = Tracker::new(&check(200, 3, 0), None);
        for _ in 0..3 {
            fail(&mut t, ms(0));
        }
        assert_eq!(t.next_delay(), ms(200));
        // An interval of 0 does not spin.
        let mut t = Tracker::new(&check(0, 3, 0), None);
        assert_eq!(t.next_delay(), FIRST_PROBE_DELAY);
        t.record(ms(0), Ok(()));
        assert_eq!(t.next_delay(), MIN_INTERVAL);
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy_and_a_pass_heals_it() {
        let mut t = Tracker::new(&check(200, 3, 0), None);
        assert!(t.record(ms(0), Ok(())));
        assert!(!fail(&mut t, ms(200)));
        assert!(!fail(&mut t, ms(400)));
        // A pass in between starts the count again.
        assert!(!t.record(ms(600), Ok(())));
        assert!(!fail(&mut t, ms(800)));
        assert!(!fail(&mut t, ms(1000)));
        assert_eq!(t.state().health, Health::Healthy);
        assert!(fail(&mut t, ms(1200)));
        let st = t.state();
        assert_eq!(st.health, Health::Unhealthy);
        assert_eq!(st.log.as_deref(), Some("failed at 1.2s"));
        assert_eq!(t.next_delay(), ms(200));
        assert!(!fail(&mut t, ms(1400)), "stays unhealthy");
        assert!(t.record(ms(1600), Ok(())));
        assert_eq!(t.state().health, Health::Healthy);
        assert_eq!(t.state().log, None);
    }

    #[test]
    fn a_task_that_never_passes_goes_unhealthy_after_retries_intervals() {
        let mut t = Tracker::new(&check(30_000, 2, 0), None);
        assert!(!fail(&mut t, ms(0)));
        assert_eq!(t.state().health, Health::Starting);
        assert_eq!(t.state().log.as_deref(), Some("failed at 0ns"));
        // The quick probes of a starting task count once per interval, as Docker's would.
        for at in [50, 150, 1000, 29_000, 30_000, 31_000] {
            assert!(!fail(&mut t, ms(at)), "{at}");
        }
        assert!(fail(&mut t, ms(60_000)));
        assert_eq!(t.state().health, Health::Unhealthy);
        // Never passed: still probed every second, to take it back as soon as it can.
        assert_eq!(t.next_delay(), ms(1000));
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_a_pass() {
        let mut t = Tracker::new(&check(1000, 2, 5000), None);
        for at in [0, 1000, 2000, 3000, 4000] {
            assert!(!fail(&mut t, ms(at)));
            assert_eq!(t.state().health, Health::Starting);
        }
        // Out of the start period, failures count.
        assert!(!fail(&mut t, ms(5000)));
        assert!(fail(&mut t, ms(6000)));
        assert_eq!(t.state().health, Health::Unhealthy);

        // A pass within the start period counts, and the task has started: failures count.
        let mut t = Tracker::new(&check(1000, 2, 5000), None);
        assert!(t.record(ms(0), Ok(())));
        assert!(!fail(&mut t, ms(1000)));
        assert!(fail(&mut t, ms(2000)));
        assert_eq!(t.state().health, Health::Unhealthy);
    }

    #[test]
    fn retries_of_zero_mean_one() {
        let mut t = Tracker::new(&check(1000, 0, 0), None);
        assert!(!fail(&mut t, ms(0)));
        assert!(fail(&mut t, ms(1000)));
        assert_eq!(t.state().health, Health::Unhealthy);
    }

    #[test]
    fn a_restarted_agent_goes_on_from_the_health_last_found() {
        let healthy = HealthState {
            health: Health::Healthy,
            log: None,
        };
        let mut t = Tracker::new(&check(200, 2, 60_000), Some(&healthy));
        assert_eq!(t.state(), healthy);
        assert_eq!(t.next_delay(), ms(200));
        // It had started: the start period is over for it.
        assert!(!fail(&mut t, ms(0)));
        assert!(fail(&mut t, ms(200)));

        let unhealthy = HealthState {
            health: Health::Unhealthy,
            log: Some("exit status 1".into()),
        };
        let mut t = Tracker::new(&check(200, 2, 60_000), Some(&unhealthy));
        assert!(!fail(&mut t, ms(0)));
        assert_eq!(t.state().health, Health::Unhealthy);
        assert!(t.record(ms(200), Ok(())));
    }

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.0 302 Found"), Some(302));
        assert_eq!(status_code("HTTP/1.1 503"), Some(503));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code("HTTP/1.1 2000 no"), None);
        assert_eq!(status_code(""), None);
    }

    #[test]
    fn logs_are_bounded_and_escaped() {
        let long = "x".repeat(5000);
        assert!(bound(&long).chars().count() < LOG_CHARS + 20);
        assert_eq!(
            bound("  exit status 1: no\nfile\n"),
            "exit status 1: no\\nfile"
        );
    }

    #[test]
    fn a_failed_command_is_reported_as_before() {
        let exit = |raw, output: &str| {
            ProbeError::Exit {
                status: ExitStatus::from_raw(raw),
                output: output.into(),
            }
            .to_string()
        };
        assert_eq!(exit(1 << 8, ""), "exit status 1");
        assert_eq!(exit(1 << 8, "no"), "exit status 1: no");
        assert_eq!(exit(9, "x"), "killed by signal 9: x");
    }

    #[test]
    fn a_bad_path_is_refused_before_any_connection() {
        let target = Target {
            task: "t".into(),
            pid: 0,
            start_time: 0,
            netns_inode: 0,
        };
        for path in ["health", "/a b", "/a\r\nX-Evil: 1"] {
            let e = http_get(&target, 80, path, ms(100))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid path"), "{e}");
        }
    }
}
