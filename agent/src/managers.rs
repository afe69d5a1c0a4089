//! The managers the agent knows, and which one it tries next.
//!
//! Several managers share the cluster's state; only their leader takes agents, and a follower
//! answers with the leader's address when it knows it. The agent knows the managers of its
//! `--manager` flags, which always stay, and those the leader listed last
//! ([`proto::agent::ManagerMsg::Managers`]), kept in the state dir so that a restarted agent
//! still finds a manager when its flags' ones are gone. A follower's hint is tried at once but
//! only remembered for this run: the leader's list is the truth about who the managers are.
//!
//! Which manager comes next is decided here without any I/O, so it is tested without a network.

use std::time::Duration;

pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The wait after a follower that knows no leader: an election is usually over by then.
pub const NO_LEADER_WAIT: Duration = Duration::from_millis(300);
/// Followers' hints followed in a row: stale hints may name each other while the leadership
/// moves, and past this the agent goes on round robin (with its backoff) instead.
pub const MAX_HOPS: u32 = 3;

/// A manager's agent endpoint, ADDR:PORT.
pub fn parse_manager(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not ADDR:PORT"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no address"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} has no valid port"))?;
    Ok(s.to_string())
}

/// How a session with a manager ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The connection failed, or the session failed or closed.
    Lost,
    /// The manager is a follower; the leader's address if it knows one.
    NotLeader(Option<String>),
}

/// The manager to try next, after how long, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    pub addr: String,
    pub wait: Duration,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Managers {
    flags: Vec<String>,
    learned: Vec<String>,
    /// Followers' hints that no leader's list has named.
    hinted: Vec<String>,
    current: String,
    /// Managers lost since the last round's wait. A welcome does not reset it: a leader that
    /// keeps dropping the agent must not be redialled in a tight loop.
    tried: usize,
    /// Hints followed since the last welcome or round's wait.
    hops: u32,
    backoff: Duration,
}

impl Managers {
    /// Starts with the first flag's manager. `flags` must not be empty.
    pub fn new(flags: Vec<String>, learned: Vec<String>) -> Managers {
        let current = flags
            .first()
            .expect("at least one --manager (clap requires it)")
            .clone();
        Managers {
            flags,
            learned: dedup(learned),
            hinted: Vec::new(),
            current,
            tried: 0,
            hops: 0,
            backoff: BACKOFF_MIN,
        }
    }

    /// The manager to connect to now.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Every known manager once, in the order they are tried: the flags', the learned, the
    /// hinted.
    pub fn candidates(&self) -> Vec<String> {
        dedup(
            self.flags
                .iter()
                .chain(&self.learned)
                .chain(&self.hinted)
                .cloned()
                .collect(),
        )
    }

    /// The leader's last list, as kept in the state dir.
    pub fn learned(&self) -> &[String] {
        &self.learned
    }

    /// The current manager took the agent: the next round's wait is the shortest again.
    pub fn connected(&mut self) {
        self.hops = 0;
        self.backoff = BACKOFF_MIN;
    }

    /// Replaces the learned managers with a leader's list (hints are superseded by it too).
    /// Whether the learned ones changed, i.e. must be kept anew.
    pub fn learn(&mut self, addrs: Vec<String>) -> bool {
        let addrs = dedup(addrs);
        self.hinted.clear();
        if addrs == self.learned {
            return false;
        }
        self.learned = addrs;
        true
    }

    /// Moves on after a session with the current manager ended with `outcome`.
    pub fn after(&mut self, outcome: Outcome) -> Next {
        let from = self.current.clone();
        match outcome {
            Outcome::NotLeader(Some(leader)) if self.hops < MAX_HOPS => {
                self.hops += 1;
                if !self.candidates().contains(&leader) {
                    self.hinted.push(leader.clone());
                }
                self.current = leader.clone();
                Next {
                    addr: leader.clone(),
                    wait: Duration::ZERO,
                    reason: format!("the manager at {from} is not the leader; the leader is at {leader}"),
                }
            }
            Outcome::NotLeader(Some(leader)) => self.rotate(format!(
                "the manager at {from} is not the leader and names {leader}, but {MAX_HOPS} hints were followed in a row"
            )),
            Outcome::NotLeader(None) => {
                let mut next = self.rotate(format!(
                    "the manager at {from} is not the leader and knows no leader (an election?)"
                ));
                next.wait = next.wait.max(NO_LEADER_WAIT);
                next
            }
            Outcome::Lost => self.rotate(format!("the connection to the manager at {from} ended")),
        }
    }

