//! Encoding and decoding against datagrams captured from a real kernel (Debian's 6.1 in a
//! QEMU guest) talking to ipvsadm 1.31; see tests/fixtures/README.md for how they were made.
//! Everything is native-endian on the wire, and the fixtures are from x86-64.
#![cfg(target_endian = "little")]

use std::net::SocketAddr;
use std::num::NonZeroU32;

use crate::client::{encode_get_family, encode_request, Op};
use crate::types::*;
use crate::wire::{self, parse_attrs, Reply, NLM_F_DUMP, NLM_F_REQUEST};
use crate::Error;

/// The IPVS family id the guest kernel assigned (0x20), as the fixtures carry it.
const FAMILY: u16 = 0x20;
const SEQ: u32 = 7;

/// The datagrams of a fixture: `(true, bytes)` for those ipvsadm sent, `(false, ..)` for
/// the kernel's.
fn fixture(text: &str) -> Vec<(bool, Vec<u8>)> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (dir, hex) = l.split_once(' ').expect("direction and hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (dir == ">", bytes)
        })
        .collect()
}

fn sent(text: &str, n: usize) -> Vec<u8> {
    fixture(text)
        .into_iter()
        .filter(|(s, _)| *s)
        .nth(n)
        .expect("sent datagram")
        .1
}

fn received(text: &str, n: usize) -> Vec<u8> {
    fixture(text)
        .into_iter()
        .filter(|(s, _)| !*s)
        .nth(n)
        .expect("received datagram")
        .1
}

/// Our request equals ipvsadm's byte for byte, except the sequence number and port id
/// (bytes 8..16 of the header), which differ per process and run.
fn assert_same_request(ours: &[u8], theirs: &[u8]) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "length\nours   {ours:02x?}\ntheirs {theirs:02x?}"
    );
    assert_eq!(ours[..8], theirs[..8], "header");
    assert_eq!(ours[16..], theirs[16..], "payload");
}

/// The replies in one received datagram, each checked to answer `seq`.
fn replies(datagram: &[u8]) -> Vec<Reply<'_>> {
    wire::messages(datagram)
        .map(|m| m.and_then(|m| m.reply()).expect("valid message"))
        .collect()
}

fn seq_of(datagram: &[u8]) -> u32 {
    u32::from_ne_bytes(datagram[8..12].try_into().unwrap())
}

fn op_bytes(op: Op<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    op.encode(&mut buf, FAMILY, SEQ);
    buf
}

fn fwm256() -> ServiceKey {
    ServiceKey::Fwmark {
        family: Family::Ipv4,
        mark: 256,
    }
}

fn tcp_service() -> Service {
    Service {
        key: ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: "10.0.0.1:80".parse().unwrap(),
        },
        scheduler: "wrr".into(),
        flags: ServiceFlags::PERSISTENT,
        timeout: 300,
        netmask: 24,
    }
}

fn udp6_service() -> Service {
    Service {
        key: ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: "[2001:db8::1]:53".parse().unwrap(),
        },
        scheduler: "sh".into(),
        flags: ServiceFlags::PERSISTENT,
        timeout: 60,
        netmask: 64,
    }
}

const RESOLVE: &str = include_str!("../tests/fixtures/resolve_family.txt");
const ADD_SERVICE_FWM: &str = include_str!("../tests/fixtures/add_service_fwm.txt");
const ADD_SERVICE_TCP: &str = include_str!("../tests/fixtures/add_service_tcp.txt");
const ADD_SERVICE_UDP6: &str = include_str!("../tests/fixtures/add_service_udp6.txt");
const ADD_DEST_FWM: &str = include_str!("../tests/fixtures/add_dest_fwm.txt");
const ADD_DEST_TCP: &str = include_str!("../tests/fixtures/add_dest_tcp.txt");
const ADD_DEST_UDP6: &str = include_str!("../tests/fixtures/add_dest_udp6.txt");
const ADD_DEST_DUP: &str = include_str!("../tests/fixtures/add_dest_dup.txt");
const ADD_SERVICE_BOGUS: &str = include_str!("../tests/fixtures/add_service_bogus.txt");
const EDIT_MISSING: &str = include_str!("../tests/fixtures/edit_dest_missing_service.txt");
const SET_TIMEOUTS: &str = include_str!("../tests/fixtures/set_timeouts.txt");
const LIST_TIMEOUTS: &str = include_str!("../tests/fixtures/list_timeouts.txt");
const LIST: &str = include_str!("../tests/fixtures/list_services.txt");

