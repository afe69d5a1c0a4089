//! What the kernel holds of the agent's objects, as plain data for the planner.

use std::collections::BTreeMap;

use vxlan::{FdbEntry, LinkState, NeighEntry, RouteEntry};

/// Everything the agent owns, as found: the namespaces in its netns dir, by file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub namespaces: BTreeMap<String, NsObs>,
    /// The agent's own links in the node namespace: the gwbridge and the node ends of legs.
    pub node: NsObs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsObs {
    /// The namespace's inode: tells whether a task's process still lives in this very namespace.
    pub inode: u64,
    /// Links other than `lo`, by name.
    pub links: BTreeMap<String, LinkState>,
    /// Neighbour entries on VXLAN devices.
    pub neighs: Vec<NeighEntry>,
    /// FDB entries on VXLAN devices.
    pub fdb: Vec<FdbEntry>,
    /// IPv4 routes of the main table (a task's default route is the agent's).
    pub routes: Vec<RouteEntry>,
}

impl NsObs {
    pub fn new(inode: u64, seen: vxlan::Observed) -> NsObs {
        NsObs {
            inode,
            links: seen
                .links
                .into_iter()
                .filter(|l| l.name != "lo")
                .map(|l| (l.name.clone(), l))
                .collect(),
            neighs: seen.neighs,
            fdb: seen.fdb,
            routes: seen.routes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vxlan::LinkKind;

    fn link(name: &str, kind: LinkKind) -> LinkState {
        LinkState {
            name: name.into(),
            index: 1,
            mtu: 1450,
            up: true,
            mac: None,
            master: None,
            addrs: vec![],
            kind,
        }
    }

    #[test]
    fn loopback_is_not_ours_to_manage() {
        let seen = vxlan::Observed {
            links: vec![
                link("lo", LinkKind::Other(String::new())),
                link("br0", LinkKind::Bridge),
            ],
            neighs: vec![],
            fdb: vec![],
            routes: vec![],
        };
        let obs = NsObs::new(7, seen);
        assert_eq!(obs.inode, 7);
        assert_eq!(obs.links.keys().collect::<Vec<_>>(), ["br0"]);
    }
}
