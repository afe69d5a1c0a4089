//! A manager on etcd: follows what the election says. Elected, it loads the stored state,
//! brings it up to date as any start does, and leads; deposed, it follows again. Agents and
//! API requests find the leader through [`crate::cluster::Cluster::leading`].

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::unbounded_channel;

use crate::certs::Pki;
use crate::cluster::{lock, Shared};
use crate::etcd::{Etcd, Event, Fence, ManagerInfo};
use crate::state::State;
use crate::Startup;

pub async fn run(
    etcd: Etcd,
    cluster: Shared,
    fence: Arc<Mutex<Option<Fence>>>,
    startup: Startup,
    mut import: Option<State>,
    pki: Arc<Pki>,
    me: ManagerInfo,
) {
    let (tx, mut events) = unbounded_channel();
    etcd.campaign(me, tx);
    let set_fence = |f: Option<Fence>| *fence.lock().unwrap_or_else(|p| p.into_inner()) = f;
    while let Some(event) = events.recv().await {
        match event {
            Event::Elected(f) => {
                set_fence(Some(f));
                if let Err(e) = take_over(&etcd, &cluster, &startup, &mut import, &pki).await {
                    tracing::error!("take over as leader: {e:#}; giving the leadership up");
                    set_fence(None);
                    lock(&cluster).follow("taking over failed");
                    etcd.revoke().await;
                }
            }
            Event::Lost(why) => {
                set_fence(None);
                lock(&cluster).follow(&why);
            }
            Event::View { leader, managers } => lock(&cluster).set_view(leader, managers),
        }
    }
}

async fn take_over(
    etcd: &Etcd,
    cluster: &Shared,
    startup: &Startup,
    import: &mut Option<State>,
    pki: &Pki,
) -> anyhow::Result<()> {
    let stored = etcd.load().await?;
    let mut state = match (&stored, import.take()) {
        (None, Some(imported)) => imported,
        (Some(s), Some(_)) => {
            tracing::error!("--import: etcd holds a cluster already (another manager was first); nothing imported");
            s.clone()
        }
        (s, None) => s.clone().unwrap_or_default(),
    };
    if state.cluster_id.is_empty() {
        state.cluster_id = pki.cluster_id().to_string();
    }
    startup.prepare(&mut state, pki)?;
    lock(cluster).lead(&stored.unwrap_or_default(), state)?;
    Ok(())
}
