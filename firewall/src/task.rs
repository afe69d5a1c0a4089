//! The task namespace table: traffic balanced to the task's ingress IP on the published port is
//! redirected to the port the task listens on.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::render::Batch;
use crate::{check_port, PortKey, Result, Ruleset, TableShape};

const CHAIN: &str = "nat-prerouting";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The task's IP on the ingress overlay.
    pub ingress_ip: Ipv4Addr,
    /// Published port → target port. Equal ports need no rule.
    pub redirects: BTreeMap<PortKey, u16>,
}

impl TaskState {
    pub fn validate(&self) -> Result<()> {
        for (key, target) in &self.redirects {
            check_port("a published port", key.port)?;
            check_port(format_args!("the target of {key}"), *target)?;
        }
        Ok(())
    }

    fn rules(&self) -> impl Iterator<Item = (&PortKey, &u16)> {
        self.redirects.iter().filter(|(k, t)| k.port != **t)
    }
}

impl Ruleset for TaskState {
    /// A task has a handful of ports: any change flushes and refills its one chain.
    fn render(prev: Option<&TaskState>, next: &TaskState) -> Result<Batch> {
        next.validate()?;
        let mut b = Batch::default();
        match prev {
            Some(prev) if prev == next => return Ok(b),
            Some(_) => b.flush_chain(CHAIN),
            None => {
                b.recreate_table();
                b.add_base_chain(CHAIN, "type nat hook prerouting priority dstnat");
            }
        }
        for (key, target) in next.rules() {
            b.add_rule(
                CHAIN,
                format_args!(
                    "ip daddr {} {} dport {} redirect to :{target}",
                    next.ingress_ip, key.proto, key.port
                ),
            );
        }
        Ok(b)
    }

    fn shape(&self) -> TableShape {
        TableShape {
            chains: [(CHAIN.to_string(), self.rules().count())].into(),
            sets: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(redirects: &[(PortKey, u16)]) -> TaskState {
        TaskState {
            ingress_ip: "10.255.0.10".parse().unwrap(),
            redirects: redirects.iter().copied().collect(),
        }
    }

    #[test]
    fn full_build_and_refill() {
        let s = state(&[
            (PortKey::tcp(80), 8080),
            (PortKey::udp(53), 5353),
            (PortKey::tcp(9000), 9000),
        ]);
        assert_eq!(
            TaskState::render(None, &s).unwrap().to_string(),
            "\
add table ip meshnet
delete table ip meshnet
add table ip meshnet
add chain ip meshnet nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 tcp dport 80 redirect to :8080
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 udp dport 53 redirect to :5353
"
        );
        assert_eq!(s.shape().chains[CHAIN], 2);
        let fewer = state(&[(PortKey::tcp(80), 8081)]);
        assert_eq!(
            TaskState::render(Some(&s), &fewer).unwrap().to_string(),
            "\
flush chain ip meshnet nat-prerouting
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 tcp dport 80 redirect to :8081
"
        );
        assert!(TaskState::render(Some(&fewer), &fewer).unwrap().is_empty());
    }

    #[test]
    fn bad_ports_are_rejected() {
        let s = state(&[(PortKey::tcp(80), 0)]);
        assert_eq!(
            TaskState::render(None, &s).unwrap_err().to_string(),
            "invalid port 0 for the target of 80/tcp: ports are 1-65535"
        );
    }
}
