//! A blocking connection to the manager's API: one request, one response, per line.

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

pub struct Client {
    host: Host,
    reader: BufReader<Box<dyn Read>>,
    writer: Box<dyn Write>,
}

impl Client {
    pub fn connect(host: &Host) -> anyhow::Result<Client> {
        let context = || format!("connect to the manager at {host}");
        let (reader, writer): (Box<dyn Read>, Box<dyn Write>) = match host {
            Host::Unix(path) => {
                let s = connect_unix(path).with_context(context)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .with_context(context)?;
                (Box::new(s.try_clone().with_context(context)?), Box::new(s))
            }
            Host::Tcp(addr) => {
                let s = TcpStream::connect(addr).with_context(context)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .with_context(context)?;
                (Box::new(s.try_clone().with_context(context)?), Box::new(s))
            }
        };
        Ok(Client {
            host: host.clone(),
            reader: BufReader::new(reader),
            writer,
        })
    }

    /// Sends one request; a refusal from the manager becomes an error with its message.
    pub fn call(&mut self, req: &Request) -> anyhow::Result<Response> {
        let host = &self.host;
        self.writer
            .write_all(&proto::encode_frame(req))
            .and_then(|()| self.writer.flush())
            .with_context(|| format!("send request to the manager at {host}"))?;
        let mut line = Vec::new();
        let n = self
            .reader
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
        let err = Client::connect(&Host::Unix(path.clone())).err().unwrap();
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
        assert!(Client::connect(&Host::Unix(path)).is_err());
        assert!(started.elapsed() < STALE_SOCKET_WAIT);
        std::fs::remove_dir_all(&dir).unwrap();
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
