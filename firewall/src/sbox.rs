//! The ingress_sbox table: published port → fwmark, the SNAT back through this node, and the
//! nftables load balancer (see the crate documentation for the layout).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::changes::{Changes, Key, Step, Value};
use proto::model::LbKind;

use crate::render::Batch;
use crate::{check_interface, check_port, Error, Fwmark, PortKey, Result, Ruleset};

/// What the sandbox's fixed chains depend on; a change rebuilds the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SboxConfig {
    /// The sandbox's leg on the ingress overlay (`eth0`).
    pub ingress_iface: String,
    pub ingress_subnet: Ipv4Net,
    /// This node's IP on the ingress overlay: the SNAT source, so replies come back here.
    pub ingress_ip: Ipv4Addr,
    pub lb: LbKind,
}

/// One service published in ingress mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SboxService {
    pub ports: BTreeSet<PortKey>,
    /// Every task's ingress IP, on any node. The port is kept: each task redirects it.
    /// Used by [`LbKind::Nftables`]; with IPVS, only for flushing stale conntrack entries.
    pub backends: BTreeSet<Ipv4Addr>,
    /// The service's VIP, a local address of the sandbox: every connection to it, any port,
    /// is marked for the service.
    pub vip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SboxState {
    pub config: SboxConfig,
    pub services: BTreeMap<Fwmark, SboxService>,
}

fn svc_chain(mark: Fwmark) -> String {
    format!("svc-{mark}")
}

impl SboxState {
    pub fn new(config: SboxConfig) -> SboxState {
        SboxState {
            config,
            services: BTreeMap::new(),
        }
    }

