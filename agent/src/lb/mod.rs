//! The load balancer of a sandbox (the routing mesh's inside ingress_sbox; with IPVS also the
//! VIPs' inside each `lb_<network>`), behind one trait with one module per backend: [`ipvs`]
//! (FWM virtual services, Swarm's way) and [`nft`] (nftables maps + numgen). Both also own the
//! sandbox's nftables table (marks and SNAT; for nft also the balancing).

pub mod ipvs;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Duration;

use firewall::{NfnlSocket, NsNetfilter, Ruleset, SboxState};
use netns::Netns;
use proto::agent::LbReport;
use proto::model::LbKind;
use tracing::warn;

/// Connection timeouts in seconds; `None` keeps the kernel's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Option<NonZeroU32>,
    pub tcp_fin: Option<NonZeroU32>,
    pub udp: Option<NonZeroU32>,
}

#[derive(Debug, Clone, Copy)]
pub struct LbOptions {
    /// How long a removed IPVS destination keeps weight 0 before it is deleted.
    pub drain: Duration,
    pub timeouts: Timeouts,
}

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("load-balancer table: {0}")]
    Firewall(#[from] firewall::Error),
    #[error("IPVS: {0}")]
    Ipvs(#[from] ::ipvs::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// By fwmark, the addresses of tasks that left a service's backends but may still run: their
/// open connections are to go on, without new ones.
pub type DrainingBackends = BTreeMap<u32, BTreeSet<Ipv4Addr>>;

/// What one [`LoadBalancer::sync`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct LbSynced {
    /// Run again within this, at the latest (a drain deadline).
    pub wake: Option<Duration>,
    /// The sandbox's table had drifted and was rebuilt.
    pub repaired: bool,
}

pub trait LoadBalancer: Send {
    /// Programs `desired` (services by fwmark with their backends) into the sandbox, changing
    /// only what differs, and keeps the open connections of `draining`. `recheck` also
    /// re-reads the kernel and repairs drift.
    fn sync(
        &mut self,
        desired: &SboxState,
        draining: &DrainingBackends,
        recheck: bool,
    ) -> Result<LbSynced, LbError>;
    /// Compares the sandbox's table with what was last applied, and rebuilds it if it drifted.
    /// Returns whether it did.
    fn recheck(&mut self) -> Result<bool, LbError>;
    /// What is programmed now, for the manager.
    fn report(&self) -> LbReport;
}

/// Opens the backend for the sandbox `sbox` and applies the timeouts.
pub fn open(kind: LbKind, sbox: Netns, opts: LbOptions) -> Result<Box<dyn LoadBalancer>, LbError> {
    Ok(match kind {
        LbKind::Ipvs => Box::new(ipvs::IpvsLb::open(sbox, opts)?),
        LbKind::Nftables => Box::new(nft::NftLb::open(sbox, opts.timeouts)?),
    })
}

/// Our table in one namespace: what we last applied, the namespace's nf_tables generation
/// when the table was last found right, and the netlink socket that carries incremental
/// changes there (opened by the first one and kept: see [`NfnlSocket`]).
pub struct Table<R> {
    applied: Option<R>,
    checked_at: Option<u32>,
    nfnl: OnceLock<NfnlSocket>,
}

impl<R> Table<R> {
    /// What we last applied, if anything.
    pub fn applied(&self) -> Option<&R> {
        self.applied.as_ref()
    }
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            applied: None,
            checked_at: None,
            nfnl: OnceLock::new(),
        }
    }
}

/// What [`sync_table`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    Unchanged,
    /// A new desired state applied.
    Applied,
    /// The table had drifted from the desired state: rebuilt.
    Repaired,
}

