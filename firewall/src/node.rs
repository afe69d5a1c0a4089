//! The node namespace table: published ports DNATed to the ingress_sbox (ingress mode) or to a
//! local task (host mode), gwbridge masquerade and icc off (layout in the crate documentation).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

use crate::render::Batch;
use crate::{check_interface, check_port, Error, PortKey, Result, Ruleset};

/// The base chain that drops packets to 127.0.0.0/8 arriving on any interface but lo.
const LOCALNET_GUARD_CHAIN: &str = "raw-prerouting";

/// What the node's fixed chains depend on; a change rebuilds the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The gwbridge's interface name (`docker_gwbridge` in Swarm).
    pub gwbridge: String,
    pub gwbridge_subnet: Ipv4Net,
    /// The ingress_sbox's address on the gwbridge: the DNAT target of ingress-mode ports.
    pub ingress_sbox_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub config: NodeConfig,
    /// Ports published in ingress mode (every node answers them).
    pub ingress_ports: BTreeSet<PortKey>,
    /// Ports published in host mode by a task on this node → that task's gwbridge IP:target.
    pub host_ports: BTreeMap<PortKey, SocketAddrV4>,
}

impl NodeState {
    pub fn new(config: NodeConfig) -> NodeState {
        NodeState {
            config,
            ingress_ports: BTreeSet::new(),
            host_ports: BTreeMap::new(),
        }
    }

    /// Bad ports, one port in both modes, a bad interface name: rejected before rendering.
    pub fn validate(&self) -> Result<()> {
        check_interface(&self.config.gwbridge)?;
        for key in &self.ingress_ports {
            check_port("an ingress-mode published port", key.port)?;
        }
        for (key, target) in &self.host_ports {
            check_port("a host-mode published port", key.port)?;
            check_port(format_args!("the target of {key}"), target.port())?;
            if self.ingress_ports.contains(key) {
                return Err(Error::DuplicatePort(*key));
            }
        }
        Ok(())
    }

    fn render_fixed(&self, b: &mut Batch) {
        let c = &self.config;
        let gw = &c.gwbridge;
        b.recreate_table();
        b.add_set("set", "ingress-ports", "type inet_proto . inet_service");
        b.add_set(
            "map",
            "host-ports",
            "type inet_proto . inet_service : ipv4_addr . inet_service",
        );
        b.add_set(
            "set",
            "host-targets",
            "type ipv4_addr . inet_proto . inet_service",
        );
        // CVE-2020-8558 (kube-proxy's KUBE-FIREWALL "block incoming localnet connections"):
        // with route_localnet=1 on the gwbridge, a neighbour that routes 127.0.0.0/8 to this
        // node would reach services bound to its localhost. Drop such packets unless they came
        // in on lo, at raw priority: before conntrack and before NAT, so that the replies of
        // our own localhost:<published> connections (addressed to our gwbridge IP until the
        // masquerade is undone at dstnat) and the output path are untouched.
        b.add_base_chain(
            LOCALNET_GUARD_CHAIN,
            "type filter hook prerouting priority raw",
        );
        b.add_rule(
            LOCALNET_GUARD_CHAIN,
            format_args!("ip daddr 127.0.0.0/8 iifname != \"lo\" drop"),
        );
        b.add_chain("published");
        b.add_rule(
            "published",
            format_args!(
                "meta l4proto . th dport @ingress-ports dnat to {}",
                c.ingress_sbox_ip
            ),
        );
        b.add_rule(
            "published",
            format_args!("dnat ip to meta l4proto . th dport map @host-ports"),
        );
        // Output too: connections from the node itself (and localhost) reach published ports.
        for (chain, hook, prio) in [
            ("nat-prerouting", "prerouting", "dstnat"),
            ("nat-output", "output", "-100"),
        ] {
            b.add_base_chain(chain, &format!("type nat hook {hook} priority {prio}"));
            b.add_rule(chain, format_args!("fib daddr type local jump published"));
        }
        b.add_base_chain(
            "nat-postrouting",
            "type nat hook postrouting priority srcnat",
        );
        b.add_rule(
            "nat-postrouting",
            format_args!(
                "ip saddr {} oifname != \"{gw}\" masquerade",
                c.gwbridge_subnet.trunc()
            ),
        );
        // localhost:<published> leaves with source 127.0.0.1 (route_localnet): give it ours.
        b.add_rule(
            "nat-postrouting",
            format_args!("oifname \"{gw}\" fib saddr type local masquerade"),
        );
        b.add_base_chain("filter-forward", "type filter hook forward priority filter");
        b.add_rule(
            "filter-forward",
            format_args!("ct state established,related accept"),
        );
        // Published traffic is accepted before the icc drop, so tasks on the gwbridge can
        // reach published ports too.
        b.add_rule(
            "filter-forward",
            format_args!("oifname \"{gw}\" meta l4proto . th dport @ingress-ports accept"),
        );
        b.add_rule(
            "filter-forward",
            format_args!(
                "oifname \"{gw}\" ip daddr . meta l4proto . th dport @host-targets accept"
            ),
        );
        b.add_rule(
            "filter-forward",
            format_args!("iifname \"{gw}\" oifname \"{gw}\" drop"),
        );
    }

