//! `hello-server`: a tiny HTTP server for demos and tests, like the seeds' nodejs web app.
//!
//!   GET /        → `Hello World! from <the local IP the request arrived on>`
//!   GET /whoami  → `client <peer IP>:<peer port>`
//!
//! HTTP/1.1 with keep-alive, so load generators measure the network and not reconnects.
//! One thread per connection: plenty for tests and benchmarks on a 2-core machine.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "hello-server",
    about = "Answers HTTP with the local IP and the client's address"
)]
struct Args {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind (all addresses by default).
    #[arg(long, default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
    eprintln!("hello-server listening on {addr}");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    let _ = serve(s);
                });
            }
            Err(e) => eprintln!("hello-server: accept: {e}"),
        }
    }
    Ok(())
}

/// The answer to a request line's path; the second value is the status line.
fn respond(path: &str, local: SocketAddr, peer: SocketAddr) -> (&'static str, String) {
    match path {
        "/" => ("200 OK", format!("Hello World! from {}\n", local.ip())),
        "/whoami" => ("200 OK", format!("client {}:{}\n", peer.ip(), peer.port())),
        _ => ("404 Not Found", "not found\n".to_string()),
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut parts = request.split_whitespace();
        let (_method, path, version) = (parts.next(), parts.next().unwrap_or("/"), parts.next());
        let mut keep_alive = version == Some("HTTP/1.1");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let h = header.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("connection") {
                    keep_alive = value.trim().eq_ignore_ascii_case("keep-alive");
                }
            }
        }
        let (status, body) = respond(path, local, peer);
        let conn = if keep_alive { "keep-alive" } else { "close" };
        write!(
            writer,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_local_ip_and_the_client() {
        let local: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let peer: SocketAddr = "10.255.0.2:40000".parse().unwrap();
        assert_eq!(
            respond("/", local, peer),
            ("200 OK", "Hello World! from 10.0.0.5\n".to_string())
        );
        assert_eq!(
            respond("/whoami", local, peer),
            ("200 OK", "client 10.255.0.2:40000\n".to_string())
        );
        assert_eq!(respond("/x", local, peer).0, "404 Not Found");
    }

    #[test]
    fn serves_keep_alive_requests_on_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener.accept().unwrap().0));
        let mut c = TcpStream::connect(addr).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        for path in ["/", "/whoami"] {
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut lines = Vec::new();
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                if l == "\r\n" {
                    break;
                }
                lines.push(l);
            }
            assert_eq!(lines[0], "HTTP/1.1 200 OK\r\n");
            let mut body = String::new();
            r.read_line(&mut body).unwrap();
            let want = if path == "/" {
                "Hello World! from 127.0.0.1\n".to_string()
            } else {
                format!("client 127.0.0.1:{}\n", c.local_addr().unwrap().port())
            };
            assert_eq!(body, want);
        }
    }
}
