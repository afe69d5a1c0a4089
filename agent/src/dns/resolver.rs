//! What to do with one query from one task (pure): answer it from the cluster's records, send
//! it upstream, refuse it as malformed, or drop it.

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use rand::seq::SliceRandom;
use rand::Rng;

use super::records::{Found, Records};

/// Seconds a client may keep a cluster answer. Short, so a change is seen at once (Docker's
/// 600 s is what keeps its clients on stale addresses).
pub const TTL: u32 = 2;

/// A UDP reply is never larger than this, whatever the client's EDNS size says.
pub const MAX_UDP_REPLY: usize = 4096;

/// The result a query is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A cluster name with addresses of the asked type.
    Answered,
    /// A cluster name without a record of the asked type: an empty NOERROR.
    Empty,
    Forwarded,
    /// No upstream answered, or too many forwards in flight.
    ServFail,
    /// Unparseable, or not one question.
    FormErr,
    /// An opcode other than QUERY.
    NotImp,
    /// Not answerable at all: too short for a header, or a response.
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Answered,
        Outcome::Empty,
        Outcome::Forwarded,
        Outcome::ServFail,
        Outcome::FormErr,
        Outcome::NotImp,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Empty => "empty",
            Outcome::Forwarded => "forwarded",
            Outcome::ServFail => "servfail",
            Outcome::FormErr => "formerr",
            Outcome::NotImp => "notimp",
            Outcome::Dropped => "dropped",
        }
    }
}

#[derive(Debug)]
pub enum Decision {
    /// Send these bytes back. `cacheable`: the same query bytes get the same reply (but for
    /// the id) until the records change; false for shuffled answers and refusals.
    Reply {
        bytes: Vec<u8>,
        outcome: Outcome,
        cacheable: bool,
    },
    /// Not a name of the cluster for this task: the query goes upstream as it came. `failed` is
    /// the reply to send if no upstream answers.
    Forward {
        failed: Vec<u8>,
    },
    Drop,
}

/// Decides what to do with `query` from `task`, which came over TCP or UDP. A UDP reply is
/// bounded by [`udp_limit`]: an answer that does not fit goes back empty with TC set, so the
/// client asks again over TCP.
pub fn decide<R: Rng>(
    records: &Records,
    task: &str,
    query: &[u8],
    tcp: bool,
    rng: &mut R,
) -> Decision {
    let Ok(header) = Header::from_bytes(query) else {
        return Decision::Drop;
    };
    if header.message_type() == MessageType::Response {
        return Decision::Drop;
    }
    let reply_to = |rcode, outcome| Decision::Reply {
        bytes: encode(&error_reply(&header, None, rcode)),
        outcome,
        cacheable: false,
    };
    let Ok(msg) = Message::from_vec(query) else {
        return reply_to(ResponseCode::FormErr, Outcome::FormErr);
    };
    if msg.op_code() != OpCode::Query {
        return reply_to(ResponseCode::NotImp, Outcome::NotImp);
    }
    let [q] = msg.queries() else {
        return reply_to(ResponseCode::FormErr, Outcome::FormErr);
    };
    let forward = || Decision::Forward {
        failed: encode(&error_reply(&header, Some(q), ResponseCode::ServFail)),
    };
    if q.query_class() != DNSClass::IN {
        return forward();
    }
    let Some(found) = records.find(task, &q.name().to_ascii()) else {
        return forward();
    };
    let mut reply = error_reply(&header, Some(q), ResponseCode::NoError);
    reply.set_authoritative(true);
    if msg.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_REPLY as u16);
        reply.set_edns(edns);
    }
    let mut cacheable = true;
    match (found, q.query_type()) {
        (Found::Addrs(entry), RecordType::A) => {
            let mut addrs = entry.addrs.clone();
            if entry.shuffle {
                addrs.shuffle(rng);
                cacheable = false;
            }
            for a in addrs {
                let rec = Record::from_rdata(q.name().clone(), TTL, RData::A(A(a)));
                reply.add_answer(rec);
            }
        }
        (Found::Ptr(target), RecordType::PTR) => {
            // A name the manager let through that is not a valid DNS name gets no record.
            if let Ok(mut target) = Name::from_ascii(target) {
                target.set_fqdn(true);
                let rec = Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(target)));
                reply.add_answer(rec);
            }
        }
        // AAAA, MX, … of a cluster name: the name exists, without that record.
        _ => {}
    }
    let outcome = if reply.answers().is_empty() {
        Outcome::Empty
    } else {
        Outcome::Answered
    };
    let limit = if tcp {
        u16::MAX as usize
    } else {
        udp_limit(&msg)
    };
    let mut bytes = encode(&reply);
    if bytes.len() > limit {
        bytes = encode(&reply.truncate());
    }
    Decision::Reply {
        bytes,
        outcome,
        cacheable,
    }
}

