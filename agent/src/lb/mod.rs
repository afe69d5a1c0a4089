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

use firewall::{Drift, Netfilter, NfnlSocket, NsNetfilter, Ruleset, SboxState};
use netns::Netns;
use proto::agent::LbReport;
use proto::model::LbKind;
use tracing::{info, warn};

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
#[derive(Debug, Clone, Default)]
pub struct LbSynced {
    /// Run again within this, at the latest (a drain deadline).
    pub wake: Option<Duration>,
    /// The sandbox's table had drifted and was rebuilt: how it differed.
    pub repaired: Option<String>,
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
    /// Returns how it differed when it did.
    fn recheck(&mut self) -> Result<Option<String>, LbError>;
    /// What is programmed now, for the manager.
    fn report(&self) -> LbReport;
}

/// Opens the backend for the sandbox `sbox` and applies the timeouts.
pub fn open(kind: LbKind, sbox: Netns, opts: LbOptions) -> Result<Box<dyn LoadBalancer>, LbError> {
    Ok(match kind {
        LbKind::Ipvs => Box::new(ipvs::IpvsLb::open(sbox, opts)?),
        LbKind::Nftables => Box::new(nft::NftLb::open(sbox)),
    })
}

/// Our table in one namespace: what we know of it, and the netlink socket that carries
/// incremental changes there (opened by the first one and kept: see [`NfnlSocket`]).
pub struct Table<R> {
    known: Known<R>,
    nfnl: OnceLock<NfnlSocket>,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            known: Known::default(),
            nfnl: OnceLock::new(),
        }
    }
}

impl<R> Table<R> {
    /// What we last applied, if anything.
    pub fn applied(&self) -> Option<&R> {
        self.known.applied.as_ref()
    }
}

/// What we know of a namespace's table: what we last applied (or found already there), and
/// the namespace's nf_tables generation when the table was last found right.
struct Known<R> {
    applied: Option<R>,
    checked_at: Option<u32>,
}

impl<R> Default for Known<R> {
    fn default() -> Self {
        Known {
            applied: None,
            checked_at: None,
        }
    }
}

/// What [`sync_table`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    Unchanged,
    /// A new desired state applied.
    Applied,
    /// The table had drifted from the desired state: rebuilt. Says how it differed.
    Repaired(String),
}

/// The kernel side of one namespace's table, behind a trait so that the decisions of
/// [`sync_table`] are tested without root.
trait TableKernel {
    /// The namespace's name, for the log.
    fn name(&self) -> String;
    fn netfilter(&self) -> &dyn Netfilter;
    /// The namespace's nf_tables generation; `None` if it cannot be read.
    fn generation(&self) -> Option<u32>;
}

struct NsTable<'a> {
    nf: NsNetfilter<'a>,
    ns: &'a Netns,
    nfnl: &'a OnceLock<NfnlSocket>,
}

impl TableKernel for NsTable<'_> {
    fn name(&self) -> String {
        self.ns.name()
    }

    fn netfilter(&self) -> &dyn Netfilter {
        &self.nf
    }

    /// On the table's kept socket where there is one (closing a socket can wait for
    /// nf_tables' deferred frees).
    fn generation(&self) -> Option<u32> {
        match self.nfnl.get() {
            Some(nfnl) => nfnl.generation(),
            None => firewall::generation(self.ns),
        }
        .ok()
    }
}

/// Applies `next` to a namespace's table. The first time (nothing applied yet, e.g. after a
/// restart) the table is read back and left alone if it already holds exactly `next`, else
/// rebuilt in full, atomically (conntrack entries survive it). Then only what changed, as one
/// nf_tables netlink batch where the table has an incremental form (the sandboxes' tables)
/// and an `nft` batch otherwise. Should an incremental batch fail (the kernel's table is not
/// what we last applied: changed behind our back), the table is rebuilt atomically instead, a
/// repair. With `recheck`, reads the table back and rebuilds it if its content differs,
/// unless the namespace's nf_tables generation has not moved since the table was last found
/// right (nothing can have changed it then, and asking is far cheaper than an `nft` listing).
pub fn sync_table<R: Ruleset + Clone + PartialEq>(
    ns: &Netns,
    table: &mut Table<R>,
    next: &R,
    recheck: bool,
) -> Result<Synced, firewall::Error> {
    let kernel = NsTable {
        nf: NsNetfilter::with_nfnl(ns, &table.nfnl),
        ns,
        nfnl: &table.nfnl,
    };
    sync_known(&kernel, &mut table.known, next, recheck)
}

