//! Pure allocation of ids, VNIs, subnets and endpoint addresses, and name validation.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::Ipv4Net;
use proto::api::MAX_NAME_CHARS;
use proto::excerpt;

/// The first VNI handed out, as in Swarm (lower ones are left to hand-made networks).
pub const FIRST_VNI: u32 = 4096;
/// VXLAN network identifiers are 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Service fwmarks start where Swarm's do.
pub const FIRST_FWMARK: u32 = 256;
/// Kept to 24 bits so the agent's own mark bits above them stay free.
pub const MAX_FWMARK: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("invalid {kind} name {:?}: it must start with a letter or digit and have at most {MAX_NAME_CHARS} of [a-zA-Z0-9_.-]", excerpt(name))]
    InvalidName { kind: &'static str, name: String },
    #[error("invalid subnet {:?}: expected an IPv4 CIDR such as 10.0.9.0/24", excerpt(.0))]
    SubnetSyntax(String),
    #[error("invalid subnet {given}: host bits are set, it should be {expected}")]
    SubnetHostBits { given: Ipv4Net, expected: Ipv4Net },
    #[error("invalid subnet {0}: the prefix length must be between /8 and /30")]
    SubnetSize(Ipv4Net),
    #[error("invalid subnet {0}: loopback, multicast and reserved ranges cannot hold an overlay")]
    SubnetReserved(Ipv4Net),
    #[error("subnet {wanted} overlaps subnet {existing} of network {network}")]
    SubnetOverlap {
        wanted: Ipv4Net,
        existing: Ipv4Net,
        network: String,
    },
    #[error("subnet {subnet} contains {addr}, the underlay address of {owner}")]
    SubnetHasUnderlay {
        subnet: Ipv4Net,
        addr: Ipv4Addr,
        owner: String,
    },
    #[error("subnet {wanted} overlaps {gwbridge}, the gwbridge subnet of {owner}: tasks there would lose their egress route")]
    SubnetOverlapsGwbridge {
        wanted: Ipv4Net,
        gwbridge: Ipv4Net,
        owner: String,
    },
    #[error("no free /24 left in 10.0.0.0/8: give the network a --subnet")]
    NoFreeSubnet,
    #[error("all VNIs from {FIRST_VNI} to {MAX_VNI} are in use")]
    NoFreeVni,
    #[error("subnet {0} has no free address left")]
    NoFreeAddress(Ipv4Net),
}

/// Names of networks and services: what Docker accepts, capped at [`MAX_NAME_CHARS`] so that
/// derived names (`<service>.<slot>.<task id>`) stay manageable.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), AllocError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && name.len() <= MAX_NAME_CHARS {
        Ok(())
    } else {
        Err(AllocError::InvalidName {
            kind,
            name: name.to_string(),
        })
    }
}

/// A random 25-character hex id, as long as Docker's swarm object ids.
pub fn new_id() -> String {
    // RandomState is seeded from the OS once per thread and perturbed per instance; hashing a
    // process-wide counter on top makes every id distinct without pulling in an RNG crate.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(25);
    out
}

/// Parses and checks a user's subnet (syntax and shape only; overlaps are checked separately).
pub fn parse_subnet(text: &str) -> Result<Ipv4Net, AllocError> {
    let net: Ipv4Net = text
        .trim()
        .parse()
        .map_err(|_| AllocError::SubnetSyntax(text.to_string()))?;
    if net.trunc() != net {
        return Err(AllocError::SubnetHostBits {
            given: net,
            expected: net.trunc(),
        });
    }
    if !(8..=30).contains(&net.prefix_len()) {
        return Err(AllocError::SubnetSize(net));
    }
    let first = net.network();
    if first.is_loopback()
        || first.is_multicast()
        || first.is_unspecified()
        || first.octets()[0] == 0
        || first.octets()[0] >= 240
        || (first.octets()[0] == 169 && first.octets()[1] == 254)
    {
        return Err(AllocError::SubnetReserved(net));
    }
    Ok(net)
}

/// Refuses `wanted` if it overlaps any `(network name, subnet)` in `existing`.
pub fn check_overlap<'a>(
    wanted: Ipv4Net,
    existing: impl IntoIterator<Item = (&'a str, Ipv4Net)>,
) -> Result<(), AllocError> {
    for (name, subnet) in existing {
        if proto::subnets_overlap(&wanted, &subnet) {
            return Err(AllocError::SubnetOverlap {
                wanted,
                existing: subnet,
                network: name.to_string(),
            });
        }
    }
    Ok(())
}

