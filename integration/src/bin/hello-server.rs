//! `hello-server`: a tiny HTTP server for demos and tests, like the seeds' nodejs web app.
//!
//!   GET /        → `Hello World! from <the local IP the request arrived on>`
//!   GET /whoami  → `client <peer IP>:<peer port>`
//!   GET /tag     → the value of `$HELLO_TAG` (`untagged` without it): which spec a task runs
//!
//! HTTP/1.1 with keep-alive, so load generators measure the network and not reconnects.
//! One thread per connection: plenty for tests and benchmarks on a 2-core machine.
//!
//! With `--udp`, any datagram to the same port is answered with the same greeting, naming the
//! local address the datagram was sent to.

use std::io::{BufRead, BufReader, IoSliceMut, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;

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
    /// Also answer UDP on the same port.
    #[arg(long)]
    udp: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
    eprintln!("hello-server listening on {addr}");
    if args.udp {
        let socket = UdpSocket::bind(addr).with_context(|| format!("listen on udp {addr}"))?;
        std::thread::spawn(move || {
            if let Err(e) = serve_udp(&socket) {
                eprintln!("hello-server: udp: {e}");
            }
        });
    }
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
        "/tag" => {
            let tag = std::env::var("HELLO_TAG").unwrap_or_else(|_| "untagged".into());
            ("200 OK", format!("{tag}\n"))
        }
        _ => ("404 Not Found", "not found\n".to_string()),
    }
}

/// Answers each datagram with the greeting; IP_PKTINFO tells which local address it was sent
/// to, as a socket bound to 0.0.0.0 cannot know otherwise.
fn serve_udp(socket: &UdpSocket) -> nix::Result<()> {
    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn,
    };
    setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    let mut buf = [0u8; 2048];
    loop {
        let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<SockaddrIn>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )?;
        let local = msg.cmsgs()?.find_map(|c| match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
            }
            _ => None,
        });
        let (Some(peer), Some(local)) = (msg.address, local) else {
            continue;
        };
        let peer = SocketAddr::from((peer.ip(), peer.port()));
        let _ = socket.send_to(format!("Hello World! from {local}\n").as_bytes(), peer);
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
    fn answers_udp_with_the_address_it_was_sent_to() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || serve_udp(&server));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"hi", addr).unwrap();
        let mut buf = [0u8; 128];
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"Hello World! from 127.0.0.1\n");
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