fn sync_known<R: Ruleset + Clone + PartialEq>(
    kernel: &dyn TableKernel,
    known: &mut Known<R>,
    next: &R,
    recheck: bool,
) -> Result<Synced, firewall::Error> {
    let nf = kernel.netfilter();
    let Some(applied) = &known.applied else {
        // What the kernel holds is not known: a restart finds its tables right, and writes
        // nothing to them. A table that differs here may just be an older desired state.
        let before = kernel.generation();
        let drift = firewall::reconcile(nf, next)?;
        known.checked_at = checked_after(&drift, before, kernel);
        known.applied = Some(next.clone());
        return Ok(match drift {
            None => Synced::Unchanged,
            // A new namespace's first build.
            Some(Drift::Missing) => Synced::Applied,
            Some(drift) => {
                let netns = kernel.name();
                info!(%netns, differed = %drift, "table {} rebuilt", firewall::TABLE);
                Synced::Applied
            }
        });
    };
    if applied != next {
        let synced = firewall::sync_report(nf, Some(applied), next)?;
        known.applied = Some(next.clone());
        // Our write is one transaction: if the generation moved by exactly one since the table
        // was last found right, nothing else was written meanwhile and it is right still.
        // Otherwise (or after a rebuild) the next check lists it once.
        let now = match synced {
            firewall::Synced::Applied => kernel.generation(),
            firewall::Synced::Rebuilt(_) => None,
        };
        known.checked_at = right_after_own_write(known.checked_at, now);
        return Ok(match synced {
            firewall::Synced::Applied => Synced::Applied,
            firewall::Synced::Rebuilt(e) => {
                warn!(error = %e, "incremental change failed: the table was rebuilt");
                Synced::Repaired(format!("an incremental change failed: {e}"))
            }
        });
    }
    if !recheck {
        return Ok(Synced::Unchanged);
    }
    // Read before listing: a change made after it moves the generation past it.
    let before = kernel.generation();
    if before.is_some() && before == known.checked_at {
        return Ok(Synced::Unchanged);
    }
    let drift = firewall::reconcile(nf, next)?;
    known.checked_at = checked_after(&drift, before, kernel);
    Ok(match drift {
        None => Synced::Unchanged,
        Some(drift) => Synced::Repaired(drift.to_string()),
    })
}

/// The generation at which a table compared at generation `before` is known right: `before`
/// if it was, and after our rebuild the generation it brought, if it was the only write
/// meanwhile (so a comparison that never finds a table right rebuilds it once, not again on
/// the notifications of its own rebuild).
fn checked_after(
    drift: &Option<Drift>,
    before: Option<u32>,
    kernel: &dyn TableKernel,
) -> Option<u32> {
    match drift {
        None => before,
        Some(_) => right_after_own_write(before, kernel.generation()),
    }
}

/// Compares a namespace's table with what was last applied to it (nothing if nothing was), and
/// rebuilds it if it drifted. Returns how it differed when it did.
pub fn recheck_table<R: Ruleset + Clone + PartialEq>(
    ns: &Netns,
    table: &mut Table<R>,
) -> Result<Option<String>, firewall::Error> {
    let Some(applied) = table.known.applied.clone() else {
        return Ok(None);
    };
    Ok(match sync_table(ns, table, &applied, true)? {
        Synced::Repaired(how) => Some(how),
        Synced::Unchanged | Synced::Applied => None,
    })
}

