//! The cluster's IPsec key ring for encrypted overlays (pure; the caller brings the randomness).
//!
//! One ring per cluster, as in Swarm: a node pair carries one pair of ESP states per key
//! whatever number of encrypted networks it shares, and which networks are encrypted is chosen
//! by marking their VXLAN packets, not by key. Rotation (every `--encryption-key-rotation`)
//! appends a fresh key and drops the oldest beyond [`RING`]; the send key is always the
//! second-newest. So each key goes through three steps, each one rotation interval apart:
//! 1. added: every node installs it for receiving only;
//! 2. made the send key: nodes switch to it at slightly different moments, and each peer can
//!    already receive with it (installed one interval ago) and still with the previous one;
//! 3. removed, one interval after nobody sends with it any more.

use proto::agent::{EncryptionKeys, EspKey, ESP_KEY_BYTES};
use serde::{Deserialize, Serialize};

/// Keys kept: the receive-only newest, the send key, and the one before it.
pub const RING: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyRing {
    /// Oldest first.
    pub keys: Vec<EspKey>,
    /// The tag of the last key made: tags are never reused, so SPIs never repeat.
    pub last_tag: u32,
    /// When the ring last rotated (or was made), in seconds.
    pub rotated_at: u64,
}

impl KeyRing {
    /// Whether the ring needs a key now: it is incomplete, or a rotation is due.
    pub fn due(&self, now: u64, interval_secs: u64) -> bool {
        self.keys.len() < 2 || now >= self.rotated_at.saturating_add(interval_secs)
    }

    /// Brings the ring up to date: a new ring gets two keys (the first to send with, the second
    /// receive-only), a due one rotates once.
    pub fn rotate(
        &mut self,
        now: u64,
        interval_secs: u64,
        fresh: &mut impl FnMut() -> [u8; ESP_KEY_BYTES],
    ) {
        if !self.due(now, interval_secs) {
            return;
        }
        while self.keys.len() < 2 {
            self.push(fresh());
        }
        if self.rotated_at != 0 && now >= self.rotated_at.saturating_add(interval_secs) {
            self.push(fresh());
        }
        let extra = self.keys.len().saturating_sub(RING);
        self.keys.drain(..extra);
        self.rotated_at = now;
    }

    fn push(&mut self, secret: [u8; ESP_KEY_BYTES]) {
        self.last_tag = self.last_tag.wrapping_add(1).max(1);
        self.keys.push(EspKey {
            tag: self.last_tag,
            secret,
        });
    }

    /// What agents get: every key, and the second-newest to send with.
    pub fn for_agents(&self) -> Option<EncryptionKeys> {
        let send = match self.keys.len() {
            0 => return None,
            1 => &self.keys[0],
            n => &self.keys[n - 2],
        };
        Some(EncryptionKeys {
            keys: self.keys.clone(),
            send: send.tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut() -> [u8; ESP_KEY_BYTES] {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; ESP_KEY_BYTES]
        }
    }

    fn tags(r: &KeyRing) -> (Vec<u32>, u32) {
        let k = r.for_agents().unwrap();
        (k.keys.iter().map(|k| k.tag).collect(), k.send)
    }

    #[test]
    fn a_new_key_is_received_for_an_interval_before_anyone_sends_with_it() {
        let mut gen = counter();
        let mut r = KeyRing::default();
        assert!(r.for_agents().is_none());
        assert!(r.due(100, 60));
        r.rotate(100, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2], 1));
        // Not due yet: nothing moves.
        r.rotate(159, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2], 1));
        r.rotate(160, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2, 3], 2));
        r.rotate(220, 60, &mut gen);
        assert_eq!(tags(&r), (vec![2, 3, 4], 3));
        r.rotate(280, 60, &mut gen);
        assert_eq!(tags(&r), (vec![3, 4, 5], 4));
        // The send key is the second-newest.
        assert_eq!(r.keys[1].secret, [4; ESP_KEY_BYTES]);
    }

    #[test]
    fn a_long_pause_rotates_only_once() {
        let mut gen = counter();
        let mut r = KeyRing::default();
        r.rotate(100, 60, &mut gen);
        r.rotate(100_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2, 3], 2));
        assert!(!r.due(100_059, 60));
    }
}