/// Refuses `subnet` if it contains one of the `(owner, address)` underlay addresses.
pub fn check_underlay(subnet: Ipv4Net, underlay: &[(String, Ipv4Addr)]) -> Result<(), AllocError> {
    match underlay.iter().find(|(_, ip)| subnet.contains(ip)) {
        Some((owner, addr)) => Err(AllocError::SubnetHasUnderlay {
            subnet,
            addr: *addr,
            owner: owner.clone(),
        }),
        None => Ok(()),
    }
}

/// Refuses `subnet` if it overlaps one of the `(owner, subnet)` gwbridges: a task's route to its
/// overlay would shadow its own gwbridge leg (or the other way round).
pub fn check_gwbridge(subnet: Ipv4Net, gwbridges: &[(String, Ipv4Net)]) -> Result<(), AllocError> {
    match gwbridges
        .iter()
        .find(|(_, gw)| proto::subnets_overlap(&subnet, gw))
    {
        Some((owner, gw)) => Err(AllocError::SubnetOverlapsGwbridge {
            wanted: subnet,
            gwbridge: *gw,
            owner: owner.clone(),
        }),
        None => Ok(()),
    }
}

/// The next /24 of 10.0.0.0/8 after `after` that overlaps none of `existing`, serially and
/// wrapping around like task addresses: a just-freed subnet is handed out again last, so no
/// node mixes up a stale sandbox or route of the old network with the new one.
pub fn next_free_subnet(
    existing: &[Ipv4Net],
    after: Option<Ipv4Net>,
) -> Result<Ipv4Net, AllocError> {
    const SLOTS: u32 = 1 << 16;
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let range = Ipv4Net::new(Ipv4Addr::from(base), 8).expect("/8 is a valid prefix");
    let start = after
        .filter(|a| a.prefix_len() == 24 && range.contains(&a.network()))
        .map_or(0, |a| ((u32::from(a.network()) - base) >> 8) + 1);
    (0..SLOTS)
        .map(|i| {
            let slot = (start + i) % SLOTS;
            Ipv4Net::new(Ipv4Addr::from(base | (slot << 8)), 24).expect("/24 is a valid prefix")
        })
        .find(|candidate| {
            !existing
                .iter()
                .any(|e| proto::subnets_overlap(candidate, e))
        })
        .ok_or(AllocError::NoFreeSubnet)
}

/// The next VNI after `last` that is not in use, wrapping around from [`MAX_VNI`] to
/// [`FIRST_VNI`]. Handing them out serially, not lowest-first, keeps a just-freed VNI from being
/// reused while stale kernel objects for it may still linger on some node.
pub fn next_vni(in_use: &BTreeSet<u32>, last: u32) -> Result<u32, AllocError> {
    next_after(in_use, last, FIRST_VNI, MAX_VNI).ok_or(AllocError::NoFreeVni)
}

/// The next fwmark after `last` not in use, serially like VNIs: a just-freed mark may still be
/// on conntrack entries of some node, so it is not handed out again at once.
pub fn next_fwmark(in_use: &BTreeSet<u32>, last: u32) -> Option<u32> {
    next_after(in_use, last, FIRST_FWMARK, MAX_FWMARK)
}

/// The first value of `first..=max` after `last`, wrapping around, that is not in `in_use`.
fn next_after(in_use: &BTreeSet<u32>, last: u32, first: u32, max: u32) -> Option<u32> {
    let span = max - first + 1;
    let start = if (first..=max).contains(&last) {
        last - first + 1
    } else {
        0
    };
    (0..span)
        .map(|i| first + (start + i) % span)
        .find(|v| !in_use.contains(v))
}