#[test]
fn family_lookup_matches_ipvsadm_and_decodes_the_id() {
    let mut ours = Vec::new();
    encode_get_family(&mut ours, SEQ);
    assert_same_request(&ours, &sent(RESOLVE, 0));
    let reply = received(RESOLVE, 0);
    let [Reply::Data { cmd: 1, attrs }] = replies(&reply)[..] else {
        panic!("expected one CTRL_CMD_NEWFAMILY message");
    };
    assert_eq!(decode_family_id(attrs), Ok(FAMILY));
    assert_eq!(replies(&received(RESOLVE, 1)), [Reply::Ack]);
}

#[test]
fn new_service_requests_match_ipvsadm() {
    // The first exchange of each command file is ipvsadm's GET_INFO; the second the change.
    let fwm = Service::new(fwm256(), "rr");
    assert_same_request(&op_bytes(Op::AddService(&fwm)), &sent(ADD_SERVICE_FWM, 1));
    let tcp = tcp_service();
    assert_same_request(&op_bytes(Op::AddService(&tcp)), &sent(ADD_SERVICE_TCP, 1));
    let udp6 = udp6_service();
    assert_same_request(&op_bytes(Op::AddService(&udp6)), &sent(ADD_SERVICE_UDP6, 1));
    for f in [ADD_SERVICE_FWM, ADD_SERVICE_TCP, ADD_SERVICE_UDP6] {
        assert_eq!(replies(&received(f, 1)), [Reply::Ack]);
    }
}

/// A nest's attribute values, indexed by attribute type.
type AttrTable = Vec<Option<Vec<u8>>>;

/// The SERVICE and DEST nests of a NEW_DEST request.
fn dest_request_nests(request: &[u8]) -> (AttrTable, AttrTable) {
    let owned = |t: &[Option<&[u8]>]| t.iter().map(|a| a.map(<[u8]>::to_vec)).collect();
    let top = parse_attrs::<3>(&request[20..]).unwrap();
    let svc = parse_attrs::<16>(top[1].unwrap()).unwrap();
    let dest = parse_attrs::<16>(top[2].unwrap()).unwrap();
    (owned(&svc), owned(&dest))
}

#[test]
fn new_dest_requests_carry_ipvsadms_attributes() {
    // ipvsadm also sends the service's settings and zeroed tunnel attributes, which the
    // kernel ignores for NEW_DEST; every attribute we send must equal ipvsadm's.
    let tcp = tcp_service();
    let cases = [
        (
            ADD_DEST_FWM,
            fwm256(),
            Destination::new("10.0.0.2:0".parse().unwrap(), Forward::Masq, 1),
        ),
        (
            ADD_DEST_TCP,
            tcp.key,
            Destination {
                upper_threshold: 100,
                lower_threshold: 10,
                ..Destination::new("127.0.0.1:8080".parse().unwrap(), Forward::Masq, 5)
            },
        ),
        (
            ADD_DEST_UDP6,
            udp6_service().key,
            Destination::new("[2001:db8::2]:53".parse().unwrap(), Forward::Tunnel, 2),
        ),
    ];
    for (file, key, dest) in cases {
        let ours = op_bytes(Op::AddDestination(&key, &dest));
        let theirs = sent(file, 1);
        assert_eq!(ours[16..20], theirs[16..20], "genl header");
        let (our_svc, our_dest) = dest_request_nests(&ours);
        let (their_svc, their_dest) = dest_request_nests(&theirs);
        for (kind, value) in our_svc.iter().enumerate().filter(|(_, v)| v.is_some()) {
            assert_eq!(value, &their_svc[kind], "service attribute {kind}");
        }
        for (kind, value) in our_dest.iter().enumerate().filter(|(_, v)| v.is_some()) {
            assert_eq!(value, &their_dest[kind], "destination attribute {kind}");
        }
        // The identifying service attributes, and everything NEW_DEST needs, are there.
        let key_attrs = if key == fwm256() { 2 } else { 4 };
        assert_eq!(our_svc.iter().filter(|v| v.is_some()).count(), key_attrs);
        assert_eq!(our_dest.iter().filter(|v| v.is_some()).count(), 7);
        assert_eq!(replies(&received(file, 1)), [Reply::Ack]);
    }
}