    /// Bad ports, a port published (or a VIP held) by two services, a bad interface name:
    /// rejected before any rule is rendered.
    pub fn validate(&self) -> Result<()> {
        check_interface(&self.config.ingress_iface)?;
        // Sorted lists rather than sets: this runs on every sync, over every service.
        let mut ports = Vec::with_capacity(self.services.len());
        let mut vips = Vec::with_capacity(self.services.len());
        for (mark, svc) in &self.services {
            vips.extend(svc.vip);
            for key in &svc.ports {
                check_port(format_args!("service with fwmark {mark}"), key.port)?;
                ports.push(*key);
            }
        }
        vips.sort_unstable();
        if let Some(w) = vips.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::DuplicateVip(w[0]));
        }
        ports.sort_unstable();
        if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::DuplicatePort(w[0]));
        }
        Ok(())
    }

    fn balances(&self) -> bool {
        self.config.lb == LbKind::Nftables
    }

    fn render_fixed(&self, b: &mut Batch) {
        let c = &self.config;
        b.recreate_table();
        b.add_set("map", "published", "type inet_proto . inet_service : mark");
        b.add_base_chain(
            "mangle-prerouting",
            "type filter hook prerouting priority mangle",
        );
        b.add_rule(
            "mangle-prerouting",
            format_args!("meta mark set meta l4proto . th dport map @published"),
        );
        // Last: a connection to a VIP belongs to its service, whatever its port.
        b.add_set("map", "vips", "type ipv4_addr : mark");
        b.add_rule(
            "mangle-prerouting",
            format_args!("meta mark set ip daddr map @vips"),
        );
        if self.balances() {
            b.add_set("map", "services", "type mark : verdict");
            b.add_set("map", "backends", "type mark . mark : ipv4_addr");
            b.add_base_chain("nat-prerouting", "type nat hook prerouting priority dstnat");
            b.add_rule("nat-prerouting", format_args!("meta mark vmap @services"));
            b.add_rule(
                "nat-prerouting",
                format_args!("dnat to meta mark . ct mark map @backends"),
            );
        }
        b.add_base_chain(
            "nat-postrouting",
            "type nat hook postrouting priority srcnat",
        );
        b.add_rule(
            "nat-postrouting",
            format_args!(
                "ip daddr {} oifname \"{}\" snat to {}",
                c.ingress_subnet.trunc(),
                c.ingress_iface,
                c.ingress_ip
            ),
        );
    }

    /// The element and chain changes from `old` services to `self`'s, in an order the kernel
    /// accepts within one transaction: deletions of elements first (so chains lose their
    /// references), then new or refilled chains, then new elements, then chain deletions.
    fn service_changes(&self, old: &BTreeMap<Fwmark, SboxService>) -> Changes {
        let empty = SboxService::default();
        // Only services whose entry changed are looked at further: both maps walked in step.
        let mut changed = Vec::new();
        let (mut was, mut now) = (old.iter().peekable(), self.services.iter().peekable());
        loop {
            let mark = match (was.peek(), now.peek()) {
                (None, None) => break,
                (Some((w, _)), None) => **w,
                (None, Some((n, _))) => **n,
                (Some((w, ws)), Some((n, ns))) => {
                    if w == n && ws == ns {
                        was.next();
                        now.next();
                        continue;
                    }
                    (**w).min(**n)
                }
            };
            if was.peek().is_some_and(|(w, _)| **w == mark) {
                was.next();
            }
            if now.peek().is_some_and(|(n, _)| **n == mark) {
                now.next();
            }
            changed.push(mark);
        }

        let mut del_published = Vec::new();
        let mut add_published = Vec::new();
        let mut del_vips = Vec::new();
        let mut add_vips = Vec::new();
        let mut del_services = Vec::new();
        let mut add_services = Vec::new();
        let mut del_slots = Vec::new();
        let mut add_slots = Vec::new();
        let mut dead_chains = Vec::new();
        let mut chains = Vec::new();
        for mark in changed {
            let was = old.get(&mark).unwrap_or(&empty);
            let now = self.services.get(&mark).unwrap_or(&empty);
            // A port moving between services is deleted before it is added again.
            del_published.extend(was.ports.difference(&now.ports).map(|p| Key::Port(*p)));
            add_published.extend(
                now.ports
                    .difference(&was.ports)
                    .map(|p| (Key::Port(*p), Value::Mark(mark))),
            );
            if was.vip != now.vip {
                del_vips.extend(was.vip.map(Key::Ip));
                add_vips.extend(now.vip.map(|v| (Key::Ip(v), Value::Mark(mark))));
            }
            if !self.balances() {
                continue;
            }
            let was: Vec<Ipv4Addr> = was.backends.iter().copied().collect();
            let now: Vec<Ipv4Addr> = now.backends.iter().copied().collect();
            // Slot i of the round robin goes to the i-th backend; only changed slots move.
            for i in 0..was.len().max(now.len()) {
                let (w, n) = (was.get(i), now.get(i));
                if w == n {
                    continue;
                }
                let slot = Key::Slot(mark, i as u32);
                if w.is_some() {
                    del_slots.push(slot);
                }
                if let Some(ip) = n {
                    add_slots.push((slot, Value::Ip(*ip)));
                }
            }
            let svc = svc_chain(mark);
            match (was.len(), now.len()) {
                (w, n) if w == n => {}
                (_, 0) => {
                    del_services.push(Key::Mark(mark));
                    dead_chains.push(Step::DeleteChain(svc));
                }
                (w, n) => {
                    if w == 0 {
                        chains.push(Step::AddChain(svc.clone()));
                        add_services.push((Key::Mark(mark), Value::Jump(svc.clone())));
                    } else {
                        chains.push(Step::FlushChain(svc.clone()));
                    }
                    chains.push(Step::AddRoundRobin {
                        chain: svc,
                        modulus: n as u32,
                    });
                }
            }
        }

        let mut c = Changes::default();
        let del = |map, keys| Step::DeleteElements { map, keys };
        let add = |map, elements| Step::AddElements { map, elements };
        c.push(del("services", del_services));
        c.push(del("backends", del_slots));
        c.push(del("published", del_published));
        c.push(del("vips", del_vips));
        for step in chains {
            c.push(step);
        }
        c.push(add("backends", add_slots));
        c.push(add("published", add_published));
        c.push(add("vips", add_vips));
        c.push(add("services", add_services));
        for step in dead_chains {
            c.push(step);
        }
        c
    }
}