    fn render_elements(&self, old: &NodeState, b: &mut Batch) {
        let ingress = |s: &NodeState| -> BTreeSet<String> {
            s.ingress_ports.iter().map(PortKey::nft).collect()
        };
        let host = |s: &NodeState| -> BTreeSet<(String, String)> {
            s.host_ports
                .iter()
                .map(|(k, t)| (k.nft(), format!("{} . {}", t.ip(), t.port())))
                .collect()
        };
        let targets = |s: &NodeState| -> BTreeSet<String> {
            s.host_ports
                .iter()
                .map(|(k, t)| format!("{} . {} . {}", t.ip(), k.proto, t.port()))
                .collect()
        };
        let (old_in, new_in) = (ingress(old), ingress(self));
        let (old_host, new_host) = (host(old), host(self));
        let (old_t, new_t) = (targets(old), targets(self));
        let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
            a.difference(b).cloned().collect()
        };
        b.elements("delete", "ingress-ports", &diff(&old_in, &new_in));
        let del_host: Vec<String> = old_host
            .difference(&new_host)
            .map(|(k, _)| k.clone())
            .collect();
        b.elements("delete", "host-ports", &del_host);
        b.elements("delete", "host-targets", &diff(&old_t, &new_t));
        b.elements("add", "ingress-ports", &diff(&new_in, &old_in));
        let add_host: Vec<String> = new_host
            .difference(&old_host)
            .map(|(k, v)| format!("{k} : {v}"))
            .collect();
        b.elements("add", "host-ports", &add_host);
        b.elements("add", "host-targets", &diff(&new_t, &old_t));
    }
}

impl Ruleset for NodeState {
    fn render(prev: Option<&NodeState>, next: &NodeState) -> Result<Batch> {
        next.validate()?;
        let mut b = Batch::default();
        match prev {
            Some(prev) if prev.config == next.config => next.render_elements(prev, &mut b),
            _ => {
                next.render_fixed(&mut b);
                next.render_elements(&NodeState::new(next.config.clone()), &mut b);
            }
        }
        Ok(b)
    }
}