#[test]
fn duplicate_destination_is_exists() {
    let reply = received(ADD_DEST_DUP, 1);
    let [Reply::Failed { errno, ref ext_ack }] = replies(&reply)[..] else {
        panic!("expected an error reply");
    };
    assert_eq!(errno, libc::EEXIST);
    let dest = Destination::new("10.0.0.2:0".parse().unwrap(), Forward::Masq, 1);
    let err = Op::AddDestination(&fwm256(), &dest).error(errno, ext_ack.clone());
    assert!(matches!(err, Error::Exists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "add destination 10.0.0.2:0 to service FWM 256: File exists (errno 17)"
    );
    assert_eq!(err.errno(), Some(17));
}

#[test]
fn unknown_scheduler_is_enoent_on_new_service() {
    let reply = received(ADD_SERVICE_BOGUS, 1);
    let [Reply::Failed { errno, ref ext_ack }] = replies(&reply)[..] else {
        panic!("expected an error reply");
    };
    assert_eq!(errno, libc::ENOENT);
    let svc = Service::new(
        ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: "10.0.0.9:80".parse().unwrap(),
        },
        "bogus",
    );
    assert_same_request(&op_bytes(Op::AddService(&svc)), &sent(ADD_SERVICE_BOGUS, 1));
    let err = Op::AddService(&svc).error(errno, ext_ack.clone());
    assert!(matches!(&err, Error::UnknownScheduler { scheduler, .. } if scheduler == "bogus"));
    assert_eq!(
        err.to_string(),
        "add service TCP 10.0.0.9:80: unknown scheduler \"bogus\" (no kernel module ip_vs_bogus): No such file or directory (errno 2)"
    );
}

#[test]
fn missing_service_is_not_found() {
    let reply = received(EDIT_MISSING, 1);
    let [Reply::Failed { errno, ref ext_ack }] = replies(&reply)[..] else {
        panic!("expected an error reply");
    };
    assert_eq!(errno, libc::ESRCH);
    let key = ServiceKey::Addr {
        protocol: Protocol::Tcp,
        addr: "10.0.0.7:80".parse().unwrap(),
    };
    let dest = Destination::new("10.0.0.3:80".parse().unwrap(), Forward::Masq, 1);
    let err = Op::UpdateDestination(&key, &dest).error(errno, ext_ack.clone());
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "update destination 10.0.0.3:80 in service TCP 10.0.0.7:80: No such process (errno 3)"
    );
}

#[test]
fn timeouts_encode_and_decode() {
    let change = TimeoutChange {
        tcp: NonZeroU32::new(900),
        tcp_fin: NonZeroU32::new(120),
        udp: NonZeroU32::new(300),
    };
    let mut ours = Vec::new();
    encode_request(
        &mut ours,
        FAMILY,
        NLM_F_REQUEST | wire::NLM_F_ACK,
        SEQ,
        12,
        |b| change.encode(b),
    );
    assert_same_request(&ours, &sent(SET_TIMEOUTS, 1));
    assert_eq!(replies(&received(SET_TIMEOUTS, 1)), [Reply::Ack]);

    let reply = received(LIST_TIMEOUTS, 1);
    let [Reply::Data { cmd: 12, attrs }] = replies(&reply)[..] else {
        panic!("expected SET_CONFIG as the reply to GET_CONFIG");
    };
    // ipvsadm_timeout.out: "Timeout (tcp tcpfin udp): 900 120 300"
    assert_eq!(
        decode_timeouts(attrs),
        Ok(Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        })
    );

    // None is sent as 0, which the kernel reads as "unchanged".
    let mut partial = Vec::new();
    TimeoutChange {
        udp: NonZeroU32::new(5),
        ..Default::default()
    }
    .encode(&mut partial);
    let t = parse_attrs::<7>(&partial).unwrap();
    assert_eq!(
        [t[4], t[5], t[6]],
        [
            Some(&[0u8; 4][..]),
            Some(&[0; 4][..]),
            Some(&5u32.to_ne_bytes()[..])
        ]
    );
}

