//! meshnet's nftables rule sets: pure renderers from desired state to `nft -f` scripts, plus a
//! thin executor that runs `nft` inside a network namespace, and sends the sandboxes'
//! incremental changes as nf_tables netlink batches ([`nfnl`]).
//!
//! Every rule set lives in **one table, `table ip meshnet`**, in the namespace it serves. Nothing
//! here lists, flushes or touches any other table, so foreign rules survive every update.
//!
//! # Batches
//! A renderer takes `(previous desired state, new desired state)` and emits ONE [`Batch`]: an
//! `nft -f -` text script that the kernel applies as one transaction. Text rather than JSON: it
//! reads like `nft list` output, so the exact-script unit tests stay readable.
//! - No previous state (agent start, or a reconcile found drift): `add table` + `delete table` +
//!   the whole table, in the same transaction, so a restart never leaves a moment without rules
//!   and established connections keep their conntrack NAT bindings.
//! - Otherwise only what changed: map/set elements added or deleted, per-object chains added,
//!   flushed and refilled, or deleted. Base chains are rewritten only through a full rebuild,
//!   when the table's configuration (interfaces, subnets, LB mode) changes.
//! - Element lists are split into statements of at most [`ELEMENTS_PER_STATEMENT`].
//! - Where a table's incremental changes are only elements and per-object chains (the sandbox
//!   tables, [`SboxState`]), [`Ruleset::changes`] gives them as data ([`Changes`]), and [`sync`]
//!   hands them to [`Netfilter::apply_changes`]: [`NsNetfilter`] encodes them as one nf_tables
//!   netlink batch ([`nfnl`]) instead of running `nft`, which would first dump every chain and
//!   set of the namespace. The same [`Changes`] render as the `nft -f` script
//!   ([`Changes::to_batch`]), so both paths apply the same transition; the lab tests check that
//!   they list the same table. Full rebuilds stay `nft -f` scripts.
//! - The incremental path never lists the table. [`reconcile`] reads it back with
//!   `nft -j list table ip meshnet` and compares its [`Content`] (chains with their rules in
//!   order, sets and maps with their elements) with the full build's: any rule, chain or
//!   element deleted, added or edited behind our back makes it rebuild the table, and the
//!   [`Drift`] says what differed. A table that is already right is left alone.
//!
//! # Node namespace ([`NodeState`])
//! ```text
//! set ingress-ports   { inet_proto . inet_service }                   published ports, ingress mode
//! map host-ports      { inet_proto . inet_service : ipv4_addr . inet_service }  host mode → task
//! set host-targets    { ipv4_addr . inet_proto . inet_service }       host-mode DNAT targets
//! chain raw-prerouting  (filter prerouting, raw)  ip daddr 127.0.0.0/8 iifname != "lo" drop   (CVE-2020-8558)
//! chain published     l4proto.dport @ingress-ports dnat to <sbox gwbridge IP>   (port unchanged)
//!                     dnat ip to l4proto.dport map @host-ports                 (source kept)
//! chain nat-prerouting  (nat prerouting, dstnat)  fib daddr type local jump published
//! chain nat-output      (nat output, -100)        fib daddr type local jump published
//! chain nat-postrouting (nat postrouting, srcnat) ip saddr <gwbridge subnet> oifname != <gwbridge> masquerade
//!                                                 oifname <gwbridge> fib saddr type local masquerade
//! chain filter-forward  (filter forward)          ct state established,related accept
//!                                                 oifname <gwbridge> l4proto.dport @ingress-ports accept
//!                                                 oifname <gwbridge> daddr.l4proto.dport @host-targets accept
//!                                                 iifname <gwbridge> oifname <gwbridge> drop   (icc off)
//! ```
//! `localhost:<published>` works with `route_localnet=1` on the gwbridge ([`node_sysctls`]) and
//! the local-source masquerade, as with Docker. `route_localnet` also lets a neighbour on the
//! gwbridge send to 127.0.0.0/8 and reach what listens on the node's localhost
//! (CVE-2020-8558): `raw-prerouting` drops such packets, as kube-proxy's KUBE-FIREWALL chain
//! does, before conntrack and NAT, so only packets sent to 127/8 from outside are affected.
//! Like Docker's icc rule, the forward drop sees container-to-container traffic on the bridge
//! only when `br_netfilter` is loaded (`bridge-nf-call-iptables=1`); this crate does not load
//! it.
//!
//! # ingress_sbox and `lb_<network>` ([`SboxState`])
//! ```text
//! map published { inet_proto . inet_service : mark }      published port → service fwmark
//! map vips      { ipv4_addr : mark }                      service VIP → service fwmark
//! map services  { mark : verdict }                        fwmark → jump svc-<mark>
//! map backends  { mark . mark : ipv4_addr }               fwmark . slot → task ingress IP
//! chain mangle-prerouting (filter prerouting, mangle)  meta mark set l4proto.dport map @published
//!                                                      meta mark set ip daddr map @vips
//! chain nat-prerouting    (nat prerouting, dstnat)     meta mark vmap @services
//!                                                      dnat to meta mark . ct mark map @backends
//! chain nat-postrouting   (nat postrouting, srcnat)    ip daddr <ingress subnet> oifname <eth0> snat to <sbox ingress IP>
//! chain svc-<mark>        ct mark set numgen inc mod <N>      (round robin over N slots)
//! ```
//! A service's VIP (a local address of the sandbox) is marked for it whatever the port: the
//! ingress VIP in ingress_sbox, and each VIP of a network in its `lb_<network>` namespace, whose
//! table is the same with [`LbKind::Ipvs`](proto::model::LbKind::Ipvs), no published port, and the network's subnet, leg
//! and lb address in place of ingress's.
//!
//! Lookup is O(1) in the number of services: three map lookups for the first packet of a
//! connection. The DNAT keeps the port (each task redirects it). With [`LbKind::Ipvs`](proto::model::LbKind::Ipvs) only
//! `published`, the marking chain and the SNAT chain exist (IPVS is programmed elsewhere).
//! Slot i of a service is its i-th backend in address order. A service without backends is
//! only marked: the sandbox's own stack refuses its connections.
//!
//! This departs from kube-proxy's layout (`numgen inc mod N vmap { 0 : goto ep-a, ... }` in
//! each service chain, one `dnat` chain per endpoint) for two costs measured on kernel 6.18
//! with nft 1.0.6, 10k services × 2 backends:
//! - For every `goto`/`jump` it adds, the kernel's loop check walks the verdict maps of the
//!   table and their bindings, so one anonymous verdict map per service makes programming
//!   quadratic: 12.9 s in one batch (10 s with one shared map bound in every service chain).
//!   Here the service chain only stores its slot in the connection mark and the base chain
//!   does the lookups: 0.3 s, the time `nft -f` takes to load the listed result.
//! - Every nft 1.0.6 run dumps all chains of the namespace into its cache, at a cost that grows
//!   faster than their number: with 30k chains (10k services + 20k per-endpoint chains) even a
//!   one-element change costs about 50 ms, with 10k chains about 10 ms. So backends are map
//!   elements, not chains.
//!
//! The connection mark carries the slot only for the first packet's lookup; the sandbox is ours.
//!
//! Draining: a removed backend leaves the `backends` map (no new connection picks it) while
//! established connections keep their conntrack entry. [`sync`] then deletes the UDP conntrack
//! entries whose reply source is that backend, so UDP flows move on to live backends, and the
//! TCP ones still waiting for its SYN-ACK (SYN_SENT): a client that reuses such a source port
//! would otherwise follow the entry to a gone backend for two minutes.
//!
//! # Task namespace ([`TaskState`])
//! ```text
//! map vips { ipv4_addr : verdict }                VIP → goto vip-<VIP>   (nftables load balancer)
//! chain nat-prerouting (nat prerouting, dstnat)  ip daddr <task ingress IP> tcp dport <P> redirect to :<T>
//! chain nat-output     (nat output, -100)        ip daddr vmap @vips
//! chain vip-<VIP>      dnat to numgen inc mod <N> map { 0 : <task 0>, 1 : <task 1>, ... }
//!                      (no task: reject with tcp reset; reject)
//! ```
//! A connection from the task to a service VIP, any port, is DNATed in the task's own
//! namespace (kube-proxy's nftables proxier does the same on the node): no extra hop, no SNAT,
//! the backend sees the client's address. One lookup per new connection whatever the number
//! of services; a change refills only the chains of the VIPs it concerns. The service chains
//! keep anonymous maps rather than per-endpoint chains: a task table has few chains, and a
//! change of backends is one flush and one rule. A backend that leaves every VIP also loses
//! the task's UDP and SYN_SENT conntrack entries to it.

