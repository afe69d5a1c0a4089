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

/// The last pass's observations of the agent's namespaces, kept for the next pass while the
/// kernel says nothing changed there: a pass set off by a change in one namespace reads that
/// one again, not every namespace the agent owns. Only a namespace watched (see
/// [`crate::netwatch`]) since before it was observed is kept, so that any later change to it
/// is notified; the timer pass clears the cache (the backstop for a lost notification or a
/// watch that ended).
#[derive(Debug, Default)]
pub struct ObsCache {
    kept: BTreeMap<String, NsObs>,
}

impl ObsCache {
    /// Keeps the namespaces of `observed` that `watched` (name → inode, as it was before the
    /// observation began) holds with the same inode.
    pub fn store(&mut self, observed: &Observed, watched: &BTreeMap<String, u64>) {
        self.kept = observed
            .namespaces
            .iter()
            .filter(|(name, o)| watched.get(*name) == Some(&o.inode))
            .map(|(name, o)| (name.clone(), o.clone()))
            .collect();
    }

    /// `name` changed (a notification, or an action of ours): the next pass reads it again.
    pub fn invalidate(&mut self, name: &str) {
        self.kept.remove(name);
    }

    pub fn clear(&mut self) {
        self.kept.clear();
    }

    /// The observations a pass may take as they are, while the namespace's inode is the same,
    /// leaving none: the pass stores its own after.
    pub fn take(&mut self) -> BTreeMap<String, NsObs> {
        std::mem::take(&mut self.kept)
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

    #[test]
    fn only_watched_unchanged_namespaces_are_kept() {
        let ns = |inode| NsObs {
            inode,
            ..NsObs::default()
        };
        let observed = Observed {
            namespaces: BTreeMap::from([
                ("a".to_string(), ns(1)),
                ("b".to_string(), ns(2)),
                ("c".to_string(), ns(3)),
            ]),
            node: NsObs::default(),
        };
        // a watched; b not yet; c watched, but an older namespace of that name.
        let watched = BTreeMap::from([("a".to_string(), 1), ("c".to_string(), 9)]);
        let mut cache = ObsCache::default();
        cache.store(&observed, &watched);
        cache.invalidate("b");
        assert_eq!(cache.take().keys().collect::<Vec<_>>(), ["a"]);
        assert!(cache.take().is_empty(), "taken, none left");
        cache.store(&observed, &watched);
        cache.invalidate("a");
        assert!(cache.take().is_empty());
        cache.store(&observed, &watched);
        cache.clear();
        assert!(cache.take().is_empty());
    }
}
