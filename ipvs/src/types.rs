//! IPVS objects and their attribute encoding (linux `include/uapi/linux/ip_vs.h`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;

use crate::wire::{self, get_str, get_u16, get_u32, get_uint, parse_attrs};

// Top-level command attributes.
pub(crate) const CMD_ATTR_SERVICE: u16 = 1;
pub(crate) const CMD_ATTR_DEST: u16 = 2;
pub(crate) const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
pub(crate) const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
pub(crate) const CMD_ATTR_TIMEOUT_UDP: u16 = 6;
const CMD_ATTR_MAX: usize = 7;

const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_FWMARK: u16 = 5;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;
const SVC_STATS: u16 = 10;
const SVC_STATS64: u16 = 12;
const SVC_MAX: usize = 13;

const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_PERSIST_CONNS: u16 = 9;
const DEST_STATS: u16 = 10;
const DEST_ADDR_FAMILY: u16 = 11;
const DEST_STATS64: u16 = 12;
const DEST_MAX: usize = 13;

const INFO_VERSION: u16 = 1;
const INFO_CONN_TAB_SIZE: u16 = 2;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
/// `IP_VS_SCHEDNAME_MAXLEN` is 16 including the NUL.
const SCHED_NAME_MAX: usize = 15;
/// `IP_VS_SVC_F_HASHED`: kernel bookkeeping (the service is in the hash table), not a setting.
const SVC_F_HASHED: u32 = 0x2;
/// `IP_VS_CONN_F_FWD_MASK`.
const FWD_MASK: u32 = 0x7;

/// Address family of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    fn af(self) -> u16 {
        match self {
            Family::Ipv4 => AF_INET,
            Family::Ipv6 => AF_INET6,
        }
    }

    fn from_af(af: u16) -> Result<Family, String> {
        match af {
            AF_INET => Ok(Family::Ipv4),
            AF_INET6 => Ok(Family::Ipv6),
            _ => Err(format!("unknown address family {af}")),
        }
    }

    /// The widest prefix length: the default persistence netmask.
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }
}

/// Transport protocol of an address-based virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn number(self) -> u16 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u16,
            Protocol::Udp => libc::IPPROTO_UDP as u16,
            Protocol::Sctp => libc::IPPROTO_SCTP as u16,
        }
    }

    fn from_number(n: u16) -> Result<Protocol, String> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
            .ok_or_else(|| format!("unknown protocol {n}"))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// What identifies a virtual service in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKey {
    /// Packets carrying this firewall mark (set by nftables/iptables), of this family.
    Fwmark { family: Family, mark: u32 },
    /// Packets to this address and port (host order here; network order on the wire).
    Addr {
        protocol: Protocol,
        addr: SocketAddr,
    },
}

impl ServiceKey {
    pub fn family(&self) -> Family {
        match *self {
            ServiceKey::Fwmark { family, .. } => family,
            ServiceKey::Addr { addr, .. } => Family::of(addr.ip()),
        }
    }

    /// Writes the attributes that identify the service into an open SERVICE nest, in
    /// ipvsadm's order and form (the address always as 16 bytes).
    fn encode(&self, buf: &mut Vec<u8>) {
        wire::put_u16(buf, SVC_AF, self.family().af());
        match *self {
            ServiceKey::Fwmark { mark, .. } => wire::put_u32(buf, SVC_FWMARK, mark),
            ServiceKey::Addr { protocol, addr } => {
                wire::put_u16(buf, SVC_PROTOCOL, protocol.number());
                wire::put(buf, SVC_ADDR, &addr16(addr.ip()));
                wire::put(buf, SVC_PORT, &addr.port().to_be_bytes());
            }
        }
    }
}

/// ipvsadm's notation: `FWM 256`, `FWM 256 IPv6`, `TCP 10.0.0.1:80`, `UDP [2001:db8::1]:53`.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Fwmark {
                family: Family::Ipv4,
                mark,
            } => write!(f, "FWM {mark}"),
            ServiceKey::Fwmark {
                family: Family::Ipv6,
                mark,
            } => write!(f, "FWM {mark} IPv6"),
            ServiceKey::Addr { protocol, addr } => write!(f, "{protocol} {addr}"),
        }
    }
}