mod changes;
mod conntrack;
mod content;
mod exec;
/// Real listings of our tables and the states they were made from, for tests (feature
/// `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod fixtures;
mod generation;
pub mod nfnl;
mod node;
mod render;
mod sbox;
mod task;

use std::fmt;

pub use changes::{Changes, Key, Step, Value};
pub use content::{Content, Drift};
#[cfg(any(test, feature = "testing"))]
pub use exec::FakeNetfilter;
pub use exec::{reconcile, sync, sync_report, Netfilter, NsNetfilter, Synced};
pub use generation::generation;
pub use nfnl::NfnlSocket;
pub use node::{node_sysctls, NodeConfig, NodeState};
pub use render::{Batch, ELEMENTS_PER_STATEMENT};
#[cfg(any(test, feature = "testing"))]
pub use sbox::synthetic_sbox;
pub use sbox::{kernel_release, overlay_sysctls, sbox_sysctls, SboxConfig, SboxService, SboxState};
pub use task::TaskState;

/// A rule set of one namespace's table: rendered from desired state, checked against the
/// content of its full build ([`Content::from_script`]).
pub trait Ruleset: Sized {
    /// The batch that takes the table from `prev` (what was last applied; `None` when unknown)
    /// to `next`. Validates `next` first: bad input renders nothing.
    fn render(prev: Option<&Self>, next: &Self) -> Result<Batch>;

