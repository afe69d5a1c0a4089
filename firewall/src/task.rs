//! The task namespace table: traffic balanced to the task's ingress IP on the published port is
//! redirected to the port the task listens on, and (with the nftables load balancer) the task's
//! own connections to a service VIP are DNATed, round robin, to the service's running tasks.
//!
//! Translating in the client's namespace costs no extra hop and no SNAT: the backend sees the
//! client's own address. A locally generated packet DNATed in nat output is routed again, so
//! the neighbour lookup is for the real task address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::render::Batch;
use crate::{check_port, PortKey, Result, Ruleset};

const PREROUTING: &str = "nat-prerouting";
const OUTPUT: &str = "nat-output";
/// VIP → `goto vip-<VIP>`: one lookup whatever the number of services.
const VIPS: &str = "vips";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The task's IP on the ingress overlay, when it is on it.
    pub ingress_ip: Option<Ipv4Addr>,
    /// Published port → target port, on the ingress IP. Equal ports need no rule.
    pub redirects: BTreeMap<PortKey, u16>,
    /// Every VIP of a vip-mode service on the task's networks → the addresses of the service's
    /// running tasks, on any node. Slot i of the round robin is the i-th address in order.
    /// A VIP without tasks refuses (TCP reset, ICMP unreachable) instead of black-holing.
    pub vips: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
}

fn vip_chain(vip: Ipv4Addr) -> String {
    format!("vip-{vip}")
}

impl TaskState {
    pub fn validate(&self) -> Result<()> {
        for (key, target) in &self.redirects {
            check_port("a published port", key.port)?;
            check_port(format_args!("the target of {key}"), *target)?;
        }
        Ok(())
    }

    fn rules(&self) -> impl Iterator<Item = (Ipv4Addr, &PortKey, &u16)> {
        let ip = self.ingress_ip;
        self.redirects
            .iter()
            .filter(|(k, t)| k.port != **t)
            .filter_map(move |(k, t)| Some((ip?, k, t)))
    }

    fn render_redirects(&self, b: &mut Batch) {
        for (ip, key, target) in self.rules() {
            b.add_rule(
                PREROUTING,
                format_args!(
                    "ip daddr {ip} {} dport {} redirect to :{target}",
                    key.proto, key.port
                ),
            );
        }
    }

    /// The rules of one VIP's chain.
    fn render_vip(b: &mut Batch, vip: Ipv4Addr, backends: &BTreeSet<Ipv4Addr>) {
        let chain = vip_chain(vip);
        if backends.is_empty() {
            // nft adds the `meta l4proto tcp` match itself, and lists the rule without it.
            b.add_rule(&chain, format_args!("reject with tcp reset"));
            b.add_rule(&chain, format_args!("reject"));
            return;
        }
        let slots: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("{i} : {ip}"))
            .collect();
        b.add_rule(
            &chain,
            format_args!(
                "dnat to numgen inc mod {} map {{ {} }}",
                backends.len(),
                slots.join(", ")
            ),
        );
    }

    /// The VIP chains and map elements that change from `prev` to `self`: only the chains of
    /// VIPs that changed are touched, so the batch is as large as the change.
    fn render_vips(&self, prev: &BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>, b: &mut Batch) {
        let mut removed = Vec::new();
        let mut added = Vec::new();
        let mut chains = Batch::default();
        for (vip, was) in prev {
            if !self.vips.contains_key(vip) {
                removed.push(*vip);
            } else if self.vips.get(vip) != Some(was) {
                chains.flush_chain(&vip_chain(*vip));
                Self::render_vip(&mut chains, *vip, &self.vips[vip]);
            }
        }
        for (vip, backends) in &self.vips {
            if !prev.contains_key(vip) {
                chains.add_chain(&vip_chain(*vip));
                Self::render_vip(&mut chains, *vip, backends);
                added.push(*vip);
            }
        }
        let elements = |vips: &[Ipv4Addr], with_verdict: bool| -> Vec<String> {
            vips.iter()
                .map(|v| match with_verdict {
                    true => format!("{v} : goto {}", vip_chain(*v)),
                    false => v.to_string(),
                })
                .collect()
        };
        b.elements("delete", VIPS, &elements(&removed, false));
        b.append(&chains);
        b.elements("add", VIPS, &elements(&added, true));
        for vip in removed {
            b.delete_chain(&vip_chain(vip));
        }
    }
}

