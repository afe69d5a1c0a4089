//! The nftables backend: the sandbox table balances (`numgen` round robin over a map of backend
//! slots). A removed backend leaves the map at once (drained: established TCP keeps its
//! conntrack entry), and `firewall::sync` deletes its UDP and SYN_SENT conntrack entries so
//! flows move on.
//! Timeouts are the sandbox's conntrack sysctls.

use firewall::SboxState;
use netns::Netns;
use proto::agent::{LbBackendReport, LbReport, LbServiceReport};

use super::{
    recheck_table, sync_table, DrainingBackends, LbError, LbSynced, LoadBalancer, Synced, Table,
    Timeouts,
};

pub struct NftLb {
    sbox: Netns,
    table: Table<SboxState>,
}

/// The conntrack sysctls that carry each timeout in the sandbox namespace.
pub fn conntrack_sysctls(t: &Timeouts) -> Vec<(&'static str, u32)> {
    let mut out = Vec::new();
    if let Some(s) = t.tcp {
        out.push((
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            s.get(),
        ));
    }
    if let Some(s) = t.tcp_fin {
        out.push(("net.netfilter.nf_conntrack_tcp_timeout_fin_wait", s.get()));
    }
    if let Some(s) = t.udp {
        out.push(("net.netfilter.nf_conntrack_udp_timeout", s.get()));
        out.push(("net.netfilter.nf_conntrack_udp_timeout_stream", s.get()));
    }
    out
}

impl NftLb {
    /// The conntrack timeouts are the namespace's sysctls, which `MeshRules` keeps.
    pub fn open(sbox: Netns) -> NftLb {
        NftLb {
            sbox,
            table: Table::default(),
        }
    }
}

impl LoadBalancer for NftLb {
    /// Draining backends need nothing: out of the map, their conntrack entries carry them.
    fn sync(
        &mut self,
        desired: &SboxState,
        _draining: &DrainingBackends,
        recheck: bool,
    ) -> Result<LbSynced, LbError> {
        let synced = sync_table(&self.sbox, &mut self.table, desired, recheck)?;
        Ok(LbSynced {
            wake: None,
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
            backend: proto::model::LbKind::Nftables,
            services: self
                .table
                .applied()
                .iter()
                .flat_map(|t| &t.services)
                .map(|(mark, svc)| LbServiceReport {
                    fwmark: mark.get(),
                    backends: svc
                        .backends
                        .iter()
                        .map(|ip| LbBackendReport { ip: *ip, weight: 1 })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn only_given_timeouts_become_sysctls() {
        assert!(conntrack_sysctls(&Timeouts::default()).is_empty());
        let t = Timeouts {
            tcp: NonZeroU32::new(3600),
            tcp_fin: None,
            udp: NonZeroU32::new(30),
        };
        assert_eq!(
            conntrack_sysctls(&t),
            [
                ("net.netfilter.nf_conntrack_tcp_timeout_established", 3600),
                ("net.netfilter.nf_conntrack_udp_timeout", 30),
                ("net.netfilter.nf_conntrack_udp_timeout_stream", 30),
            ]
        );
    }
}
