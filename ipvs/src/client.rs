use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr as NlAddr};

use crate::error::{BatchError, Error};
use crate::types::{
    decode_destination, decode_family_id, decode_info, decode_service, decode_timeouts,
    encode_dest_key, encode_key, Destination, DestinationEntry, Info, Service, ServiceEntry,
    ServiceKey, TimeoutChange, Timeouts,
};
use crate::wire::{self, Reply, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

pub type Result<T, E = Error> = std::result::Result<T, E>;

const IPVS_GENL_VERSION: u8 = 1;
const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_SET_CONFIG: u8 = 12;
const CMD_GET_CONFIG: u8 = 13;
const CMD_GET_INFO: u8 = 15;
const CMD_FLUSH: u8 = 17;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Receive buffer for one datagram. The kernel sizes dump datagrams after the largest
/// buffer a reader has offered, up to 32 KiB, so 64 KiB holds any reply whole and gets
/// the biggest dump chunks (fewest round trips).
const RX_BUF: usize = 64 * 1024;
/// Requests per send in a batch. Each is acked separately and the kernel drops acks that
/// overflow the socket's receive buffer, so the batch is bounded to keep the unread acks
/// (a few hundred bytes of buffer each) far below the buffer size.
const BATCH: usize = 128;
/// Socket receive buffer we ask for (root may exceed net.core.rmem_max).
const SO_RCVBUF_SIZE: libc::c_int = 4 << 20;

/// One change to the IPVS table, for [`Client::apply`] (or the single-change methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    AddService(&'a Service),
    UpdateService(&'a Service),
    DeleteService(&'a ServiceKey),
    AddDestination(&'a ServiceKey, &'a Destination),
    UpdateDestination(&'a ServiceKey, &'a Destination),
    DeleteDestination(&'a ServiceKey, SocketAddr),
}

impl Op<'_> {
    fn cmd(&self) -> u8 {
        match self {
            Op::AddService(_) => CMD_NEW_SERVICE,
            Op::UpdateService(_) => CMD_SET_SERVICE,
            Op::DeleteService(_) => CMD_DEL_SERVICE,
            Op::AddDestination(..) => CMD_NEW_DEST,
            Op::UpdateDestination(..) => CMD_SET_DEST,
            Op::DeleteDestination(..) => CMD_DEL_DEST,
        }
    }

    /// Appends the request for this change, asking for an ack.
    pub(crate) fn encode(&self, buf: &mut Vec<u8>, family: u16, seq: u32) {
        encode_request(
            buf,
            family,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.cmd(),
            |buf| match *self {
                Op::AddService(s) | Op::UpdateService(s) => s.encode(buf),
                Op::DeleteService(k) => encode_key(k, buf),
                Op::AddDestination(k, d) | Op::UpdateDestination(k, d) => {
                    encode_key(k, buf);
                    d.encode(buf);
                }
                Op::DeleteDestination(k, addr) => {
                    encode_key(k, buf);
                    encode_dest_key(addr, buf);
                }
            },
        );
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Op::AddService(s) | Op::UpdateService(s) => s.validate(),
            _ => Ok(()),
        }
    }

    /// Types the kernel's answer to this change (see `ip_vs_genl_set_cmd`).
    pub(crate) fn error(&self, errno: i32, ext_ack: Option<String>) -> Error {
        let op = self.to_string();
        match (self, errno) {
            // A missing service is ESRCH on SET; ENOENT comes from the scheduler lookup.
            (Op::AddService(s) | Op::UpdateService(s), libc::ENOENT) => Error::UnknownScheduler {
                op,
                scheduler: s.scheduler.clone(),
                errno,
                ext_ack,
            },
            (_, libc::ESRCH | libc::ENOENT) => Error::NotFound { op, errno, ext_ack },
            (_, libc::EEXIST) => Error::Exists { op, errno, ext_ack },
            _ => Error::Kernel { op, errno, ext_ack },
        }
    }
}

impl fmt::Display for Op<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddService(s) => write!(f, "add service {}", s.key),
            Op::UpdateService(s) => write!(f, "update service {}", s.key),
            Op::DeleteService(k) => write!(f, "delete service {k}"),
            Op::AddDestination(k, d) => write!(f, "add destination {} to service {k}", d.addr),
            Op::UpdateDestination(k, d) => {
                write!(f, "update destination {} in service {k}", d.addr)
            }
            Op::DeleteDestination(k, a) => write!(f, "delete destination {a} from service {k}"),
        }
    }
}

/// Appends one generic netlink request whose attributes `attrs` writes.
pub(crate) fn encode_request(
    buf: &mut Vec<u8>,
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    attrs: impl FnOnce(&mut Vec<u8>),
) {
    let start = wire::begin(buf, family, flags, seq, cmd, IPVS_GENL_VERSION);
    attrs(buf);
    wire::finish(buf, start);
}

