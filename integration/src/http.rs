//! One HTTP request on a new connection from inside a namespace, without spawning a process:
//! the load loops of the tests and benchmarks are then not paced by process start-up (slow in
//! the emulated guest).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netns::Netns;

/// Connecting may take this long (one SYN retransmit fits).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The answer may take this long once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET path` to `host:port` (an IPv4 address) from `client` on a new connection; the body of
/// a 200 answer, or which step failed and how.
pub fn get(client: &Netns, host: &str, port: u16, path: &str) -> Result<String, String> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("address {host}:{port}: {e}"))?;
    let mut s = client
        .run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("answer {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answer {head:?}"));
    }
    Ok(body.to_string())
}

/// One HTTP/1.1 keep-alive connection from inside a namespace: requests one after another on
/// the same TCP connection, as a long-lived client holds it.
pub struct KeepAlive(BufReader<TcpStream>);

impl KeepAlive {
    pub fn open(client: &Netns, host: &str, port: u16) -> Result<KeepAlive, String> {
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .map_err(|e| format!("address {host}:{port}: {e}"))?;
        let s = client
            .run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(KeepAlive(BufReader::new(s)))
    }

    /// `GET path` on this connection: the body of a 200 answer, or which step failed and how.
    pub fn get(&mut self, path: &str) -> Result<String, String> {
        write!(self.0.get_mut(), "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut status = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            match self.0.read_line(&mut line) {
                Ok(0) => return Err("closed by the server".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if status.is_empty() {
                status = line.to_string();
            } else if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
                }
            }
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("answer {status:?}"));
        }
        let mut body = vec![0; length];
        self.0
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        String::from_utf8(body).map_err(|e| e.to_string())
    }
}