impl Ruleset for SboxState {
    fn render(prev: Option<&SboxState>, next: &SboxState) -> Result<Batch> {
        next.validate()?;
        let mut b = Batch::default();
        match prev {
            Some(prev) if prev.config == next.config => {
                b.append(&next.service_changes(&prev.services).to_batch());
            }
            _ => {
                next.render_fixed(&mut b);
                b.append(&next.service_changes(&BTreeMap::new()).to_batch());
            }
        }
        Ok(b)
    }

    /// Only services changed (same configuration): their elements and chains.
    fn changes(prev: &SboxState, next: &SboxState) -> Result<Option<Changes>> {
        next.validate()?;
        Ok((prev.config == next.config).then(|| next.service_changes(&prev.services)))
    }

    /// Backends that no service has any more: their stale conntrack entries should go.
    fn stale_destinations(prev: &SboxState, next: &SboxState) -> Vec<Ipv4Addr> {
        let all = |s: &SboxState| -> BTreeSet<Ipv4Addr> {
            s.services
                .values()
                .flat_map(|s| s.backends.iter().copied())
                .collect()
        };
        all(prev).difference(&all(next)).copied().collect()
    }
}

/// Sysctls the sandbox needs (keys in `/proc/sys` dotted form), applied by the agent, on a
/// kernel of release `kernel` (uname -r). IPVS values as Swarm sets them: conntrack for the SNAT
/// rule, no stale connections to removed destinations. Except `conn_reuse_mode`: Swarm sets 0,
/// which avoids the 1 s SYN drop on port reuse of old kernels (moby#35082) but sends a new
/// connection that reuses a client port to the old one's destination even when it is draining
/// (kubernetes#81775, #99162), so a stopping task gets new connections. From 5.9 a reused port
/// is rescheduled without the drop, so it keeps the kernel's 1 there, as kube-proxy does.
pub fn sbox_sysctls(lb: LbKind, kernel: &str) -> Vec<(String, String)> {
    let mut out = vec![("net.ipv4.ip_forward", "1")];
    if lb == LbKind::Ipvs {
        let reuse = if reschedules_reused_ports(kernel) {
            "1"
        } else {
            "0"
        };
        out.extend([
            ("net.ipv4.vs.conntrack", "1"),
            ("net.ipv4.vs.expire_nodest_conn", "1"),
            ("net.ipv4.vs.expire_quiescent_template", "1"),
            ("net.ipv4.vs.conn_reuse_mode", reuse),
        ]);
    }
    out.into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sysctls of an overlay network's sandbox (`1-<netid>`: br0, vxlan0 and the tasks' veths),
/// which holds no rules: bridge netfilter off, so that frames crossing br0 do not run this
/// namespace's IP, IPv6 and ARP hooks (conntrack included) for nothing. Not for the node's
/// namespace, whose gwbridge icc drop needs them, nor ingress_sbox and `lb_` namespaces, which
/// hold no bridge. The keys exist only while `br_netfilter` is loaded, and outside the node's
/// namespace only from Linux 5.3, where they are per namespace (before, they were global):
/// write them where present (`netns::Netns::sync_sysctls` with `skip_absent`).
pub fn overlay_sysctls() -> Vec<(String, String)> {
    ["iptables", "ip6tables", "arptables"]
        .into_iter()
        .map(|family| (format!("net.bridge.bridge-nf-call-{family}"), "0".into()))
        .collect()
}

/// The running kernel's release (`uname -r`), for [`sbox_sysctls`]; empty if unreadable.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default()
}

/// Whether IPVS on kernel release `kernel` reschedules a SYN that reuses a finished
/// connection's port without dropping it first, with conntrack on: from 5.9 ("ipvs: allow
/// connection reuse for unconfirmed conntrack"). An unreadable release counts as older.
fn reschedules_reused_ports(kernel: &str) -> bool {
    let mut parts = kernel
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 9),
        _ => false,
    }
}