/// The gateway of a subnet: its first host address.
pub fn gateway_of(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The next free endpoint address of `subnet` after `after` (serially, wrapping around, as
/// Swarm's IPAM does): a freed address is not handed out again until the others were, so a
/// replacement task never inherits a dead task's address while peers may still hold stale
/// ARP, FDB or conntrack state for it. Never the network, gateway or broadcast address.
pub fn next_ip(
    subnet: Ipv4Net,
    in_use: &BTreeSet<Ipv4Addr>,
    after: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, AllocError> {
    let first = u32::from(subnet.network()) + 2;
    let last = u32::from(subnet.broadcast()) - 1;
    let start = after
        .map(u32::from)
        .filter(|a| (first..last).contains(a))
        .map_or(first, |a| a + 1);
    (start..=last)
        .chain(first..start)
        .map(Ipv4Addr::from)
        .find(|ip| !in_use.contains(ip))
        .ok_or(AllocError::NoFreeAddress(subnet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn names() {
        for ok in ["web", "a", "Web-1.v2_x", "0abc", &"x".repeat(32)] {
            assert_eq!(validate_name("service", ok), Ok(()), "{ok}");
        }
        for bad in ["", "-web", ".x", "_x", "a b", "a/b", "wéb", &"x".repeat(33)] {
            let err = validate_name("service", bad).unwrap_err();
            assert!(err.to_string().contains("invalid service name"), "{err}");
        }
        // A huge name is quoted as an excerpt, not repeated whole.
        let err = validate_name("service", &"x".repeat(10_000)).unwrap_err();
        assert!(err.to_string().contains("…(10000 bytes)"), "{err}");
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn ids_are_25_hex_chars_and_distinct() {
        let ids: BTreeSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 25);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
    }

    #[test]
    fn subnets_are_validated() {
        assert_eq!(parse_subnet("10.0.9.0/24"), Ok(net("10.0.9.0/24")));
        assert_eq!(parse_subnet(" 172.32.0.0/16 "), Ok(net("172.32.0.0/16")));
        assert!(matches!(
            parse_subnet("10.0.9.300/24"),
            Err(AllocError::SubnetSyntax(_))
        ));
        assert!(matches!(
            parse_subnet("10.0.9.0"),
            Err(AllocError::SubnetSyntax(_))
        ));
        assert!(matches!(
            parse_subnet("fd00::/64"),
            Err(AllocError::SubnetSyntax(_))
        ));
        let err = parse_subnet("10.0.9.5/24").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid subnet 10.0.9.5/24: host bits are set, it should be 10.0.9.0/24"
        );
        assert!(matches!(
            parse_subnet("10.0.9.0/31"),
            Err(AllocError::SubnetSize(_))
        ));
        assert!(matches!(
            parse_subnet("0.0.0.0/0"),
            Err(AllocError::SubnetSize(_))
        ));
        assert!(matches!(
            parse_subnet("127.0.0.0/8"),
            Err(AllocError::SubnetReserved(_))
        ));
        assert!(matches!(
            parse_subnet("224.1.0.0/16"),
            Err(AllocError::SubnetReserved(_))
        ));
    }

    #[test]
    fn overlap_is_refused_both_ways() {
        let existing = [
            ("backend", net("10.0.9.0/24")),
            ("big", net("172.16.0.0/12")),
        ];
        assert!(check_overlap(net("10.0.10.0/24"), existing).is_ok());
        let err = check_overlap(net("10.0.0.0/16"), existing).unwrap_err();
        assert_eq!(
            err.to_string(),
            "subnet 10.0.0.0/16 overlaps subnet 10.0.9.0/24 of network backend"
        );
        assert!(check_overlap(net("172.20.1.0/24"), existing).is_err());
        assert!(check_overlap(net("10.0.9.128/25"), existing).is_err());
    }

    #[test]
    fn underlay_addresses_stay_outside_overlays() {
        let underlay = [("node node1".to_string(), Ipv4Addr::new(192, 168, 56, 11))];
        assert!(check_underlay(net("10.0.9.0/24"), &underlay).is_ok());
        assert_eq!(
            check_underlay(net("192.168.0.0/16"), &underlay)
                .unwrap_err()
                .to_string(),
            "subnet 192.168.0.0/16 contains 192.168.56.11, the underlay address of node node1"
        );
        // An underlay inside 10.0.0.0/8 is skipped by the automatic choice too.
        assert_eq!(
            next_free_subnet(&[Ipv4Net::from(Ipv4Addr::new(10, 0, 0, 7))], None),
            Ok(net("10.0.1.0/24"))
        );
    }

    #[test]
    fn free_subnets_skip_everything_taken() {
        assert_eq!(next_free_subnet(&[], None), Ok(net("10.0.0.0/24")));
        assert_eq!(
            next_free_subnet(&[net("10.0.0.0/24"), net("10.0.1.0/25")], None),
            Ok(net("10.0.2.0/24"))
        );
        // A user /16 at the start of the range pushes the allocator past it entirely.
        assert_eq!(
            next_free_subnet(&[net("10.0.0.0/16"), net("10.255.0.0/16")], None),
            Ok(net("10.1.0.0/24"))
        );
        assert_eq!(
            next_free_subnet(&[net("10.0.0.0/8")], None),
            Err(AllocError::NoFreeSubnet)
        );
    }

    #[test]
    fn subnets_are_serial_so_a_freed_one_is_reused_last() {
        // 10.0.0.0/24 was freed after 10.0.1.0/24 was handed out: the next is 10.0.2.0/24.
        let taken = [net("10.0.1.0/24")];
        assert_eq!(
            next_free_subnet(&taken, Some(net("10.0.1.0/24"))),
            Ok(net("10.0.2.0/24"))
        );
        // At the end of 10.0.0.0/8 the allocation wraps around to the freed one.
        assert_eq!(
            next_free_subnet(&taken, Some(net("10.255.255.0/24"))),
            Ok(net("10.0.0.0/24"))
        );
        // A last subnet the user chose outside the range restarts at the beginning.
        assert_eq!(
            next_free_subnet(&taken, Some(net("192.168.7.0/24"))),
            Ok(net("10.0.0.0/24"))
        );
    }

    #[test]
    fn gwbridges_stay_outside_overlays() {
        let gw = [("node node1".to_string(), net("172.18.0.0/16"))];
        assert!(check_gwbridge(net("172.19.0.0/24"), &gw).is_ok());
        assert_eq!(
            check_gwbridge(net("172.18.5.0/24"), &gw)
                .unwrap_err()
                .to_string(),
            "subnet 172.18.5.0/24 overlaps 172.18.0.0/16, the gwbridge subnet of node node1: tasks there would lose their egress route"
        );
        assert!(check_gwbridge(net("172.16.0.0/12"), &gw).is_err());
    }

    #[test]
    fn vnis_are_serial_and_never_reused_while_in_use() {
        let mut in_use = BTreeSet::new();
        assert_eq!(next_vni(&in_use, 0), Ok(4096));
        in_use.insert(4096);
        assert_eq!(next_vni(&in_use, 4096), Ok(4097));
        in_use.insert(4097);
        // 4096 freed: the next one is still 4098, not the freed one.
        in_use.remove(&4096);
        assert_eq!(next_vni(&in_use, 4097), Ok(4098));
        // Wrapping around skips what is still in use.
        assert_eq!(next_vni(&in_use, MAX_VNI), Ok(4096));
        in_use.insert(4096);
        assert_eq!(next_vni(&in_use, MAX_VNI), Ok(4098));
        // Exhaustion, shown on a small range (the real one has 16 million values).
        let all: BTreeSet<u32> = (10..=20).collect();
        assert_eq!(next_after(&all, 15, 10, 20), None);
        let almost: BTreeSet<u32> = (10..=20).filter(|&v| v != 12).collect();
        assert_eq!(next_after(&almost, 15, 10, 20), Some(12));
    }

    #[test]
    fn fwmarks_start_at_256_and_are_serial() {
        let mut in_use = BTreeSet::new();
        assert_eq!(next_fwmark(&in_use, 0), Some(256));
        in_use.insert(256);
        assert_eq!(next_fwmark(&in_use, 256), Some(257));
        in_use.remove(&256);
        assert_eq!(next_fwmark(&in_use, 257), Some(258));
        in_use.insert(256);
        assert_eq!(next_fwmark(&in_use, MAX_FWMARK), Some(257));
    }

    #[test]
    fn endpoint_addresses_skip_network_gateway_and_broadcast() {
        let subnet = net("10.0.9.0/30");
        assert_eq!(gateway_of(subnet), Ipv4Addr::new(10, 0, 9, 1));
        let mut in_use = BTreeSet::new();
        let ip = next_ip(subnet, &in_use, None).unwrap();
        assert_eq!(ip, Ipv4Addr::new(10, 0, 9, 2));
        in_use.insert(ip);
        // .3 is the broadcast address of a /30: nothing left.
        assert_eq!(
            next_ip(subnet, &in_use, Some(ip)),
            Err(AllocError::NoFreeAddress(subnet))
        );

        let subnet = net("10.0.9.0/24");
        let ip = |d| Ipv4Addr::new(10, 0, 9, d);
        let mut in_use: BTreeSet<Ipv4Addr> = (2..=5).map(ip).collect();
        in_use.remove(&ip(3));
        // A freed address waits: the next one after the last handed out comes first...
        assert_eq!(next_ip(subnet, &in_use, Some(ip(5))), Ok(ip(6)));
        // ...and the freed one comes back once the allocation wraps around.
        let mut high: BTreeSet<Ipv4Addr> = (2..=254).map(ip).collect();
        high.remove(&ip(3));
        assert_eq!(next_ip(subnet, &high, Some(ip(254))), Ok(ip(3)));
        assert_eq!(next_ip(subnet, &high, Some(ip(200))), Ok(ip(3)));
        let full: BTreeSet<Ipv4Addr> = (2..=254).map(ip).collect();
        assert!(next_ip(subnet, &full, Some(ip(7))).is_err());
    }
}