/// nlctrl's GETFAMILY request for "IPVS".
pub(crate) fn encode_get_family(buf: &mut Vec<u8>, seq: u32) {
    encode_request(
        buf,
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        |b| wire::put_str(b, CTRL_ATTR_FAMILY_NAME, "IPVS"),
    );
}

/// Why a request failed, before it is tied to the operation's description.
#[derive(Debug)]
enum Failure {
    Kernel { errno: i32, ext_ack: Option<String> },
    Io(io::Error),
    Decode(String),
}

impl Failure {
    /// For reads and whole-table changes: ESRCH/ENOENT mean the object is missing.
    fn into_error(self, op: String) -> Error {
        match self {
            Failure::Io(source) => Error::Io { op, source },
            Failure::Decode(reason) => Error::Decode { op, reason },
            Failure::Kernel { errno, ext_ack } => match errno {
                libc::ESRCH | libc::ENOENT => Error::NotFound { op, errno, ext_ack },
                libc::EEXIST => Error::Exists { op, errno, ext_ack },
                _ => Error::Kernel { op, errno, ext_ack },
            },
        }
    }
}

/// A synchronous IPVS client.
///
/// IPVS tables are per network namespace, and a netlink socket stays in the namespace it
/// was opened in: create the client on a thread that is inside the target namespace.
/// The client may then be used from any thread. Requests are serialised by `&mut self`.
pub struct Client {
    sock: Socket,
    family: u16,
    seq: u32,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("fd", &self.sock.as_raw_fd())
            .field("family", &self.family)
            .finish()
    }
}

impl Client {
    /// Opens a generic netlink socket in the calling thread's network namespace and
    /// resolves the IPVS family. Returns [`Error::NoIpvs`] when the kernel has no IPVS.
    pub fn new() -> Result<Client> {
        let op = "open a generic netlink socket for IPVS";
        let io = |source| Error::Io {
            op: op.to_string(),
            source,
        };
        let mut sock = Socket::new(NETLINK_GENERIC).map_err(io)?;
        sock.bind_auto().map_err(io)?;
        sock.connect(&NlAddr::new(0, 0)).map_err(io)?;
        // Error text from the kernel, and acks that echo only the request's header (so a
        // batch's acks stay small). Kernels before 4.12 lack these; that only costs detail.
        optional(sock.set_ext_ack(true)).map_err(io)?;
        optional(sock.set_cap_ack(true)).map_err(io)?;
        set_rcvbuf(&sock).map_err(io)?;
        let mut client = Client {
            sock,
            family: 0,
            seq: 0,
            rx: Vec::with_capacity(RX_BUF),
            tx: Vec::new(),
        };
        client.family = client.resolve_family()?;
        Ok(client)
    }

    /// The generic netlink id of the IPVS family (global, assigned when ip_vs loaded).
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn resolve_family(&mut self) -> Result<u16> {
        let seq = self.next_seq();
        self.tx.clear();
        encode_get_family(&mut self.tx, seq);
        let mut id = None;
        let res = self.exchange(seq, &mut |attrs| {
            id = Some(decode_family_id(attrs)?);
            Ok(())
        });
        let op = || "resolve the generic netlink family \"IPVS\"".to_string();
        match res {
            Err(Failure::Kernel {
                errno: libc::ENOENT,
                ..
            }) => Err(Error::NoIpvs),
            Err(f) => Err(f.into_error(op())),
            Ok(()) => id.ok_or_else(|| Error::Decode {
                op: op(),
                reason: "no family id in the reply".into(),
            }),
        }
    }

    /// IPVS version and connection table size.
    pub fn info(&mut self) -> Result<Info> {
        self.get_one(CMD_GET_INFO, |_| {}, decode_info)
            .map_err(|f| f.into_error("get IPVS info".into()))
    }

    /// Connection timeouts (ipvsadm `--timeout`).
    pub fn timeouts(&mut self) -> Result<Timeouts> {
        self.get_one(CMD_GET_CONFIG, |_| {}, decode_timeouts)
            .map_err(|f| f.into_error("get IPVS timeouts".into()))
    }

    /// Changes connection timeouts (ipvsadm `--set`); `None` fields stay as they are.
    pub fn set_timeouts(&mut self, change: &TimeoutChange) -> Result<()> {
        self.simple(CMD_SET_CONFIG, |b| change.encode(b))
            .map_err(|f| f.into_error(format!("set IPVS timeouts {change:?}")))
    }

    /// Deletes every service in this namespace (ipvsadm `-C`).
    pub fn flush(&mut self) -> Result<()> {
        self.simple(CMD_FLUSH, |_| {})
            .map_err(|f| f.into_error("flush IPVS services".into()))
    }