/// The generation at which a table found right at `before` is known right after one
/// transaction of ours brought the namespace to `now`: `now` if it was the only one.
pub(crate) fn right_after_own_write(before: Option<u32>, now: Option<u32>) -> Option<u32> {
    match (before, now) {
        (Some(before), Some(now)) if now == before.wrapping_add(1) => Some(now),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firewall::{FakeNetfilter, TaskState};
    use std::cell::Cell;

    use firewall::fixtures::{task, TASK as LISTED};

    /// [`LISTED`] with one backend of a VIP's rule edited: the same counts everywhere.
    fn edited() -> String {
        let edited = LISTED.replace("\"10.0.9.6\"", "\"10.0.9.7\"");
        assert_ne!(edited, LISTED);
        edited
    }

    /// A kernel whose generation moves with every write: each batch of ours, and `others`.
    #[derive(Default)]
    struct FakeTable {
        nf: FakeNetfilter,
        others: Cell<u32>,
    }

    impl TableKernel for FakeTable {
        fn name(&self) -> String {
            "fake".into()
        }

        fn netfilter(&self) -> &dyn Netfilter {
            &self.nf
        }

        fn generation(&self) -> Option<u32> {
            Some(self.nf.applied.lock().unwrap().len() as u32 + self.others.get())
        }
    }

    impl FakeTable {
        fn listing(&self, json: Option<String>) {
            *self.nf.listing.lock().unwrap() = json;
        }

        fn writes(&self) -> Vec<String> {
            self.nf.applied.lock().unwrap().clone()
        }
    }

    #[test]
    fn a_restart_over_a_right_table_writes_nothing() {
        let k = FakeTable::default();
        k.listing(Some(LISTED.into()));
        let mut known = Known::default();
        let desired = task();
        let synced = sync_known(&k, &mut known, &desired, false).unwrap();
        assert_eq!(synced, Synced::Unchanged);
        assert_eq!(
            k.writes(),
            Vec::<String>::new(),
            "a right table is not rebuilt"
        );
        assert_eq!(known.applied.as_ref(), Some(&desired));
        // Found right at this generation: the next check does not even list it (a listing
        // now would find no table and rebuild it).
        k.listing(None);
        let synced = sync_known(&k, &mut known, &desired, true).unwrap();
        assert_eq!(synced, Synced::Unchanged);
        assert_eq!(k.writes(), Vec::<String>::new());
    }

    #[test]
    fn a_restart_over_another_or_no_table_rebuilds_it() {
        let desired = task();
        let full = TaskState::render(None, &desired).unwrap().to_string();
        for listing in [Some(edited()), None] {
            let k = FakeTable::default();
            k.listing(listing);
            let mut known = Known::default();
            // Not a repair: what differs may be the state before the restart.
            let synced = sync_known(&k, &mut known, &desired, false).unwrap();
            assert_eq!(synced, Synced::Applied);
            assert_eq!(k.writes(), std::slice::from_ref(&full));
        }
    }

    #[test]
    fn a_recheck_repairs_an_edit_that_kept_the_counts_and_says_what_differed() {
        let k = FakeTable::default();
        k.listing(Some(LISTED.into()));
        let mut known = Known::default();
        let desired = task();
        sync_known(&k, &mut known, &desired, false).unwrap();
        // Someone edits the rule.
        k.others.set(1);
        k.listing(Some(edited()));
        let synced = sync_known(&k, &mut known, &desired, true).unwrap();
        assert_eq!(
            synced,
            Synced::Repaired(
                "chain vip-10.0.9.2 rule 1 differs: \
                 `dnat to numgen inc mod 2 map { 0 : 10.0.9.5, 1 : 10.0.9.7 }` instead of \
                 `dnat to numgen inc mod 2 map { 0 : 10.0.9.5, 1 : 10.0.9.6 }`"
                    .into()
            )
        );
        let full = TaskState::render(None, &desired).unwrap().to_string();
        assert_eq!(k.writes(), std::slice::from_ref(&full));
        // The recheck that the rebuild's own notifications set off: our write alone moved the
        // generation, so the table is right without a listing (this one would rebuild again).
        let synced = sync_known(&k, &mut known, &desired, true).unwrap();
        assert_eq!(synced, Synced::Unchanged);
        assert_eq!(k.writes(), [full]);
    }

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