impl Ruleset for TaskState {
    /// A task has a handful of ports: a change of them flushes and refills their one chain.
    /// VIPs change one chain each.
    fn render(prev: Option<&TaskState>, next: &TaskState) -> Result<Batch> {
        next.validate()?;
        let mut b = Batch::default();
        match prev {
            Some(prev) if prev == next => {}
            Some(prev) => {
                if (prev.ingress_ip, &prev.redirects) != (next.ingress_ip, &next.redirects) {
                    b.flush_chain(PREROUTING);
                    next.render_redirects(&mut b);
                }
                next.render_vips(&prev.vips, &mut b);
            }
            None => {
                b.recreate_table();
                b.add_base_chain(PREROUTING, "type nat hook prerouting priority dstnat");
                next.render_redirects(&mut b);
                b.add_set("map", VIPS, "type ipv4_addr : verdict");
                // nft refuses `priority dstnat` in an output nat chain; -100 is its value.
                b.add_base_chain(OUTPUT, "type nat hook output priority -100");
                b.add_rule(OUTPUT, format_args!("ip daddr vmap @{VIPS}"));
                next.render_vips(&BTreeMap::new(), &mut b);
            }
        }
        Ok(b)
    }

    /// Tasks that no VIP balances to any more: the task's UDP flows to them must go, so the
    /// next datagram is balanced afresh.
    fn stale_destinations(prev: &TaskState, next: &TaskState) -> Vec<Ipv4Addr> {
        let all =
            |s: &TaskState| -> BTreeSet<Ipv4Addr> { s.vips.values().flatten().copied().collect() };
        all(prev).difference(&all(next)).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn state(redirects: &[(PortKey, u16)]) -> TaskState {
        TaskState {
            ingress_ip: Some(ip("10.255.0.10")),
            redirects: redirects.iter().copied().collect(),
            vips: BTreeMap::new(),
        }
    }

    fn with_vips(mut s: TaskState, vips: &[(&str, &[&str])]) -> TaskState {
        s.vips = vips
            .iter()
            .map(|(v, b)| (ip(v), b.iter().map(|a| ip(a)).collect()))
            .collect();
        s
    }

    fn render(prev: Option<&TaskState>, next: &TaskState) -> String {
        TaskState::render(prev, next).unwrap().to_string()
    }

    const FIXED_OUTPUT: &str = "\
add map ip meshnet vips { type ipv4_addr : verdict; }
add chain ip meshnet nat-output { type nat hook output priority -100; policy accept; }
add rule ip meshnet nat-output ip daddr vmap @vips
";

    #[test]
    fn full_build_and_refill() {
        let s = state(&[
            (PortKey::tcp(80), 8080),
            (PortKey::udp(53), 5353),
            (PortKey::tcp(9000), 9000),
        ]);
        assert_eq!(
            render(None, &s),
            "\
add table ip meshnet
delete table ip meshnet
add table ip meshnet
add chain ip meshnet nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 tcp dport 80 redirect to :8080
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 udp dport 53 redirect to :5353
"
            .to_string()
                + FIXED_OUTPUT
        );
        let fewer = state(&[(PortKey::tcp(80), 8081)]);
        assert_eq!(
            render(Some(&s), &fewer),
            "\
flush chain ip meshnet nat-prerouting
add rule ip meshnet nat-prerouting ip daddr 10.255.0.10 tcp dport 80 redirect to :8081
"
        );
        assert!(TaskState::render(Some(&fewer), &fewer).unwrap().is_empty());
    }

    #[test]
    fn a_task_off_ingress_redirects_nothing() {
        let s = TaskState {
            ingress_ip: None,
            ..state(&[(PortKey::tcp(80), 8080)])
        };
        assert!(!render(None, &s).contains("redirect"));
    }

    #[test]
    fn vips_balance_round_robin_over_maps_and_refuse_without_tasks() {
        let s = with_vips(
            state(&[]),
            &[("10.0.9.2", &["10.0.9.6", "10.0.9.5"]), ("10.0.9.3", &[])],
        );
        let text = render(None, &s);
        assert!(text.ends_with(
            &(FIXED_OUTPUT.to_string()
                + "\
add chain ip meshnet vip-10.0.9.2
add rule ip meshnet vip-10.0.9.2 dnat to numgen inc mod 2 map { 0 : 10.0.9.5, 1 : 10.0.9.6 }
add chain ip meshnet vip-10.0.9.3
add rule ip meshnet vip-10.0.9.3 reject with tcp reset
add rule ip meshnet vip-10.0.9.3 reject
add element ip meshnet vips { 10.0.9.2 : goto vip-10.0.9.2, 10.0.9.3 : goto vip-10.0.9.3 }
")
        ));
    }

    #[test]
    fn a_vip_change_refills_only_its_chain() {
        let before = with_vips(
            state(&[(PortKey::tcp(80), 8080)]),
            &[
                ("10.0.9.2", &["10.0.9.5", "10.0.9.6"]),
                ("10.0.9.3", &["10.0.9.7"]),
            ],
        );
        // A task of the first service leaves; the second service is untouched.
        let after = with_vips(
            state(&[(PortKey::tcp(80), 8080)]),
            &[("10.0.9.2", &["10.0.9.6"]), ("10.0.9.3", &["10.0.9.7"])],
        );
        assert_eq!(
            render(Some(&before), &after),
            "\
flush chain ip meshnet vip-10.0.9.2
add rule ip meshnet vip-10.0.9.2 dnat to numgen inc mod 1 map { 0 : 10.0.9.6 }
"
        );
        assert_eq!(
            TaskState::stale_destinations(&before, &after),
            [ip("10.0.9.5")]
        );
        // The last task leaves: the VIP refuses.
        let none = with_vips(
            state(&[(PortKey::tcp(80), 8080)]),
            &[("10.0.9.2", &[]), ("10.0.9.3", &["10.0.9.7"])],
        );
        assert_eq!(
            render(Some(&after), &none),
            "\
flush chain ip meshnet vip-10.0.9.2
add rule ip meshnet vip-10.0.9.2 reject with tcp reset
add rule ip meshnet vip-10.0.9.2 reject
"
        );
    }

    #[test]
    fn services_come_and_go_with_their_chains() {
        let one = with_vips(state(&[]), &[("10.0.9.2", &["10.0.9.5"])]);
        let two = with_vips(
            state(&[]),
            &[("10.0.9.2", &["10.0.9.5"]), ("10.0.9.3", &["10.0.9.7"])],
        );
        assert_eq!(
            render(Some(&one), &two),
            "\
add chain ip meshnet vip-10.0.9.3
add rule ip meshnet vip-10.0.9.3 dnat to numgen inc mod 1 map { 0 : 10.0.9.7 }
add element ip meshnet vips { 10.0.9.3 : goto vip-10.0.9.3 }
"
        );
        assert_eq!(
            render(Some(&two), &one),
            "\
delete element ip meshnet vips { 10.0.9.3 }
flush chain ip meshnet vip-10.0.9.3
delete chain ip meshnet vip-10.0.9.3
"
        );
        assert_eq!(TaskState::stale_destinations(&two, &one), [ip("10.0.9.7")]);
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