    pub fn add_service(&mut self, service: &Service) -> Result<()> {
        self.one(Op::AddService(service))
    }

    /// Changes a service's scheduler, flags, timeout and netmask; the key selects it.
    pub fn update_service(&mut self, service: &Service) -> Result<()> {
        self.one(Op::UpdateService(service))
    }

    /// Deletes a service with its destinations.
    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.one(Op::DeleteService(key))
    }

    pub fn add_destination(&mut self, service: &ServiceKey, dest: &Destination) -> Result<()> {
        self.one(Op::AddDestination(service, dest))
    }

    /// Changes a destination's forwarding, weight and thresholds; weight 0 drains it.
    pub fn update_destination(&mut self, service: &ServiceKey, dest: &Destination) -> Result<()> {
        self.one(Op::UpdateDestination(service, dest))
    }

    pub fn delete_destination(&mut self, service: &ServiceKey, addr: SocketAddr) -> Result<()> {
        self.one(Op::DeleteDestination(service, addr))
    }

    /// One service with its counters; [`Error::NotFound`] if it does not exist.
    pub fn get_service(&mut self, key: &ServiceKey) -> Result<ServiceEntry> {
        self.get_one(CMD_GET_SERVICE, |b| encode_key(key, b), decode_service)
            .map_err(|f| f.into_error(format!("get service {key}")))
    }

    /// Every service in this namespace, in the kernel's (hash table) order.
    pub fn services(&mut self) -> Result<Vec<ServiceEntry>> {
        let mut out = Vec::new();
        self.dump(CMD_GET_SERVICE, |_| {}, &mut |attrs| {
            out.push(decode_service(attrs)?);
            Ok(())
        })
        .map_err(|f| f.into_error("list services".into()))?;
        Ok(out)
    }

    /// The destinations of one service; [`Error::NotFound`] if the service does not exist.
    pub fn destinations(&mut self, service: &ServiceKey) -> Result<Vec<DestinationEntry>> {
        let family = service.family();
        let mut out = Vec::new();
        self.dump(CMD_GET_DEST, |b| encode_key(service, b), &mut |attrs| {
            out.push(decode_destination(attrs, family)?);
            Ok(())
        })
        .map_err(|f| f.into_error(format!("list destinations of service {service}")))?;
        if out.is_empty() {
            // The kernel dumps nothing, without error, for a missing service.
            self.get_service(service)?;
        }
        Ok(out)
    }

    /// Applies `ops` in order, up to 128 requests per send, each acknowledged by the
    /// kernel. This is not a transaction: the kernel carries on after a failed change, so
    /// every failure is reported. Invalid input (e.g. a scheduler name too long) is
    /// reported before anything is sent. If the socket itself fails, the failure is
    /// reported against the first unacknowledged change and the rest are not sent.
    pub fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), BatchError> {
        let total = ops.len();
        let invalid: Vec<(usize, Error)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| {
                let reason = op.validate().err()?;
                Some((
                    i,
                    Error::Invalid {
                        op: op.to_string(),
                        reason,
                    },
                ))
            })
            .collect();
        if !invalid.is_empty() {
            return Err(BatchError {
                total,
                failures: invalid,
            });
        }
        let mut failures = Vec::new();
        for (n, chunk) in ops.chunks(BATCH).enumerate() {
            let base = n * BATCH;
            if let Err((i, f)) = self.apply_chunk(chunk, &mut |i, errno, ext_ack| {
                failures.push((base + i, chunk[i].error(errno, ext_ack)));
            }) {
                let op = chunk[i].to_string();
                failures.push((base + i, f.into_error(op)));
                break;
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            failures.sort_by_key(|(i, _)| *i);
            Err(BatchError { total, failures })
        }
    }

    /// Sends one chunk and waits for all its acks, reporting kernel refusals to `failed`.
    /// A socket or framing failure ends the chunk: `Err((first unacked index, failure))`.
    fn apply_chunk(
        &mut self,
        chunk: &[Op<'_>],
        failed: &mut dyn FnMut(usize, i32, Option<String>),
    ) -> Result<(), (usize, Failure)> {
        self.tx.clear();
        let first_seq = self.seq.wrapping_add(1);
        for op in chunk {
            let seq = self.next_seq();
            op.encode(&mut self.tx, self.family, seq);
        }
        self.send_tx().map_err(|e| (0, Failure::Io(e)))?;
        let mut acked = vec![false; chunk.len()];
        let mut pending = chunk.len();
        let first_unacked = |acked: &[bool]| acked.iter().position(|a| !a).unwrap_or(0);
        while pending > 0 {
            if let Err(f) = self.recv() {
                return Err((first_unacked(&acked), f));
            }
            for msg in wire::messages(&self.rx) {
                let reply = msg.and_then(|m| Ok((m.seq, m.reply()?)));
                let (seq, reply) =
                    reply.map_err(|e| (first_unacked(&acked), Failure::Decode(e)))?;
                let i = seq.wrapping_sub(first_seq) as usize;
                if i >= chunk.len() || acked[i] {
                    continue; // a late reply to an earlier, abandoned request
                }
                match reply {
                    Reply::Ack => {}
                    Reply::Failed { errno, ext_ack } => failed(i, errno, ext_ack),
                    Reply::Data { .. } | Reply::Done | Reply::Noop => continue,
                }
                acked[i] = true;
                pending -= 1;
            }
        }
        Ok(())
    }

    fn one(&mut self, op: Op<'_>) -> Result<()> {
        self.apply(&[op]).map_err(BatchError::into_first)
    }

    /// A request without reply data, acknowledged.
    fn simple(&mut self, cmd: u8, attrs: impl FnOnce(&mut Vec<u8>)) -> Result<(), Failure> {
        let seq = self.start(cmd, NLM_F_REQUEST | NLM_F_ACK, attrs);
        self.exchange(seq, &mut |_| Ok(()))
    }

    /// A request answered by one message, decoded by `decode`.
    fn get_one<T>(
        &mut self,
        cmd: u8,
        attrs: impl FnOnce(&mut Vec<u8>),
        decode: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<T, Failure> {
        let seq = self.start(cmd, NLM_F_REQUEST | NLM_F_ACK, attrs);
        let mut out = None;
        self.exchange(seq, &mut |a| {
            out = Some(decode(a)?);
            Ok(())
        })?;
        out.ok_or_else(|| Failure::Decode("the kernel sent no reply message".into()))
    }

    /// A dump: every reply message goes to `each`, across as many datagrams as it takes.
    fn dump(
        &mut self,
        cmd: u8,
        attrs: impl FnOnce(&mut Vec<u8>),
        each: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), Failure> {
        let seq = self.start(cmd, NLM_F_REQUEST | NLM_F_DUMP, attrs);
        self.exchange(seq, each)
    }

    fn start(&mut self, cmd: u8, flags: u16, attrs: impl FnOnce(&mut Vec<u8>)) -> u32 {
        let seq = self.next_seq();
        self.tx.clear();
        encode_request(&mut self.tx, self.family, flags, seq, cmd, attrs);
        seq
    }

    /// Sends `self.tx` and hands reply messages for `seq` to `on_data` until the ack or
    /// the end of the dump. A message that fails to decode does not stop the reading: an
    /// unfinished dump would leave the socket busy for the next one.
    fn exchange(
        &mut self,
        seq: u32,
        on_data: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), Failure> {
        self.send_tx().map_err(Failure::Io)?;
        let mut bad = None;
        loop {
            self.recv()?;
            for msg in wire::messages(&self.rx) {
                let msg = msg.map_err(Failure::Decode)?;
                if msg.seq != seq {
                    continue;
                }
                match msg.reply().map_err(Failure::Decode)? {
                    Reply::Data { attrs, .. } => {
                        if let Err(e) = on_data(attrs) {
                            bad.get_or_insert(e);
                        }
                    }
                    Reply::Ack | Reply::Done => {
                        return bad.map_or(Ok(()), |e| Err(Failure::Decode(e)))
                    }
                    Reply::Failed { errno, ext_ack } => {
                        return Err(Failure::Kernel { errno, ext_ack })
                    }
                    Reply::Noop => {}
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send_tx(&mut self) -> io::Result<()> {
        loop {
            match self.sock.send(&self.tx, 0) {
                Ok(n) if n == self.tx.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "sent {n} of {} bytes",
                        self.tx.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one datagram into `self.rx`.
    fn recv(&mut self) -> Result<(), Failure> {
        loop {
            self.rx.clear();
            // MSG_TRUNC makes recv return the datagram's real size, so a cut one is caught.
            match self.sock.recv(&mut self.rx, libc::MSG_TRUNC) {
                Ok(n) if n > self.rx.len() => {
                    return Err(Failure::Decode(format!(
                        "a {n}-byte datagram exceeded the {}-byte receive buffer",
                        self.rx.len()
                    )))
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }
}

/// Treats "option not supported by this kernel" as success.
fn optional(res: io::Result<()>) -> io::Result<()> {
    match res {
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(()),
        other => other,
    }
}

/// Room for a batch's acks and large dump chunks. SO_RCVBUFFORCE (CAP_NET_ADMIN, which
/// IPVS needs anyway) passes net.core.rmem_max; without it we get what SO_RCVBUF allows.
fn set_rcvbuf(sock: &Socket) -> io::Result<()> {
    let size = SO_RCVBUF_SIZE;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        sock.set_rx_buf_sz(size)
    }
}
