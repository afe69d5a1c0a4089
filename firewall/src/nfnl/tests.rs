//! The encoder against bytes nft 1.0.6 sent for the same statements (captured with
//! `strace -e trace=sendmsg -e write=3 nft -f <statements>` in a throwaway namespace holding
//! `fixtures/base.nft`; one message per line, in hex).

use std::net::Ipv4Addr;

use super::wire::{self, HEADERS};
use super::*;
use crate::{Fwmark, PortKey, Ruleset, SboxConfig, SboxService, SboxState};
use proto::model::LbKind;

fn hex(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;

/// What may differ from nft's bytes: sequence numbers, our ACK request on the last command,
/// and nft's own set ids (an identifier of its cache, not of the kernel's set).
fn normalize(msg: &[u8]) -> Vec<u8> {
    let m = wire::messages(msg).unwrap()[0];
    let mut out = msg[..HEADERS].to_vec();
    out[8..12].copy_from_slice(&0u32.to_ne_bytes());
    let flags = m.flags & !wire::NLM_F_ACK;
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    for (kind, nflags, data) in wire::attrs(&msg[HEADERS..]).unwrap() {
        if m.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
            && kind == NFTA_SET_ELEM_LIST_SET_ID
        {
            continue;
        }
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&(kind | nflags).to_ne_bytes());
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    wire::end_msg(&mut out, 0);
    out
}

fn mark(m: u32) -> Fwmark {
    Fwmark::new(m).unwrap()
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 255, 0, last)
}

/// `fixtures/base.nft`: service 256 on 80/tcp with two backends.
fn base() -> SboxState {
    let mut s = SboxState::new(SboxConfig {
        ingress_iface: "eth0".into(),
        ingress_subnet: "10.255.0.0/16".parse().unwrap(),
        ingress_ip: ip(2),
        lb: LbKind::Nftables,
    });
    s.services.insert(
        mark(256),
        SboxService {
            ports: [PortKey::tcp(80)].into(),
            backends: [ip(10), ip(11)].into(),
            vip: None,
        },
    );
    s
}

/// `base` plus service 257: 53/udp, VIP 10.0.9.2, the given backends.
fn with_257(backends: &[u8]) -> SboxState {
    let mut s = base();
    s.services.insert(
        mark(257),
        SboxService {
            ports: [PortKey::udp(53)].into(),
            backends: backends.iter().map(|b| ip(*b)).collect(),
            vip: Some(Ipv4Addr::new(10, 0, 9, 2)),
        },
    );
    s
}

/// The transition renders to the fixture's statements and encodes to nft's bytes for them.
fn check(prev: &SboxState, next: &SboxState, script: &str, captured: &str) {
    let changes = SboxState::changes(prev, next).unwrap().unwrap();
    assert_eq!(changes.to_batch().as_str(), script);
    let ours = encode(&changes, 100);
    let ours: Vec<&[u8]> = wire::messages(ours.bytes())
        .unwrap()
        .iter()
        .map(|m| m.bytes)
        .collect();
    let theirs = hex(captured);
    assert_eq!(ours.len(), theirs.len(), "number of messages");
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            normalize(o),
            normalize(t),
            "message {i}:\n ours   {}\n theirs {}",
            hex_of(o),
            hex_of(t)
        );
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn adding_a_service_encodes_as_nft_does() {
    check(
        &base(),
        &with_257(&[20, 21, 22]),
        include_str!("fixtures/add_service.nft"),
        include_str!("fixtures/add_service.hex"),
    );
}

#[test]
fn removing_a_backend_encodes_as_nft_does() {
    check(
        &with_257(&[20, 21, 22]),
        &with_257(&[20, 22]),
        include_str!("fixtures/remove_backend.nft"),
        include_str!("fixtures/remove_backend.hex"),
    );
}

#[test]
fn removing_a_service_encodes_as_nft_does() {
    check(
        &with_257(&[20, 22]),
        &base(),
        include_str!("fixtures/remove_service.nft"),
        include_str!("fixtures/remove_service.hex"),
    );
}

#[test]
fn the_batch_is_framed_and_only_the_last_command_asks_for_an_ack() {
    let changes = SboxState::changes(&base(), &with_257(&[20, 21, 22]))
        .unwrap()
        .unwrap();
    let batch = encode(&changes, 40);
    let msgs = wire::messages(batch.bytes()).unwrap();
    assert_eq!(msgs.len(), 8);
    assert_eq!(batch.commands(), 6);
    assert_eq!(msgs[0].kind, NFNL_MSG_BATCH_BEGIN);
    assert_eq!(msgs[7].kind, NFNL_MSG_BATCH_END);
    let seqs: Vec<u32> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (40..48).collect::<Vec<_>>());
    let acked: Vec<bool> = msgs
        .iter()
        .map(|m| m.flags & wire::NLM_F_ACK != 0)
        .collect();
    assert_eq!(
        acked,
        [false, false, false, false, false, false, true, false]
    );
}

#[test]
fn an_error_names_the_element_at_fault() {
    let changes = SboxState::changes(&base(), &with_257(&[20, 21, 22]))
        .unwrap()
        .unwrap();
    let batch = encode(&changes, 1);
    let msgs = wire::messages(batch.bytes()).unwrap();
    // The backends message (the third command): find its second element's offset.
    let backends = msgs[3];
    assert_eq!(
        backends.kind,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
    );
    let cmd = &batch.commands[2];
    assert_eq!(cmd.seq, backends.seq);
    let second = cmd.elements[1].0;
    assert_eq!(
        batch.blame(backends.seq, Some(second)),
        "add element ip meshnet backends { 257 . 1 : 10.255.0.21 }"
    );
    // Inside the element (its key, say) still points at it.
    assert_eq!(
        batch.blame(backends.seq, Some(second + 8)),
        "add element ip meshnet backends { 257 . 1 : 10.255.0.21 }"
    );
    // No offset: the whole statement.
    assert_eq!(
        batch.blame(backends.seq, None),
        "add element ip meshnet backends { 257 . 0 : 10.255.0.20, 257 . 1 : 10.255.0.21, \
         257 . 2 : 10.255.0.22 }"
    );
    assert_eq!(
        batch.blame(msgs[1].seq, None),
        "add chain ip meshnet svc-257"
    );
    assert_eq!(
        batch.blame(msgs[0].seq, None),
        "apply a batch of 6 changes to ip meshnet"
    );
}

#[test]
fn many_elements_are_split_over_messages_that_fit() {
    let before = crate::synthetic_sbox(0, 2);
    let after = crate::synthetic_sbox(5000, 2);
    let changes = SboxState::changes(&before, &after).unwrap().unwrap();
    let batch = encode(&changes, 1);
    let msgs = wire::messages(batch.bytes()).unwrap();
    let mut elements = 0;
    for m in msgs
        .iter()
        .filter(|m| m.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM)
    {
        let top = wire::attrs(&m.bytes[HEADERS..]).unwrap();
        let (_, _, list) = top
            .iter()
            .find(|(k, _, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
            .unwrap();
        assert!(list.len() <= MAX_NEST);
        elements += wire::attrs(list).unwrap().len();
    }
    // 10000 backend slots, 5000 ports, 5000 verdicts.
    assert_eq!(elements, 20_000);
    // 5000 chains and their rules, and the element messages.
    assert!(batch.commands() > 10_000);
}
