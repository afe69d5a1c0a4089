//! A blocking connection to the manager's API: one request, one response, per line. Over TCP
//! it is TLS with the cluster's client certificate (`--tls-dir`), checking that the manager's
//! certificate is of the same CA.

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::api::{Request, Response};

/// A manager that does not answer within this time is stuck or not a manager.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// A socket file that refuses connections is one a killed manager left behind; a restarting
/// manager replaces it within moments, so wait this long before giving up.
const STALE_SOCKET_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Host {
    type Err = String;

    fn from_str(s: &str) -> Result<Host, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.starts_with('/') {
                return Ok(Host::Unix(PathBuf::from(path)));
            }
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            if addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Host::Tcp(addr.to_string()));
            }
        }
        Err(format!(
            "invalid host {s:?}: expected unix:///path/to/socket or tcp://address:port"
        ))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Unix(path) => write!(f, "unix://{}", path.display()),
            Host::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + STALE_SOCKET_WAIT;
    loop {
        match UnixStream::connect(path) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

pub struct Client {
    host: Host,
    stream: BufReader<Box<dyn Stream>>,
}

impl Client {
    /// Connects to the API at `host`; over TCP with the client bundle in `tls_dir`
    /// (`ca.pem`, `cert.pem`, `key.pem`, as the manager writes to `<data-dir>/client/`).
    pub fn connect(host: &Host, tls_dir: Option<&Path>) -> anyhow::Result<Client> {
        let context = || format!("connect to the manager at {host}");
        let stream: Box<dyn Stream> = match host {
            Host::Unix(path) => {
                let s = connect_unix(path).with_context(context)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .with_context(context)?;
                Box::new(s)
            }
            Host::Tcp(addr) => {
                let Some(dir) = tls_dir else {
                    bail!(
                        "the TCP API at {host} needs the cluster's client certificate: pass --tls-dir DIR (or set MESH_TLS_DIR) with a copy of the manager's <data-dir>/client/ (ca.pem, cert.pem, key.pem)"
                    );
                };
                let creds = trust::Credentials::load_client(dir)
                    .with_context(|| format!("read the client bundle in {}", dir.display()))?;
                let config = creds
                    .client_config()
                    .with_context(|| format!("use the client bundle in {}", dir.display()))?;
                let s = TcpStream::connect(addr).with_context(context)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .with_context(context)?;
                let tls = rustls::ClientConnection::new(config, trust::tls::manager_name())
                    .with_context(context)?;
                Box::new(rustls::StreamOwned::new(tls, s))
            }
        };
        Ok(Client {
            host: host.clone(),
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request; a refusal from the manager becomes an error with its message.
    pub fn call(&mut self, req: &Request) -> anyhow::Result<Response> {
        let host = &self.host;
        let writer = self.stream.get_mut();
        writer
            .write_all(&proto::encode_frame(req))
            .and_then(|()| writer.flush())
            .with_context(|| format!("send request to the manager at {host}"))?;
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(proto::MAX_FRAME_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("read the answer of the manager at {host}"))?;
        if n == 0 {
            bail!("the manager at {host} closed the connection without answering");
        }
        match proto::decode_frame(&line)
            .with_context(|| format!("decode the answer of the manager at {host}"))?
        {
            Response::Error { message } => bail!(message),
            response => Ok(response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_waited_for_then_reported() {
        let dir = std::env::temp_dir().join(format!("meshctl-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // Bound and closed: the file stays and refuses connections, as after a SIGKILL.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let started = Instant::now();
        let err = Client::connect(&Host::Unix(path.clone()), None)
            .err()
            .unwrap();
        assert!(started.elapsed() >= STALE_SOCKET_WAIT);
        assert!(
            format!("{err:#}").starts_with(&format!(
                "connect to the manager at unix://{}",
                path.display()
            )),
            "{err:#}"
        );
        // A missing socket is reported at once.
        std::fs::remove_file(&path).unwrap();
        let started = Instant::now();
        assert!(Client::connect(&Host::Unix(path), None).is_err());
        assert!(started.elapsed() < STALE_SOCKET_WAIT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tcp_without_a_client_certificate_is_a_clear_error() {
        let err = Client::connect(&Host::Tcp("127.0.0.1:1".into()), None)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("--tls-dir"), "{err:#}");
    }

    #[test]
    fn hosts() {
        assert_eq!(
            "unix:///run/meshnet/manager.sock".parse(),
            Ok(Host::Unix("/run/meshnet/manager.sock".into()))
        );
        assert_eq!(
            "tcp://192.168.56.11:2378".parse(),
            Ok(Host::Tcp("192.168.56.11:2378".into()))
        );
        assert_eq!(
            "tcp://[::1]:2378".parse(),
            Ok(Host::Tcp("[::1]:2378".into()))
        );
        for bad in [
            "/run/x.sock",
            "unix://relative",
            "tcp://host",
            "tcp://:80",
            "http://x:1",
        ] {
            let err = bad.parse::<Host>().unwrap_err();
            assert!(err.starts_with("invalid host"), "{err}");
        }
        assert_eq!(Host::Unix("/a.sock".into()).to_string(), "unix:///a.sock");
    }
}
