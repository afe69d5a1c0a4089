//! The listeners at 127.0.0.11:53 (UDP and TCP) inside each task's namespace, all served by
//! the agent's runtime.
//!
//! Port 53 is bound directly rather than Docker's random port with a DNAT of :53 to it in the
//! task's nat table: no per-task nftables table to keep in step, no conntrack entry per query.
//! Measured with dnsperf against dnsmasq on 127.0.0.11 in a namespace, the DNAT path gave
//! 0.82-0.85x the queries per second of the direct one. The price is that a task cannot bind
//! 0.0.0.0:53 itself; it can still serve DNS on its overlay address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::debug;

use super::records::Records;
use super::resolver::{decide, Decision, Outcome};
use super::upstream::Forwarder;
use crate::metrics::AgentMetrics;
use prometheus_client::metrics::counter::Counter;

pub const LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    Ipv4Addr::new(127, 0, 0, 11),
    53,
));

/// TCP connections one listener serves at once; more are closed at once. Only processes in
/// the task's own namespace reach its listener, so a task can exhaust only its own.
pub const MAX_TCP_CONNS: usize = 64;
/// A TCP client has this long to send each whole query (length and body), and to take each reply.
pub const TCP_DEADLINE: Duration = Duration::from_secs(3);

/// What every listener shares.
pub struct Shared {
    records: watch::Receiver<Arc<Records>>,
    forwarder: Forwarder,
    /// By [`Outcome`], in the order of [`Outcome::ALL`].
    counters: Vec<Counter>,
}

impl Shared {
    pub fn new(
        records: watch::Receiver<Arc<Records>>,
        forwarder: Forwarder,
        metrics: &AgentMetrics,
    ) -> Shared {
        let counters = Outcome::ALL
            .iter()
            .map(|o| metrics.dns_queries(o.as_str()))
            .collect();
        Shared {
            records,
            forwarder,
            counters,
        }
    }

    fn count(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.counters[i].inc();
        }
    }

    fn records(&self) -> Arc<Records> {
        self.records.borrow().clone()
    }

    fn decide(&self, task: &str, query: &[u8], tcp: bool) -> Decision {
        decide(&self.records(), task, query, tcp, &mut rand::rng())
    }

    /// The reply to send for a decision (forwarding if it says so), or None to send nothing.
    async fn finish(&self, query: &[u8], tcp: bool, decision: Decision) -> Option<Vec<u8>> {
        let (reply, outcome) = match decision {
            Decision::Reply { bytes, outcome, .. } => (Some(bytes), outcome),
            Decision::Drop => (None, Outcome::Dropped),
            Decision::Forward { failed } => match self.forwarder.forward(query, tcp).await {
                Some(r) => (Some(r), Outcome::Forwarded),
                None => (Some(failed), Outcome::ServFail),
            },
        };
        self.count(outcome);
        reply
    }
}

/// Binds both sockets in the calling thread's namespace (a thread inside the task's).
pub fn bind() -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(LISTEN)?;
    let tcp = std::net::TcpListener::bind(LISTEN)?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

/// Serves the sockets on runtime `rt` until the returned set is dropped (which aborts every
/// task in it, connections included).
pub fn serve(
    task: String,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    shared: Arc<Shared>,
    rt: &Handle,
) -> std::io::Result<JoinSet<()>> {
    // Registered with `rt`'s reactor, where they are polled.
    let _in = rt.enter();
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    let tcp = TcpListener::from_std(tcp)?;
    let task: Arc<str> = task.into();
    let mut set = JoinSet::new();
    set.spawn_on(serve_udp(udp, task.clone(), shared.clone()), rt);
    set.spawn_on(serve_tcp(tcp, task, shared), rt);
    Ok(set)
}

/// Replies already given on one listener, by the query's bytes after its id: the same question
/// from the same task gets the same bytes until the records change, without parsing and
/// encoding again (what lets the resolver keep up with dnsmasq, B8).
#[derive(Default)]
struct AnswerCache {
    /// The records the entries were made from; held, so a new set is never taken for it.
    records: Option<Arc<Records>>,
    replies: HashMap<Box<[u8]>, (Outcome, Vec<u8>)>,
}

/// Entries one listener keeps; a task asks for few names, so a full cache is simply emptied.
const CACHE_ENTRIES: usize = 256;