/// Applies `next` to a namespace's table: a full atomic rebuild the first time (nothing applied
/// yet, e.g. after a restart: conntrack entries survive it), then only what changed, as one
/// nf_tables netlink batch where the table has an incremental form (the sandboxes' tables) and
/// an `nft` batch otherwise. Should an incremental batch fail (the kernel's table is not what
/// we last applied: changed behind our back), the table is rebuilt atomically instead, a
/// repair. With `recheck`, reads the table back and rebuilds it if it drifted, unless the
/// namespace's nf_tables generation has not moved since the table was last found right
/// (nothing can have changed it then, and asking is far cheaper than an `nft` listing).
pub fn sync_table<R: Ruleset + Clone + PartialEq>(
    ns: &Netns,
    table: &mut Table<R>,
    next: &R,
    recheck: bool,
) -> Result<Synced, firewall::Error> {
    if table.applied.as_ref() != Some(next) {
        let nf = NsNetfilter::with_nfnl(ns, &table.nfnl);
        let synced = firewall::sync_report(&nf, table.applied.as_ref(), next)?;
        table.applied = Some(next.clone());
        // Our write is one transaction: if the generation moved by exactly one since the table
        // was last found right, nothing else was written meanwhile and it is right still.
        // Otherwise (or after a rebuild) the next check lists it once.
        let now = match synced {
            firewall::Synced::Applied => generation(ns, table),
            firewall::Synced::Rebuilt(_) => None,
        };
        table.checked_at = right_after_own_write(table.checked_at, now);
        return Ok(match synced {
            firewall::Synced::Applied => Synced::Applied,
            firewall::Synced::Rebuilt(e) => {
                warn!(error = %e, "incremental change failed: the table was rebuilt");
                Synced::Repaired
            }
        });
    }
    if !recheck {
        return Ok(Synced::Unchanged);
    }
    let nf = NsNetfilter::new(ns);
    // Read before listing: a change made after it moves the generation past it.
    let generation = generation(ns, table);
    if generation.is_some() && generation == table.checked_at {
        return Ok(Synced::Unchanged);
    }
    let rebuilt = firewall::reconcile(&nf, next)?;
    table.checked_at = if rebuilt { None } else { generation };
    Ok(if rebuilt {
        Synced::Repaired
    } else {
        Synced::Unchanged
    })
}

/// Compares a namespace's table with what was last applied to it (nothing if nothing was), and
/// rebuilds it if it drifted. Returns whether it did.
pub fn recheck_table<R: Ruleset + Clone + PartialEq>(
    ns: &Netns,
    table: &mut Table<R>,
) -> Result<bool, firewall::Error> {
    let Some(applied) = table.applied.clone() else {
        return Ok(false);
    };
    Ok(sync_table(ns, table, &applied, true)? == Synced::Repaired)
}

/// The generation at which a table found right at `before` is known right after one
/// transaction of ours brought the namespace to `now`: `now` if it was the only one.
pub(crate) fn right_after_own_write(before: Option<u32>, now: Option<u32>) -> Option<u32> {
    match (before, now) {
        (Some(before), Some(now)) if now == before.wrapping_add(1) => Some(now),
        _ => None,
    }
}

/// The namespace's nf_tables generation, on the table's kept socket where there is one (closing
/// a socket can wait for nf_tables' deferred frees); `None` if it cannot be read.
fn generation<R>(ns: &Netns, table: &Table<R>) -> Option<u32> {
    match table.nfnl.get() {
        Some(nfnl) => nfnl.generation(),
        None => firewall::generation(ns),
    }
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_write_of_ours_alone_keeps_a_table_known_right() {
        assert_eq!(right_after_own_write(Some(41), Some(42)), Some(42));
        assert_eq!(
            right_after_own_write(Some(u32::MAX), Some(0)),
            Some(0),
            "wraps"
        );
        // Someone else wrote too, before or after ours: list it.
        assert_eq!(right_after_own_write(Some(41), Some(43)), None);
        // Never found right, or the generation unreadable: list it.
        assert_eq!(right_after_own_write(None, Some(42)), None);
        assert_eq!(right_after_own_write(Some(41), None), None);
    }
}
