//! The IPVS backend, as Swarm programs it: one FWM virtual service per balanced service (rr,
//! no persistence), each task's address a masq destination with port 0 and weight 1. The
//! sandbox table only marks and SNATs. In ingress_sbox the services are the published ones;
//! in `lb_<network>`, the network's VIPs.
//!
//! Sync diffs against an IPVS dump, never flush-and-refill, so a restarted agent adopts what
//! is there without breaking a connection. A backend that goes is drained: weight 0 first (no
//! new connections, established ones go on). It stays so while the manager lists its task as
//! draining (out of the balancers, or stopping within its grace period), and is deleted the
//! agent's grace period (`--drain-seconds`) after it left that list; with
//! `expire_nodest_conn=1` its remaining connections then expire, and its UDP (and SYN_SENT)
//! conntrack entries are deleted so flows move to live backends. A service that goes is
//! drained the same way, then deleted once it has no destination left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use firewall::{Netfilter, NsNetfilter, SboxState};
use ipvs::{Client, Destination, Family, Forward, Service, ServiceKey, TimeoutChange};
use netns::Netns;
use proto::agent::{LbBackendReport, LbReport, LbServiceReport};

use super::{
    recheck_table, sync_table, DrainingBackends, LbError, LbOptions, LbSynced, LoadBalancer,
    Synced, Table,
};

const SCHEDULER: &str = "rr";

/// One FWM service as IPVS holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvcObs {
    pub scheduler: String,
    /// Destination → weight.
    pub dests: BTreeMap<Ipv4Addr, u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvsOp {
    AddService(u32),
    /// Puts the scheduler back to rr.
    UpdateService(u32),
    DeleteService(u32),
    AddDest(u32, Ipv4Addr),
    SetWeight(u32, Ipv4Addr, u32),
    DeleteDest(u32, Ipv4Addr),
}

/// Destinations waiting out their grace period, since when they have weight 0.
pub type DrainTimers = BTreeMap<(u32, Ipv4Addr), Instant>;

/// The changes from `observed` to `desired` (fwmark → backends), with the drain state machine
/// per destination: desired → weight 1; listed in `draining` (its task may still run) →
/// weight 0 and kept; neither → weight 0, then deleted `grace` after. A weight-0 destination
/// found without a timer (an agent restart) starts its grace anew.
pub fn plan_ipvs(
    desired: &BTreeMap<u32, BTreeSet<Ipv4Addr>>,
    draining: &DrainingBackends,
    observed: &BTreeMap<u32, SvcObs>,
    timers: &mut DrainTimers,
    now: Instant,
    grace: Duration,
) -> Vec<IpvsOp> {
    let mut ops = Vec::new();
    let mut still_draining = DrainTimers::new();
    let empty = BTreeSet::new();
    for (&mark, backends) in desired {
        match observed.get(&mark) {
            None => ops.push(IpvsOp::AddService(mark)),
            Some(o) if o.scheduler != SCHEDULER => ops.push(IpvsOp::UpdateService(mark)),
            Some(_) => {}
        }
        let dests = observed.get(&mark).map(|o| &o.dests);
        for &ip in backends {
            match dests.and_then(|d| d.get(&ip)) {
                None => ops.push(IpvsOp::AddDest(mark, ip)),
                Some(1) => {}
                Some(_) => ops.push(IpvsOp::SetWeight(mark, ip, 1)),
            }
        }
    }
    for (&mark, o) in observed {
        let backends = desired.get(&mark).unwrap_or(&empty);
        let kept = draining.get(&mark).unwrap_or(&empty);
        let mut left = 0;
        for (&ip, &weight) in &o.dests {
            if backends.contains(&ip) {
                left += 1;
                continue;
            }
            if kept.contains(&ip) {
                // Its grace period starts once it leaves the list (its task has ended).
                if weight != 0 {
                    ops.push(IpvsOp::SetWeight(mark, ip, 0));
                }
                left += 1;
                continue;
            }
            let since = *timers.get(&(mark, ip)).unwrap_or(&now);
            if weight != 0 {
                ops.push(IpvsOp::SetWeight(mark, ip, 0));
                still_draining.insert((mark, ip), now);
                left += 1;
            } else if now.duration_since(since) >= grace {
                ops.push(IpvsOp::DeleteDest(mark, ip));
            } else {
                still_draining.insert((mark, ip), since);
                left += 1;
            }
        }
        if !desired.contains_key(&mark) && left == 0 {
            ops.push(IpvsOp::DeleteService(mark));
        }
    }
    *timers = still_draining;
    ops
}