    /// Round robin: the next candidate at once, or after the backoff once every one failed.
    fn rotate(&mut self, why: String) -> Next {
        let list = self.candidates();
        // A manager the leader's list dropped is not in it: start over at the first.
        let at = list
            .iter()
            .position(|m| *m == self.current)
            .map_or(0, |i| (i + 1) % list.len());
        self.current = list[at].clone();
        self.tried += 1;
        let (wait, reason) = if self.tried >= list.len() {
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            self.tried = 0;
            self.hops = 0;
            let n = list.len();
            (
                wait,
                format!("{why}; none of {n} known managers took the agent: waiting {wait:?}"),
            )
        } else {
            (Duration::ZERO, why)
        };
        Next {
            addr: self.current.clone(),
            wait,
            reason,
        }
    }
}

/// `addrs` without repeats, in their first order.
fn dedup(addrs: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(addrs.len());
    for a in addrs {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(addrs: &[&str]) -> Vec<String> {
        addrs.iter().map(|a| a.to_string()).collect()
    }

    /// The addresses and waits of `n` steps that all end with `outcome`.
    fn steps(m: &mut Managers, outcome: Outcome, n: usize) -> Vec<(String, Duration)> {
        (0..n)
            .map(|_| {
                let next = m.after(outcome.clone());
                (next.addr, next.wait)
            })
            .collect()
    }

    const NOW: Duration = Duration::ZERO;

    #[test]
    fn lost_managers_go_round_robin_with_the_backoff_between_rounds_only() {
        let mut m = Managers::new(s(&["a:1", "b:1"]), s(&["c:1", "a:1"]));
        assert_eq!(m.candidates(), s(&["a:1", "b:1", "c:1"]));
        assert_eq!(m.current(), "a:1");
        let ms = Duration::from_millis;
        assert_eq!(
            steps(&mut m, Outcome::Lost, 6),
            [
                ("b:1".into(), NOW),
                ("c:1".into(), NOW),
                ("a:1".into(), ms(500)),
                ("b:1".into(), NOW),
                ("c:1".into(), NOW),
                ("a:1".into(), ms(1000)),
            ]
        );
        // Welcomed by a: the next loss moves on at once, and the backoff starts over.
        m.connected();
        assert_eq!(
            steps(&mut m, Outcome::Lost, 3),
            [
                ("b:1".into(), NOW),
                ("c:1".into(), NOW),
                ("a:1".into(), ms(500)),
            ]
        );
    }

    #[test]
    fn a_leader_that_keeps_dropping_the_agent_is_not_hammered() {
        let mut m = Managers::new(s(&["a:1", "b:1"]), vec![]);
        let mut waited = Duration::ZERO;
        for _ in 0..2 {
            // a welcomes and closes; b sends the agent back to a.
            m.connected();
            waited += m.after(Outcome::Lost).wait;
            assert_eq!(m.current(), "b:1");
            waited += m.after(Outcome::NotLeader(Some("a:1".into()))).wait;
        }
        assert_eq!(waited, BACKOFF_MIN, "one round's wait per two losses");
    }

    #[test]
    fn one_manager_keeps_the_old_backoff() {
        let mut m = Managers::new(s(&["a:1"]), vec![]);
        let waits: Vec<Duration> = steps(&mut m, Outcome::Lost, 7)
            .into_iter()
            .map(|(addr, wait)| {
                assert_eq!(addr, "a:1");
                wait
            })
            .collect();
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert_eq!(
            waits,
            [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0].map(secs),
            "doubling up to BACKOFF_MAX"
        );
        m.connected();
        assert_eq!(m.after(Outcome::Lost).wait, BACKOFF_MIN);
    }

    #[test]
    fn a_follower_s_hint_is_followed_at_once_and_kept_only_for_the_run() {
        let mut m = Managers::new(s(&["a:1", "b:1"]), vec![]);
        m.after(Outcome::Lost);
        assert_eq!(m.current(), "b:1");
        let next = m.after(Outcome::NotLeader(Some("z:9".into())));
        assert_eq!((next.addr.as_str(), next.wait), ("z:9", NOW));
        assert!(
            next.reason.contains("b:1") && next.reason.contains("z:9"),
            "{}",
            next.reason
        );
        assert_eq!(m.candidates(), s(&["a:1", "b:1", "z:9"]));
        assert!(m.learned().is_empty(), "a hint is not the leader's list");
        // A known leader is gone to without being added twice.
        m.after(Outcome::NotLeader(Some("a:1".into())));
        assert_eq!(m.current(), "a:1");
        assert_eq!(m.candidates().len(), 3);
        // The leader's list replaces hints; the flags stay.
        assert!(m.learn(s(&["c:1", "d:1", "c:1"])));
        assert!(!m.learn(s(&["c:1", "d:1"])), "the same list again");
        assert_eq!(m.learned(), s(&["c:1", "d:1"]));
        assert_eq!(m.candidates(), s(&["a:1", "b:1", "c:1", "d:1"]));
    }

    #[test]
    fn hints_that_go_in_circles_fall_back_to_round_robin() {
        let mut m = Managers::new(s(&["a:1", "b:1"]), vec![]);
        let mut hops = Vec::new();
        for _ in 0..MAX_HOPS {
            let to = if m.current() == "a:1" { "b:1" } else { "a:1" };
            hops.push(m.after(Outcome::NotLeader(Some(to.into()))));
        }
        assert!(hops.iter().all(|h| h.wait == NOW));
        assert_eq!(m.current(), "b:1");
        // One hint too many: round robin instead, with its wait once both were tried.
        let next = m.after(Outcome::NotLeader(Some("a:1".into())));
        assert_eq!((next.addr.as_str(), next.wait), ("a:1", NOW));
        let next = m.after(Outcome::NotLeader(Some("b:1".into())));
        assert_eq!((next.addr.as_str(), next.wait), ("b:1", BACKOFF_MIN));
        // After the round's wait hints are followed again.
        let next = m.after(Outcome::NotLeader(Some("a:1".into())));
        assert_eq!((next.addr.as_str(), next.wait), ("a:1", NOW));
    }

    #[test]
    fn no_leader_waits_a_moment_then_tries_the_next() {
        let mut m = Managers::new(s(&["a:1", "b:1", "c:1"]), vec![]);
        let next = m.after(Outcome::NotLeader(None));
        assert_eq!((next.addr.as_str(), next.wait), ("b:1", NO_LEADER_WAIT));
        assert!(next.reason.contains("knows no leader"), "{}", next.reason);
        m.after(Outcome::NotLeader(None));
        // The round's end waits the (longer) backoff.
        let next = m.after(Outcome::NotLeader(None));
        assert_eq!((next.addr.as_str(), next.wait), ("a:1", BACKOFF_MIN));
        assert!(NO_LEADER_WAIT < BACKOFF_MIN);
    }

    #[test]
    fn a_manager_dropped_from_the_list_is_left_for_the_first() {
        let mut m = Managers::new(s(&["a:1"]), s(&["b:1"]));
        m.after(Outcome::Lost);
        assert_eq!(m.current(), "b:1");
        m.connected();
        // b's leader says the managers are now a and c: b, once lost, is not tried again.
        m.learn(s(&["a:1", "c:1"]));
        assert_eq!(m.after(Outcome::Lost).addr, "a:1");
        assert_eq!(m.after(Outcome::Lost).addr, "c:1");
        assert_eq!(m.after(Outcome::Lost).addr, "a:1");
    }

    #[test]
    fn manager_addresses_need_an_address_and_a_port() {
        assert_eq!(parse_manager("10.0.0.1:2377").unwrap(), "10.0.0.1:2377");
        assert!(parse_manager("[::1]:2377").is_ok());
        for bad in ["nohost", ":2377", "h:0", "h:99999", "h:x"] {
            assert!(parse_manager(bad).is_err(), "{bad}");
        }
    }
}
