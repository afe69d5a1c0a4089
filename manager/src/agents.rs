//! Agent connections (proto::agent), all over TLS. A peer without a certificate may fetch the
//! CA or join with a token, one small frame within [`HANDSHAKE_TIMEOUT`], and is gone. A peer
//! with a certificate of the cluster's CA is the node its CN names: Hello → Welcome, then
//! assignments out and task states, applied revisions, heartbeats and renewals in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use proto::agent::{AgentMsg, ManagerMsg, NODE_DOWN_SECS};
use proto::excerpt;
use proto::wire::{frame_error, read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use trust::CertRole;

use crate::cluster::{lock, Liveness, Shared};
use crate::limits::{Slot, Slots, HANDSHAKE_TIMEOUT, MAX_PENDING, MAX_PENDING_PER_PEER};
use crate::outbox::{outbox, OutboxRx};
use crate::reports::{Inbox, Report};

type Tls = TlsStream<TcpStream>;

pub async fn serve(
    listener: TcpListener,
    cluster: Shared,
    inbox: Arc<Inbox>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let pending = Slots::new(MAX_PENDING, MAX_PENDING_PER_PEER);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Until it is authenticated, a peer holds one of a few places: a flood from one
                // address is turned away at accept, one from many makes the oldest go.
                let Some(slot) = pending.admit(peer.ip()) else {
                    tracing::debug!(%peer, "too many unauthenticated connections from this address: closing");
                    continue;
                };
                let span = tracing::info_span!("agent", %peer, node = tracing::field::Empty);
                let (cluster, inbox, acceptor) = (cluster.clone(), inbox.clone(), acceptor.clone());
                tokio::spawn(
                    async move {
                        match connection(stream, peer, acceptor, cluster, inbox, slot).await {
                            Ok(()) => tracing::debug!("connection ended"),
                            Err(e) => tracing::warn!("{e:#}"),
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(error = %e, "accept agent connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Drives [`crate::cluster::Cluster::tick`]: once a second, and at each deadline it names.
pub async fn tick(cluster: Shared) {
    let second = Duration::from_secs(1);
    let mut next_second = tokio::time::Instant::now();
    loop {
        let whole_second = tokio::time::Instant::now() >= next_second;
        if whole_second {
            next_second = tokio::time::Instant::now() + second;
        }
        let deadline = match lock(&cluster).tick(whole_second) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("periodic reconcile: {e}");
                None
            }
        };
        let mut wake = next_second;
        if let Some(ms) = deadline {
            let wait = Duration::from_millis(ms.saturating_sub(proto::unix_now_ms()));
            wake = wake.min(tokio::time::Instant::now() + wait);
        }
        tokio::time::sleep_until(wake).await;
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    cluster: Shared,
    inbox: Arc<Inbox>,
    slot: Slot,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    // Until a node has said Hello over a verified connection, it holds a pending place and may
    // be evicted to make room, and everything it sends is small and quick.
    let opened = tokio::select! {
        opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, open(stream, peer, acceptor, &cluster)) => {
            opened.context("TLS handshake and first message: timed out")??
        }
        _ = slot.evicted() => bail!("closed before authenticating, to make room for newer connections"),
    };
    drop(slot);
    let Some((node_id, hello, mut rd, mut wr)) = opened else {
        return Ok(());
    };
    session(&mut rd, &mut wr, &node_id, hello, &cluster, &inbox).await
}

/// The TLS handshake, then either a certificate-less peer's one request, answered (`None`), or
/// a node's Hello.
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    cluster: &Shared,
) -> anyhow::Result<Option<(String, Hello, BufReader<ReadHalf<Tls>>, WriteHalf<Tls>)>> {
    let tls = acceptor.accept(stream).await.context("TLS handshake")?;
    let Some(identity) = trust::tls::peer_identity(tls.get_ref().1) else {
        unauthenticated(tls, peer, cluster).await?;
        return Ok(None);
    };
    let identity = identity.context("read the peer's certificate")?;
    let node_id = identity.common_name.clone();
    tracing::Span::current().record("node", excerpt(&node_id).to_string().as_str());
    let (rd, mut wr) = tokio::io::split(tls);
    let mut rd = BufReader::new(rd);
    let cluster_id = lock(cluster).pki().cluster_id().to_string();
    if identity.cluster_id != cluster_id
        || !matches!(identity.role, Some(CertRole::Worker | CertRole::Manager))
    {
        let reason = "this certificate is not a node certificate of this cluster".to_string();
        return Err(refuse(&mut wr, reason).await);
    }
    let mut buf = Vec::new();
    if !read_frame(&mut rd, &mut buf, proto::PREAUTH_FRAME_BYTES)
        .await
        .context("read Hello")?
    {
        bail!("closed before Hello");
    }
    let hello = match proto::decode_frame::<AgentMsg>(&buf) {
        Ok(AgentMsg::Hello {
            version,
            hostname,
            advertise_addr,
            gwbridge_subnet,
            esp,
        }) => Hello {
            version,
            hostname,
            advertise_addr,
            gwbridge_subnet,
            esp,
        },
        Ok(_) => return Err(refuse(&mut wr, "the first message must be hello".into()).await),
        Err(e) => return Err(refuse(&mut wr, format!("decode hello: {}", frame_error(&e))).await),
    };
    Ok(Some((node_id, hello, rd, wr)))
}

struct Hello {
    version: u32,
    hostname: String,
    advertise_addr: std::net::IpAddr,
    gwbridge_subnet: Option<ipnet::Ipv4Net>,
    esp: Option<proto::agent::EspSupport>,
}

/// A peer without a certificate: one GetCa or Join, answered, then the connection closes.
async fn unauthenticated(tls: Tls, peer: SocketAddr, cluster: &Shared) -> anyhow::Result<()> {
    let (rd, mut wr) = tokio::io::split(tls);
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    if !read_frame(&mut rd, &mut buf, proto::PREAUTH_FRAME_BYTES)
        .await
        .context("read the first request")?
    {
        return Ok(());
    }
    let reply = match proto::decode_frame::<AgentMsg>(&buf) {
        Ok(AgentMsg::GetCa) => ManagerMsg::Ca {
            cert: lock(cluster).pki().ca_pem().to_string(),
        },
        Ok(AgentMsg::Join {
            version,
            token,
            csr,
            hostname,
            advertise_addr,
        }) => {
            if version != proto::PROTOCOL_VERSION {
                let reason = format!(
                    "protocol version {version} is not supported: this manager speaks version {}",
                    proto::PROTOCOL_VERSION
                );
                return Err(refuse(&mut wr, reason).await);
            }
            if let Some(redirect) = redirect(cluster) {
                write_frame(&mut wr, &redirect)
                    .await
                    .context("redirect the join")?;
                return Ok(());
            }
            let joined = {
                let mut c = lock(cluster);
                let role = c.pki().check_token(&token, &c.state().join_secrets);
                role.and_then(|role| {
                    c.join(&hostname, advertise_addr, role, &csr)
                        .map(|(node_id, cert)| (node_id, cert, role))
                })
            };
            match joined {
                Ok((node_id, cert, role)) => {
                    tracing::info!(node = %node_id, hostname = %excerpt(&hostname), addr = %advertise_addr, ?role, "node joined");
                    ManagerMsg::Joined { node_id, cert }
                }
                Err(reason) => {
                    tracing::warn!(hostname = %excerpt(&hostname), "join refused: {reason}");
                    return Err(refuse(&mut wr, reason).await);
                }
            }
        }
        Ok(_) => {
            let reason = format!("{peer} has no certificate of this cluster: join first (mesh-agent --join-token, from meshctl join-token worker)");
            return Err(refuse(&mut wr, reason).await);
        }
        Err(e) => {
            return Err(refuse(&mut wr, format!("decode request: {}", frame_error(&e))).await)
        }
    };
    write_frame(&mut wr, &reply).await.context("answer")?;
    Ok(())
}

async fn session(
    rd: &mut BufReader<ReadHalf<Tls>>,
    wr: &mut WriteHalf<Tls>,
    node_id: &str,
    hello: Hello,
    cluster: &Shared,
    inbox: &Inbox,
) -> anyhow::Result<()> {
    let Hello {
        version,
        hostname,
        advertise_addr,
        gwbridge_subnet,
        esp,
    } = hello;
    if version != proto::PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {version} is not supported: this manager speaks version {}",
            proto::PROTOCOL_VERSION
        );
        return Err(refuse(wr, reason).await);
    }
    if let Some(redirect) = redirect(cluster) {
        write_frame(wr, &redirect)
            .await
            .context("redirect the agent")?;
        tracing::info!(hostname = %excerpt(&hostname), "agent sent to the leader: this manager follows");
        return Ok(());
    }

    let (tx, mut rx) = outbox();
    let joined = lock(cluster).connect_agent(node_id, &hostname, advertise_addr, tx);
    let conn = match joined {
        Ok(conn) => conn,
        Err(e) => return Err(refuse(wr, e.to_string()).await),
    };
    tracing::info!(hostname = %excerpt(&hostname), addr = %advertise_addr, "agent connected");
    if let Err(e) = lock(cluster).transact(|s, _| {
        s.set_gwbridge_subnet(node_id, gwbridge_subnet);
        s.set_node_esp(node_id, esp.as_ref());
        Ok(())
    }) {
        tracing::error!(
            "record the gwbridge subnet of node {}: {e}",
            excerpt(&hostname)
        );
    }

    let mut buf = Vec::new();
    let result = converse(rd, wr, &mut rx, &mut buf, node_id, cluster, inbox).await;
    lock(cluster).disconnect_agent(node_id, conn);
    result
}

/// A follower's answer to an agent or a join: the leader's address, when one is known.
fn redirect(cluster: &Shared) -> Option<ManagerMsg> {
    let c = lock(cluster);
    (!c.leading()).then(|| c.not_leader())
}

/// Tells the peer why it is turned away (best effort: it may be gone) and returns the reason
/// as the connection's error.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, reason: String) -> anyhow::Error {
    if let Err(e) = write_frame(
        wr,
        &ManagerMsg::Refused {
            reason: reason.clone(),
        },
    )
    .await
    {
        tracing::debug!(error = %e, "send refusal");
    }
    anyhow::anyhow!(reason)
}