/// What IPVS holds after `ops`.
fn after(observed: &BTreeMap<u32, SvcObs>, ops: &[IpvsOp]) -> BTreeMap<u32, SvcObs> {
    let mut out = observed.clone();
    for op in ops {
        match *op {
            IpvsOp::AddService(m) | IpvsOp::UpdateService(m) => {
                out.entry(m).or_default().scheduler = SCHEDULER.into();
            }
            IpvsOp::DeleteService(m) => {
                out.remove(&m);
            }
            IpvsOp::AddDest(m, ip) => {
                out.entry(m).or_default().dests.insert(ip, 1);
            }
            IpvsOp::SetWeight(m, ip, w) => {
                out.entry(m).or_default().dests.insert(ip, w);
            }
            IpvsOp::DeleteDest(m, ip) => {
                if let Some(s) = out.get_mut(&m) {
                    s.dests.remove(&ip);
                }
            }
        }
    }
    out
}

fn key(mark: u32) -> ServiceKey {
    ServiceKey::Fwmark {
        family: Family::Ipv4,
        mark,
    }
}

fn dest(ip: Ipv4Addr, weight: u32) -> Destination {
    Destination::new(SocketAddr::new(IpAddr::V4(ip), 0), Forward::Masq, weight)
}

pub struct IpvsLb {
    /// Opened inside the sandbox: its socket talks to the sandbox's IPVS from any thread.
    client: Client,
    sbox: Netns,
    grace: Duration,
    table: Table<SboxState>,
    timers: DrainTimers,
    programmed: BTreeMap<u32, SvcObs>,
}

impl IpvsLb {
    pub fn open(sbox: Netns, opts: LbOptions) -> Result<IpvsLb, LbError> {
        let mut client = sbox.run(Client::new)??;
        let t = opts.timeouts;
        if t != super::Timeouts::default() {
            client.set_timeouts(&TimeoutChange {
                tcp: t.tcp,
                tcp_fin: t.tcp_fin,
                udp: t.udp,
            })?;
        }
        Ok(IpvsLb {
            client,
            sbox,
            grace: opts.drain,
            table: Table::default(),
            timers: DrainTimers::new(),
            programmed: BTreeMap::new(),
        })
    }

    /// Our FWM IPv4 services and their destinations.
    fn dump(&mut self) -> Result<BTreeMap<u32, SvcObs>, ipvs::Error> {
        let mut out = BTreeMap::new();
        for entry in self.client.services()? {
            let ServiceKey::Fwmark {
                family: Family::Ipv4,
                mark,
            } = entry.service.key
            else {
                continue;
            };
            let mut obs = SvcObs {
                scheduler: entry.service.scheduler.clone(),
                dests: BTreeMap::new(),
            };
            for d in self.client.destinations(&entry.service.key)? {
                if let IpAddr::V4(ip) = d.destination.addr.ip() {
                    obs.dests.insert(ip, d.destination.weight);
                }
            }
            out.insert(mark, obs);
        }
        Ok(out)
    }
}

