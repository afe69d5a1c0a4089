//! A small XFRM netlink client (NETLINK_XFRM): ESP states and policies, added, replaced,
//! deleted and dumped. Only what the agent programs is encoded: IPv4, transport mode,
//! `rfc4106(gcm(aes))`, policies with a mark. Layouts are those of `<linux/xfrm.h>` on 64-bit
//! Linux (checked against the header: `xfrm_usersa_info` 224 bytes, `xfrm_userpolicy_info` 168,
//! `xfrm_user_tmpl` 64).

use std::io;
use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_XFRM, Socket, SocketAddr};

use super::{OutPolicy, Sa, SaId, AEAD_ICV_BITS, AEAD_NAME, ESP_MARK, ESP_MARK_MASK, REQID};
use proto::agent::ESP_KEY_BYTES;

const XFRM_MSG_NEWSA: u16 = 16;
const XFRM_MSG_DELSA: u16 = 17;
const XFRM_MSG_GETSA: u16 = 18;
const XFRM_MSG_DELPOLICY: u16 = 20;
const XFRM_MSG_GETPOLICY: u16 = 21;
const XFRM_MSG_UPDPOLICY: u16 = 25;
const XFRMA_TMPL: u16 = 5;
const XFRMA_ALG_AEAD: u16 = 18;
const XFRMA_MARK: u16 = 21;
const XFRM_POLICY_OUT: u8 = 1;
const XFRM_MODE_TRANSPORT: u8 = 0;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;

const AF_INET: u16 = libc::AF_INET as u16;
const IPPROTO_ESP: u8 = libc::IPPROTO_ESP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

const USERSA_INFO_LEN: usize = 224;
const USERSA_ID_LEN: usize = 24;
const USERPOLICY_INFO_LEN: usize = 168;
const USERPOLICY_ID_LEN: usize = 64;
const USER_TMPL_LEN: usize = 64;
/// `xfrm_algo_aead`: a 64-byte name, key and ICV lengths in bits, then the key.
const AEAD_HEADER_LEN: usize = 72;

#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    #[error("open an XFRM netlink socket: {0}")]
    Open(io::Error),
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
    #[error("{op}: malformed reply from the kernel")]
    Malformed { op: String },
}

/// One socket in the calling thread's network namespace.
pub struct XfrmSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl XfrmSocket {
    pub fn open() -> Result<XfrmSocket, XfrmError> {
        let mut sock = Socket::new(NETLINK_XFRM).map_err(XfrmError::Open)?;
        sock.bind_auto().map_err(XfrmError::Open)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(XfrmError::Open)?;
        // The kernel answers at once; a reply that never comes must not hang the agent.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(XfrmError::Open(io::Error::last_os_error()));
        }
        Ok(XfrmSocket {
            sock,
            seq: 0,
            // A dump part holds a few messages of some hundred bytes each.
            buf: vec![0; 64 * 1024],
        })
    }

    pub fn add_sa(&mut self, sa: &Sa) -> Result<(), XfrmError> {
        let op = || format!("add ESP state {sa:?}");
        let flags = NLM_F_CREATE | NLM_F_EXCL;
        self.request(XFRM_MSG_NEWSA, flags, &encode_sa(sa))
            .map_err(|source| XfrmError::Io { op: op(), source })
    }

    pub fn delete_sa(&mut self, id: &SaId) -> Result<(), XfrmError> {
        let op = || format!("delete ESP state {id:?}");
        self.request(XFRM_MSG_DELSA, 0, &encode_sa_id(id))
            .map_err(|source| XfrmError::Io { op: op(), source })
    }

    /// Creates the policy or replaces the one with the same selector, direction and mark.
    pub fn set_policy(&mut self, p: &OutPolicy) -> Result<(), XfrmError> {
        let op = || format!("set ESP policy {p:?}");
        self.request(XFRM_MSG_UPDPOLICY, NLM_F_CREATE, &encode_policy(p))
            .map_err(|source| XfrmError::Io { op: op(), source })
    }

    pub fn delete_policy(&mut self, p: &OutPolicy) -> Result<(), XfrmError> {
        let op = || format!("delete ESP policy {p:?}");
        self.request(XFRM_MSG_DELPOLICY, 0, &encode_policy_id(p))
            .map_err(|source| XfrmError::Io { op: op(), source })
    }

    /// Every ESP state with our reqid (others are not ours and are never touched).
    pub fn states(&mut self) -> Result<Vec<Sa>, XfrmError> {
        let parts = self.dump(XFRM_MSG_GETSA, USERSA_INFO_LEN, "dump ESP states")?;
        Ok(parts.iter().filter_map(|m| parse_sa(m)).collect())
    }

    /// Every outbound policy with our mark.
    pub fn policies(&mut self) -> Result<Vec<OutPolicy>, XfrmError> {
        let parts = self.dump(XFRM_MSG_GETPOLICY, USERPOLICY_INFO_LEN, "dump ESP policies")?;
        Ok(parts.iter().filter_map(|m| parse_policy(m)).collect())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let seq = self.next_seq();
        let msg = nlmsg(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, payload);
        self.sock.send(&msg, 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for (hdr_kind, hdr_seq, body) in messages(&self.buf[..n]) {
                if hdr_seq != seq || hdr_kind != NLMSG_ERROR {
                    continue;
                }
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(|| io::Error::other("short netlink error"))?;
                return if errno == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-errno))
                };
            }
        }
    }

    /// The payloads of every message of a dump, each at least `min_len` long.
    fn dump(&mut self, kind: u16, min_len: usize, op: &str) -> Result<Vec<Vec<u8>>, XfrmError> {
        let io_err = |source| XfrmError::Io {
            op: op.to_string(),
            source,
        };
        let seq = self.next_seq();
        // No payload: the kernel would read one as filter attributes.
        let msg = nlmsg(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, &[]);
        self.sock.send(&msg, 0).map_err(io_err)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0).map_err(io_err)?;
            for (hdr_kind, hdr_seq, body) in messages(&self.buf[..n]) {
                if hdr_seq != seq {
                    continue;
                }
                match hdr_kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        return Err(io_err(io::Error::from_raw_os_error(-errno)));
                    }
                    _ if body.len() >= min_len => out.push(body.to_vec()),
                    _ => {
                        return Err(XfrmError::Malformed { op: op.to_string() });
                    }
                }
            }
        }
    }
}

fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// (type, seq, payload) of each netlink message in a datagram; stops at a malformed one.
fn messages(mut data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
        out.push((kind, seq, &data[16..len]));
        data = &data[align4(len).min(data.len())..];
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_addr(buf: &mut [u8], at: usize, ip: Ipv4Addr) {
    buf[at..at + 4].copy_from_slice(&ip.octets());
}

fn get_addr(buf: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3])
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(out.len()), 0);
}

/// (type, value) of each attribute after a fixed header.
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = get_u16(data, 0) as usize;
        if len < 4 || len > data.len() {
            break;
        }
        // The top bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        out.push((get_u16(data, 2) & 0x3fff, &data[4..len]));
        data = &data[align4(len).min(data.len())..];
    }
    out
}

fn mark_attr() -> [u8; 8] {
    let mut m = [0u8; 8];
    put_u32(&mut m, 0, ESP_MARK);
    put_u32(&mut m, 4, ESP_MARK_MASK);
    m
}

/// `xfrm_usersa_info` + the AEAD algorithm: a transport-mode ESP state with our reqid.
pub(super) fn encode_sa(sa: &Sa) -> Vec<u8> {
    let mut info = vec![0u8; USERSA_INFO_LEN];
    // Selector: any IPv4 traffic (the policy selects; a transport state needs no more).
    put_u16(&mut info, 40, AF_INET);
    // id: daddr, spi (network order), proto.
    put_addr(&mut info, 56, sa.id.dst);
    info[72..76].copy_from_slice(&sa.id.spi.to_be_bytes());
    info[76] = IPPROTO_ESP;
    put_addr(&mut info, 80, sa.src);
    // Lifetimes: no byte or packet limit (XFRM_INF), no time limit (0).
    for i in 0..4 {
        info[96 + 8 * i..104 + 8 * i].copy_from_slice(&u64::MAX.to_ne_bytes());
    }
    put_u32(&mut info, 208, REQID);
    put_u16(&mut info, 212, AF_INET);
    info[214] = XFRM_MODE_TRANSPORT;
    // Anti-replay over the last 32 packets (the largest the legacy field holds).
    info[215] = 32;
    let mut aead = vec![0u8; AEAD_HEADER_LEN];
    aead[..AEAD_NAME.len()].copy_from_slice(AEAD_NAME.as_bytes());
    put_u32(&mut aead, 64, (ESP_KEY_BYTES * 8) as u32);
    put_u32(&mut aead, 68, AEAD_ICV_BITS);
    aead.extend_from_slice(&sa.key);
    put_attr(&mut info, XFRMA_ALG_AEAD, &aead);
    info
}

