//! The cluster's IPsec key ring for encrypted overlays (pure; the caller brings the randomness
//! and says which nodes have not applied a revision yet).
//!
//! One ring per cluster, as in Swarm: a node pair carries one pair of ESP states per key
//! whatever number of encrypted networks it shares, and which networks are encrypted is chosen
//! by marking their VXLAN packets, not by key.
//!
//! Two rules keep every packet decryptable: a node receives with a key before any node sends
//! with it, and a key is dropped only once no node sends with it. Swarm spaces its steps by
//! time and hopes every node followed; here the manager knows which assignment revision
//! carried each step to each node, so a rotation (every `--encryption-key-rotation`) moves
//! through its steps as the nodes confirm them:
//! 1. added: a fresh key joins the ring; every node installs it for receiving only;
//! 2. switched, once every node that carries keys applied step 1: the new key is the send key;
//!    each node swaps its policies to it, and every peer can already receive with it;
//! 3. dropped, once every such node applied step 2: the oldest key goes, down to two.
//!
//! So the ring holds three keys during a rotation and two between rotations: the send key and
//! the one before it, which stays receivable until the next rotation. A node that is down does
//! not hold a step back (it gets the whole ring when it comes back); one that is up but does
//! not answer holds it at most [`KEY_STEP_TIMEOUT_MS`], and a node that missed a switch that
//! way still reaches its peers with the key before, kept until the next rotation.

use std::collections::BTreeMap;

use proto::agent::{EncryptionKeys, EspKey, ESP_KEY_BYTES};
use serde::{Deserialize, Serialize};

/// Keys at most: during a rotation, the one before the send key, the send key and the new one.
pub const RING: usize = 3;
/// A step waits at most this long for a node that neither applies it nor goes down, as a
/// draining task does (see [`crate::rollout::DRAIN_TIMEOUT_MS`]).
pub const KEY_STEP_TIMEOUT_MS: u64 = crate::rollout::DRAIN_TIMEOUT_MS;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyRing {
    /// Oldest first.
    pub keys: Vec<EspKey>,
    /// The tag of the key to send with; 0 in a ring stored before there were steps, whose send
    /// key was the second-newest.
    #[serde(default)]
    pub send: u32,
    /// The tag of the last key made: tags are never reused, so SPIs never repeat.
    pub last_tag: u32,
    /// When the last rotation began (or the ring was made), in seconds.
    pub rotated_at: u64,
    /// The step of a rotation the nodes are applying.
    #[serde(default)]
    pub step: Option<KeyStep>,
}

/// A step of a rotation, on its way to the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStep {
    pub kind: StepKind,
    /// When it was taken, in milliseconds.
    pub since_ms: u64,
    /// Node id → the revision of its assignment that carries the step, for each node that
    /// was ready and carried keys when the assignments were computed ([`KeyRing::arm`]).
    pub revisions: BTreeMap<String, u64>,
    pub armed: bool,
}

impl KeyStep {
    /// Whether it waited [`KEY_STEP_TIMEOUT_MS`] for the nodes.
    fn timed_out(&self, now_ms: u64) -> bool {
        now_ms >= self.since_ms.saturating_add(KEY_STEP_TIMEOUT_MS)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    /// A new key, receive-only.
    Added,
    /// The newest key became the send key.
    Switched,
}

/// What [`KeyRing::advance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    /// The step that was confirmed (or waited for long enough).
    pub confirmed: StepKind,
    /// Nodes that had not applied it when it timed out; empty when all had.
    pub unconfirmed: Vec<String>,
}

impl KeyRing {
    /// Whether the ring needs work from the clock now: there is none, or a rotation is due
    /// (never while one is under way).
    pub fn due(&self, now: u64, interval_secs: u64) -> bool {
        self.keys.is_empty()
            || (self.step.is_none() && now >= self.rotated_at.saturating_add(interval_secs))
    }

    /// Makes the ring (one key, the send key) if there is none, or begins a rotation when one
    /// is due: a fresh key is added, receive-only.
    pub fn rotate(
        &mut self,
        now_ms: u64,
        interval_secs: u64,
        fresh: &mut impl FnMut() -> [u8; ESP_KEY_BYTES],
    ) {
        let now = now_ms / 1000;
        if !self.due(now, interval_secs) {
            return;
        }
        // A ring stored before there were steps may hold three keys: the oldest, which
        // nobody sends with any more, makes room.
        if let Some(send) = self.send_key().map(|k| k.tag) {
            self.send = send;
            let before_send = self.keys.iter().take_while(|k| k.tag != send).count();
            let extra = self.keys.len().saturating_sub(RING - 1).min(before_send);
            self.keys.drain(..extra);
        }
        let tag = self.push(fresh());
        self.rotated_at = now;
        if self.keys.len() == 1 {
            // Nobody has a key yet: every node gets this one to send and receive with at once.
            self.send = tag;
            return;
        }
        self.step = Some(KeyStep {
            kind: StepKind::Added,
            since_ms: now_ms,
            revisions: BTreeMap::new(),
            armed: false,
        });
    }

