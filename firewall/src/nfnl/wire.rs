//! Netlink bytes: message headers, `nfgenmsg`, attributes and nests, built in place in one
//! buffer (host byte order for the netlink headers, as the kernel reads them); and the few
//! reply fields we read back.

/// `struct nlmsghdr` (16 bytes) then `struct nfgenmsg` (4 bytes).
pub const HEADERS: usize = 20;
pub const NLMSG_ERROR: u16 = 2;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// In an error reply: the original message's payload was left out (`NETLINK_CAP_ACK`).
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an error reply: extended-ACK attributes follow (`NETLINK_EXT_ACK`).
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Starts a message; returns where it starts, for [`end_msg`].
pub fn begin_msg(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, resource id in network order.
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

/// Writes the length of the message that starts at `start`.
pub fn end_msg(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

pub fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    pad(buf);
}

/// A NUL-terminated string attribute.
pub fn attr_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    buf.extend_from_slice(&((4 + s.len() + 1) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    pad(buf);
}

pub fn attr_be32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    attr(buf, kind, &value.to_be_bytes());
}

/// Opens a nested attribute; returns where it starts, for [`end_nest`].
pub fn begin_nest(buf: &mut Vec<u8>, kind: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    start
}

/// Writes the length of the nest that starts at `start`. Nests longer than an attribute
/// length can say are the caller's to avoid (see `MAX_NEST`).
pub fn end_nest(buf: &mut [u8], start: usize) {
    let len = buf.len() - start;
    debug_assert!(len <= usize::from(u16::MAX), "nest of {len} bytes");
    buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One message of a buffer holding several.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, headers included.
    pub bytes: &'a [u8],
}

/// Splits a buffer into its messages; `None` if a length is out of bounds.
pub fn messages(mut buf: &[u8]) -> Option<Vec<Msg<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (msg, rest) = first_message(buf)?;
        out.push(msg);
        buf = rest;
    }
    Some(out)
}

/// The messages of a buffer up to the first whose length is out of bounds: what is whole of
/// a datagram of notifications.
pub fn whole_messages(mut buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    std::iter::from_fn(move || {
        let (msg, rest) = first_message(buf)?;
        buf = rest;
        Some(msg)
    })
}

/// The first message of `buf` and what follows it; `None` if its length is out of bounds.
fn first_message(buf: &[u8]) -> Option<(Msg<'_>, &[u8])> {
    let len = u32_at(buf, 0)? as usize;
    if len < 16 || len > buf.len() {
        return None;
    }
    let msg = Msg {
        kind: u16_at(buf, 4)?,
        flags: u16_at(buf, 6)?,
        seq: u32_at(buf, 8)?,
        bytes: &buf[..len],
    };
    // Messages are 4-byte aligned.
    let next = (len + 3) & !3;
    Some((msg, buf.get(next..).unwrap_or(&[])))
}

/// The attributes in `buf` as (type without flags, flags, payload); `None` if malformed.
pub fn attrs(mut buf: &[u8]) -> Option<Vec<(u16, u16, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0)?);
        let kind = u16_at(buf, 2)?;
        if len < 4 || len > buf.len() {
            return None;
        }
        out.push((kind & NLA_TYPE_MASK, kind & !NLA_TYPE_MASK, &buf[4..len]));
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Some(out)
}

/// An `NLMSG_ERROR` reply: the errno (0 for an ACK), and from the extended ACK the kernel's
/// message and the offset, in the original message, of the attribute at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub seq: u32,
    pub errno: i32,
    pub message: Option<String>,
    pub offset: Option<u32>,
}

const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

pub fn parse_ack(msg: &Msg<'_>) -> Option<Ack> {
    let b = msg.bytes;
    let errno = -(u32_at(b, 16)? as i32);
    let mut ack = Ack {
        seq: msg.seq,
        errno,
        message: None,
        offset: None,
    };
    if msg.flags & NLM_F_ACK_TLVS == 0 {
        return Some(ack);
    }
    // nlmsgerr: the error, then the original header, then (uncapped) its payload.
    let orig_len = if msg.flags & NLM_F_CAPPED != 0 {
        16
    } else {
        (u32_at(b, 20)? as usize + 3) & !3
    };
    for (kind, _, data) in attrs(b.get(20 + orig_len..)?)? {
        match kind {
            NLMSGERR_ATTR_MSG => {
                let text = data.split(|c| *c == 0).next().unwrap_or_default();
                ack.message = Some(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS if data.len() >= 4 => ack.offset = u32_at(data, 0),
            _ => {}
        }
    }
    Some(ack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip() {
        let mut buf = Vec::new();
        let start = begin_msg(&mut buf, 0x0a03, NLM_F_REQUEST, 7, 2, 0);
        attr_str(&mut buf, 1, "meshnet");
        let nest = begin_nest(&mut buf, 4);
        attr_be32(&mut buf, 1, 3);
        end_nest(&mut buf, nest);
        end_msg(&mut buf, start);
        assert_eq!(buf.len(), HEADERS + 12 + 12);
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].kind, msgs[0].seq), (0x0a03, 7));
        let top = attrs(&buf[HEADERS..]).unwrap();
        assert_eq!(top[0], (1, 0, &b"meshnet\0"[..]));
        assert_eq!((top[1].0, top[1].1), (4, NLA_F_NESTED));
        assert_eq!(attrs(top[1].2).unwrap(), vec![(1, 0, &[0, 0, 0, 3][..])]);
        assert!(messages(&buf[..10]).is_none());
    }

    #[test]
    fn an_error_reply_gives_errno_message_and_offset() {
        // NLMSG_ERROR, capped, with extended ACK: ENOENT, "no such element", offset 44.
        let mut b = Vec::new();
        let start = begin_msg(&mut b, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 5, 0, 0);
        b.truncate(start + 16);
        b.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        attr_str(&mut b, NLMSGERR_ATTR_MSG, "no such element");
        attr(&mut b, NLMSGERR_ATTR_OFFS, &44u32.to_ne_bytes());
        end_msg(&mut b, start);
        let msgs = messages(&b).unwrap();
        assert_eq!(
            parse_ack(&msgs[0]).unwrap(),
            Ack {
                seq: 5,
                errno: libc::ENOENT,
                message: Some("no such element".into()),
                offset: Some(44),
            }
        );
    }
}