impl LoadBalancer for IpvsLb {
    fn sync(
        &mut self,
        desired: &SboxState,
        draining: &DrainingBackends,
        recheck: bool,
    ) -> Result<LbSynced, LbError> {
        let synced = sync_table(&self.sbox, &mut self.table, desired, recheck)?;
        let want: BTreeMap<u32, BTreeSet<Ipv4Addr>> = desired
            .services
            .iter()
            .map(|(m, s)| (m.get(), s.backends.clone()))
            .collect();
        let observed = self.dump()?;
        let now = Instant::now();
        let ops = plan_ipvs(
            &want,
            draining,
            &observed,
            &mut self.timers,
            now,
            self.grace,
        );
        if !ops.is_empty() {
            tracing::info!(?ops, netns = %self.sbox.name(), "ipvs changes");
        }
        // One request each: a handful per change, and an error names the one that failed.
        for op in &ops {
            let c = &mut self.client;
            match *op {
                IpvsOp::AddService(m) => c.add_service(&Service::new(key(m), SCHEDULER))?,
                IpvsOp::UpdateService(m) => c.update_service(&Service::new(key(m), SCHEDULER))?,
                IpvsOp::DeleteService(m) => c.delete_service(&key(m))?,
                IpvsOp::AddDest(m, ip) => c.add_destination(&key(m), &dest(ip, 1))?,
                IpvsOp::SetWeight(m, ip, w) => c.update_destination(&key(m), &dest(ip, w))?,
                IpvsOp::DeleteDest(m, ip) => c.delete_destination(&key(m), dest(ip, 0).addr)?,
            }
        }
        let live: BTreeSet<Ipv4Addr> = want.values().flatten().copied().collect();
        let nf = NsNetfilter::new(&self.sbox);
        for op in &ops {
            if let IpvsOp::DeleteDest(_, ip) = op {
                if !live.contains(ip) {
                    nf.delete_stale_conntrack(*ip)?;
                }
            }
        }
        self.programmed = after(&observed, &ops);
        Ok(LbSynced {
            wake: self
                .timers
                .values()
                .map(|since| (*since + self.grace).saturating_duration_since(now))
                .min(),
            repaired: match synced {
                Synced::Repaired(how) => Some(how),
                Synced::Unchanged | Synced::Applied => None,
            },
        })
    }

    fn recheck(&mut self) -> Result<Option<String>, LbError> {
        Ok(recheck_table(&self.sbox, &mut self.table)?)
    }