    /// Records, once the assignments carrying the current step are computed, which revision
    /// each node must apply (`revisions`: the ready nodes that carry keys).
    pub fn arm(&mut self, revisions: impl FnOnce() -> BTreeMap<String, u64>) {
        if let Some(step) = self.step.as_mut().filter(|s| !s.armed) {
            step.revisions = revisions();
            step.armed = true;
        }
    }

    /// Whether [`KeyRing::advance`] would move on now; `pending` lists the nodes of a revision
    /// map that are up and have not applied their revision yet.
    pub fn ready(
        &self,
        now_ms: u64,
        pending: impl FnOnce(&BTreeMap<String, u64>) -> Vec<String>,
    ) -> bool {
        self.step.as_ref().is_some_and(|step| {
            step.armed && (step.timed_out(now_ms) || pending(&step.revisions).is_empty())
        })
    }

    /// Takes the next step of a rotation once every node confirmed the current one, or it
    /// waited [`KEY_STEP_TIMEOUT_MS`]: switches to the new key, or drops the oldest.
    pub fn advance(
        &mut self,
        now_ms: u64,
        pending: impl FnOnce(&BTreeMap<String, u64>) -> Vec<String>,
    ) -> Option<Advanced> {
        let step = self.step.as_ref().filter(|s| s.armed)?;
        let waiting = pending(&step.revisions);
        if !waiting.is_empty() && !step.timed_out(now_ms) {
            return None;
        }
        let confirmed = step.kind;
        match confirmed {
            StepKind::Added => {
                self.send = self.keys.last().expect("a rotation adds a key").tag;
                self.step = Some(KeyStep {
                    kind: StepKind::Switched,
                    since_ms: now_ms,
                    revisions: BTreeMap::new(),
                    armed: false,
                });
            }
            StepKind::Switched => {
                let extra = self.keys.len().saturating_sub(RING - 1);
                self.keys.drain(..extra);
                self.step = None;
            }
        }
        Some(Advanced {
            confirmed,
            unconfirmed: waiting,
        })
    }

    fn push(&mut self, secret: [u8; ESP_KEY_BYTES]) -> u32 {
        self.last_tag = self.last_tag.wrapping_add(1).max(1);
        self.keys.push(EspKey {
            tag: self.last_tag,
            secret,
        });
        self.last_tag
    }

    /// The key to send with.
    fn send_key(&self) -> Option<&EspKey> {
        self.keys.iter().find(|k| k.tag == self.send).or_else(|| {
            // A ring stored before there were steps: its send key was the second-newest.
            let n = self.keys.len();
            self.keys.get(n.saturating_sub(2))
        })
    }

