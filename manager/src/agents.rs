//! Agent connections (proto::agent): Hello → Welcome, then assignments out and task states,
//! applied revisions and heartbeats in.

use std::time::Duration;

use anyhow::{bail, Context};
use proto::agent::{AgentMsg, ManagerMsg, NODE_DOWN_SECS};
use proto::model::NodeStatus;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cluster::{lock, Shared, TxError};
use crate::state::{OpError, Reason};
use crate::wire::{frame_error, read_frame, write_frame};

/// An agent that connects must say Hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, cluster: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("agent", %peer, node = tracing::field::Empty);
                let cluster = cluster.clone();
                tokio::spawn(
                    async move {
                        match session(stream, cluster).await {
                            Ok(()) => tracing::info!("agent disconnected"),
                            Err(e) => tracing::warn!("agent session ended: {e:#}"),
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

/// Drives [`crate::cluster::Cluster::tick`] once a second.
pub async fn tick(cluster: Shared) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        if let Err(e) = lock(&cluster).tick() {
            tracing::error!("periodic reconcile: {e}");
        }
    }
}

async fn session(stream: TcpStream, cluster: Shared) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let got = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd, &mut buf))
        .await
        .context("wait for Hello: timed out")?
        .context("read Hello")?;
    if !got {
        bail!("closed before Hello");
    }
    let hello = proto::decode_frame::<AgentMsg>(&buf);
    buf.clear();
    let (version, hostname, advertise_addr, node_id, gwbridge_subnet) = match hello {
        Ok(AgentMsg::Hello {
            version,
            hostname,
            advertise_addr,
            node_id,
            gwbridge_subnet,
        }) => (version, hostname, advertise_addr, node_id, gwbridge_subnet),
        Ok(_) => return Err(refuse(&mut wr, "the first message must be hello".into()).await),
        Err(e) => return Err(refuse(&mut wr, format!("decode hello: {}", frame_error(&e))).await),
    };
    if version != proto::PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {version} is not supported: this manager speaks version {}",
            proto::PROTOCOL_VERSION
        );
        return Err(refuse(&mut wr, reason)
            .await
            .context(format!("refuse agent {}", proto::excerpt(&hostname))));
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let joined = lock(&cluster).connect_agent(&hostname, advertise_addr, node_id.as_deref(), tx);
    let (node_id, conn) = match joined {
        Ok(joined) => joined,
        Err(e) => return Err(refuse(&mut wr, e.to_string()).await),
    };
    tracing::Span::current().record("node", node_id.as_str());
    tracing::info!(%hostname, addr = %advertise_addr, "agent connected");
    if let Err(e) = lock(&cluster).transact(|s, _| {
        s.set_gwbridge_subnet(&node_id, gwbridge_subnet);
        Ok(())
    }) {
        tracing::error!("record the gwbridge subnet of node {hostname}: {e}");
    }

    let result = converse(&mut rd, &mut wr, &mut rx, &mut buf, &node_id, &cluster).await;
    lock(&cluster).disconnect_agent(&node_id, conn);
    result
}

/// Tells the agent why it is turned away (best effort: it may be gone) and returns the reason
/// as the session's error.
async fn refuse(wr: &mut tokio::net::tcp::OwnedWriteHalf, reason: String) -> anyhow::Error {
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

async fn converse(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<ManagerMsg>,
    buf: &mut Vec<u8>,
    node_id: &str,
    cluster: &Shared,
) -> anyhow::Result<()> {
    // A connection that carries nothing for this long is dead even if TCP has not noticed.
    let silence = Duration::from_secs(NODE_DOWN_SECS * 3);
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(msg) => {
                    if let ManagerMsg::Assign(a) = &msg {
                        tracing::info!(revision = a.revision, tasks = a.tasks.len(), networks = a.networks.len(), "send assignment");
                    }
                    write_frame(wr, &msg).await.context("send to agent")?;
                }
                None => bail!("replaced by a newer connection of the same node"),
            },
            read = tokio::time::timeout(silence, read_frame(rd, buf)) => {
                let got = read
                    .map_err(|_| anyhow::anyhow!("no message for {}s", silence.as_secs()))?
                    .context("read from agent")?;
                if !got {
                    return Ok(());
                }
                let msg: AgentMsg = proto::decode_frame(buf)
                    .map_err(|e| anyhow::anyhow!("decode agent message: {}", frame_error(&e)))?;
                buf.clear();
                handle(msg, node_id, cluster)?;
            }
        }
    }
}

fn handle(msg: AgentMsg, node_id: &str, cluster: &Shared) -> anyhow::Result<()> {
    let mut c = lock(cluster);
    c.seen(node_id);
    match msg {
        AgentMsg::Heartbeat => {}
        AgentMsg::Applied { revision } => {
            tracing::debug!(revision, "agent applied");
            if let Err(e) = c.transact(|s, _| {
                s.set_applied(node_id, revision);
                Ok(())
            }) {
                tracing::error!("record applied revision {revision}: {e}");
            }
        }
        AgentMsg::TaskStatus(status) => {
            let span = tracing::info_span!("task", task = %proto::excerpt(&status.task_id));
            let _enter = span.enter();
            let error = status.error.as_deref().map(crate::state::task_error);
            tracing::info!(state = ?status.state, error, "task status");
            match c.transact(|s, now| s.task_status(node_id, &status, now)) {
                Ok(()) => {}
                // Tasks removed by a scale-down or service rm are reported as they stop.
                Err(TxError::Refused(OpError {
                    reason: Reason::NotFound { .. },
                    ..
                })) => tracing::debug!("status of a task the manager no longer has"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        AgentMsg::Hello { .. } => bail!("protocol error: a second hello"),
        AgentMsg::LbState(report) => c.record_lb(node_id, report),
    }
    // Heartbeats that stalled long enough to mark the node down have resumed: it is back.
    let down = c
        .state()
        .nodes
        .get(node_id)
        .is_some_and(|r| r.node.status == NodeStatus::Down);
    if down {
        tracing::info!("node is ready again");
        if let Err(e) = c.transact(|s, _| {
            s.set_node_status(node_id, NodeStatus::Ready);
            Ok(())
        }) {
            tracing::error!("mark node ready again: {e}");
        }
    }
    Ok(())
}
