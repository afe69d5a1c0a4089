//! Real listings of our table for the tests: `nft -j list table ip meshnet` (nft 1.0.6, kernel
//! 6.18) in a fresh namespace after `nft -f` of the full build of one state below; the
//! `-edited`, `-missing` and `-policy` ones were then changed by hand with `nft` as their
//! constants say.

use std::net::Ipv4Addr;

use proto::model::LbKind;

use crate::{
    Fwmark, NodeConfig, NodeState, PortKey, SboxConfig, SboxService, SboxState, TaskState,
};

/// [`node`].
pub const NODE: &str = include_str!("fixtures/listing-node.json");
/// [`node`], then `nft 'chain ip meshnet filter-forward { policy drop; }'`.
pub const NODE_POLICY_DROP: &str = include_str!("fixtures/listing-node-policy-drop.json");
/// [`sbox`] with [`LbKind::Nftables`].
pub const SBOX: &str = include_str!("fixtures/listing-sbox.json");
/// [`SBOX`], then `published { tcp . 443 : 257 }` replaced by `{ tcp . 443 : 258 }`.
pub const SBOX_EDITED_ELEMENT: &str = include_str!("fixtures/listing-sbox-edited-element.json");
/// [`SBOX`], then the SNAT rule replaced by one to 10.255.0.3 (`nft replace rule`).
pub const SBOX_EDITED_RULE: &str = include_str!("fixtures/listing-sbox-edited-rule.json");
/// [`SBOX`], then svc-256's rule replaced by `ct mark set numgen inc mod 3`.
pub const SBOX_EDITED_SVC_RULE: &str = include_str!("fixtures/listing-sbox-edited-svc-rule.json");
/// [`SBOX`], then `delete element ip meshnet backends { 256 . 1 }`.
pub const SBOX_MISSING_ELEMENT: &str = include_str!("fixtures/listing-sbox-missing-element.json");
/// [`sbox`] with [`LbKind::Ipvs`].
pub const IPVS: &str = include_str!("fixtures/listing-ipvs.json");
/// [`task`].
pub const TASK: &str = include_str!("fixtures/listing-task.json");

/// Ingress and host-mode ports, two of each.
pub fn node() -> NodeState {
    let mut n = NodeState::new(NodeConfig {
        gwbridge: "gwbr".into(),
        gwbridge_subnet: "172.18.0.1/16".parse().unwrap(),
        ingress_sbox_ip: "172.18.0.2".parse().unwrap(),
    });
    n.ingress_ports.extend([PortKey::tcp(80), PortKey::udp(53)]);
    let host = [
        (PortKey::tcp(81), "172.18.0.3:8080"),
        (PortKey::udp(82), "172.18.0.4:9090"),
    ];
    for (key, target) in host {
        n.host_ports.insert(key, target.parse().unwrap());
    }
    n
}

/// Three services: two ports, two backends and a VIP; a port without backends; a VIP with one
/// backend.
pub fn sbox(lb: LbKind) -> SboxState {
    let ip = |last| Ipv4Addr::new(10, 255, 0, last);
    let mut s = SboxState::new(SboxConfig {
        ingress_iface: "eth0".into(),
        ingress_subnet: "10.255.0.0/16".parse().unwrap(),
        ingress_ip: ip(2),
        lb,
    });
    let services = [
        (
            256,
            vec![PortKey::tcp(80), PortKey::udp(80)],
            vec![ip(10), ip(11)],
            Some(ip(100)),
        ),
        (257, vec![PortKey::tcp(443)], vec![], None),
        (258, vec![], vec![ip(12)], Some(ip(101))),
    ];
    for (mark, ports, backends, vip) in services {
        let svc = SboxService {
            ports: ports.into_iter().collect(),
            backends: backends.into_iter().collect(),
            vip,
        };
        s.services.insert(Fwmark::new(mark).unwrap(), svc);
    }
    s
}

/// Two redirects (and a port that needs none), a VIP with two tasks and one without.
pub fn task() -> TaskState {
    let ip = |s: &str| -> Ipv4Addr { s.parse().unwrap() };
    TaskState {
        ingress_ip: Some(ip("10.255.0.10")),
        redirects: [
            (PortKey::tcp(80), 8080),
            (PortKey::udp(53), 5353),
            (PortKey::tcp(9000), 9000),
        ]
        .into(),
        vips: [
            (ip("10.0.9.2"), [ip("10.0.9.6"), ip("10.0.9.5")].into()),
            (ip("10.0.9.3"), Default::default()),
        ]
        .into(),
    }
}