/// `xfrm_usersa_id`: what names a state.
fn encode_sa_id(id: &SaId) -> Vec<u8> {
    let mut b = vec![0u8; USERSA_ID_LEN];
    put_addr(&mut b, 0, id.dst);
    b[16..20].copy_from_slice(&id.spi.to_be_bytes());
    put_u16(&mut b, 20, AF_INET);
    b[22] = IPPROTO_ESP;
    b
}

/// The selector of an outbound policy: UDP from us to the peer's data-path port.
fn encode_selector(b: &mut [u8], p: &OutPolicy) {
    put_addr(b, 0, p.dst);
    put_addr(b, 16, p.src);
    b[32..34].copy_from_slice(&p.port.to_be_bytes());
    b[34..36].copy_from_slice(&u16::MAX.to_be_bytes());
    put_u16(b, 40, AF_INET);
    b[42] = 32;
    b[43] = 32;
    b[44] = IPPROTO_UDP;
}

/// `xfrm_userpolicy_info` + template + mark: packets with our mark to the peer's VXLAN port
/// need ESP with the state whose SPI the template names.
pub(super) fn encode_policy(p: &OutPolicy) -> Vec<u8> {
    let mut info = vec![0u8; USERPOLICY_INFO_LEN];
    encode_selector(&mut info, p);
    for i in 0..4 {
        info[56 + 8 * i..64 + 8 * i].copy_from_slice(&u64::MAX.to_ne_bytes());
    }
    info[160] = XFRM_POLICY_OUT;
    let mut tmpl = vec![0u8; USER_TMPL_LEN];
    put_addr(&mut tmpl, 0, p.dst);
    tmpl[16..20].copy_from_slice(&p.spi.to_be_bytes());
    tmpl[20] = IPPROTO_ESP;
    put_u16(&mut tmpl, 24, AF_INET);
    put_addr(&mut tmpl, 28, p.src);
    put_u32(&mut tmpl, 44, REQID);
    tmpl[48] = XFRM_MODE_TRANSPORT;
    for at in [52, 56, 60] {
        put_u32(&mut tmpl, at, u32::MAX);
    }
    put_attr(&mut info, XFRMA_TMPL, &tmpl);
    put_attr(&mut info, XFRMA_MARK, &mark_attr());
    info
}

/// `xfrm_userpolicy_id` + mark: a marked policy is found only with its mark.
fn encode_policy_id(p: &OutPolicy) -> Vec<u8> {
    let mut id = vec![0u8; USERPOLICY_ID_LEN];
    encode_selector(&mut id, p);
    id[60] = XFRM_POLICY_OUT;
    put_attr(&mut id, XFRMA_MARK, &mark_attr());
    id
}

/// A dumped state, if it is an IPv4 ESP state with our reqid and an AEAD key of our size.
pub(super) fn parse_sa(m: &[u8]) -> Option<Sa> {
    if m.len() < USERSA_INFO_LEN
        || get_u32(m, 208) != REQID
        || m[76] != IPPROTO_ESP
        || get_u16(m, 212) != AF_INET
    {
        return None;
    }
    let mut key = [0u8; ESP_KEY_BYTES];
    // A state of ours without the AEAD key we gave it (changed behind our back) reads as one
    // with an all-zero key, so it is replaced.
    if let Some((_, v)) = attrs(&m[USERSA_INFO_LEN..])
        .into_iter()
        .find(|(k, _)| *k == XFRMA_ALG_AEAD)
    {
        if v.len() == AEAD_HEADER_LEN + ESP_KEY_BYTES
            && v[..AEAD_NAME.len()] == *AEAD_NAME.as_bytes()
            && get_u32(v, 68) == AEAD_ICV_BITS
        {
            key.copy_from_slice(&v[AEAD_HEADER_LEN..]);
        }
    }
    Some(Sa {
        id: SaId {
            dst: get_addr(m, 56),
            spi: u32::from_be_bytes(m[72..76].try_into().expect("4 bytes")),
        },
        src: get_addr(m, 80),
        key,
    })
}