async fn converse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    rx: &mut OutboxRx,
    buf: &mut Vec<u8>,
    node_id: &str,
    cluster: &Shared,
    inbox: &Inbox,
) -> anyhow::Result<()> {
    // A connection that carries nothing for this long is dead even if TCP has not noticed.
    let silence = Duration::from_secs(NODE_DOWN_SECS * 3);
    let liveness = lock(cluster).liveness();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(msg) => {
                    if let ManagerMsg::Assign(a) = &msg {
                        tracing::info!(revision = a.revision, tasks = a.tasks.len(), networks = a.networks.len(), "send assignment");
                    }
                    write_frame(wr, &msg).await.context("send to agent")?;
                }
                None => bail!("the session was closed by the manager (a newer connection of the node, or the node was removed)"),
            },
            read = tokio::time::timeout(silence, read_frame(rd, buf, proto::AGENT_FRAME_BYTES)) => {
                let got = read
                    .map_err(|_| anyhow::anyhow!("no message for {}s", silence.as_secs()))?
                    .context("read from agent")?;
                if !got {
                    tracing::info!("agent disconnected");
                    return Ok(());
                }
                let msg: AgentMsg = proto::decode_frame(buf)
                    .map_err(|e| anyhow::anyhow!("decode agent message: {}", frame_error(&e)))?;
                buf.clear();
                if let Some(reply) = handle(msg, node_id, cluster, inbox, &liveness)? {
                    write_frame(wr, &reply).await.context("send to agent")?;
                }
            }
        }
    }
}

