//! What the manager's end-to-end tests (control.rs, trust.rs) share: temp dirs, free ports, and
//! a line-oriented connection that speaks the API or, over TLS, the agent protocol.

// Each test target uses its own subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::agent::{AgentMsg, Assignment, ManagerMsg, TaskStatus};
use proto::api::{Request, Response};
use proto::model::{Role, TaskState};
use serde::de::DeserializeOwned;

/// Reads that wait longer than this fail the test instead of hanging it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A unique directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mesh-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to 127.0.0.1:`port` that checks the manager against `config`'s roots; the
/// handshake runs on first use.
pub fn tls_to(port: u16, config: Arc<rustls::ClientConfig>) -> Tls {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    let tls = rustls::ClientConnection::new(config, trust::tls::manager_name()).unwrap();
    rustls::StreamOwned::new(tls, s)
}

/// A line-oriented connection with a read timeout, for both the API and the agent protocol.
pub struct Conn<S: Read + Write> {
    pub stream: BufReader<S>,
}

impl Conn<UnixStream> {
    pub fn unix(path: &Path) -> Conn<UnixStream> {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        Conn {
            stream: BufReader::new(s),
        }
    }
}

impl Conn<Tls> {
    pub fn tls(port: u16, config: Arc<rustls::ClientConfig>) -> Conn<Tls> {
        Conn {
            stream: BufReader::new(tls_to(port, config)),
        }
    }

    /// An agent's connection, with the node's certificate.
    pub fn agent(port: u16, creds: &trust::Credentials) -> Conn<Tls> {
        Conn::tls(port, creds.client_config().unwrap())
    }

    /// Sends Hello and returns the manager's answer, whatever it is.
    pub fn hello_msg(&mut self, hostname: &str, addr: &str, gwbridge: Option<&str>) -> ManagerMsg {
        self.send(&AgentMsg::Hello {
            version: proto::PROTOCOL_VERSION,
            hostname: hostname.into(),
            advertise_addr: addr.parse().unwrap(),
            gwbridge_subnet: gwbridge.map(|g| g.parse().unwrap()),
            esp: Some(proto::agent::EspSupport::Supported),
        });
        self.recv()
    }

    pub fn hello(&mut self, hostname: &str, addr: &str) -> (String, Role) {
        self.hello_with_gwbridge(hostname, addr, None)
    }

    pub fn hello_with_gwbridge(
        &mut self,
        hostname: &str,
        addr: &str,
        gwbridge: Option<&str>,
    ) -> (String, Role) {
        match self.hello_msg(hostname, addr, gwbridge) {
            ManagerMsg::Welcome {
                version,
                node_id,
                role,
            } => {
                assert_eq!(version, proto::PROTOCOL_VERSION);
                (node_id, role)
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// The next assignment; the list of managers that follows a Welcome is passed over.
    pub fn assignment(&mut self) -> Assignment {
        loop {
            match self.recv() {
                ManagerMsg::Assign(a) => return std::sync::Arc::unwrap_or_clone(a),
                ManagerMsg::Managers { addrs } => assert!(!addrs.is_empty()),
                other => panic!("expected Assign, got {other:?}"),
            }
        }
    }

    /// Reads assignments until one satisfies `done`.
    pub fn assignment_until(&mut self, done: impl Fn(&Assignment) -> bool) -> Assignment {
        loop {
            let a = self.assignment();
            if done(&a) {
                return a;
            }
        }
    }

    /// Reads assignments until one has `tasks` tasks (the manager may push intermediate ones).
    pub fn assignment_with(&mut self, tasks: usize) -> Assignment {
        self.assignment_until(|a| a.tasks.len() == tasks)
    }

    pub fn report_running(&mut self, a: &Assignment) {
        for t in &a.tasks {
            self.send(&AgentMsg::TaskStatus(TaskStatus {
                task_id: t.id.clone(),
                state: TaskState::Running,
                error: None,
                pid: Some(1000),
                netns: Some(format!("/run/meshnet/netns/{}", t.name)),
                health: None,
                health_log: None,
            }));
        }
        self.send(&AgentMsg::Applied {
            revision: a.revision,
        });
        self.send(&AgentMsg::Heartbeat);
    }
}

impl<S: Read + Write> Conn<S> {
    pub fn send<T: serde::Serialize>(&mut self, msg: &T) {
        let w = self.stream.get_mut();
        w.write_all(&proto::encode_frame(msg)).unwrap();
        w.flush().unwrap();
    }

    /// The next line, `None` at the end of the connection.
    pub fn line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        self.stream.read_until(b'\n', &mut line)?;
        Ok((!line.is_empty()).then_some(line))
    }

    pub fn recv<T: DeserializeOwned>(&mut self) -> T {
        let line = self
            .line()
            .unwrap_or_else(|e| panic!("read: {e}"))
            .expect("connection closed");
        proto::decode_frame(&line).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&line));
        })
    }

    pub fn call(&mut self, req: Request) -> Response {
        self.send(&req);
        self.recv()
    }
}