    /// The same transition as [`Ruleset::render`] from a known `prev`, as data, when it is
    /// only element and per-object chain changes (which an executor may apply over nf_tables
    /// netlink rather than `nft`); `None` when it needs a rebuild or the table has no such
    /// form. Validates `next` first.
    fn changes(_prev: &Self, _next: &Self) -> Result<Option<Changes>> {
        Ok(None)
    }

    /// Destinations whose stale conntrack entries (see [`Netfilter::delete_stale_conntrack`])
    /// must go after moving from `prev` to `next`.
    fn stale_destinations(_prev: &Self, _next: &Self) -> Vec<std::net::Ipv4Addr> {
        Vec::new()
    }
}

/// The family and name of the one table this crate owns in every namespace.
pub const TABLE: &str = "ip meshnet";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid port {port} for {what}: ports are 1-65535")]
    InvalidPort { what: String, port: u16 },
    #[error("invalid fwmark 0: a service needs a non-zero mark")]
    InvalidFwmark,
    #[error("port {0} is published twice")]
    DuplicatePort(PortKey),
    #[error("VIP {0} belongs to two services")]
    DuplicateVip(std::net::Ipv4Addr),
    #[error("invalid interface name {0:?}: use 1-15 characters of [A-Za-z0-9_.-]")]
    InvalidInterface(String),
    #[error("{action} in network namespace {ns}: {cause}")]
    Netns {
        action: &'static str,
        ns: String,
        cause: netns::Error,
    },
    #[error("{action} in network namespace {ns}: {cause}")]
    Io {
        action: &'static str,
        ns: String,
        cause: std::io::Error,
    },
    #[error("{action} in network namespace {ns}: `{command}` failed ({status}): {stderr}")]
    Command {
        action: &'static str,
        ns: String,
        command: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{action} in network namespace {ns}: {cause}")]
    Nfnl {
        /// What failed, as the nft statement it stands for.
        action: String,
        ns: String,
        cause: std::io::Error,
    },
    #[error("parse the listing of table {TABLE}: {0}")]
    Listing(String),
    #[error("read the content of table {TABLE} from its script: unexpected line {0:?}")]
    Script(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A published port: protocol and port number (`80/tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub proto: Proto,
    pub port: u16,
}

impl PortKey {
    pub fn tcp(port: u16) -> PortKey {
        PortKey {
            proto: Proto::Tcp,
            port,
        }
    }

    pub fn udp(port: u16) -> PortKey {
        PortKey {
            proto: Proto::Udp,
            port,
        }
    }

    /// The key as an nft concatenation element (`tcp . 80`).
    fn nft(&self) -> String {
        format!("{} . {}", self.proto, self.port)
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// A service's firewall mark: cluster-stable, allocated by the manager (from 256, as Swarm).
/// Displays in decimal (as `ipvsadm -ln` shows `FWM 256`); `{:#x}` gives nft's hex form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fwmark(u32);

impl Fwmark {
    /// Mark 0 means "unmarked" to the kernel, so no service can have it.
    pub fn new(mark: u32) -> Result<Fwmark> {
        if mark == 0 {
            Err(Error::InvalidFwmark)
        } else {
            Ok(Fwmark(mark))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Fwmark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::LowerHex for Fwmark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

fn check_port(what: impl fmt::Display, port: u16) -> Result<()> {
    if port == 0 {
        Err(Error::InvalidPort {
            what: what.to_string(),
            port,
        })
    } else {
        Ok(())
    }
}

/// Interface names end up quoted in rules: keep them to what the kernel allows and nft parses.
fn check_interface(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInterface(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwmarks_format_in_decimal_and_hex() {
        let m = Fwmark::new(256).unwrap();
        assert_eq!(m.to_string(), "256");
        assert_eq!(format!("{m:#x}"), "0x100");
        assert_eq!(m.get(), 256);
        assert!(matches!(Fwmark::new(0), Err(Error::InvalidFwmark)));
    }

    #[test]
    fn port_keys_format() {
        assert_eq!(PortKey::tcp(80).to_string(), "80/tcp");
        assert_eq!(PortKey::udp(53).nft(), "udp . 53");
    }

    #[test]
    fn interface_names_are_checked() {
        for good in ["eth0", "docker_gwbridge", "gw.1", "a-b"] {
            assert!(check_interface(good).is_ok(), "{good}");
        }
        for bad in ["", "sixteen_chars_xx", "a b", "a\"b", "x;y"] {
            assert!(
                matches!(check_interface(bad), Err(Error::InvalidInterface(_))),
                "{bad}"
            );
        }
    }
}