/// Service flags (`IP_VS_SVC_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// Persistent service: a client sticks to one destination for `timeout` seconds.
    pub const PERSISTENT: ServiceFlags = ServiceFlags(0x1);
    /// One-packet scheduling (UDP): each datagram is scheduled on its own.
    pub const ONEPACKET: ServiceFlags = ServiceFlags(0x4);
    /// Scheduler-specific flags (for `sh`: fallback, port; for `mh`: fallback, port).
    pub const SCHED1: ServiceFlags = ServiceFlags(0x8);
    pub const SCHED2: ServiceFlags = ServiceFlags(0x10);
    pub const SCHED3: ServiceFlags = ServiceFlags(0x20);

    pub fn contains(self, other: ServiceFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ServiceFlags {
    type Output = ServiceFlags;
    fn bitor(self, rhs: ServiceFlags) -> ServiceFlags {
        ServiceFlags(self.0 | rhs.0)
    }
}

/// A virtual service's settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub key: ServiceKey,
    /// Scheduler name: `rr`, `wrr`, `lc`, `sh`, ... (the kernel module `ip_vs_<name>`).
    pub scheduler: String,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (used with [`ServiceFlags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence granularity as a prefix length: clients in the same /`netmask` share a
    /// persistent destination. 32 (IPv4) or 128 (IPv6) means per client address.
    pub netmask: u8,
}

impl Service {
    /// A non-persistent service with the given scheduler (ipvsadm's defaults otherwise).
    pub fn new(key: ServiceKey, scheduler: &str) -> Service {
        Service {
            key,
            scheduler: scheduler.to_string(),
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: key.family().max_prefix(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.scheduler.is_empty()
            || self.scheduler.len() > SCHED_NAME_MAX
            || self.scheduler.contains('\0')
        {
            return Err(format!(
                "invalid scheduler name {:?}: 1 to {SCHED_NAME_MAX} bytes without NUL",
                self.scheduler
            ));
        }
        let max = self.key.family().max_prefix();
        if self.netmask > max {
            return Err(format!(
                "invalid netmask /{} for {:?}",
                self.netmask,
                self.key.family()
            ));
        }
        Ok(())
    }

    /// Writes the full SERVICE nest, as NEW_SERVICE and SET_SERVICE require it.
    pub(crate) fn encode(&self, buf: &mut Vec<u8>) {
        let nest = wire::nest_start(buf, CMD_ATTR_SERVICE);
        self.key.encode(buf);
        wire::put_str(buf, SVC_SCHED_NAME, &self.scheduler);
        // struct ip_vs_flags { flags, mask }: a full mask sets every flag to our value.
        let mut flags = self.flags.0.to_ne_bytes().to_vec();
        flags.extend_from_slice(&u32::MAX.to_ne_bytes());
        wire::put(buf, SVC_FLAGS, &flags);
        wire::put_u32(buf, SVC_TIMEOUT, self.timeout);
        wire::put(
            buf,
            SVC_NETMASK,
            &encode_netmask(self.key.family(), self.netmask),
        );
        wire::nest_end(buf, nest);
    }
}

/// Writes a SERVICE nest holding only the identifying attributes.
pub(crate) fn encode_key(key: &ServiceKey, buf: &mut Vec<u8>) {
    let nest = wire::nest_start(buf, CMD_ATTR_SERVICE);
    key.encode(buf);
    wire::nest_end(buf, nest);
}

/// The kernel keeps the netmask as raw bytes: an IPv4 mask in network order (255.255.255.0
/// is `ff ff ff 00`), an IPv6 prefix length as a native integer — as ipvsadm sends them.
fn encode_netmask(family: Family, prefix: u8) -> [u8; 4] {
    match family {
        Family::Ipv4 => u32::MAX
            .checked_shl(32 - u32::from(prefix))
            .unwrap_or(0)
            .to_be_bytes(),
        Family::Ipv6 => u32::from(prefix).to_ne_bytes(),
    }
}

fn decode_netmask(family: Family, raw: &[u8]) -> Result<u8, String> {
    let b = raw.get(..4).ok_or("short netmask attribute")?;
    match family {
        Family::Ipv4 => {
            let mask = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let prefix = mask.leading_ones();
            if mask.checked_shl(prefix).unwrap_or(0) != 0 {
                return Err(format!("non-contiguous netmask {}", Ipv4Addr::from(mask)));
            }
            Ok(prefix as u8)
        }
        Family::Ipv6 => {
            let prefix = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            u8::try_from(prefix)
                .ok()
                .filter(|p| *p <= 128)
                .ok_or_else(|| format!("IPv6 netmask prefix {prefix}"))
        }
    }
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn decode_addr(family: Family, raw: &[u8]) -> Result<IpAddr, String> {
    match family {
        Family::Ipv4 => raw
            .get(..4)
            .map(|b| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            .ok_or_else(|| format!("IPv4 address of {} bytes", raw.len())),
        Family::Ipv6 => <[u8; 16]>::try_from(raw.get(..16).unwrap_or(raw))
            .map(|b| IpAddr::V6(Ipv6Addr::from(b)))
            .map_err(|_| format!("IPv6 address of {} bytes", raw.len())),
    }
}

fn decode_port(raw: &[u8]) -> Result<u16, String> {
    raw.get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "short port attribute".to_string())
}

fn need<'a>(v: Option<&'a [u8]>, what: &str) -> Result<&'a [u8], String> {
    v.ok_or_else(|| format!("reply lacks the {what} attribute"))
}

/// Traffic counters and rate estimates of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Rates (per second), as estimated by the kernel.
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

impl Stats {
    /// Decodes STATS64 if present (every counter 64-bit), else the older STATS.
    fn decode(stats64: Option<&[u8]>, stats: Option<&[u8]>) -> Result<Stats, String> {
        let Some(nest) = stats64.or(stats) else {
            return Ok(Stats::default());
        };
        let t = parse_attrs::<11>(nest)?;
        let get = |i: usize| {
            t[i].map(get_uint)
                .transpose()
                .map(Option::unwrap_or_default)
        };
        Ok(Stats {
            conns: get(1)?,
            in_packets: get(2)?,
            out_packets: get(3)?,
            in_bytes: get(4)?,
            out_bytes: get(5)?,
            cps: get(6)?,
            in_pps: get(7)?,
            out_pps: get(8)?,
            in_bps: get(9)?,
            out_bps: get(10)?,
        })
    }
}

/// A service as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    pub service: Service,
    pub stats: Stats,
}

/// Decodes the SERVICE nest of a GET_SERVICE reply.
pub(crate) fn decode_service(attrs: &[u8]) -> Result<ServiceEntry, String> {
    let top = parse_attrs::<CMD_ATTR_MAX>(attrs)?;
    let t = parse_attrs::<SVC_MAX>(need(top[CMD_ATTR_SERVICE as usize], "SERVICE")?)?;
    let at = |k: u16| t[k as usize];
    let family = Family::from_af(get_u16(need(at(SVC_AF), "AF")?)?)?;
    let mark = at(SVC_FWMARK).map(get_u32).transpose()?.unwrap_or(0);
    let key = if mark != 0 {
        ServiceKey::Fwmark { family, mark }
    } else {
        let protocol = Protocol::from_number(get_u16(need(at(SVC_PROTOCOL), "PROTOCOL")?)?)?;
        let ip = decode_addr(family, need(at(SVC_ADDR), "ADDR")?)?;
        let port = decode_port(need(at(SVC_PORT), "PORT")?)?;
        ServiceKey::Addr {
            protocol,
            addr: SocketAddr::new(ip, port),
        }
    };
    let flags = get_u32(need(at(SVC_FLAGS), "FLAGS")?)? & !SVC_F_HASHED;
    Ok(ServiceEntry {
        service: Service {
            key,
            scheduler: get_str(need(at(SVC_SCHED_NAME), "SCHED_NAME")?)?,
            flags: ServiceFlags(flags),
            timeout: get_u32(need(at(SVC_TIMEOUT), "TIMEOUT")?)?,
            netmask: decode_netmask(family, need(at(SVC_NETMASK), "NETMASK")?)?,
        },
        stats: Stats::decode(at(SVC_STATS64), at(SVC_STATS))?,
    })
}

/// How packets reach a destination (`IP_VS_CONN_F_*` forwarding methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Forward {
    /// NAT (ipvsadm `-m`, "Masq").
    Masq,
    /// Deliver locally ("Local").
    Local,
    /// IP-in-IP tunnel (ipvsadm `-i`, "Tunnel").
    Tunnel,
    /// Direct routing (ipvsadm `-g`, "Route").
    DirectRoute,
}

impl Forward {
    fn code(self) -> u32 {
        match self {
            Forward::Masq => 0,
            Forward::Local => 1,
            Forward::Tunnel => 2,
            Forward::DirectRoute => 3,
        }
    }

    fn from_code(c: u32) -> Result<Forward, String> {
        match c & FWD_MASK {
            0 => Ok(Forward::Masq),
            1 => Ok(Forward::Local),
            2 => Ok(Forward::Tunnel),
            3 => Ok(Forward::DirectRoute),
            other => Err(format!("unknown forwarding method {other}")),
        }
    }
}

/// A real server behind a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Address and port (0 for fwmark services: the packet's own port is kept).
    pub addr: SocketAddr,
    pub forward: Forward,
    /// Relative weight; 0 quiesces the destination (no new connections) so it drains.
    pub weight: u32,
    /// Connection count above which the destination takes no new connections; 0 = no limit.
    pub upper_threshold: u32,
    /// Connection count below which an overloaded destination takes connections again.
    pub lower_threshold: u32,
}

impl Destination {
    /// A destination with no connection thresholds.
    pub fn new(addr: SocketAddr, forward: Forward, weight: u32) -> Destination {
        Destination {
            addr,
            forward,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }

    /// Writes the full DEST nest, as NEW_DEST and SET_DEST require it.
    pub(crate) fn encode(&self, buf: &mut Vec<u8>) {
        let nest = encode_dest_addr(self.addr, buf);
        wire::put_u32(buf, DEST_FWD_METHOD, self.forward.code());
        wire::put_u32(buf, DEST_WEIGHT, self.weight);
        wire::put_u32(buf, DEST_U_THRESH, self.upper_threshold);
        wire::put_u32(buf, DEST_L_THRESH, self.lower_threshold);
        wire::nest_end(buf, nest);
    }
}

/// Opens a DEST nest and writes the identifying attributes; returns the nest to close.
fn encode_dest_addr(addr: SocketAddr, buf: &mut Vec<u8>) -> usize {
    let nest = wire::nest_start(buf, CMD_ATTR_DEST);
    wire::put_u16(buf, DEST_ADDR_FAMILY, Family::of(addr.ip()).af());
    wire::put(buf, DEST_ADDR, &addr16(addr.ip()));
    wire::put(buf, DEST_PORT, &addr.port().to_be_bytes());
    nest
}

/// Writes a DEST nest holding only the address, for DEL_DEST.
pub(crate) fn encode_dest_key(addr: SocketAddr, buf: &mut Vec<u8>) {
    let nest = encode_dest_addr(addr, buf);
    wire::nest_end(buf, nest);
}

/// A destination as read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DestinationEntry {
    pub destination: Destination,
    pub active_conns: u32,
    pub inactive_conns: u32,
    /// Persistence templates pointing at this destination.
    pub persistent_conns: u32,
    pub stats: Stats,
}

/// Decodes the DEST nest of a GET_DEST reply; `family` is the service's, which applies
/// when the kernel (before 3.18) sends no destination family.
pub(crate) fn decode_destination(attrs: &[u8], family: Family) -> Result<DestinationEntry, String> {
    let top = parse_attrs::<CMD_ATTR_MAX>(attrs)?;
    let t = parse_attrs::<DEST_MAX>(need(top[CMD_ATTR_DEST as usize], "DEST")?)?;
    let at = |k: u16| t[k as usize];
    let u32_or_0 = |k: u16| {
        at(k)
            .map(get_u32)
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let family = match at(DEST_ADDR_FAMILY) {
        Some(v) => Family::from_af(get_u16(v)?)?,
        None => family,
    };
    let ip = decode_addr(family, need(at(DEST_ADDR), "ADDR")?)?;
    let port = decode_port(need(at(DEST_PORT), "PORT")?)?;
    Ok(DestinationEntry {
        destination: Destination {
            addr: SocketAddr::new(ip, port),
            forward: Forward::from_code(get_u32(need(at(DEST_FWD_METHOD), "FWD_METHOD")?)?)?,
            weight: get_u32(need(at(DEST_WEIGHT), "WEIGHT")?)?,
            upper_threshold: u32_or_0(DEST_U_THRESH)?,
            lower_threshold: u32_or_0(DEST_L_THRESH)?,
        },
        active_conns: u32_or_0(DEST_ACTIVE_CONNS)?,
        inactive_conns: u32_or_0(DEST_INACT_CONNS)?,
        persistent_conns: u32_or_0(DEST_PERSIST_CONNS)?,
        stats: Stats::decode(at(DEST_STATS64), at(DEST_STATS))?,
    })
}

/// Connection timeouts in seconds, as read from the kernel (ipvsadm `--timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

pub(crate) fn decode_timeouts(attrs: &[u8]) -> Result<Timeouts, String> {
    let t = parse_attrs::<CMD_ATTR_MAX>(attrs)?;
    let get = |k: u16, what| get_u32(need(t[k as usize], what)?);
    Ok(Timeouts {
        tcp: get(CMD_ATTR_TIMEOUT_TCP, "TIMEOUT_TCP")?,
        tcp_fin: get(CMD_ATTR_TIMEOUT_TCP_FIN, "TIMEOUT_TCP_FIN")?,
        udp: get(CMD_ATTR_TIMEOUT_UDP, "TIMEOUT_UDP")?,
    })
}

/// A change of connection timeouts (ipvsadm `--set`). `None` leaves a timeout unchanged;
/// the kernel has no way to set one to 0 (it reads 0 as "unchanged"), hence `NonZeroU32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TimeoutChange {
    pub tcp: Option<NonZeroU32>,
    pub tcp_fin: Option<NonZeroU32>,
    pub udp: Option<NonZeroU32>,
}

impl TimeoutChange {
    /// Writes all three attributes, 0 standing for "unchanged", as ipvsadm does.
    pub(crate) fn encode(&self, buf: &mut Vec<u8>) {
        let secs = |t: Option<NonZeroU32>| t.map_or(0, NonZeroU32::get);
        wire::put_u32(buf, CMD_ATTR_TIMEOUT_TCP, secs(self.tcp));
        wire::put_u32(buf, CMD_ATTR_TIMEOUT_TCP_FIN, secs(self.tcp_fin));
        wire::put_u32(buf, CMD_ATTR_TIMEOUT_UDP, secs(self.udp));
    }
}

/// IPVS version and connection table size (the header of `ipvsadm -L`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Info {
    /// `(major, minor, patch)`, e.g. `(1, 2, 1)`.
    pub version: (u8, u8, u8),
    pub conn_table_size: u32,
}

pub(crate) fn decode_info(attrs: &[u8]) -> Result<Info, String> {
    let t = parse_attrs::<3>(attrs)?;
    let v = get_u32(need(t[INFO_VERSION as usize], "INFO_VERSION")?)?;
    Ok(Info {
        version: ((v >> 16) as u8, (v >> 8) as u8, v as u8),
        conn_table_size: get_u32(need(t[INFO_CONN_TAB_SIZE as usize], "CONN_TAB_SIZE")?)?,
    })
}

/// Decodes the family id from nlctrl's GETFAMILY reply.
pub(crate) fn decode_family_id(attrs: &[u8]) -> Result<u16, String> {
    const CTRL_ATTR_FAMILY_ID: usize = 1;
    let t = parse_attrs::<2>(attrs)?;
    get_u16(need(t[CTRL_ATTR_FAMILY_ID], "CTRL_ATTR_FAMILY_ID")?)
}
