//! Bounds on what peers can hold of the manager before and after they authenticate, so a flood
//! of connections never starves meshctl, agents or state saves of file descriptors or memory.
//!
//! Both tables make room rather than refuse: when full, the entry that has waited the longest
//! (a handshake that has not finished, an API connection idle the longest) is told to close, so
//! an attacker has to outpace every legitimate client instead of merely getting there first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The TLS handshake (and, for a peer without a certificate, its one request; for a node, its
/// Hello) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that have not authenticated yet: in all, and from one address.
pub const MAX_PENDING: usize = 256;
pub const MAX_PENDING_PER_PEER: usize = 16;
/// Open API connections.
pub const MAX_API_CONNS: usize = 128;
/// An API connection that sends no request for this long is closed.
pub const API_IDLE: Duration = Duration::from_secs(60);

/// A table of connections, at most `max` in all and `max_per_peer` from one address.
#[derive(Debug)]
pub struct Slots {
    inner: Mutex<Inner>,
    max: usize,
    max_per_peer: usize,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Entry {
    peer: IpAddr,
    /// Since when it waits (admitted, or idle again); `None` while it is being served.
    waiting_since: Option<Instant>,
    evict: Arc<Notify>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evict: Arc<Notify>,
}

impl Slots {
    pub fn new(max: usize, max_per_peer: usize) -> Arc<Slots> {
        Arc::new(Slots {
            inner: Mutex::default(),
            max,
            max_per_peer,
        })
    }

    /// A place for a new connection from `peer`, or `None` when that address already holds
    /// its share. When the table is full, the connections waiting the longest are told to go.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut inner = self.lock();
        if inner.per_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_peer {
            return None;
        }
        while inner.open.len() >= self.max {
            let oldest = inner
                .open
                .iter()
                .filter_map(|(id, e)| e.waiting_since.map(|t| (t, *id)))
                .min();
            // Every connection is being served: let this one in over the bound for now.
            let Some((_, id)) = oldest else { break };
            let entry = inner.remove(id).expect("it was just found");
            entry.evict.notify_one();
        }
        inner.next += 1;
        let id = inner.next;
        let evict = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Entry {
                peer,
                waiting_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        *inner.per_peer.entry(peer).or_default() += 1;
        Some(Slot {
            slots: self.clone(),
            id,
            evict,
        })
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&entry.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&entry.peer);
            }
        }
        Some(entry)
    }
}

impl Slot {
    /// Marks the connection busy (a request is being answered: it is not evicted meanwhile) or
    /// waiting again.
    pub fn set_busy(&self, busy: bool) {
        if let Some(e) = self.slots.lock().open.get_mut(&self.id) {
            e.waiting_since = (!busy).then(Instant::now);
        }
    }

    /// Completes when the table wants this connection closed.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_gets_it_back() {
        let s = Slots::new(10, 2);
        let a1 = s.admit(ip(1)).unwrap();
        let _a2 = s.admit(ip(1)).unwrap();
        assert!(s.admit(ip(1)).is_none(), "per peer");
        assert!(s.admit(ip(2)).is_some(), "others are not affected");
        drop(a1);
        assert!(s.admit(ip(1)).is_some());
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_waiting_and_never_grows_in_a_burst() {
        let s = Slots::new(3, 100);
        let first = s.admit(ip(1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let busy = s.admit(ip(1)).unwrap();
        busy.set_busy(true);
        let mut held = vec![s.admit(ip(2)).unwrap()];
        // A burst: every newcomer gets in, the table stays at its bound.
        for _ in 0..50 {
            held.push(s.admit(ip(3)).unwrap());
            assert!(s.len() <= 3, "{}", s.len());
        }
        tokio::time::timeout(Duration::from_secs(1), first.evicted())
            .await
            .expect("the one waiting longest is told to go first");
        assert_eq!(s.len(), 3);
        // The evicted ones left the table at once; what is dropped now is what was still in it.
        drop(held);
        assert_eq!(s.len(), 1, "only the busy one is left");
    }
}