/// Answers what needs an answer (a renewal) and queues the rest for the reports thread
/// (crate::reports), so reading an agent never waits for the cluster's lock.
fn handle(
    msg: AgentMsg,
    node_id: &str,
    cluster: &Shared,
    inbox: &Inbox,
    liveness: &Liveness,
) -> anyhow::Result<Option<ManagerMsg>> {
    liveness.seen(node_id);
    let node = node_id.to_string();
    let mut reply = None;
    let report = match msg {
        AgentMsg::Heartbeat => Report::Alive { node_id: node },
        AgentMsg::Applied { revision } => {
            tracing::debug!(revision, "agent applied");
            Report::Applied {
                node_id: node,
                revision,
            }
        }
        AgentMsg::TaskStatus(status) => {
            // Every report at debug; the state's changes are logged where they are recorded.
            let error = status.error.as_deref().map(crate::state::task_error);
            tracing::debug!(task = %excerpt(&status.task_id), state = ?status.state, error, "task status");
            Report::Status {
                node_id: node,
                status,
            }
        }
        AgentMsg::LbState(report) => Report::Lb {
            node_id: node,
            report,
        },
        AgentMsg::Renew { csr } => {
            reply = Some(match lock(cluster).renew(node_id, &csr) {
                Ok(cert) => {
                    tracing::info!("renewed the node's certificate");
                    ManagerMsg::Certificate { cert }
                }
                Err(reason) => {
                    tracing::warn!("renewal refused: {reason}");
                    ManagerMsg::Refused { reason }
                }
            });
            Report::Alive { node_id: node }
        }
        AgentMsg::Hello { .. } => bail!("protocol error: a second hello"),
        AgentMsg::GetCa | AgentMsg::Join { .. } => {
            bail!("protocol error: getca or join on an authenticated connection")
        }
    };
    inbox.push(report);
    Ok(reply)
}
