//! A removed backend's stale conntrack entries, deleted over ctnetlink in the namespace that
//! balances: UDP flows, and TCP connections still in SYN_SENT, whose reply comes from the
//! backend. Their next datagram or SYN is then balanced afresh instead of following the entry
//! to a backend that is gone. `conntrack -D` did the same from two child processes per
//! backend, which cost seconds per change in the emulated guest.
//!
//! One dump of the namespace's IPv4 table, filtered here (the kernel's dump filters vary by
//! version), then one DELETE per match, naming it by its original tuple as the dump gave it.
//! An entry gone meanwhile (ENOENT) is not an error.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use netns::Netns;

use crate::nfnl::wire::{self, Msg, HEADERS, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};
use crate::{Error, Result};

/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_*`.
const CT_NEW: u16 = 1 << 8;
const CT_GET: u16 = (1 << 8) | 1;
const CT_DELETE: u16 = (1 << 8) | 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const TCP_CONNTRACK_SYN_SENT: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Deletes the stale entries of `backend` in `ns`; returns how many went.
pub fn delete_stale(ns: &Netns, backend: Ipv4Addr) -> Result<u64> {
    const ACTION: &str = "delete stale conntrack entries";
    let name = || ns.path().display().to_string();
    // A netlink socket stays in the namespace it was made in.
    let sock = ns
        .run(crate::generation::open)
        .map_err(|cause| Error::Netns {
            action: ACTION,
            ns: name(),
            cause,
        })?
        .map_err(|cause| Error::Io {
            action: ACTION,
            ns: name(),
            cause,
        })?;
    let io_err = |cause| Error::Io {
        action: ACTION,
        ns: name(),
        cause,
    };
    let stale = dump_stale(&sock, backend).map_err(io_err)?;
    let mut deleted = 0;
    for (seq, key) in (2..).zip(&stale) {
        match delete(&sock, seq, key) {
            Ok(()) => deleted += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(deleted)
}

/// A request for the IPv4 table (nfgenmsg: AF_INET, resource 0) carrying `attrs`.
fn request(kind: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADERS + attrs.len());
    let start = wire::begin_msg(
        &mut m,
        kind,
        NLM_F_REQUEST | flags,
        seq,
        libc::AF_INET as u8,
        0,
    );
    m.extend_from_slice(attrs);
    wire::end_msg(&mut m, start);
    m
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The messages of the next datagram on `sock`.
fn recv<'a>(sock: &OwnedFd, buf: &'a mut [u8]) -> io::Result<Vec<Msg<'a>>> {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    wire::messages(&buf[..n as usize]).ok_or_else(|| invalid("truncated message"))
}

/// Dumps the table and returns, for each stale entry of `backend`, the attributes that name it
/// in a DELETE: its original tuple and zone, as the kernel encoded them.
fn dump_stale(sock: &OwnedFd, backend: Ipv4Addr) -> io::Result<Vec<Vec<u8>>> {
    send(sock, &request(CT_GET, NLM_F_DUMP, 1, &[]))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        for msg in recv(sock, &mut buf)? {
            match msg.kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => error_of(&msg)?,
                CT_NEW => out.extend(stale_key(&msg.bytes[16..], backend)),
                _ => {}
            }
        }
    }
}

fn delete(sock: &OwnedFd, seq: u32, key: &[u8]) -> io::Result<()> {
    send(sock, &request(CT_DELETE, NLM_F_ACK, seq, key))?;
    let mut buf = [0u8; 4096];
    loop {
        for msg in recv(sock, &mut buf)? {
            if msg.kind == NLMSG_ERROR && msg.seq == seq {
                return error_of(&msg);
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ctnetlink: {what}"))
}

/// An NLMSG_ERROR message: Ok for an ACK (errno 0), the kernel's error otherwise.
fn error_of(msg: &Msg<'_>) -> io::Result<()> {
    match wire::parse_ack(msg).ok_or_else(|| invalid("short error message"))? {
        ack if ack.errno == 0 => Ok(()),
        ack => Err(io::Error::from_raw_os_error(ack.errno)),
    }
}

/// The value of attribute `kind` among `data`'s attributes.
fn attr(data: &[u8], kind: u16) -> Option<&[u8]> {
    wire::attrs(data)?
        .into_iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, _, value)| value)
}

/// For an entry (a CT_NEW payload: nfgenmsg, then attributes) whose reply comes from `backend`
/// and that is UDP, or TCP in SYN_SENT: the attributes naming it for a DELETE.
fn stale_key(payload: &[u8], backend: Ipv4Addr) -> Option<Vec<u8>> {
    let body = payload.get(4..)?;
    let reply = attr(body, CTA_TUPLE_REPLY)?;
    let src = attr(attr(reply, CTA_TUPLE_IP)?, CTA_IP_V4_SRC)?;
    if src != backend.octets() {
        return None;
    }
    let proto = *attr(attr(reply, CTA_TUPLE_PROTO)?, CTA_PROTO_NUM)?.first()?;
    let stale = match proto {
        IPPROTO_UDP => true,
        IPPROTO_TCP => {
            attr(body, CTA_PROTOINFO)
                .and_then(|p| attr(p, CTA_PROTOINFO_TCP))
                .and_then(|t| attr(t, CTA_PROTOINFO_TCP_STATE))
                .and_then(|s| s.first())
                == Some(&TCP_CONNTRACK_SYN_SENT)
        }
        _ => false,
    };
    if !stale {
        return None;
    }
    // Encoded again as they came (nested flag included), so they name the same entry.
    let mut key = Vec::new();
    for (kind, flags, value) in wire::attrs(body)? {
        if kind == CTA_TUPLE_ORIG || kind == CTA_ZONE {
            wire::attr(&mut key, kind | flags, value);
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: u16 = 0x8000;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn tuple(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let ip = [nla(CTA_IP_V4_SRC, &src), nla(2, &dst)].concat();
        let l4 = [
            nla(CTA_PROTO_NUM, &[proto]),
            nla(2, &sport.to_be_bytes()),
            nla(3, &dport.to_be_bytes()),
        ]
        .concat();
        [
            nla(CTA_TUPLE_IP | NESTED, &ip),
            nla(CTA_TUPLE_PROTO | NESTED, &l4),
        ]
        .concat()
    }

    /// An entry as a dump gives it: client 10.255.0.2:40000 → VIP 10.255.0.100:80, DNATed to
    /// `backend`, with a TCP state when given.
    fn entry(backend: [u8; 4], proto: u8, tcp_state: Option<u8>) -> Vec<u8> {
        let mut m = vec![libc::AF_INET as u8, 0, 0, 0];
        let orig = tuple([10, 255, 0, 2], [10, 255, 0, 100], proto, 40000, 80);
        m.extend(nla(CTA_TUPLE_ORIG | NESTED, &orig));
        let reply = tuple(backend, [10, 255, 0, 2], proto, 80, 40000);
        m.extend(nla(CTA_TUPLE_REPLY | NESTED, &reply));
        m.extend(nla(3, &0x188u32.to_be_bytes()));
        if let Some(state) = tcp_state {
            let tcp = nla(CTA_PROTOINFO_TCP_STATE, &[state]);
            let info = nla(CTA_PROTOINFO_TCP | NESTED, &tcp);
            m.extend(nla(CTA_PROTOINFO | NESTED, &info));
        }
        m.extend(nla(CTA_ZONE, &0u16.to_be_bytes()));
        m
    }

    const GONE: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 7);

    #[test]
    fn udp_and_syn_sent_entries_of_the_backend_are_stale() {
        let udp = entry(GONE.octets(), IPPROTO_UDP, None);
        let key = stale_key(&udp, GONE).expect("stale");
        // The key names the entry by its original tuple and zone, bytes as given.
        let orig = tuple([10, 255, 0, 2], [10, 255, 0, 100], IPPROTO_UDP, 40000, 80);
        let want = [
            nla(CTA_TUPLE_ORIG | NESTED, &orig),
            nla(CTA_ZONE, &0u16.to_be_bytes()),
        ]
        .concat();
        assert_eq!(key, want);
        let syn = entry(GONE.octets(), IPPROTO_TCP, Some(TCP_CONNTRACK_SYN_SENT));
        assert!(stale_key(&syn, GONE).is_some());
    }

    #[test]
    fn established_tcp_and_other_backends_are_kept() {
        let established = entry(GONE.octets(), IPPROTO_TCP, Some(3));
        assert!(stale_key(&established, GONE).is_none());
        let no_state = entry(GONE.octets(), IPPROTO_TCP, None);
        assert!(stale_key(&no_state, GONE).is_none());
        let other = entry([10, 255, 0, 8], IPPROTO_UDP, None);
        assert!(stale_key(&other, GONE).is_none());
        assert!(stale_key(&entry(GONE.octets(), 1, None), GONE).is_none());
    }

    #[test]
    fn truncated_input_is_refused_or_ignored_never_misread() {
        let udp = entry(GONE.octets(), IPPROTO_UDP, None);
        for cut in 0..udp.len() {
            // A cut entry may lose its reply tuple; it never yields a key for another backend.
            if let Some(key) = stale_key(&udp[..cut], GONE) {
                assert!(key.len() < udp.len());
            }
        }
        let mut msg = request(CT_NEW, 0, 7, &udp[4..]);
        let parsed = wire::messages(&msg).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            stale_key(&parsed[0].bytes[16..], GONE),
            stale_key(&udp, GONE)
        );
        let too_long = msg.len() as u32 + 8;
        msg[0..4].copy_from_slice(&too_long.to_ne_bytes());
        assert!(wire::messages(&msg).is_none());
    }

    /// An NLMSG_ERROR message with `code` (0 is an ACK), the original header capped.
    fn error_msg(code: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&5u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn acks_pass_and_kernel_errors_come_back() {
        let ack = error_msg(0);
        assert!(error_of(&wire::messages(&ack).unwrap()[0]).is_ok());
        let enoent = error_msg(-libc::ENOENT);
        let err = error_of(&wire::messages(&enoent).unwrap()[0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let short = &error_msg(0)[..16];
        let mut short = short.to_vec();
        short[0..4].copy_from_slice(&16u32.to_ne_bytes());
        assert!(error_of(&wire::messages(&short).unwrap()[0]).is_err());
    }
}