/// A sandbox with `services` services, each on its own TCP port (from 1024, fwmark from 256)
/// with `backends` backends: the ruleset benchmarks time. At most 64511 services and 254
/// backends, so ports and addresses stay valid. For tests and benchmarks (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub fn synthetic_sbox(services: u16, backends: u8) -> SboxState {
    assert!(
        services <= 64511 && backends <= 254,
        "synthetic_sbox: too large"
    );
    let mut state = SboxState::new(SboxConfig {
        ingress_iface: "eth0".into(),
        ingress_subnet: "10.0.0.0/8".parse().expect("valid subnet"),
        ingress_ip: Ipv4Addr::new(10, 255, 255, 254),
        lb: LbKind::Nftables,
    });
    for i in 0..services {
        let [hi, lo] = i.to_be_bytes();
        let svc = SboxService {
            ports: [PortKey::tcp(1024 + i)].into(),
            backends: (1..=backends)
                .map(|j| Ipv4Addr::new(10, hi, lo, j))
                .collect(),
            vip: None,
        };
        let mark = Fwmark::new(256 + u32::from(i)).expect("non-zero mark");
        state.services.insert(mark, svc);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lb: LbKind) -> SboxConfig {
        SboxConfig {
            ingress_iface: "eth0".into(),
            ingress_subnet: "10.255.0.0/16".parse().unwrap(),
            ingress_ip: "10.255.0.2".parse().unwrap(),
            lb,
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, last)
    }

    fn state(lb: LbKind, services: &[(u32, &[PortKey], &[u8])]) -> SboxState {
        let mut s = SboxState::new(config(lb));
        for (mark, ports, backends) in services {
            s.services.insert(
                Fwmark::new(*mark).unwrap(),
                SboxService {
                    ports: ports.iter().copied().collect(),
                    backends: backends.iter().map(|b| ip(*b)).collect(),
                    vip: None,
                },
            );
        }
        s
    }

    fn render(prev: Option<&SboxState>, next: &SboxState) -> String {
        SboxState::render(prev, next).unwrap().to_string()
    }

    #[test]
    fn full_build_with_nftables_lb() {
        let s = state(
            LbKind::Nftables,
            &[(256, &[PortKey::tcp(80), PortKey::udp(80)], &[10, 11])],
        );
        let expected = "\
add table ip meshnet
delete table ip meshnet
add table ip meshnet
add map ip meshnet published { type inet_proto . inet_service : mark; }
add chain ip meshnet mangle-prerouting { type filter hook prerouting priority mangle; policy accept; }
add rule ip meshnet mangle-prerouting meta mark set meta l4proto . th dport map @published
add map ip meshnet vips { type ipv4_addr : mark; }
add rule ip meshnet mangle-prerouting meta mark set ip daddr map @vips
add map ip meshnet services { type mark : verdict; }
add map ip meshnet backends { type mark . mark : ipv4_addr; }
add chain ip meshnet nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
add rule ip meshnet nat-prerouting meta mark vmap @services
add rule ip meshnet nat-prerouting dnat to meta mark . ct mark map @backends
add chain ip meshnet nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule ip meshnet nat-postrouting ip daddr 10.255.0.0/16 oifname \"eth0\" snat to 10.255.0.2
add chain ip meshnet svc-256
add rule ip meshnet svc-256 ct mark set numgen inc mod 2
add element ip meshnet backends { 256 . 0 : 10.255.0.10, 256 . 1 : 10.255.0.11 }
add element ip meshnet published { tcp . 80 : 256, udp . 80 : 256 }
add element ip meshnet services { 256 : jump svc-256 }
";
        assert_eq!(render(None, &s), expected);
    }

    #[test]
    fn full_build_for_ipvs_only_marks_and_snats() {
        let s = state(LbKind::Ipvs, &[(257, &[PortKey::tcp(443)], &[10])]);
        let expected = "\
add table ip meshnet
delete table ip meshnet
add table ip meshnet
add map ip meshnet published { type inet_proto . inet_service : mark; }
add chain ip meshnet mangle-prerouting { type filter hook prerouting priority mangle; policy accept; }
add rule ip meshnet mangle-prerouting meta mark set meta l4proto . th dport map @published
add map ip meshnet vips { type ipv4_addr : mark; }
add rule ip meshnet mangle-prerouting meta mark set ip daddr map @vips
add chain ip meshnet nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule ip meshnet nat-postrouting ip daddr 10.255.0.0/16 oifname \"eth0\" snat to 10.255.0.2
add element ip meshnet published { tcp . 443 : 257 }
";
        assert_eq!(render(None, &s), expected);
        // Backends do not matter to the IPVS table.
        let more = state(LbKind::Ipvs, &[(257, &[PortKey::tcp(443)], &[10, 11])]);
        assert_eq!(render(Some(&s), &more), "");
    }

    #[test]
    fn adding_a_service_touches_only_its_objects() {
        let before = state(LbKind::Nftables, &[(256, &[PortKey::tcp(80)], &[10, 11])]);
        let after = state(
            LbKind::Nftables,
            &[
                (256, &[PortKey::tcp(80)], &[10, 11]),
                (257, &[PortKey::udp(53)], &[20]),
            ],
        );
        let expected = "\
add chain ip meshnet svc-257
add rule ip meshnet svc-257 ct mark set numgen inc mod 1
add element ip meshnet backends { 257 . 0 : 10.255.0.20 }
add element ip meshnet published { udp . 53 : 257 }
add element ip meshnet services { 257 : jump svc-257 }
";
        assert_eq!(render(Some(&before), &after), expected);
        assert_eq!(render(Some(&after), &after), "", "no change, no batch");

        let removed = "\
delete element ip meshnet services { 257 }
delete element ip meshnet backends { 257 . 0 }
delete element ip meshnet published { udp . 53 }
flush chain ip meshnet svc-257
delete chain ip meshnet svc-257
";
        assert_eq!(render(Some(&after), &before), removed);
    }

    #[test]
    fn removing_a_backend_refills_only_that_service() {
        let other = (300, &[PortKey::tcp(8000)][..], &[30, 31][..]);
        let before = state(
            LbKind::Nftables,
            &[(256, &[PortKey::tcp(80)], &[10, 11, 12]), other],
        );
        let after = state(
            LbKind::Nftables,
            &[(256, &[PortKey::tcp(80)], &[10, 12]), other],
        );
        let expected = "\
delete element ip meshnet backends { 256 . 1, 256 . 2 }
flush chain ip meshnet svc-256
add rule ip meshnet svc-256 ct mark set numgen inc mod 2
add element ip meshnet backends { 256 . 1 : 10.255.0.12 }
";
        assert_eq!(render(Some(&before), &after), expected);
        assert_eq!(SboxState::stale_destinations(&before, &after), vec![ip(11)]);
    }

    #[test]
    fn replacing_a_backend_keeps_the_service_chain() {
        let before = state(LbKind::Nftables, &[(256, &[PortKey::tcp(80)], &[10, 11])]);
        let after = state(LbKind::Nftables, &[(256, &[PortKey::tcp(80)], &[10, 13])]);
        let expected = "\
delete element ip meshnet backends { 256 . 1 }
add element ip meshnet backends { 256 . 1 : 10.255.0.13 }
";
        assert_eq!(render(Some(&before), &after), expected);
    }

    #[test]
    fn a_service_without_backends_is_only_marked() {
        let s = state(LbKind::Nftables, &[(256, &[PortKey::tcp(80)], &[])]);
        let text = render(None, &s);
        assert!(text.ends_with(
            "add rule ip meshnet nat-postrouting ip daddr 10.255.0.0/16 oifname \"eth0\" snat to 10.255.0.2\n\
             add element ip meshnet published { tcp . 80 : 256 }\n"
        ));
        assert!(!text.contains("svc-256"));
    }

    #[test]
    fn a_vip_marks_every_port_of_its_service() {
        let mut lb = state(LbKind::Ipvs, &[(300, &[], &[10, 11]), (301, &[], &[])]);
        lb.services.get_mut(&Fwmark::new(300).unwrap()).unwrap().vip = Some(ip(100));
        let text = render(None, &lb);
        assert!(
            text.ends_with("add element ip meshnet vips { 10.255.0.100 : 300 }\n"),
            "{text}"
        );
        // The VIP moves to another service: deleted, then added, in one batch.
        let mut moved = lb.clone();
        moved
            .services
            .get_mut(&Fwmark::new(300).unwrap())
            .unwrap()
            .vip = None;
        moved
            .services
            .get_mut(&Fwmark::new(301).unwrap())
            .unwrap()
            .vip = Some(ip(100));
        assert_eq!(
            render(Some(&lb), &moved),
            "delete element ip meshnet vips { 10.255.0.100 }\n\
             add element ip meshnet vips { 10.255.0.100 : 301 }\n"
        );
        // Two services cannot hold one VIP.
        let mut twice = lb.clone();
        twice
            .services
            .get_mut(&Fwmark::new(301).unwrap())
            .unwrap()
            .vip = Some(ip(100));
        assert_eq!(
            SboxState::render(None, &twice).unwrap_err().to_string(),
            "VIP 10.255.0.100 belongs to two services"
        );
    }

    #[test]
    fn moving_a_port_to_another_service_deletes_then_adds() {
        let before = state(LbKind::Ipvs, &[(256, &[PortKey::tcp(80)], &[])]);
        let after = state(LbKind::Ipvs, &[(257, &[PortKey::tcp(80)], &[])]);
        assert_eq!(
            render(Some(&before), &after),
            "delete element ip meshnet published { tcp . 80 }\n\
             add element ip meshnet published { tcp . 80 : 257 }\n"
        );
    }

    #[test]
    fn a_config_change_rebuilds_the_table() {
        let before = state(LbKind::Ipvs, &[(256, &[PortKey::tcp(80)], &[10])]);
        let after = state(LbKind::Nftables, &[(256, &[PortKey::tcp(80)], &[10])]);
        assert_eq!(render(Some(&before), &after), render(None, &after));
    }

    #[test]
    fn bad_input_is_rejected() {
        let zero = state(LbKind::Nftables, &[(256, &[PortKey::tcp(0)], &[10])]);
        let err = SboxState::render(None, &zero).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid port 0 for service with fwmark 256: ports are 1-65535"
        );
        let twice = state(
            LbKind::Nftables,
            &[
                (256, &[PortKey::tcp(80)], &[10]),
                (257, &[PortKey::tcp(80)], &[11]),
            ],
        );
        assert_eq!(
            SboxState::render(None, &twice).unwrap_err().to_string(),
            "port 80/tcp is published twice"
        );
        let mut bad_iface = state(LbKind::Nftables, &[]);
        bad_iface.config.ingress_iface = "eth0\" accept".into();
        assert!(matches!(
            SboxState::render(None, &bad_iface),
            Err(Error::InvalidInterface(_))
        ));
    }

    #[test]
    fn sysctls_per_lb_mode() {
        assert_eq!(
            sbox_sysctls(LbKind::Nftables, "6.18.0"),
            vec![("net.ipv4.ip_forward".to_string(), "1".to_string())]
        );
        let reuse = |kernel| {
            let ipvs = sbox_sysctls(LbKind::Ipvs, kernel);
            assert!(ipvs.contains(&("net.ipv4.vs.expire_nodest_conn".into(), "1".into())));
            assert_eq!(ipvs.len(), 5);
            ipvs.into_iter()
                .find(|(k, _)| k == "net.ipv4.vs.conn_reuse_mode")
                .unwrap()
                .1
        };
        assert_eq!(reuse("6.1.0-28-amd64"), "1");
        assert_eq!(reuse("5.9.0"), "1");
        assert_eq!(reuse("5.8.18-100.fc31.x86_64"), "0");
        assert_eq!(reuse("4.19.0"), "0");
        assert_eq!(reuse("garbage"), "0");
    }

    #[test]
    fn overlay_sandboxes_turn_bridge_netfilter_off_for_every_family() {
        let want: Vec<(String, String)> = [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
            "net.bridge.bridge-nf-call-arptables",
        ]
        .into_iter()
        .map(|k| (k.to_string(), "0".to_string()))
        .collect();
        assert_eq!(overlay_sysctls(), want);
    }

    #[test]
    fn synthetic_state_renders_every_service() {
        let s = synthetic_sbox(3000, 2);
        let text = render(None, &s);
        assert_eq!(text.matches("ct mark set numgen inc mod 2").count(), 3000);
        assert_eq!(text.matches("add element ip meshnet backends").count(), 6);
        assert!(text.contains(", 3255 . 1 : 10.11.183.2 }\n"));
    }
}