    fn report(&self) -> LbReport {
        LbReport {
            backend: proto::model::LbKind::Ipvs,
            services: self
                .programmed
                .iter()
                .map(|(mark, s)| LbServiceReport {
                    fwmark: *mark,
                    backends: s
                        .dests
                        .iter()
                        .map(|(ip, w)| LbBackendReport {
                            ip: *ip,
                            weight: *w,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, n)
    }

    fn want(backends: &[u8]) -> BTreeMap<u32, BTreeSet<Ipv4Addr>> {
        [(256, backends.iter().map(|n| ip(*n)).collect())].into()
    }

    /// Plans and applies to `obs` as the kernel would, nothing listed as draining.
    fn step(
        desired: &BTreeMap<u32, BTreeSet<Ipv4Addr>>,
        obs: &mut BTreeMap<u32, SvcObs>,
        timers: &mut DrainTimers,
        now: Instant,
    ) -> Vec<IpvsOp> {
        step_draining(desired, &BTreeMap::new(), obs, timers, now)
    }

    fn step_draining(
        desired: &BTreeMap<u32, BTreeSet<Ipv4Addr>>,
        draining: &DrainingBackends,
        obs: &mut BTreeMap<u32, SvcObs>,
        timers: &mut DrainTimers,
        now: Instant,
    ) -> Vec<IpvsOp> {
        let ops = plan_ipvs(desired, draining, obs, timers, now, Duration::from_secs(2));
        *obs = after(obs, &ops);
        ops
    }

    #[test]
    fn a_removed_backend_goes_weight_1_then_0_then_away() {
        let t0 = Instant::now();
        let mut obs = BTreeMap::new();
        let mut dr = DrainTimers::new();
        assert_eq!(
            step(&want(&[10, 11]), &mut obs, &mut dr, t0),
            [
                IpvsOp::AddService(256),
                IpvsOp::AddDest(256, ip(10)),
                IpvsOp::AddDest(256, ip(11))
            ]
        );
        assert_eq!(step(&want(&[10, 11]), &mut obs, &mut dr, t0), []);
        // 11 leaves: quiesced, kept during the grace period, then deleted.
        assert_eq!(
            step(&want(&[10]), &mut obs, &mut dr, t0),
            [IpvsOp::SetWeight(256, ip(11), 0)]
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(step(&want(&[10]), &mut obs, &mut dr, t1), []);
        assert_eq!(obs[&256].dests[&ip(11)], 0);
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(
            step(&want(&[10]), &mut obs, &mut dr, t2),
            [IpvsOp::DeleteDest(256, ip(11))]
        );
        assert!(dr.is_empty());
        assert_eq!(obs[&256].dests, [(ip(10), 1)].into());
    }

    #[test]
    fn a_backend_listed_as_draining_keeps_weight_0_until_it_leaves_the_list() {
        let t0 = Instant::now();
        let mut obs = BTreeMap::new();
        let mut dr = DrainTimers::new();
        step(&want(&[10, 11]), &mut obs, &mut dr, t0);
        let listed: DrainingBackends = [(256, [ip(11)].into())].into();
        assert_eq!(
            step_draining(&want(&[10]), &listed, &mut obs, &mut dr, t0),
            [IpvsOp::SetWeight(256, ip(11), 0)]
        );
        // Far past the grace period, its task still runs: kept, and nothing to wake for.
        let t60 = t0 + Duration::from_secs(60);
        assert_eq!(
            step_draining(&want(&[10]), &listed, &mut obs, &mut dr, t60),
            []
        );
        assert!(dr.is_empty());
        // Its whole service may go meanwhile (service rm): the service stays for it.
        assert_eq!(
            step_draining(&BTreeMap::new(), &listed, &mut obs, &mut dr, t60),
            [IpvsOp::SetWeight(256, ip(10), 0)]
        );
        // Its task ended: the usual grace, then it goes, and the service with it.
        assert_eq!(step(&BTreeMap::new(), &mut obs, &mut dr, t60), []);
        assert_eq!(
            step(
                &BTreeMap::new(),
                &mut obs,
                &mut dr,
                t60 + Duration::from_secs(2)
            ),
            [
                IpvsOp::DeleteDest(256, ip(10)),
                IpvsOp::DeleteDest(256, ip(11)),
                IpvsOp::DeleteService(256)
            ]
        );
        // A listed address IPVS does not hold is not added.
        assert_eq!(
            step_draining(&want(&[10]), &listed, &mut obs, &mut dr, t60),
            [IpvsOp::AddService(256), IpvsOp::AddDest(256, ip(10))]
        );
    }

    #[test]
    fn a_draining_backend_that_returns_gets_weight_1_back() {
        let t0 = Instant::now();
        let mut obs = BTreeMap::new();
        let mut dr = DrainTimers::new();
        step(&want(&[10, 11]), &mut obs, &mut dr, t0);
        step(&want(&[10]), &mut obs, &mut dr, t0);
        assert_eq!(
            step(
                &want(&[10, 11]),
                &mut obs,
                &mut dr,
                t0 + Duration::from_secs(1)
            ),
            [IpvsOp::SetWeight(256, ip(11), 1)]
        );
        assert!(dr.is_empty());
    }

    #[test]
    fn a_removed_service_drains_then_goes_and_restart_adopts_without_churn() {
        let t0 = Instant::now();
        let mut obs = BTreeMap::new();
        let mut dr = DrainTimers::new();
        step(&want(&[10]), &mut obs, &mut dr, t0);
        // A restarted agent (no drain records) finds the same state: nothing to do.
        let mut fresh = DrainTimers::new();
        assert_eq!(step(&want(&[10]), &mut obs, &mut fresh, t0), []);
        let none = BTreeMap::new();
        assert_eq!(
            step(&none, &mut obs, &mut dr, t0),
            [IpvsOp::SetWeight(256, ip(10), 0)]
        );
        assert_eq!(
            step(&none, &mut obs, &mut dr, t0 + Duration::from_secs(3)),
            [IpvsOp::DeleteDest(256, ip(10)), IpvsOp::DeleteService(256)]
        );
        assert!(obs.is_empty());
        // A scheduler changed by hand is put back.
        step(&want(&[10]), &mut obs, &mut dr, t0);
        obs.get_mut(&256).unwrap().scheduler = "wrr".into();
        assert_eq!(
            step(&want(&[10]), &mut obs, &mut dr, t0),
            [IpvsOp::UpdateService(256)]
        );
    }
}