impl AnswerCache {
    /// The reply to `query` made from `records`, with the query's id.
    fn get(&mut self, records: &Arc<Records>, query: &[u8]) -> Option<(Outcome, Vec<u8>)> {
        if !self
            .records
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, records))
        {
            self.replies.clear();
            self.records = Some(records.clone());
        }
        let (outcome, bytes) = self.replies.get(query.get(2..)?)?;
        let mut reply = bytes.clone();
        reply[..2].copy_from_slice(&query[..2]);
        Some((*outcome, reply))
    }

    fn put(&mut self, query: &[u8], outcome: Outcome, reply: &[u8]) {
        if self.replies.len() >= CACHE_ENTRIES {
            self.replies.clear();
        }
        if let Some(key) = query.get(2..) {
            self.replies.insert(key.into(), (outcome, reply.to_vec()));
        }
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, task: Arc<str>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    let mut forwards = JoinSet::new();
    let mut cache = AnswerCache::default();
    loop {
        tokio::select! {
            got = sock.recv_from(&mut buf) => {
                let Ok((n, peer)) = got else {
                    // Errors on an unconnected UDP socket are transient; never spin on one.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let query = &buf[..n];
                let records = shared.records();
                if let Some((outcome, reply)) = cache.get(&records, query) {
                    shared.count(outcome);
                    let _ = sock.send_to(&reply, peer).await;
                    continue;
                }
                let decision = decide(&records, &task, query, false, &mut rand::rng());
                match decision {
                    // Upstreams may take seconds: never waited for in this loop.
                    forward @ Decision::Forward { .. } => {
                        let (sock, shared, query) = (sock.clone(), shared.clone(), query.to_vec());
                        forwards.spawn(async move {
                            if let Some(reply) = shared.finish(&query, false, forward).await {
                                let _ = sock.send_to(&reply, peer).await;
                            }
                        });
                    }
                    local => {
                        if let Decision::Reply { bytes, outcome, cacheable: true } = &local {
                            cache.put(query, *outcome, bytes);
                        }
                        if let Some(reply) = shared.finish(query, false, local).await {
                            let _ = sock.send_to(&reply, peer).await;
                        }
                    }
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
        }
    }
}

async fn serve_tcp(listener: TcpListener, task: Arc<str>, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            got = listener.accept() => {
                let Ok((stream, _)) = got else {
                    // EMFILE and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if conns.len() >= MAX_TCP_CONNS {
                    debug!(task = %task, "too many DNS TCP connections; closing a new one");
                    continue;
                }
                conns.spawn(serve_conn(stream, task.clone(), shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Queries in turn on one connection, each within [`TCP_DEADLINE`]; a short, slow, cut or
/// reset message ends the connection, and only it.
async fn serve_conn(mut s: TcpStream, task: Arc<str>, shared: Arc<Shared>) {
    loop {
        let query = match timeout(TCP_DEADLINE, read_msg(&mut s)).await {
            Ok(Ok(Some(q))) => q,
            _ => return,
        };
        let decision = shared.decide(&task, &query, true);
        let Some(reply) = shared.finish(&query, true, decision).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(timeout(TCP_DEADLINE, s.write_all(&out)).await, Ok(Ok(()))) {
            return;
        }
    }
}

/// One length-prefixed message; None at a clean end of stream, an error for anything cut short
/// or too short for a DNS header.
async fn read_msg(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u16::from_be_bytes(len) as usize;
    if len < 12 {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut q = vec![0u8; len];
    s.read_exact(&mut q).await?;
    Ok(Some(q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::tests::sample;
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use tokio::time::Instant;

    /// A listener pair on loopback (any port) for the sample's `client.1.k`, no upstream.
    fn start() -> (SocketAddr, JoinSet<()>) {
        let (udp, tcp) = loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let (_, records) = watch::channel(Arc::new(Records::build(&sample())));
        let shared = Shared::new(records, Forwarder::new(vec![]), &AgentMetrics::new());
        let set = serve(
            "client.1.k".into(),
            udp,
            tcp,
            Arc::new(shared),
            &Handle::current(),
        )
        .unwrap();
        (addr, set)
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn framed(q: &[u8]) -> Vec<u8> {
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(q);
        out
    }

    async fn read_reply(s: &mut TcpStream) -> Message {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        Message::from_vec(&body).unwrap()
    }

    fn first_a(m: &Message) -> Option<Ipv4Addr> {
        m.answers().iter().find_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
    }

    #[test]
    fn cached_replies_take_the_query_id_and_go_with_their_records() {
        let records = Arc::new(Records::build(&sample()));
        let mut cache = AnswerCache::default();
        let q = query("web");
        assert!(cache.get(&records, &q).is_none());
        let decision = decide(&records, "client.1.k", &q, false, &mut rand::rng());
        let Decision::Reply {
            bytes,
            outcome,
            cacheable: true,
        } = decision
        else {
            panic!("a VIP answer is cacheable: {decision:?}")
        };
        cache.put(&q, outcome, &bytes);
        let mut again = q.clone();
        again[..2].copy_from_slice(&0xbeefu16.to_be_bytes());
        let (o, reply) = cache.get(&records, &again).unwrap();
        assert_eq!(o, Outcome::Answered);
        assert_eq!(reply[..2], [0xbe, 0xef]);
        assert_eq!(reply[2..], bytes[2..]);
        // Another name, or the same name from new records: not from the cache.
        assert!(cache.get(&records, &query("tasks.web")).is_none());
        let newer = Arc::new(Records::build(&sample()));
        assert!(cache.get(&newer, &q).is_none());
        // dnsrr answers are shuffled per query: never cached.
        let rr = decide(&newer, "client.1.k", &query("rr"), false, &mut rand::rng());
        assert!(
            matches!(
                rr,
                Decision::Reply {
                    cacheable: false,
                    ..
                }
            ),
            "{rr:?}"
        );
    }

    #[tokio::test]
    async fn a_cut_tcp_query_holds_up_nobody_and_is_closed() {
        let (addr, _serving) = start();
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck.write_all(&[0, 100, 0, 7, 1]).await.unwrap();
        let started = Instant::now();
        let mut other = TcpStream::connect(addr).await.unwrap();
        // Two queries in one write: both answered, in order, on the one connection.
        let mut two = framed(&query("web"));
        two.extend(framed(&query("tasks.rr")));
        other.write_all(&two).await.unwrap();
        let first = read_reply(&mut other).await;
        assert_eq!(first_a(&first), Some("10.0.9.2".parse().unwrap()));
        let second = read_reply(&mut other).await;
        assert_eq!(second.answers().len(), 2);
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut byte = [0u8; 1];
        let closed = timeout(TCP_DEADLINE + Duration::from_secs(2), stuck.read(&mut byte)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }

    #[tokio::test]
    async fn past_the_bound_a_new_tcp_connection_is_closed() {
        let (addr, _serving) = start();
        let mut idle = Vec::new();
        for _ in 0..MAX_TCP_CONNS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the listener take them all before the next one.
        let mut probe = idle.pop().unwrap();
        probe.write_all(&framed(&query("web"))).await.unwrap();
        read_reply(&mut probe).await;
        idle.push(probe);
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let got = timeout(Duration::from_secs(1), extra.read(&mut byte)).await;
        assert!(matches!(got, Ok(Ok(0)) | Ok(Err(_))), "{got:?}");
    }

    #[tokio::test]
    async fn udp_garbage_gets_formerr_or_nothing_and_answers_go_on() {
        let (addr, _serving) = start();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(addr).await.unwrap();
        let mut buf = [0u8; 4096];
        let mut cut = query("web");
        cut.truncate(cut.len() - 3);
        sock.send(&cut).await.unwrap();
        let n = timeout(Duration::from_secs(1), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!((r.id(), r.response_code()), (7, ResponseCode::FormErr));
        for junk in [&[1u8, 2, 3][..], &[0xff; 3000]] {
            sock.send(junk).await.unwrap();
        }
        sock.send(&query("www")).await.unwrap();
        let r = loop {
            let n = timeout(Duration::from_secs(1), sock.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let r = Message::from_vec(&buf[..n]).unwrap();
            if r.response_code() == ResponseCode::NoError {
                break r;
            }
        };
        assert_eq!(first_a(&r), Some("10.0.9.2".parse().unwrap()));
        // Not a cluster name and no upstream: SERVFAIL, at once.
        sock.send(&query("example.com.")).await.unwrap();
        let n = timeout(Duration::from_secs(1), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.response_code(), ResponseCode::ServFail);
    }
}
