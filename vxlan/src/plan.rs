//! Pure planning of the static peer entries on one VXLAN device: what to add and remove
//! so that the observed neighbour and FDB entries become exactly the desired peers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use crate::MacAddr;

/// A remote endpoint of the overlay: its overlay IP and MAC, behind the node `vtep`
/// (that node's underlay address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemotePeer {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub vtep: Ipv4Addr,
}

impl RemotePeer {
    /// A peer whose MAC is derived from its IP, as for every meshnet endpoint.
    pub fn new(ip: Ipv4Addr, vtep: Ipv4Addr) -> RemotePeer {
        RemotePeer {
            ip,
            mac: MacAddr::from_ipv4(ip),
            vtep,
        }
    }
}

/// An IPv4 neighbour entry on a VXLAN device (`ip neigh show dev vxlan0`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighEntry {
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
}

/// Whose forwarding table an FDB entry on a VXLAN device lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FdbOwner {
    /// The VXLAN device's own table (`self`): MAC → remote VTEP.
    Device,
    /// The bridge the device is a port of (`master br0`): MAC → this port.
    Bridge,
}

/// An FDB entry on a VXLAN device (`bridge fdb show dev vxlan0`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub dev: String,
    pub mac: MacAddr,
    /// The remote VTEP (`dst`); only [`FdbOwner::Device`] entries have one.
    pub dst: Option<Ipv4Addr>,
    pub owner: FdbOwner,
    pub permanent: bool,
}

/// One change to the peer entries of a VXLAN device.
///
/// The variant order is the order to apply them in: removals first (so a MAC never has
/// two destinations), then the FDB entry before the neighbour entry (so an ARP reply
/// from the proxy is never given for a MAC the device cannot reach yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerAction {
    /// `ip neigh del IP dev vxlan0`
    DelNeigh { ip: Ipv4Addr },
    /// `bridge fdb del MAC dev vxlan0 dst VTEP self`
    DelFdb { mac: MacAddr, vtep: Ipv4Addr },
    /// `bridge fdb del MAC dev vxlan0 master`: a MAC the bridge learned on the VXLAN
    /// port, which would keep sending that MAC's frames into the tunnel.
    DelBridgeFdb { mac: MacAddr },
    /// `bridge fdb replace MAC dev vxlan0 dst VTEP self permanent`
    AddFdb { mac: MacAddr, vtep: Ipv4Addr },
    /// `ip neigh replace IP lladdr MAC dev vxlan0 nud permanent`
    AddNeigh { ip: Ipv4Addr, mac: MacAddr },
}

impl fmt::Display for PeerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAction::DelNeigh { ip } => write!(f, "delete neigh {ip}"),
            PeerAction::DelFdb { mac, vtep } => write!(f, "delete fdb {mac} dst {vtep}"),
            PeerAction::DelBridgeFdb { mac } => write!(f, "delete bridge fdb {mac}"),
            PeerAction::AddFdb { mac, vtep } => write!(f, "add fdb {mac} dst {vtep}"),
            PeerAction::AddNeigh { ip, mac } => write!(f, "add neigh {ip} lladdr {mac}"),
        }
    }
}

