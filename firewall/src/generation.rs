//! The nf_tables generation of a namespace, asked over netlink (`NFT_MSG_GETGEN`). It moves
//! with every nftables transaction there, whoever makes it, so a table found right at one
//! generation is still right while the generation stands still: the periodic drift check lists
//! a table (an `nft` process per namespace) only when it moved.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use netns::Netns;

use crate::nfnl::wire::{self, HEADERS, NLMSG_ERROR, NLM_F_REQUEST};
use crate::{Error, Result};

const NETLINK_NETFILTER: libc::c_int = 12;
/// `(NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN`, and the answer's `| NFT_MSG_NEWGEN`.
const GETGEN: u16 = (10 << 8) | 16;
const NEWGEN: u16 = (10 << 8) | 15;
const NFTA_GEN_ID: u16 = 1;

/// The current nf_tables generation of `ns`.
pub fn generation(ns: &Netns) -> Result<u32> {
    let name = || ns.path().display().to_string();
    let io_err = |cause| Error::Io {
        action: "ask the nf_tables generation",
        ns: name(),
        cause,
    };
    // A netlink socket stays in the namespace it was made in.
    let sock = ns
        .run(open)
        .map_err(|cause| Error::Netns {
            action: "ask the nf_tables generation",
            ns: name(),
            cause,
        })?
        .map_err(io_err)?;
    ask(&sock).map_err(io_err)
}

/// A netfilter netlink socket in the calling thread's namespace, with a 1 s receive timeout.
pub(crate) fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid option struct of the size given.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

pub(crate) fn ask(sock: &OwnedFd) -> io::Result<u32> {
    let mut req = Vec::with_capacity(HEADERS);
    let start = wire::begin_msg(&mut req, GETGEN, NLM_F_REQUEST, 1, 0, 0);
    wire::end_msg(&mut req, start);
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

/// The generation id in a `NEWGEN` answer; the kernel's error for an error answer.
fn parse(reply: &[u8]) -> io::Result<u32> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected GETGEN answer");
    let messages = wire::messages(reply).ok_or_else(bad)?;
    let msg = messages.first().ok_or_else(bad)?;
    match msg.kind {
        NEWGEN => {}
        NLMSG_ERROR => {
            let ack = wire::parse_ack(msg).ok_or_else(bad)?;
            return Err(io::Error::from_raw_os_error(ack.errno));
        }
        _ => return Err(bad()),
    }
    let attrs = wire::attrs(msg.bytes.get(HEADERS..).ok_or_else(bad)?).ok_or_else(bad)?;
    let (_, _, id) = attrs
        .into_iter()
        .find(|(kind, _, value)| *kind == NFTA_GEN_ID && value.len() >= 4)
        .ok_or_else(bad)?;
    Ok(u32::from_be_bytes(id[..4].try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NEWGEN answer as the kernel sends it: id, then the pid and name of the last writer.
    fn newgen(id: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&NEWGEN.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&(NFTA_GEN_ID | 0x4000).to_ne_bytes());
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&77u32.to_be_bytes());
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn the_generation_is_read_from_a_newgen_answer() {
        assert_eq!(parse(&newgen(4242)).unwrap(), 4242);
    }

    #[test]
    fn errors_and_garbage_are_errors() {
        let mut err = newgen(1)[..20].to_vec();
        err[0..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&err).unwrap_err().raw_os_error(), Some(libc::EPERM));
        for cut in [0, 3, 10, 19, 22] {
            assert!(parse(&newgen(1)[..cut]).is_err(), "cut at {cut}");
        }
    }
}