#[test]
fn info_decodes() {
    let reply = received(LIST, 0);
    let [Reply::Data { cmd: 14, attrs }] = replies(&reply)[..] else {
        panic!("expected SET_INFO as the reply to GET_INFO");
    };
    // ipvsadm_list.out: "IP Virtual Server version 1.2.1 (size=4096)"
    assert_eq!(
        decode_info(attrs),
        Ok(Info {
            version: (1, 2, 1),
            conn_table_size: 4096
        })
    );
}

#[test]
fn service_dump_decodes_as_ipvsadm_printed_it() {
    // Request: GET_SERVICE with NLM_F_DUMP and no attributes, like ipvsadm's.
    let theirs = sent(LIST, 1);
    let mut ours = Vec::new();
    encode_request(
        &mut ours,
        FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        SEQ,
        4,
        |_| {},
    );
    assert_eq!(ours[16..], theirs[16..]);

    let seq = seq_of(&theirs);
    let reply = received(LIST, 1);
    assert!(wire::messages(&reply).all(|m| m.unwrap().seq == seq));
    let mut entries = Vec::new();
    for r in replies(&reply) {
        match r {
            Reply::Data { cmd: 1, attrs } => entries.push(decode_service(attrs).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(replies(&received(LIST, 2)), [Reply::Done]);
    let services: Vec<_> = entries.iter().map(|e| e.service.clone()).collect();
    // ipvsadm_list.out, in the kernel's hash table order (ipvsadm sorts its output).
    assert_eq!(
        services,
        [udp6_service(), tcp_service(), Service::new(fwm256(), "rr")]
    );
    // ipvsadm_stats.out: TCP 10.0.0.1:80  2 conns, 2/2 packets, 120/80 bytes.
    let s = entries[1].stats;
    assert_eq!(
        (
            s.conns,
            s.in_packets,
            s.out_packets,
            s.in_bytes,
            s.out_bytes
        ),
        (2, 2, 2, 120, 80)
    );
    assert_eq!(entries[2].stats, Stats::default());
}

#[test]
fn destination_dumps_decode_as_ipvsadm_printed_them() {
    // Sent datagrams: GET_INFO, GET_SERVICE dump, then GET_DEST per service.
    // Request: GET_DEST dump with the service's identifying attributes, like ipvsadm's.
    let mut ours = Vec::new();
    encode_request(&mut ours, FAMILY, NLM_F_REQUEST | NLM_F_DUMP, SEQ, 8, |b| {
        encode_key(&tcp_service().key, b)
    });
    assert_eq!(ours[16..], sent(LIST, 2)[16..]);

    // Every datagram answering sent datagram `n` (same sequence number and port id).
    let answer = |n: usize| -> Vec<Vec<u8>> {
        let id = sent(LIST, n)[8..16].to_vec();
        fixture(LIST)
            .into_iter()
            .filter(|(s, d)| !*s && d[8..16] == id[..])
            .map(|(_, d)| d)
            .collect()
    };
    let decode_all = |n: usize, family: Family| -> Vec<DestinationEntry> {
        let datagrams = answer(n);
        let mut out = Vec::new();
        let mut done = false;
        for r in datagrams.iter().flat_map(|d| replies(d)) {
            match r {
                Reply::Data { cmd: 5, attrs } => {
                    out.push(decode_destination(attrs, family).unwrap())
                }
                Reply::Done => done = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(done, "the dump ends with NLMSG_DONE");
        out
    };
    // ipvsadm_list.out / _stats.out / _thresholds.out / _persistent.out, in ipvsadm's
    // order: TCP 10.0.0.1:80, UDP [2001:db8::1]:53, FWM 256.
    let tcp_dests = decode_all(2, Family::Ipv4);
    assert_eq!(tcp_dests.len(), 1);
    let d = tcp_dests[0];
    assert_eq!(
        d.destination,
        Destination {
            upper_threshold: 100,
            lower_threshold: 10,
            ..Destination::new("127.0.0.1:8080".parse().unwrap(), Forward::Masq, 5)
        }
    );
    // 0 active, 2 inactive, 1 persistence template.
    assert_eq!(
        (d.active_conns, d.inactive_conns, d.persistent_conns),
        (0, 2, 1)
    );
    let st = d.stats;
    assert_eq!(
        (
            st.conns,
            st.in_packets,
            st.out_packets,
            st.in_bytes,
            st.out_bytes
        ),
        (2, 2, 2, 120, 80)
    );
    let udp_dests = decode_all(3, Family::Ipv6);
    assert_eq!(
        udp_dests.iter().map(|d| d.destination).collect::<Vec<_>>(),
        [Destination::new(
            "[2001:db8::2]:53".parse().unwrap(),
            Forward::Tunnel,
            2
        )]
    );
    let fwm_dests = decode_all(4, Family::Ipv4);
    assert_eq!(
        fwm_dests.iter().map(|d| d.destination).collect::<Vec<_>>(),
        [Destination::new(
            "10.0.0.2:0".parse().unwrap(),
            Forward::Masq,
            1
        )]
    );
}

#[test]
fn batch_frames_requests_back_to_back() {
    let key = fwm256();
    let svc = Service::new(key, "rr");
    let dest = Destination::new("10.255.0.5:0".parse().unwrap(), Forward::Masq, 1);
    let mut buf = Vec::new();
    Op::AddService(&svc).encode(&mut buf, FAMILY, 1);
    Op::AddDestination(&key, &dest).encode(&mut buf, FAMILY, 2);
    Op::DeleteDestination(&key, dest.addr).encode(&mut buf, FAMILY, 3);
    let msgs: Vec<_> = wire::messages(&buf).map(Result::unwrap).collect();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    let cmds: Vec<u8> = msgs.iter().map(|m| m.payload[0]).collect();
    assert_eq!(cmds, [1, 5, 7]);
    // DEL_DEST carries only what identifies the destination.
    let top = parse_attrs::<3>(&msgs[2].payload[4..]).unwrap();
    let d = parse_attrs::<16>(top[2].unwrap()).unwrap();
    assert_eq!(d.iter().filter(|a| a.is_some()).count(), 3);
}

#[test]
fn extended_ack_message_is_read() {
    // NLMSG_ERROR, flags NLM_F_CAPPED | NLM_F_ACK_TLVS: errno, the request's header, then
    // NLMSGERR_ATTR_MSG (the layout of linux/netlink.h; IPVS itself sets no messages).
    let mut m = Vec::new();
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes());
    m.extend_from_slice(&0x300u16.to_ne_bytes());
    m.extend_from_slice(&9u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
    m.extend_from_slice(&[0; 16]);
    wire::put_str(&mut m, 1, "Attribute failed policy validation");
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    assert_eq!(
        replies(&m),
        [Reply::Failed {
            errno: libc::EINVAL,
            ext_ack: Some("Attribute failed policy validation".into())
        }]
    );
    let svc = Service::new(fwm256(), "rr");
    let err = Op::UpdateService(&svc).error(
        libc::EINVAL,
        Some("Attribute failed policy validation".into()),
    );
    assert_eq!(
        err.to_string(),
        "update service FWM 256: Invalid argument (errno 22): Attribute failed policy validation"
    );
}

#[test]
fn keys_print_like_ipvsadm() {
    let v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
    assert_eq!(fwm256().to_string(), "FWM 256");
    assert_eq!(
        ServiceKey::Fwmark {
            family: Family::Ipv6,
            mark: 1
        }
        .to_string(),
        "FWM 1 IPv6"
    );
    assert_eq!(
        ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: v6
        }
        .to_string(),
        "UDP [2001:db8::1]:53"
    );
}

#[test]
fn invalid_services_are_refused_before_sending() {
    let mut s = Service::new(fwm256(), "a-scheduler-name-too-long");
    assert!(s.validate().unwrap_err().contains("scheduler"));
    s.scheduler = "rr".into();
    s.netmask = 33;
    assert!(s.validate().unwrap_err().contains("netmask"));
    s.netmask = 0;
    assert_eq!(s.validate(), Ok(()));
}
