//! The node's upstream resolvers, and forwarding a query to them.
//!
//! Queries go out from the agent's own (node) namespace, so every resolv.conf entry is usable
//! as it is, loopback ones too (systemd-resolved's 127.0.0.53): unlike Docker, which dials from
//! the container and so needs /run/systemd/resolve/resolv.conf, nothing is skipped here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

/// glibc reads at most 3 nameservers; so does Docker.
pub const MAX_UPSTREAMS: usize = 3;

/// The node's resolver configuration, as far as tasks need it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeResolv {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

/// Parses resolv.conf as glibc does: `nameserver` lines in order (at most 3), and the last
/// `search` or `domain` line for the search list. Scoped IPv6 (`fe80::1%eth0`) and unknown
/// lines are skipped.
pub fn parse_resolv_conf(text: &str) -> NodeResolv {
    let mut out = NodeResolv::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    if out.nameservers.len() < MAX_UPSTREAMS {
                        out.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
            }
            Some("search") | Some("domain") => {
                out.search = words
                    .take_while(|w| !w.starts_with(['#', ';']))
                    .map(String::from)
                    .collect();
            }
            _ => {}
        }
    }
    out
}

/// `--dns-upstream`: `ADDR`, `ADDR:PORT`, `[V6]:PORT` or a bare IPv6 address (port 53).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return if sa.port() == 0 {
            Err(format!("{s:?}: port 0"))
        } else {
            Ok(sa)
        };
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not ADDR or ADDR:PORT"))
}

/// Sends queries to the upstreams in order until one answers.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// Forwards in flight, all listeners together: past the bound a query fails at once
    /// instead of queueing (a flood cannot grow memory or latency without limit).
    permits: Arc<Semaphore>,
    per_try: Duration,
    budget: Duration,
}

/// Docker's bound.
pub const MAX_FORWARDS: usize = 1024;

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>) -> Forwarder {
        Forwarder::with_limits(
            upstreams,
            MAX_FORWARDS,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
    }

    pub fn with_limits(
        mut upstreams: Vec<SocketAddr>,
        max_in_flight: usize,
        per_try: Duration,
        budget: Duration,
    ) -> Forwarder {
        upstreams.truncate(MAX_UPSTREAMS);
        Forwarder {
            upstreams,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            per_try,
            budget,
        }
    }

    /// The first usable upstream reply to `query` (raw, as the upstream sent it: a truncated
    /// UDP reply keeps its TC bit so the client retries over TCP), or None: no upstream, too
    /// many forwards in flight, or none answered in time. SERVFAIL and REFUSED move on to the
    /// next upstream.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let _permit = self.permits.clone().try_acquire_owned().ok()?;
        let id = query.get(..2)?;
        let id = u16::from_be_bytes([id[0], id[1]]);
        let deadline = Instant::now() + self.budget;
        for up in &self.upstreams {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let wait = left.min(self.per_try);
            let got = if tcp {
                timeout(wait, ask_tcp(*up, query, id)).await
            } else {
                timeout(wait, ask_udp(*up, query, id)).await
            };
            if let Ok(Ok(reply)) = got {
                // RCODE: the low 4 bits of byte 3. 2 = SERVFAIL, 5 = REFUSED.
                if !matches!(reply[3] & 0x0f, 2 | 5) {
                    return Some(reply);
                }
            }
        }
        None
    }
}

/// A reply to `id` (header long enough, QR set).
fn is_reply_to(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && u16::from_be_bytes([reply[0], reply[1]]) == id && reply[2] & 0x80 != 0
}

