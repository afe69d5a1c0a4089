//! Bounds on what peers can hold of the manager before and after they authenticate, so a flood
//! of connections never starves meshctl, agents or state saves of file descriptors or memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The TLS handshake (and, for a peer without a certificate, its one request) must finish
/// within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unauthenticated connections in progress: in all, and from one address.
pub const MAX_PENDING: usize = 256;
pub const MAX_PENDING_PER_PEER: usize = 16;
/// Open API connections; beyond this the one idle longest is closed to make room.
pub const MAX_API_CONNS: usize = 128;
/// An API connection that sends no request for this long is closed.
pub const API_IDLE: Duration = Duration::from_secs(60);

/// Counts connections that have not authenticated yet, per peer address and in all.
#[derive(Debug)]
pub struct Pending {
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    max_total: usize,
    max_per_peer: usize,
}

/// One admitted pending connection; dropping it frees its place.
#[derive(Debug)]
pub struct PendingPermit {
    pending: Arc<Pending>,
    peer: IpAddr,
}

impl Pending {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Pending> {
        Arc::new(Pending {
            per_peer: Mutex::default(),
            max_total,
            max_per_peer,
        })
    }

    /// A place for a new connection from `peer`, or `None` when it or everyone has too many.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<PendingPermit> {
        let mut map = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        let mine = map.entry(peer).or_default();
        if total >= self.max_total || *mine >= self.max_per_peer {
            return None;
        }
        *mine += 1;
        Some(PendingPermit {
            pending: self.clone(),
            peer,
        })
    }
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        let mut map = self
            .pending
            .per_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// Open API connections. When full, a new one is let in and the one idle the longest is told
/// to close: whoever holds idle connections loses them, the next meshctl gets through.
#[derive(Debug)]
pub struct Conns {
    inner: Mutex<ConnsInner>,
    max: usize,
}

#[derive(Debug, Default)]
struct ConnsInner {
    next: u64,
    open: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

/// One open connection; dropping it takes it off the table.
#[derive(Debug)]
pub struct ConnGuard {
    conns: Arc<Conns>,
    id: u64,
    evict: Arc<Notify>,
}

impl Conns {
    pub fn new(max: usize) -> Arc<Conns> {
        Arc::new(Conns {
            inner: Mutex::default(),
            max,
        })
    }

    pub fn admit(self: &Arc<Self>) -> ConnGuard {
        let mut inner = self.lock();
        if inner.open.len() >= self.max {
            let oldest = inner
                .open
                .values()
                .filter_map(|e| e.idle_since.map(|t| (t, e.evict.clone())))
                .min_by_key(|(t, _)| *t);
            if let Some((_, evict)) = oldest {
                evict.notify_one();
            }
        }
        inner.next += 1;
        let id = inner.next;
        let evict = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Entry {
                idle_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        ConnGuard {
            conns: self.clone(),
            id,
            evict,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ConnGuard {
    /// Marks the connection busy (a request is being answered) or idle again.
    pub fn set_busy(&self, busy: bool) {
        if let Some(e) = self.conns.lock().open.get_mut(&self.id) {
            e.idle_since = (!busy).then(Instant::now);
        }
    }

    /// Completes when the table wants this connection closed.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_places_are_bounded_per_peer_and_in_all_and_come_back() {
        let p = Pending::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = p.admit(a).unwrap();
        let _a2 = p.admit(a).unwrap();
        assert!(p.admit(a).is_none(), "per peer");
        let _b1 = p.admit(b).unwrap();
        assert!(p.admit(b).is_none(), "in all");
        drop(a1);
        assert!(p.admit(b).is_some());
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_idle_connection() {
        let c = Conns::new(2);
        let first = c.admit();
        std::thread::sleep(Duration::from_millis(5));
        let busy = c.admit();
        busy.set_busy(true);
        let _third = c.admit();
        tokio::time::timeout(Duration::from_secs(1), first.evicted())
            .await
            .expect("the idle one is told to go");
        assert_eq!(c.len(), 3);
        drop(first);
        assert_eq!(c.len(), 2);
    }
}