/// A dumped policy, if it is an outbound IPv4 one with our mark and one template.
pub(super) fn parse_policy(m: &[u8]) -> Option<OutPolicy> {
    if m.len() < USERPOLICY_INFO_LEN || m[160] != XFRM_POLICY_OUT || get_u16(m, 40) != AF_INET {
        return None;
    }
    let found = attrs(&m[USERPOLICY_INFO_LEN..]);
    let mark = found.iter().find(|(k, _)| *k == XFRMA_MARK)?.1;
    if mark.len() < 8 || get_u32(mark, 0) != ESP_MARK || get_u32(mark, 4) != ESP_MARK_MASK {
        return None;
    }
    // A policy of ours whose template was changed reads with SPI 0, so it is set again.
    let spi = found
        .iter()
        .find(|(k, v)| *k == XFRMA_TMPL && v.len() == USER_TMPL_LEN)
        .filter(|(_, t)| get_u32(t, 44) == REQID && t[20] == IPPROTO_ESP)
        .map_or(0, |(_, t)| {
            u32::from_be_bytes(t[16..20].try_into().expect("4 bytes"))
        });
    Some(OutPolicy {
        src: get_addr(m, 16),
        dst: get_addr(m, 0),
        port: u16::from_be_bytes(m[32..34].try_into().expect("2 bytes")),
        spi,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa() -> Sa {
        Sa {
            id: SaId {
                dst: Ipv4Addr::new(192, 168, 56, 12),
                spi: 0x1234_5678,
            },
            src: Ipv4Addr::new(192, 168, 56, 11),
            key: *b"0123456789abcdefsalt",
        }
    }

    #[test]
    fn a_state_encodes_as_the_kernel_lays_it_out_and_reads_back() {
        let b = encode_sa(&sa());
        // Fixed part, then one AEAD attribute of 4 + 72 + 20 bytes.
        assert_eq!(b.len(), USERSA_INFO_LEN + 96);
        assert_eq!(&b[56..60], &[192, 168, 56, 12]);
        assert_eq!(&b[72..76], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(b[76], 50);
        assert_eq!(&b[80..84], &[192, 168, 56, 11]);
        assert_eq!(get_u32(&b, 208), REQID);
        assert_eq!(b[214], XFRM_MODE_TRANSPORT);
        assert_eq!(get_u16(&b, USERSA_INFO_LEN), 96);
        assert_eq!(get_u16(&b, USERSA_INFO_LEN + 2), XFRMA_ALG_AEAD);
        assert_eq!(&b[USERSA_INFO_LEN + 4..][..17], b"rfc4106(gcm(aes))");
        assert_eq!(get_u32(&b, USERSA_INFO_LEN + 4 + 64), 160);
        assert_eq!(get_u32(&b, USERSA_INFO_LEN + 4 + 68), 128);
        assert_eq!(parse_sa(&b), Some(sa()));
        // Another reqid is someone else's.
        let mut foreign = b.clone();
        put_u32(&mut foreign, 208, 7);
        assert_eq!(parse_sa(&foreign), None);
    }

    #[test]
    fn a_policy_encodes_its_selector_template_and_mark_and_reads_back() {
        let p = OutPolicy {
            src: Ipv4Addr::new(192, 168, 56, 11),
            dst: Ipv4Addr::new(192, 168, 56, 12),
            port: 4789,
            spi: 0xabcd_0001,
        };
        let b = encode_policy(&p);
        assert_eq!(b.len(), USERPOLICY_INFO_LEN + 4 + USER_TMPL_LEN + 4 + 8);
        assert_eq!(&b[32..36], &[0x12, 0xb5, 0xff, 0xff]);
        assert_eq!((b[42], b[43], b[44]), (32, 32, 17));
        assert_eq!(b[160], XFRM_POLICY_OUT);
        assert_eq!(parse_policy(&b), Some(p.clone()));
        let id = encode_policy_id(&p);
        assert_eq!(id.len(), USERPOLICY_ID_LEN + 12);
        assert_eq!(id[60], XFRM_POLICY_OUT);
        // Without our mark it is not ours.
        let mut foreign = b[..USERPOLICY_INFO_LEN + 4 + USER_TMPL_LEN].to_vec();
        assert_eq!(parse_policy(&foreign), None);
        put_attr(&mut foreign, XFRMA_MARK, &[1, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(parse_policy(&foreign), None);
    }

    #[test]
    fn netlink_messages_split_and_stop_at_garbage() {
        let mut d = nlmsg(NLMSG_DONE, 0, 9, &[1, 2, 3]);
        d.resize(align4(d.len()), 0);
        d.extend(nlmsg(NLMSG_ERROR, 0, 10, &0i32.to_ne_bytes()));
        d.extend_from_slice(&[0xff; 7]);
        let m = messages(&d);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[0].1, m[0].2), (NLMSG_DONE, 9, &[1u8, 2, 3][..]));
        assert_eq!((m[1].0, m[1].1), (NLMSG_ERROR, 10));
    }
}