async fn ask_udp(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    // A fresh socket per query: a random source port, and a connected socket takes replies
    // from the upstream only.
    let local: SocketAddr = match up {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let n = sock.recv(&mut buf).await?;
        if is_reply_to(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await?;
    if is_reply_to(&reply, id) {
        Ok(reply)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a reply to the query",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_three_servers_and_the_last_search_list() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver ::1\n\
                    search a.example b.example\noptions edns0 ndots:2\nnameserver 10.0.0.1\n\
                    nameserver 10.0.0.2\ndomain corp.example\nnameserver bogus\n";
        let r = parse_resolv_conf(text);
        assert_eq!(
            r.nameservers,
            ["127.0.0.53:53", "[::1]:53", "10.0.0.1:53"].map(|s| s.parse::<SocketAddr>().unwrap())
        );
        assert_eq!(r.search, ["corp.example"]);
        assert_eq!(
            parse_resolv_conf("search x.example y ; comment\n").search,
            ["x.example", "y"]
        );
        assert_eq!(parse_resolv_conf(""), NodeResolv::default());
    }

    #[test]
    fn upstream_flags_parse() {
        let ok = |s: &str| parse_upstream(s).unwrap().to_string();
        assert_eq!(ok("192.168.56.1"), "192.168.56.1:53");
        assert_eq!(ok("192.168.56.1:5353"), "192.168.56.1:5353");
        assert_eq!(ok("::1"), "[::1]:53");
        assert_eq!(ok("[2001:db8::1]:54"), "[2001:db8::1]:54");
        for bad in ["", "dns.example", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3"] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    /// An upstream on loopback that answers with `rcode` (echoing the query as a reply), or
    /// never answers when None.
    async fn fake_upstream(rcode: Option<u8>) -> SocketAddr {
        fake_upstream_flags(rcode, 0).await
    }

    /// The same, with more header flags set in byte 2 of the reply (0x02: TC).
    async fn fake_upstream_flags(rcode: Option<u8>, flags: u8) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                if let Some(rc) = rcode {
                    let mut r = buf[..n].to_vec();
                    r[2] |= 0x80 | flags;
                    r[3] = (r[3] & 0xf0) | rc;
                    let _ = sock.send_to(&r, peer).await;
                }
            }
        });
        addr
    }

    const QUERY: [u8; 12] = [0xab, 0xcd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    #[tokio::test]
    async fn the_first_upstream_that_answers_wins_within_the_budget() {
        let silent = fake_upstream(None).await;
        let refusing = fake_upstream(Some(5)).await;
        let good = fake_upstream(Some(0)).await;
        let f = Forwarder::with_limits(
            vec![silent, refusing, good],
            8,
            Duration::from_millis(200),
            Duration::from_secs(2),
        );
        let started = Instant::now();
        let reply = f.forward(&QUERY, false).await.expect("the third answers");
        assert!(is_reply_to(&reply, 0xabcd) && reply[3] & 0x0f == 0);
        assert!(started.elapsed() < Duration::from_secs(1));
        // None answers: None within the budget (then SERVFAIL).
        let f = Forwarder::with_limits(
            vec![silent, refusing],
            8,
            Duration::from_millis(200),
            Duration::from_millis(300),
        );
        let started = Instant::now();
        assert_eq!(f.forward(&QUERY, false).await, None);
        assert!(started.elapsed() < Duration::from_millis(600));
        assert_eq!(Forwarder::new(vec![]).forward(&QUERY, false).await, None);
    }

    #[tokio::test]
    async fn a_truncated_udp_reply_goes_back_as_it_came() {
        let truncating = fake_upstream_flags(Some(0), 0x02).await;
        let f = Forwarder::new(vec![truncating]);
        let reply = f.forward(&QUERY, false).await.unwrap();
        assert_eq!(
            reply[2] & 0x02,
            0x02,
            "TC stays set, so the client retries over TCP"
        );
    }

    #[tokio::test]
    async fn past_the_bound_a_forward_fails_at_once() {
        let silent = fake_upstream(None).await;
        let f = Arc::new(Forwarder::with_limits(
            vec![silent],
            1,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ));
        let f2 = f.clone();
        let held = tokio::spawn(async move { f2.forward(&QUERY, false).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert_eq!(f.forward(&QUERY, false).await, None);
        assert!(started.elapsed() < Duration::from_millis(50));
        held.abort();
    }
}
