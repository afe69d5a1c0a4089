//! The netlink socket (`NETLINK_NETFILTER`, opened inside the namespace it serves) and one
//! batch's exchange on it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::wire::{self, Ack};
use super::Encoded;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// Answers are errors without the original message (capped) and one ACK: small.
const RECV_BUFFER: usize = 64 * 1024;

fn set_int(
    sock: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket with extended and capped ACKs (and a 1 s receive timeout). Call it inside the
/// namespace: the socket stays there.
pub fn open() -> io::Result<OwnedFd> {
    let sock = crate::generation::open()?;
    set_int(&sock, SOL_NETLINK, NETLINK_EXT_ACK, 1)?;
    set_int(&sock, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
    Ok(sock)
}

/// Drops answers left over from an earlier exchange that ended early (a batch failed as a
/// whole, or a wait timed out), so they are not taken for the next one's.
pub fn drain(sock: &OwnedFd, buf: &mut [u8]) {
    // SAFETY: the buffer is valid for its length.
    while unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
}

/// The first error of a failed batch, and how many more came with it.
#[derive(Debug)]
pub struct Failed {
    pub first: Ack,
    pub others: usize,
}

/// Sends the batch and reads its answers: `None` when it was committed, else its errors.
/// An `Err` is a failure to talk to the kernel (the batch may or may not be applied then).
pub fn transact(sock: &OwnedFd, batch: &Encoded) -> io::Result<Option<Failed>> {
    let bytes = batch.bytes();
    // A message larger than the send buffer is refused (EMSGSIZE): grow it for big batches.
    if bytes.len() > 128 * 1024 {
        let size = libc::c_int::try_from(bytes.len() + 4096).unwrap_or(libc::c_int::MAX);
        set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size)
            .or_else(|_| set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, size))?;
    }
    let mut buf = vec![0u8; RECV_BUFFER];
    drain(sock, &mut buf);
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", bytes.len()),
        ));
    }
    let last = batch.commands.last().map(|c| c.seq);
    let ours = |seq: u32| seq.wrapping_sub(batch.begin_seq) <= batch.commands.len() as u32 + 1;
    let mut errors: Vec<Ack> = Vec::new();
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.kind() {
                io::ErrorKind::WouldBlock => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from nf_tables to the batch",
                ),
                _ => err,
            });
        }
        let msgs = wire::messages(&buf[..n as usize]).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer")
        })?;
        let mut done = false;
        for msg in msgs
            .iter()
            .filter(|m| m.kind == wire::NLMSG_ERROR && ours(m.seq))
        {
            let ack = wire::parse_ack(msg).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "malformed netlink error answer")
            })?;
            // The ACK of the last command comes after every other answer; an error answering
            // the batch begin (commit failed, or out of memory) ends it too.
            done |= Some(ack.seq) == last || (ack.seq == batch.begin_seq && ack.errno != 0);
            if ack.errno != 0 {
                errors.push(ack);
            }
        }
        if done {
            break;
        }
    }
    let mut errors = errors.into_iter();
    Ok(errors.next().map(|first| Failed {
        first,
        others: errors.len(),
    }))
}