/// The largest UDP reply the client takes: 512, or its EDNS size up to [`MAX_UDP_REPLY`].
pub fn udp_limit(msg: &Message) -> usize {
    msg.extensions().as_ref().map_or(512, |e| {
        (e.max_payload() as usize).clamp(512, MAX_UDP_REPLY)
    })
}

/// A reply with the query's id, opcode and RD bit, and its question if there is one.
fn error_reply(header: &Header, query: Option<&Query>, rcode: ResponseCode) -> Message {
    let mut m = Message::error_msg(header.id(), header.op_code(), rcode);
    m.set_recursion_desired(header.recursion_desired())
        .set_recursion_available(true);
    if let Some(q) = query {
        m.add_query(q.clone());
    }
    m
}

fn encode(m: &Message) -> Vec<u8> {
    // Built here from parsed parts: encoding cannot fail short of a bug, and then the client
    // gets no reply rather than the agent a panic.
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::tests::{ip, sample};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::net::Ipv4Addr;

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(4242)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    fn run(name: &str, rtype: RecordType) -> Decision {
        let r = Records::build(&sample());
        let q = query(name, rtype).to_vec().unwrap();
        decide(&r, "client.1.k", &q, false, &mut StdRng::seed_from_u64(1))
    }

    fn reply(d: Decision) -> (Message, Outcome) {
        match d {
            Decision::Reply { bytes, outcome, .. } => (Message::from_vec(&bytes).unwrap(), outcome),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .map(|r| match r.data() {
                RData::A(a) => a.0,
                other => panic!("not an A record: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_service_answers_its_vip_with_a_short_ttl_and_the_question_echoed() {
        let (m, outcome) = reply(run("WeB.", RecordType::A));
        assert_eq!(outcome, Outcome::Answered);
        assert_eq!(m.id(), 4242);
        assert_eq!(m.message_type(), MessageType::Response);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.authoritative() && m.recursion_desired() && m.recursion_available());
        assert_eq!(m.queries()[0].name().to_ascii(), "WeB.");
        assert_eq!(a_records(&m), [ip("10.0.9.2")]);
        assert_eq!(m.answers()[0].name().to_ascii(), "WeB.");
        assert!(m.answers().iter().all(|r| r.ttl() == TTL && TTL <= 5));
        let (m, _) = reply(run("tasks.www", RecordType::A));
        let mut got = a_records(&m);
        got.sort();
        assert_eq!(got, [ip("10.0.9.3"), ip("10.0.9.4")]);
    }

    #[test]
    fn dnsrr_order_changes_across_queries() {
        let r = Records::build(&sample());
        let q = query("rr", RecordType::A).to_vec().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let orders: std::collections::BTreeSet<Vec<Ipv4Addr>> = (0..40)
            .map(|_| reply(decide(&r, "client.1.k", &q, false, &mut rng)).0)
            .map(|m| a_records(&m))
            .collect();
        assert_eq!(
            orders.len(),
            2,
            "both orders of two tasks show up: {orders:?}"
        );
        assert!(orders.iter().all(|o| o.len() == 2));
    }

    #[test]
    fn other_types_of_a_cluster_name_get_an_empty_noerror() {
        for t in [
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::PTR,
        ] {
            let (m, outcome) = reply(run("web", t));
            assert_eq!(
                (outcome, m.response_code()),
                (Outcome::Empty, ResponseCode::NoError)
            );
            assert!(m.answers().is_empty());
        }
    }

    #[test]
    fn ptr_answers_the_task_and_the_vip() {
        let (m, outcome) = reply(run("4.9.0.10.in-addr.arpa.", RecordType::PTR));
        assert_eq!(outcome, Outcome::Answered);
        match m.answers()[0].data() {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "web.2.b."),
            other => panic!("{other:?}"),
        }
        let (m, _) = reply(run("2.9.0.10.in-addr.arpa.", RecordType::PTR));
        assert!(matches!(m.answers()[0].data(), RData::PTR(p) if p.0.to_ascii() == "web."));
    }

    #[test]
    fn names_outside_the_cluster_or_the_tasks_networks_are_forwarded() {
        for name in [
            "example.com.",
            "other.",
            "tasks.other",
            "2.8.0.10.in-addr.arpa.",
            "8.8.8.8.in-addr.arpa.",
        ] {
            match run(name, RecordType::A) {
                Decision::Forward { failed } => {
                    let m = Message::from_vec(&failed).unwrap();
                    assert_eq!((m.id(), m.response_code()), (4242, ResponseCode::ServFail));
                    assert_eq!(m.queries().len(), 1);
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // Another class (CHAOS) is not ours either.
        let r = Records::build(&sample());
        let mut q = query("web", RecordType::A);
        q.queries_mut()[0].set_query_class(DNSClass::CH);
        let d = decide(
            &r,
            "client.1.k",
            &q.to_vec().unwrap(),
            false,
            &mut rand::rng(),
        );
        assert!(matches!(d, Decision::Forward { .. }));
    }

    #[test]
    fn malformed_queries_get_formerr_or_are_dropped() {
        let r = Records::build(&sample());
        let decide = |b: &[u8]| decide(&r, "client.1.k", b, false, &mut rand::rng());
        let good = query("web", RecordType::A).to_vec().unwrap();
        // Too short for a header: nobody to answer to.
        assert!(matches!(decide(&good[..11]), Decision::Drop));
        assert!(matches!(decide(&[]), Decision::Drop));
        // A header and a cut question: FORMERR with the id.
        for cut in [12, 14, good.len() - 1] {
            let (m, outcome) = reply(decide(&good[..cut]));
            assert_eq!(
                (m.id(), m.response_code(), outcome),
                (4242, ResponseCode::FormErr, Outcome::FormErr)
            );
        }
        // Two questions, or none.
        let mut two = query("web", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("www").unwrap(),
            RecordType::A,
        ));
        let (m, _) = reply(decide(&two.to_vec().unwrap()));
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        let mut none = query("web", RecordType::A);
        none.take_queries();
        let (m, _) = reply(decide(&none.to_vec().unwrap()));
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // A response is never answered (no reflection loops).
        let mut resp = query("web", RecordType::A);
        resp.set_message_type(MessageType::Response);
        assert!(matches!(decide(&resp.to_vec().unwrap()), Decision::Drop));
        // Another opcode.
        let mut notify = query("web", RecordType::A);
        notify.set_op_code(OpCode::Notify);
        let (m, outcome) = reply(decide(&notify.to_vec().unwrap()));
        assert_eq!(
            (m.response_code(), outcome),
            (ResponseCode::NotImp, Outcome::NotImp)
        );
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated_and_whole_over_tcp() {
        let mut a = sample();
        let svc = &mut a.networks[0].services[1];
        svc.tasks = (0..60)
            .map(|i| proto::agent::ServiceTask {
                task_id: format!("t{i}"),
                slot: i,
                addr: Ipv4Addr::new(10, 0, 9, 10 + i as u8),
            })
            .collect();
        let r = Records::build(&a);
        let q = query("tasks.rr", RecordType::A).to_vec().unwrap();
        let (m, _) = reply(decide(&r, "client.1.k", &q, false, &mut rand::rng()));
        assert!(m.truncated() && m.answers().is_empty());
        let (m, _) = reply(decide(&r, "client.1.k", &q, true, &mut rand::rng()));
        assert!(!m.truncated());
        assert_eq!(m.answers().len(), 60);
        // An EDNS client that takes 4096 bytes gets them all over UDP too.
        let mut e = query("tasks.rr", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        e.set_edns(edns);
        let (m, _) = reply(decide(
            &r,
            "client.1.k",
            &e.to_vec().unwrap(),
            false,
            &mut rand::rng(),
        ));
        assert_eq!((m.truncated(), m.answers().len()), (false, 60));
        assert!(m.extensions().is_some());
    }

    proptest::proptest! {
        /// Any bytes: a decision, never a panic; a reply always parses and keeps the id.
        #[test]
        fn any_bytes_get_a_decision(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let r = Records::build(&sample());
            if let Decision::Reply { bytes: out, .. } = decide(&r, "client.1.k", &bytes, false, &mut rand::rng()) {
                let m = Message::from_vec(&out).unwrap();
                proptest::prop_assert_eq!(Some(m.id()), bytes.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])));
            }
        }

        /// A good query cut anywhere or with one byte changed: never a panic.
        #[test]
        fn mangled_queries_never_panic(cut in 0usize..64, at in 0usize..64, byte in proptest::num::u8::ANY) {
            let r = Records::build(&sample());
            let mut q = query("tasks.web", RecordType::A).to_vec().unwrap();
            if at < q.len() { q[at] = byte; }
            q.truncate(cut.min(q.len()));
            let _ = decide(&r, "client.1.k", &q, true, &mut rand::rng());
        }
    }
}
