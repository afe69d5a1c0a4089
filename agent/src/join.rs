//! The node's credentials: those it keeps from an earlier start, or new ones from joining the
//! cluster with a token. Without either the agent refuses to start: nothing runs on a node that
//! cannot prove it belongs to the cluster.
//!
//! A join goes to the leader of the managers: a follower sends it on (trust::join follows), and
//! a manager that is down or between leaders is left for the next known one on the next try.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tracing::{info, warn};
use trust::{Credentials, JoinToken};

/// Transient failures (the manager not up yet, no leader yet) are retried this often, this far
/// apart, as swarmkit's GetRemoteCA does.
const JOIN_TRIES: u32 = 5;
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// The node's credentials, joining at `managers` (tried in turn) if it has none yet.
pub async fn credentials(
    dir: &Path,
    managers: &[String],
    token: Option<&JoinToken>,
    hostname: &str,
    advertise_addr: IpAddr,
) -> anyhow::Result<Credentials> {
    if let Some(creds) = Credentials::load_node(dir)
        .with_context(|| format!("read the node's credentials in {}", dir.display()))?
    {
        let id = creds
            .identity()
            .with_context(|| format!("read the node's certificate in {}", dir.display()))?;
        if token.is_some() {
            info!(node = %id.common_name, "this node already joined the cluster: --join-token is not needed and is ignored");
        }
        if id.not_after < SystemTime::now() {
            warn!(node = %id.common_name, "the node's certificate has expired: the manager will refuse it; remove {} and join again with a fresh token", dir.display());
        }
        return Ok(creds);
    }
    let Some(token) = token else {
        bail!(
            "this node has not joined a cluster: start mesh-agent with --join-token TOKEN (run `meshctl join-token worker` on the manager to print the command)"
        );
    };
    let mut tries = 0;
    let (node_id, creds, manager) = loop {
        let manager = &managers[tries as usize % managers.len()];
        tries += 1;
        match trust::join::join(manager, token, hostname, advertise_addr).await {
            Ok((node_id, creds)) => break (node_id, creds, manager),
            Err(e) if e.is_transient() && tries < JOIN_TRIES => {
                warn!(%manager, "join the cluster (try {tries} of {JOIN_TRIES}): {e}");
                tokio::time::sleep(JOIN_RETRY).await;
            }
            Err(e) => return Err(e).context("join the cluster"),
        }
    };
    creds
        .store_node(dir)
        .with_context(|| format!("keep the node's credentials in {}", dir.display()))?;
    info!(node = %node_id, %manager, "joined the cluster");
    Ok(creds)
}