/// The actions that turn the observed entries on device `dev` into exactly `desired`.
///
/// - Entries already right produce nothing, so planning again after applying is empty.
/// - Entries for peers that are not desired are removed, including MACs the bridge
///   learned on the VXLAN port.
/// - An entry whose MAC or VTEP changed is replaced in place (`replace` semantics) when
///   it has a single destination; extra destinations are deleted first.
/// - If `desired` names an IP or MAC twice, the later peer wins.
///
/// Entries on other devices are ignored. The result is sorted in application order.
pub fn plan_peers(
    dev: &str,
    desired: &[RemotePeer],
    neighs: &[NeighEntry],
    fdb: &[FdbEntry],
) -> Vec<PeerAction> {
    let want_neigh: BTreeMap<Ipv4Addr, MacAddr> = desired.iter().map(|p| (p.ip, p.mac)).collect();
    let want_fdb: BTreeMap<MacAddr, Ipv4Addr> = desired.iter().map(|p| (p.mac, p.vtep)).collect();
    let mut actions = BTreeSet::new();

    let neighs: Vec<&NeighEntry> = neighs.iter().filter(|n| n.dev == dev).collect();
    for n in &neighs {
        match want_neigh.get(&n.ip) {
            None => {
                actions.insert(PeerAction::DelNeigh { ip: n.ip });
            }
            Some(&mac) if n.mac != Some(mac) || !n.permanent => {
                actions.insert(PeerAction::AddNeigh { ip: n.ip, mac });
            }
            Some(_) => {}
        }
    }
    for (&ip, &mac) in &want_neigh {
        if !neighs.iter().any(|n| n.ip == ip) {
            actions.insert(PeerAction::AddNeigh { ip, mac });
        }
    }

    // Destinations the device holds per MAC; a MAC can have several (`fdb append`).
    let mut have_fdb: BTreeMap<MacAddr, Vec<(Ipv4Addr, bool)>> = BTreeMap::new();
    for e in fdb.iter().filter(|e| e.dev == dev) {
        match (e.owner, e.dst) {
            (FdbOwner::Device, Some(dst)) => {
                have_fdb.entry(e.mac).or_default().push((dst, e.permanent))
            }
            // Without a destination it is not a peer entry (we never make one).
            (FdbOwner::Device, None) => {}
            // The bridge's own permanent entry for the port's address stays.
            (FdbOwner::Bridge, _) if !e.permanent && !want_fdb.contains_key(&e.mac) => {
                actions.insert(PeerAction::DelBridgeFdb { mac: e.mac });
            }
            (FdbOwner::Bridge, _) => {}
        }
    }
    for (mac, dsts) in &have_fdb {
        let Some(&vtep) = want_fdb.get(mac) else {
            for &(dst, _) in dsts {
                actions.insert(PeerAction::DelFdb {
                    mac: *mac,
                    vtep: dst,
                });
            }
            continue;
        };
        match dsts.as_slice() {
            [(dst, true)] if *dst == vtep => {}
            // One destination: replacing rewrites it in place, with no gap in forwarding.
            [_] => {
                actions.insert(PeerAction::AddFdb { mac: *mac, vtep });
            }
            many => {
                for &(dst, _) in many.iter().filter(|(d, _)| *d != vtep) {
                    actions.insert(PeerAction::DelFdb {
                        mac: *mac,
                        vtep: dst,
                    });
                }
                if !many.contains(&(vtep, true)) {
                    actions.insert(PeerAction::AddFdb { mac: *mac, vtep });
                }
            }
        }
    }
    for (&mac, &vtep) in &want_fdb {
        if !have_fdb.contains_key(&mac) {
            actions.insert(PeerAction::AddFdb { mac, vtep });
        }
    }
    actions.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "vxlan0";

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn vtep(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 56, last)
    }

    fn peer(last: u8, vtep_last: u8) -> RemotePeer {
        RemotePeer::new(ip(last), vtep(vtep_last))
    }

    /// What the kernel shows after `peers` were programmed.
    fn programmed(peers: &[RemotePeer]) -> (Vec<NeighEntry>, Vec<FdbEntry>) {
        let neighs = peers
            .iter()
            .map(|p| NeighEntry {
                dev: DEV.into(),
                ip: p.ip,
                mac: Some(p.mac),
                permanent: true,
            })
            .collect();
        let fdb = peers.iter().map(|p| fdb_self(p.mac, p.vtep)).collect();
        (neighs, fdb)
    }

    fn fdb_self(mac: MacAddr, dst: Ipv4Addr) -> FdbEntry {
        FdbEntry {
            dev: DEV.into(),
            mac,
            dst: Some(dst),
            owner: FdbOwner::Device,
            permanent: true,
        }
    }

    fn fdb_bridge(mac: MacAddr, permanent: bool) -> FdbEntry {
        FdbEntry {
            dev: DEV.into(),
            mac,
            dst: None,
            owner: FdbOwner::Bridge,
            permanent,
        }
    }

    /// Applies actions to an observed state the way the kernel would.
    fn apply(actions: &[PeerAction], neighs: &mut Vec<NeighEntry>, fdb: &mut Vec<FdbEntry>) {
        for a in actions {
            match *a {
                PeerAction::DelNeigh { ip } => neighs.retain(|n| n.ip != ip),
                PeerAction::DelFdb { mac, vtep } => {
                    fdb.retain(|e| !(e.mac == mac && e.dst == Some(vtep)))
                }
                PeerAction::DelBridgeFdb { mac } => {
                    fdb.retain(|e| !(e.mac == mac && e.owner == FdbOwner::Bridge))
                }
                PeerAction::AddFdb { mac, vtep } => {
                    match fdb
                        .iter_mut()
                        .find(|e| e.mac == mac && e.owner == FdbOwner::Device)
                    {
                        Some(e) => *e = fdb_self(mac, vtep),
                        None => fdb.push(fdb_self(mac, vtep)),
                    }
                }
                PeerAction::AddNeigh { ip, mac } => {
                    neighs.retain(|n| n.ip != ip);
                    neighs.push(NeighEntry {
                        dev: DEV.into(),
                        ip,
                        mac: Some(mac),
                        permanent: true,
                    });
                }
            }
        }
    }

    #[test]
    fn empty_to_desired_adds_fdb_then_neigh() {
        let desired = [peer(5, 12)];
        let actions = plan_peers(DEV, &desired, &[], &[]);
        let mac = MacAddr::from_ipv4(ip(5));
        assert_eq!(
            actions,
            vec![
                PeerAction::AddFdb {
                    mac,
                    vtep: vtep(12)
                },
                PeerAction::AddNeigh { ip: ip(5), mac },
            ]
        );
    }

    #[test]
    fn programmed_state_plans_nothing() {
        let desired = [peer(5, 12), peer(6, 13), peer(7, 12)];
        let (neighs, fdb) = programmed(&desired);
        assert!(plan_peers(DEV, &desired, &neighs, &fdb).is_empty());
    }

    #[test]
    fn stale_peers_are_removed_entirely() {
        let (neighs, mut fdb) = programmed(&[peer(5, 12), peer(6, 13)]);
        let learned = MacAddr::from_ipv4(ip(6));
        fdb.push(fdb_bridge(learned, false));
        let actions = plan_peers(DEV, &[peer(5, 12)], &neighs, &fdb);
        assert_eq!(
            actions,
            vec![
                PeerAction::DelNeigh { ip: ip(6) },
                PeerAction::DelFdb {
                    mac: learned,
                    vtep: vtep(13)
                },
                PeerAction::DelBridgeFdb { mac: learned },
            ]
        );
    }

    #[test]
    fn the_bridge_port_address_and_foreign_devices_are_left_alone() {
        let port_mac: MacAddr = "ae:11:22:33:44:55".parse().unwrap();
        let mut fdb = vec![fdb_bridge(port_mac, true)];
        let mut other = fdb_self(MacAddr::from_ipv4(ip(9)), vtep(14));
        other.dev = "vxlan1".into();
        fdb.push(other);
        let neighs = vec![NeighEntry {
            dev: "vxlan1".into(),
            ip: ip(9),
            mac: None,
            permanent: false,
        }];
        assert!(plan_peers(DEV, &[], &neighs, &fdb).is_empty());
    }

    #[test]
    fn changed_vtep_is_replaced_in_place() {
        let (neighs, fdb) = programmed(&[peer(5, 12)]);
        let actions = plan_peers(DEV, &[peer(5, 13)], &neighs, &fdb);
        assert_eq!(
            actions,
            vec![PeerAction::AddFdb {
                mac: MacAddr::from_ipv4(ip(5)),
                vtep: vtep(13)
            }]
        );
    }

    #[test]
    fn changed_mac_or_state_of_an_ip_is_replaced() {
        let (mut neighs, fdb) = programmed(&[peer(5, 12)]);
        let other_mac: MacAddr = "02:42:aa:bb:cc:dd".parse().unwrap();
        neighs[0].mac = Some(other_mac);
        let desired = [peer(5, 12)];
        assert_eq!(
            plan_peers(DEV, &desired, &neighs, &fdb),
            vec![PeerAction::AddNeigh {
                ip: ip(5),
                mac: desired[0].mac
            }]
        );
        neighs[0].mac = Some(desired[0].mac);
        neighs[0].permanent = false;
        assert_eq!(plan_peers(DEV, &desired, &neighs, &fdb).len(), 1);
    }

    #[test]
    fn extra_destinations_of_a_mac_are_deleted() {
        let mac = MacAddr::from_ipv4(ip(5));
        let (neighs, _) = programmed(&[peer(5, 12)]);
        // Right destination present next to a wrong one: drop only the wrong one.
        let fdb = vec![fdb_self(mac, vtep(12)), fdb_self(mac, vtep(13))];
        assert_eq!(
            plan_peers(DEV, &[peer(5, 12)], &neighs, &fdb),
            vec![PeerAction::DelFdb {
                mac,
                vtep: vtep(13)
            }]
        );
        // Only wrong destinations: delete all, then add.
        let fdb = vec![fdb_self(mac, vtep(13)), fdb_self(mac, vtep(14))];
        assert_eq!(
            plan_peers(DEV, &[peer(5, 12)], &neighs, &fdb),
            vec![
                PeerAction::DelFdb {
                    mac,
                    vtep: vtep(13)
                },
                PeerAction::DelFdb {
                    mac,
                    vtep: vtep(14)
                },
                PeerAction::AddFdb {
                    mac,
                    vtep: vtep(12)
                },
            ]
        );
    }

    #[test]
    fn duplicate_desired_entries_add_once_and_the_later_wins() {
        let desired = [peer(5, 12), peer(5, 13)];
        let actions = plan_peers(DEV, &desired, &[], &[]);
        let mac = MacAddr::from_ipv4(ip(5));
        assert_eq!(
            actions,
            vec![
                PeerAction::AddFdb {
                    mac,
                    vtep: vtep(13)
                },
                PeerAction::AddNeigh { ip: ip(5), mac },
            ]
        );
    }

    #[test]
    fn applying_a_plan_converges_from_any_mess() {
        let desired = [peer(5, 12), peer(6, 12), peer(7, 13)];
        let mac6 = MacAddr::from_ipv4(ip(6));
        let (mut neighs, mut fdb) = programmed(&[peer(5, 13), peer(8, 12)]);
        neighs.push(NeighEntry {
            dev: DEV.into(),
            ip: ip(6),
            mac: None,
            permanent: false,
        });
        fdb.push(fdb_self(mac6, vtep(14)));
        fdb.push(fdb_self(mac6, vtep(15)));
        fdb.push(fdb_bridge(MacAddr::from_ipv4(ip(8)), false));
        fdb.push(fdb_bridge(MacAddr::from_ipv4(ip(5)), false));

        let actions = plan_peers(DEV, &desired, &neighs, &fdb);
        assert!(!actions.is_empty());
        apply(&actions, &mut neighs, &mut fdb);
        assert!(
            plan_peers(DEV, &desired, &neighs, &fdb).is_empty(),
            "{neighs:?} {fdb:?}"
        );

        let (want_neighs, want_fdb) = programmed(&desired);
        neighs.sort();
        let mut self_fdb: Vec<_> = fdb
            .iter()
            .filter(|e| e.owner == FdbOwner::Device)
            .cloned()
            .collect();
        self_fdb.sort();
        let mut want_fdb = want_fdb;
        want_fdb.sort();
        assert_eq!(neighs, want_neighs);
        assert_eq!(self_fdb, want_fdb);
        // A MAC the bridge learned for a desired peer may stay: it points at the tunnel.
        assert!(fdb
            .iter()
            .all(|e| e.owner == FdbOwner::Device || e.mac == desired[0].mac));
    }

    #[test]
    fn actions_print_like_the_commands() {
        let a = PeerAction::AddFdb {
            mac: MacAddr::from_ipv4(ip(5)),
            vtep: vtep(12),
        };
        assert_eq!(a.to_string(), "add fdb 02:42:0a:00:00:05 dst 192.168.56.12");
    }
}