/// Sysctls the node namespace needs (the slash form for the per-interface key, since interface
/// names may contain dots): forwarding, and `route_localnet` on the gwbridge so that
/// `localhost:<published>` can be routed out to the ingress_sbox. `route_localnet` alone would
/// also let a neighbour on the gwbridge reach 127.0.0.0/8 here (CVE-2020-8558): the node table's
/// `raw-prerouting` chain drops that.
pub fn node_sysctls(gwbridge: &str) -> Vec<(String, String)> {
    vec![
        ("net.ipv4.ip_forward".into(), "1".into()),
        (
            format!("net/ipv4/conf/{gwbridge}/route_localnet"),
            "1".into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState::new(NodeConfig {
            gwbridge: "gwbr".into(),
            gwbridge_subnet: "172.18.0.1/16".parse().unwrap(),
            ingress_sbox_ip: "172.18.0.2".parse().unwrap(),
        })
    }

    fn render(prev: Option<&NodeState>, next: &NodeState) -> String {
        NodeState::render(prev, next).unwrap().to_string()
    }

    #[test]
    fn full_build() {
        let mut s = state();
        s.ingress_ports.extend([PortKey::tcp(80), PortKey::udp(53)]);
        s.host_ports
            .insert(PortKey::tcp(81), "172.18.0.3:8080".parse().unwrap());
        let expected = "\
add table ip meshnet
delete table ip meshnet
add table ip meshnet
add set ip meshnet ingress-ports { type inet_proto . inet_service; }
add map ip meshnet host-ports { type inet_proto . inet_service : ipv4_addr . inet_service; }
add set ip meshnet host-targets { type ipv4_addr . inet_proto . inet_service; }
add chain ip meshnet raw-prerouting { type filter hook prerouting priority raw; policy accept; }
add rule ip meshnet raw-prerouting ip daddr 127.0.0.0/8 iifname != \"lo\" drop
add chain ip meshnet published
add rule ip meshnet published meta l4proto . th dport @ingress-ports dnat to 172.18.0.2
add rule ip meshnet published dnat ip to meta l4proto . th dport map @host-ports
add chain ip meshnet nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
add rule ip meshnet nat-prerouting fib daddr type local jump published
add chain ip meshnet nat-output { type nat hook output priority -100; policy accept; }
add rule ip meshnet nat-output fib daddr type local jump published
add chain ip meshnet nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule ip meshnet nat-postrouting ip saddr 172.18.0.0/16 oifname != \"gwbr\" masquerade
add rule ip meshnet nat-postrouting oifname \"gwbr\" fib saddr type local masquerade
add chain ip meshnet filter-forward { type filter hook forward priority filter; policy accept; }
add rule ip meshnet filter-forward ct state established,related accept
add rule ip meshnet filter-forward oifname \"gwbr\" meta l4proto . th dport @ingress-ports accept
add rule ip meshnet filter-forward oifname \"gwbr\" ip daddr . meta l4proto . th dport @host-targets accept
add rule ip meshnet filter-forward iifname \"gwbr\" oifname \"gwbr\" drop
add element ip meshnet ingress-ports { tcp . 80, udp . 53 }
add element ip meshnet host-ports { tcp . 81 : 172.18.0.3 . 8080 }
add element ip meshnet host-targets { 172.18.0.3 . tcp . 8080 }
";
        assert_eq!(render(None, &s), expected);
    }

    /// CVE-2020-8558: packets to 127.0.0.0/8 from anywhere but lo are dropped in prerouting
    /// before any NAT, in every full build whatever is published.
    #[test]
    fn localnet_guard_drops_non_loopback_packets_to_127_before_nat() {
        fn priority(chain_line: &str) -> i64 {
            let name = chain_line
                .split("priority ")
                .nth(1)
                .and_then(|rest| rest.split(';').next())
                .unwrap_or_else(|| panic!("no priority in {chain_line}"));
            crate::content::priority(name).unwrap_or_else(|| panic!("priority {name}"))
        }
        let text = render(None, &state());
        let prerouting: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add chain ") && l.contains(" hook prerouting "))
            .collect();
        let guard = prerouting
            .iter()
            .find(|l| l.starts_with("add chain ip meshnet raw-prerouting "))
            .expect("the guard's base chain");
        assert!(
            guard.contains("{ type filter hook prerouting priority raw;"),
            "{guard}"
        );
        let nat: Vec<&&str> = prerouting
            .iter()
            .filter(|l| l.contains("type nat"))
            .collect();
        assert!(!nat.is_empty());
        for n in nat {
            // raw (-300) also runs before conntrack (-200).
            assert!(priority(guard) < priority(n), "{guard} runs after {n}");
        }
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add rule ip meshnet raw-prerouting "))
            .collect();
        assert_eq!(
            rules,
            ["add rule ip meshnet raw-prerouting ip daddr 127.0.0.0/8 iifname != \"lo\" drop"]
        );
        // A gwbridge change rebuilds the table, guard included; element updates leave it be.
        let mut other = state();
        other.config.gwbridge = "docker_gwbridge".into();
        assert!(render(Some(&state()), &other).contains(rules[0]));
        let mut published = state();
        published.ingress_ports.insert(PortKey::tcp(80));
        assert!(!render(Some(&state()), &published).contains("raw-prerouting"));
    }

    #[test]
    fn publishing_and_unpublishing_touch_only_elements() {
        let before = state();
        let mut after = state();
        after.ingress_ports.insert(PortKey::tcp(80));
        assert_eq!(
            render(Some(&before), &after),
            "add element ip meshnet ingress-ports { tcp . 80 }\n"
        );
        assert_eq!(
            render(Some(&after), &before),
            "delete element ip meshnet ingress-ports { tcp . 80 }\n"
        );
        assert_eq!(render(Some(&after), &after), "");
    }

    #[test]
    fn a_host_port_moving_to_another_task_is_replaced() {
        let mut before = state();
        before
            .host_ports
            .insert(PortKey::udp(81), "172.18.0.3:8080".parse().unwrap());
        let mut after = state();
        after
            .host_ports
            .insert(PortKey::udp(81), "172.18.0.4:8080".parse().unwrap());
        assert_eq!(
            render(Some(&before), &after),
            "\
delete element ip meshnet host-ports { udp . 81 }
delete element ip meshnet host-targets { 172.18.0.3 . udp . 8080 }
add element ip meshnet host-ports { udp . 81 : 172.18.0.4 . 8080 }
add element ip meshnet host-targets { 172.18.0.4 . udp . 8080 }
"
        );
    }

    #[test]
    fn a_gwbridge_change_rebuilds() {
        let before = state();
        let mut after = state();
        after.config.gwbridge = "docker_gwbridge".into();
        let text = render(Some(&before), &after);
        assert!(text.starts_with("add table ip meshnet\ndelete table ip meshnet\n"));
        assert!(text.contains("iifname \"docker_gwbridge\" oifname \"docker_gwbridge\" drop"));
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut zero = state();
        zero.ingress_ports.insert(PortKey::tcp(0));
        assert_eq!(
            NodeState::render(None, &zero).unwrap_err().to_string(),
            "invalid port 0 for an ingress-mode published port: ports are 1-65535"
        );
        let mut target = state();
        target
            .host_ports
            .insert(PortKey::tcp(81), "172.18.0.3:0".parse().unwrap());
        assert_eq!(
            NodeState::render(None, &target).unwrap_err().to_string(),
            "invalid port 0 for the target of 81/tcp: ports are 1-65535"
        );
        let mut both = state();
        both.ingress_ports.insert(PortKey::tcp(80));
        both.host_ports
            .insert(PortKey::tcp(80), "172.18.0.3:80".parse().unwrap());
        assert!(matches!(
            NodeState::render(None, &both),
            Err(Error::DuplicatePort(_))
        ));
    }

    #[test]
    fn sysctls() {
        assert_eq!(
            node_sysctls("gw.1"),
            vec![
                ("net.ipv4.ip_forward".to_string(), "1".to_string()),
                ("net/ipv4/conf/gw.1/route_localnet".into(), "1".into())
            ]
        );
    }
}
