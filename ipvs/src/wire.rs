//! Netlink and generic-netlink framing, and the NLA (attribute) codec.
//!
//! Hand-rolled rather than built on netlink-packet-core's message types: we need several
//! requests framed back to back in one send (batches), and the extended-ack TLVs of
//! `NLMSG_ERROR`, which netlink-packet-core 0.9 leaves as raw bytes. Everything here is
//! native-endian except where the protocol says network order.

pub(crate) const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
/// In an `NLMSG_ERROR`: the echoed request was cut to its header (NETLINK_CAP_ACK).
const NLM_F_CAPPED: u16 = 0x100;
/// In an `NLMSG_ERROR` or `NLMSG_DONE`: extended-ack TLVs follow.
const NLM_F_ACK_TLVS: u16 = 0x200;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// Masks out NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute's type.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Starts a generic netlink message at the end of `buf`; returns its offset for [`finish`].
pub(crate) fn begin(
    buf: &mut Vec<u8>,
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
    buf.extend_from_slice(&family.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    buf.extend_from_slice(&[cmd, version, 0, 0]);
    start
}

/// Completes the message started at `start` by writing its length.
pub(crate) fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

pub(crate) fn put(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align(buf.len()), 0);
}

pub(crate) fn put_u16(buf: &mut Vec<u8>, kind: u16, v: u16) {
    put(buf, kind, &v.to_ne_bytes());
}

pub(crate) fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put(buf, kind, &v.to_ne_bytes());
}

/// A NUL-terminated string attribute.
pub(crate) fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    put(buf, kind, &v);
}

/// Opens a nested attribute (flagged NLA_F_NESTED, as ipvsadm's libnl does); close it with
/// [`nest_end`].
pub(crate) fn nest_start(buf: &mut Vec<u8>, kind: u16) -> usize {
    let start = buf.len();
    put(buf, kind | NLA_F_NESTED, &[]);
    start
}

pub(crate) fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Indexes the attributes in `buf` by type, like the kernel's `nla_parse`; types at or above
/// `N` are ignored so that newer kernels' additions do not break decoding.
pub(crate) fn parse_attrs<const N: usize>(mut buf: &[u8]) -> Result<[Option<&[u8]>; N], String> {
    let mut table = [None; N];
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(format!(
                "attribute {kind} has length {len} in {} bytes",
                buf.len()
            ));
        }
        if let Some(slot) = table.get_mut(kind as usize) {
            *slot = Some(&buf[NLA_HDRLEN..len]);
        }
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(table)
}

pub(crate) fn get_u16(v: &[u8]) -> Result<u16, String> {
    v.get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(|| format!("u16 attribute of {} bytes", v.len()))
}

pub(crate) fn get_u32(v: &[u8]) -> Result<u32, String> {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("u32 attribute of {} bytes", v.len()))
}

/// A counter that the kernel sends as u32 or u64 depending on the attribute set.
pub(crate) fn get_uint(v: &[u8]) -> Result<u64, String> {
    match v.len() {
        4 => get_u32(v).map(u64::from),
        8 => {
            let mut b = [0; 8];
            b.copy_from_slice(v);
            Ok(u64::from_ne_bytes(b))
        }
        n => Err(format!("counter attribute of {n} bytes")),
    }
}

pub(crate) fn get_str(v: &[u8]) -> Result<String, String> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec()).map_err(|e| format!("string attribute: {e}"))
}

/// One netlink message out of a received datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NlMsg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<NlMsg<'_>, String>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            let err = format!("netlink message of length {len} in {} bytes", buf.len());
            buf = &[];
            return Some(Err(err));
        }
        let msg = NlMsg {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align(len).min(buf.len())..];
        Some(Ok(msg))
    })
}

/// What a received message means to a waiting request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    /// A generic netlink message: command and attributes.
    Data { cmd: u8, attrs: &'a [u8] },
    /// `NLMSG_ERROR` with error 0.
    Ack,
    /// `NLMSG_ERROR` with a negative errno, or a dump that ended in error.
    Failed { errno: i32, ext_ack: Option<String> },
    /// `NLMSG_DONE`: the end of a dump.
    Done,
    /// Padding the kernel may send (`NLMSG_NOOP`).
    Noop,
}

impl<'a> NlMsg<'a> {
    pub(crate) fn reply(&self) -> Result<Reply<'a>, String> {
        match self.ty {
            NLMSG_NOOP => Ok(Reply::Noop),
            NLMSG_OVERRUN => Err("the kernel reported a netlink overrun".into()),
            NLMSG_ERROR => {
                let errno = -self.code()?;
                if errno == 0 {
                    return Ok(Reply::Ack);
                }
                // The echoed request: just its header when capped, else the whole message.
                let echoed = if self.flags & NLM_F_CAPPED != 0 {
                    NLMSG_HDRLEN
                } else {
                    self.payload
                        .get(4..8)
                        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .unwrap_or(0)
                };
                Ok(Reply::Failed {
                    errno,
                    ext_ack: self.ext_ack(4 + align(echoed))?,
                })
            }
            NLMSG_DONE => {
                // A dump that fails midway reports its error in DONE's payload.
                let errno = if self.payload.len() >= 4 {
                    -self.code()?
                } else {
                    0
                };
                if errno == 0 {
                    Ok(Reply::Done)
                } else {
                    Ok(Reply::Failed {
                        errno,
                        ext_ack: self.ext_ack(4)?,
                    })
                }
            }
            _ => {
                let payload: &'a [u8] = self.payload;
                let attrs = payload.get(GENL_HDRLEN..).ok_or_else(|| {
                    format!("generic netlink message of {} bytes", self.payload.len())
                })?;
                Ok(Reply::Data {
                    cmd: payload[0],
                    attrs,
                })
            }
        }
    }

    fn code(&self) -> Result<i32, String> {
        self.payload
            .get(..4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated netlink error message".to_string())
    }

    /// The extended-ack message text, if the kernel attached one after `offset`.
    fn ext_ack(&self, offset: usize) -> Result<Option<String>, String> {
        if self.flags & NLM_F_ACK_TLVS == 0 {
            return Ok(None);
        }
        let tlvs = self.payload.get(offset..).unwrap_or(&[]);
        let t = parse_attrs::<{ NLMSGERR_ATTR_MSG as usize + 1 }>(tlvs)?;
        t[NLMSGERR_ATTR_MSG as usize].map(get_str).transpose()
    }
}