    /// What agents get: every key, and the one to send with.
    pub fn for_agents(&self) -> Option<EncryptionKeys> {
        Some(EncryptionKeys {
            keys: self.keys.clone(),
            send: self.send_key()?.tag,
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

    /// Two nodes; `applied` says which have applied their revision of the step.
    fn revisions() -> BTreeMap<String, u64> {
        BTreeMap::from([("n1".to_string(), 5), ("n2".to_string(), 7)])
    }

    fn pending<'a>(applied: &'a [&'a str]) -> impl Fn(&BTreeMap<String, u64>) -> Vec<String> + 'a {
        move |revs| {
            revs.keys()
                .filter(|n| !applied.contains(&n.as_str()))
                .cloned()
                .collect()
        }
    }

    #[test]
    fn each_step_of_a_rotation_waits_for_every_node_to_apply_the_one_before() {
        let mut gen = counter();
        let mut r = KeyRing::default();
        assert!(r.for_agents().is_none());
        assert!(r.due(100, 60));
        // The first key is sent with at once: nobody has another.
        r.rotate(100_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1], 1));
        assert_eq!(r.step, None);
        // Not due yet: nothing moves.
        r.rotate(159_999, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1], 1));

        // Step 1: the new key is only received with.
        r.rotate(160_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2], 1));
        // Not armed yet (the assignments carrying it are not computed): nothing moves, even
        // with nobody to wait for.
        assert!(!r.ready(160_000, pending(&["n1", "n2"])));
        assert_eq!(r.advance(160_000, pending(&["n1", "n2"])), None);
        r.arm(revisions);
        // A rotation under way is never due again, however long it takes.
        assert!(!r.due(10_000, 60));
        r.rotate(10_000_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2], 1));
        // One node applied it: still receive-only.
        assert!(!r.ready(161_000, pending(&["n1"])));
        assert_eq!(r.advance(161_000, pending(&["n1"])), None);
        assert_eq!(tags(&r), (vec![1, 2], 1));
        // Both did: step 2, everybody sends with it.
        let done = r.advance(161_500, pending(&["n1", "n2"])).unwrap();
        assert_eq!(
            done,
            Advanced {
                confirmed: StepKind::Added,
                unconfirmed: vec![]
            }
        );
        assert_eq!(tags(&r), (vec![1, 2], 2));
        // A new step is armed anew: the revisions of step 1 do not count for it.
        assert_eq!(r.advance(161_500, pending(&["n1", "n2"])), None);
        r.arm(revisions);
        assert_eq!(r.step.as_ref().unwrap().kind, StepKind::Switched);
        assert_eq!(r.advance(162_000, pending(&["n2"])), None);
        // Step 3: with two keys, nothing to drop; the rotation is over.
        r.advance(162_000, pending(&["n1", "n2"])).unwrap();
        assert_eq!(tags(&r), (vec![1, 2], 2));
        assert_eq!(r.step, None);

        // The next rotation, an interval after the last one began: three keys at most, the
        // oldest goes once nobody sends with the one after it... and the one before the send
        // key stays receivable until then.
        assert!(!r.due(219, 60));
        r.rotate(220_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![1, 2, 3], 2));
        r.arm(revisions);
        r.advance(221_000, pending(&["n1", "n2"])).unwrap();
        assert_eq!(tags(&r), (vec![1, 2, 3], 3));
        r.arm(revisions);
        r.advance(222_000, pending(&["n1", "n2"])).unwrap();
        assert_eq!(tags(&r), (vec![2, 3], 3));
        assert_eq!(r.keys[1].secret, [3; ESP_KEY_BYTES]);
        assert_eq!(r.last_tag, 3);
    }

    #[test]
    fn a_node_that_does_not_answer_holds_a_step_back_no_longer_than_the_timeout() {
        let mut gen = counter();
        let mut r = KeyRing::default();
        r.rotate(0, 60, &mut gen);
        r.rotate(60_000, 60, &mut gen);
        r.arm(revisions);
        let until = 60_000 + KEY_STEP_TIMEOUT_MS;
        assert!(!r.ready(until - 1, pending(&["n1"])));
        assert_eq!(r.advance(until - 1, pending(&["n1"])), None);
        assert!(r.ready(until, pending(&["n1"])));
        let done = r.advance(until, pending(&["n1"])).unwrap();
        assert_eq!(done.unconfirmed, vec!["n2".to_string()]);
        assert_eq!(tags(&r), (vec![1, 2], 2));
        // The timeout counts from each step's own start.
        r.arm(revisions);
        assert_eq!(r.advance(until + 1, pending(&["n1"])), None);
        r.advance(until + KEY_STEP_TIMEOUT_MS, pending(&["n1"]))
            .unwrap();
        assert_eq!(r.step, None);
    }

    #[test]
    fn nothing_to_wait_for_moves_a_rotation_through_at_once() {
        let mut gen = counter();
        let mut r = KeyRing::default();
        r.rotate(0, 60, &mut gen);
        r.rotate(60_000, 60, &mut gen);
        r.arm(BTreeMap::new);
        assert!(r.ready(60_000, pending(&[])));
        r.advance(60_000, pending(&[])).unwrap();
        r.arm(BTreeMap::new);
        r.advance(60_000, pending(&[])).unwrap();
        assert_eq!((tags(&r), r.step.as_ref()), ((vec![1, 2], 2), None));
    }

    #[test]
    fn a_ring_stored_before_steps_sends_with_its_second_newest_key() {
        // What such a store held: no send tag, no step.
        let mut gen = counter();
        let old = KeyRing {
            keys: (4..=6).map(|tag| EspKey { tag, secret: gen() }).collect(),
            send: 0,
            last_tag: 6,
            rotated_at: 100,
            step: None,
        };
        let mut stored = serde_json::to_value(&old).unwrap();
        let fields = stored.as_object_mut().unwrap();
        fields.remove("send");
        fields.remove("step");
        let stored = serde_json::to_string(&stored).unwrap();
        let mut r: KeyRing = serde_json::from_str(&stored).unwrap();
        assert_eq!(tags(&r), (vec![4, 5, 6], 5));
        // Its next rotation drops the key before the send key to make room: three at most.
        r.rotate(200_000, 60, &mut gen);
        assert_eq!(tags(&r), (vec![5, 6, 7], 5));
        r.arm(revisions);
        r.advance(200_000, pending(&["n1", "n2"])).unwrap();
        assert_eq!(tags(&r), (vec![5, 6, 7], 7));
        r.arm(revisions);
        r.advance(200_000, pending(&["n1", "n2"])).unwrap();
        assert_eq!(tags(&r), (vec![6, 7], 7));
    }
}
