//! Fuzzing of every decoder a peer reaches over the network, with proptest on the stable
//! toolchain: agent ↔ manager frames ([`AgentMsg`], [`ManagerMsg`]), meshctl API frames
//! ([`Request`], [`Response`]) and the framing under both ([`proto::wire::read_frame`]).
//!
//! Inputs: arbitrary bytes; a soup of JSON tokens and our tags; valid encodings of random
//! messages, mutated (byte flips, truncations, insertions, removals, duplicated keys, huge
//! numbers, nesting up to 20k deep); and the valid encodings themselves. Properties: a decoder
//! never panics and answers within a bound; a valid encoding decodes to the value encoded;
//! `read_frame` never buffers more than its limit (+ the newline) whatever the chunking and
//! however often it is cancelled, refuses a longer line with `InvalidData` before reading past
//! it, and returns every frame within the limit whole.
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's default, 256, when unset), so the unit
//! tier runs this briefly. A long run:
//!
//! ```text
//! PROPTEST_CASES=200000 cargo test --release -p proto --test fuzz
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proto::agent::{
    AgentMsg, Assignment, EncryptionKeys, EspKey, EspSupport, IngressSpec, LbBackendReport,
    LbReport, LbServiceReport, ManagerMsg, NetworkSpec, Peer, PublishedService, TaskSpec,
    TaskStatus, ESP_KEY_BYTES,
};
use proto::api::{
    IngressSbox, ManagerStatus, NetworkDetail, NetworkEndpoint, NetworkPeer, NodeInfo, NodeLb,
    PublishInfo, PublishedPort, Request, Response, Scale, ServiceInfo, ServiceSpec, TaskEndpoint,
    TaskInfo,
};
use proto::model::{
    Attachment, Availability, Constraint, LbKind, Network, Node, NodeStatus, PortConfig, Protocol,
    PublishMode, Role, TaskState,
};
use proto::{decode_frame, encode_frame, wire::read_frame, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// A decoder that takes longer than this on one input of at most a few hundred KB has a
/// super-linear path worth a look (in a debug build, on a busy 2-core machine).
const SLOW: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Strategies for every message type.

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9._-]{0,12}",
        // Quotes, backslashes, control characters, astral planes: what JSON escapes.
        1 => vec(any::<char>(), 0..8).prop_map(String::from_iter),
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..4)
}

fn ip4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        3 => ip4().prop_map(IpAddr::V4),
        1 => any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn net4() -> impl Strategy<Value = Ipv4Net> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(a), p).unwrap())
}

fn role() -> impl Strategy<Value = Role> {
    select(vec![Role::Manager, Role::Worker])
}

fn availability() -> impl Strategy<Value = Availability> {
    select(vec![
        Availability::Active,
        Availability::Pause,
        Availability::Drain,
    ])
}

fn task_state() -> impl Strategy<Value = TaskState> {
    select(vec![
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Failed,
        TaskState::Shutdown,
        TaskState::Orphaned,
    ])
}

fn protocol() -> impl Strategy<Value = Protocol> {
    select(vec![Protocol::Tcp, Protocol::Udp])
}

fn port_config() -> impl Strategy<Value = PortConfig> {
    (
        protocol(),
        any::<u16>(),
        any::<u16>(),
        select(vec![PublishMode::Ingress, PublishMode::Host]),
    )
        .prop_map(|(protocol, published, target, mode)| PortConfig {
            protocol,
            published,
            target,
            mode,
        })
}

fn published_port() -> impl Strategy<Value = PublishedPort> {
    (protocol(), any::<u16>()).prop_map(|(protocol, published)| PublishedPort {
        protocol,
        published,
    })
}

fn network_spec() -> impl Strategy<Value = NetworkSpec> {
    let peer = (ip4(), text(), ip()).prop_map(|(ip, mac, vtep)| Peer { ip, mac, vtep });
    (
        text(),
        text(),
        net4(),
        net4(),
        any::<u32>(),
        vec(peer, 0..4),
    )
        .prop_map(|(id, name, subnet, gateway, vni, peers)| NetworkSpec {
            id,
            name,
            subnet,
            gateway,
            vni,
            encrypted: vni % 2 == 0,
            peers,
            lb_addr: None,
            draining: vec![],
            services: vec![],
        })
}

fn attachment() -> impl Strategy<Value = Attachment> {
    (text(), net4(), text()).prop_map(|(network_id, addr, mac)| Attachment {
        network_id,
        addr,
        mac,
    })
}

fn assignment() -> impl Strategy<Value = Assignment> {
    let task = (
        text(),
        text(),
        text(),
        text(),
        texts(),
        vec(attachment(), 0..3),
    )
        .prop_map(
            |(id, name, service_id, service_name, command, attachments)| TaskSpec {
                id,
                name,
                service_id,
                service_name,
                command,
                attachments,
                env: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            },
        );
    let ingress = (network_spec(), net4())
        .prop_map(|(network, sbox_addr)| IngressSpec { network, sbox_addr });
    let published = (
        text(),
        text(),
        any::<u32>(),
        vec(port_config(), 0..3),
        vec(ip4(), 0..4),
    )
        .prop_map(
            |(service_id, service_name, fwmark, ports, backends)| PublishedService {
                service_id,
                service_name,
                fwmark,
                ports,
                backends,
                vip: None,
            },
        );
    (
        any::<u64>(),
        vec(network_spec(), 0..3),
        vec(task, 0..3),
        option::of(ingress),
        vec(published, 0..3),
    )
        .prop_map(
            |(revision, networks, tasks, ingress, published)| Assignment {
                revision,
                networks,
                tasks,
                ingress: ingress.map(Box::new),
                published,
                encryption: (revision % 2 == 0).then(|| EncryptionKeys {
                    keys: vec![EspKey {
                        tag: revision as u32,
                        secret: [revision as u8; ESP_KEY_BYTES],
                    }],
                    send: revision as u32,
                }),
            },
        )
}

fn lb_services() -> impl Strategy<Value = Vec<LbServiceReport>> {
    let backend = (ip4(), any::<u32>()).prop_map(|(ip, weight)| LbBackendReport { ip, weight });
    vec(
        (any::<u32>(), vec(backend, 0..3))
            .prop_map(|(fwmark, backends)| LbServiceReport { fwmark, backends }),
        0..3,
    )
}

fn agent_msg() -> impl Strategy<Value = AgentMsg> {
    let status = (
        text(),
        task_state(),
        option::of(text()),
        option::of(any::<u32>()),
        option::of(text()),
    )
        .prop_map(|(task_id, state, error, pid, netns)| TaskStatus {
            task_id,
            state,
            error,
            pid,
            netns,
            health: None,
            health_log: None,
        });
    prop_oneof![
        (any::<u32>(), text(), ip(), option::of(net4())).prop_map(
            |(version, hostname, advertise_addr, gwbridge_subnet)| AgentMsg::Hello {
                version,
                hostname,
                esp: match version % 3 {
                    0 => None,
                    1 => Some(EspSupport::Supported),
                    _ => Some(EspSupport::Unsupported {
                        reason: format!("{advertise_addr}"),
                    }),
                },
                advertise_addr,
                gwbridge_subnet,
            }
        ),
        Just(AgentMsg::GetCa),
        (any::<u32>(), text(), text(), text(), ip()).prop_map(
            |(version, token, csr, hostname, advertise_addr)| AgentMsg::Join {
                version,
                token,
                csr,
                hostname,
                advertise_addr,
            }
        ),
        text().prop_map(|csr| AgentMsg::Renew { csr }),
        status.prop_map(AgentMsg::TaskStatus),
        any::<u64>().prop_map(|revision| AgentMsg::Applied { revision }),
        Just(AgentMsg::Heartbeat),
        (lb_kind(), lb_services())
            .prop_map(|(backend, services)| AgentMsg::LbState(LbReport { backend, services })),
    ]
}

fn manager_msg() -> impl Strategy<Value = ManagerMsg> {
    prop_oneof![
        (any::<u32>(), text(), role()).prop_map(|(version, node_id, role)| ManagerMsg::Welcome {
            version,
            node_id,
            role
        }),
        text().prop_map(|reason| ManagerMsg::Refused { reason }),
        assignment().prop_map(|a| ManagerMsg::Assign(std::sync::Arc::new(a))),
        text().prop_map(|cert| ManagerMsg::Ca { cert }),
        (text(), text()).prop_map(|(node_id, cert)| ManagerMsg::Joined { node_id, cert }),
        text().prop_map(|cert| ManagerMsg::Certificate { cert }),
        option::of(text()).prop_map(|leader| ManagerMsg::NotLeader { leader }),
        vec(text(), 0..4).prop_map(|addrs| ManagerMsg::Managers { addrs }),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(text(), text(), 0..3)
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        text(),
        any::<u64>(),
        texts(),
        vec(constraint(), 0..3),
        texts(),
        vec(port_config(), 0..3),
    )
        .prop_map(
            |(name, replicas, networks, constraints, command, ports)| ServiceSpec {
                name,
                mode: Default::default(),
                replicas,
                networks,
                constraints,
                command,
                ports,
                endpoint_mode: Default::default(),
                aliases: Default::default(),
                env: Default::default(),
                update_config: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::NodeLs),
        text().prop_map(|node| Request::NodeInspect { node }),
        (text(), option::of(availability()), labels(), texts()).prop_map(
            |(node, availability, label_add, label_rm)| Request::NodeUpdate {
                node,
                availability,
                label_add,
                label_rm,
            }
        ),
        (text(), any::<bool>()).prop_map(|(node, force)| Request::NodeRm { node, force }),
        (text(), role()).prop_map(|(node, role)| Request::NodeRole { node, role }),
        (role(), any::<bool>()).prop_map(|(role, rotate)| Request::JoinToken { role, rotate }),
        (text(), text(), option::of(text())).prop_map(|(name, driver, subnet)| {
            Request::NetworkCreate {
                options: subnet.iter().map(|s| (s.clone(), String::new())).collect(),
                name,
                driver,
                subnet,
            }
        }),
        Just(Request::NetworkLs),
        text().prop_map(|network| Request::NetworkInspect { network }),
        text().prop_map(|network| Request::NetworkRm { network }),
        texts().prop_map(|networks| Request::NetworkRmMany { networks }),
        service_spec().prop_map(|spec| Request::ServiceCreate { spec }),
        Just(Request::ServiceLs),
        text().prop_map(|service| Request::ServiceInspect { service }),
        text().prop_map(|service| Request::ServicePs { service }),
        (text(), any::<u64>())
            .prop_map(|(service, replicas)| Request::ServiceScale { service, replicas }),
        vec(
            (text(), any::<u64>()).prop_map(|(service, replicas)| Scale { service, replicas }),
            0..3
        )
        .prop_map(|scales| Request::ServiceScaleMany { scales }),
        text().prop_map(|service| Request::ServiceRm { service }),
        texts().prop_map(|services| Request::ServiceRmMany { services }),
        (
            text(),
            vec(port_config(), 0..3),
            vec(published_port(), 0..3)
        )
            .prop_map(
                |(service, publish_add, publish_rm)| Request::ServiceUpdate {
                    service,
                    publish_add,
                    publish_rm,
                    endpoint_mode: None,
                    spec: Default::default(),
                }
            ),
        Just(Request::PublishLs),
        (protocol(), any::<u16>()).prop_map(|(protocol, published)| Request::PublishRm {
            protocol,
            published
        }),
        vec(published_port(), 0..3).prop_map(|ports| Request::PublishRmMany { ports }),
    ]
}

fn node_info() -> impl Strategy<Value = NodeInfo> {
    let node = (
        text(),
        text(),
        ip(),
        role(),
        availability(),
        select(vec![NodeStatus::Ready, NodeStatus::Down]),
        labels(),
    )
        .prop_map(
            |(id, hostname, addr, role, availability, status, labels)| Node {
                id,
                hostname,
                addr,
                role,
                availability,
                status,
                no_encryption: labels.keys().next().cloned(),
                labels,
            },
        );
    (
        node,
        any::<usize>(),
        any::<u64>(),
        any::<u64>(),
        option::of(text()),
        option::of(prop_oneof![
            Just(ManagerStatus::Leader),
            Just(ManagerStatus::Reachable),
            Just(ManagerStatus::Unreachable),
        ]),
    )
        .prop_map(
            |(node, tasks, revision, applied_revision, no_routing_mesh, manager_status)| NodeInfo {
                node,
                tasks,
                revision,
                applied_revision,
                no_routing_mesh,
                manager_status,
            },
        )
}

fn network() -> impl Strategy<Value = Network> {
    (
        text(),
        text(),
        text(),
        net4(),
        ip4(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(id, name, driver, subnet, gateway, vni, ingress)| Network {
                id,
                name,
                driver,
                subnet,
                gateway,
                vni,
                ingress,
                encrypted: !ingress,
            },
        )
}

fn constraint() -> impl Strategy<Value = Constraint> {
    select(vec![
        "node.role==worker",
        "node.hostname!=a",
        "node.labels.zone==b",
    ])
    .prop_map(|c| Constraint::parse(c).unwrap())
}

fn lb_kind() -> impl Strategy<Value = LbKind> {
    prop_oneof![Just(LbKind::Ipvs), Just(LbKind::Nftables)]
}

fn node_lb() -> impl Strategy<Value = NodeLb> {
    (text(), text(), lb_kind(), lb_services()).prop_map(|(node_id, hostname, backend, services)| {
        NodeLb {
            node_id,
            hostname,
            backend,
            services,
        }
    })
}

fn network_detail() -> impl Strategy<Value = NetworkDetail> {
    let endpoint = (
        (text(), text(), text()),
        net4(),
        text(),
        option::of(text()),
        option::of(text()),
    )
        .prop_map(
            |((task_id, task_name, service), addr, mac, node_id, node)| NetworkEndpoint {
                task_id,
                task_name,
                service,
                addr,
                mac,
                node_id,
                node,
            },
        );
    let peer =
        (text(), text(), ip()).prop_map(|(node_id, name, ip)| NetworkPeer { node_id, name, ip });
    let sbox = (text(), text(), net4()).prop_map(|(node_id, hostname, addr)| IngressSbox {
        node_id,
        hostname,
        addr,
    });
    (
        network(),
        any::<u64>(),
        vec(endpoint, 0..3),
        vec(peer, 0..3),
        vec(sbox, 0..3),
        vec(node_lb(), 0..2),
    )
        .prop_map(
            |(network, created_at, endpoints, peers, sboxes, lb)| NetworkDetail {
                network,
                created_at,
                endpoints,
                peers,
                sboxes,
                lb,
            },
        )
}

fn service_info() -> impl Strategy<Value = ServiceInfo> {
    (
        text(),
        service_spec(),
        texts(),
        any::<usize>(),
        any::<u64>(),
        any::<u64>(),
        option::of(any::<u32>()),
        vec(node_lb(), 0..2),
    )
        .prop_map(
            |(id, spec, network_names, running, created_at, updated_at, fwmark, lb)| ServiceInfo {
                id,
                spec,
                network_names,
                running,
                desired: running as u64,
                created_at,
                updated_at,
                fwmark,
                lb,
                virtual_ips: vec![],
                version: 0,
                previous_spec: None,
                update_status: None,
            },
        )
}

fn task_info() -> impl Strategy<Value = TaskInfo> {
    let endpoint = (text(), text(), net4(), text()).prop_map(|(network_id, network, addr, mac)| {
        TaskEndpoint {
            network_id,
            network,
            addr,
            mac,
        }
    });
    (
        (text(), text(), text(), text(), any::<u64>()),
        (option::of(text()), option::of(text())),
        (task_state(), task_state()),
        (
            option::of(text()),
            option::of(any::<u32>()),
            option::of(text()),
        ),
        vec(endpoint, 0..3),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (id, name, service_id, service_name, slot),
                (node_id, node),
                (desired_state, state),
                (error, pid, netns),
                endpoints,
                (created_at, updated_at),
            )| TaskInfo {
                id,
                name,
                service_id,
                service_name,
                slot,
                node_id,
                node,
                desired_state,
                state,
                error,
                pid,
                netns,
                endpoints,
                created_at,
                updated_at,
                spec_version: 0,
                health: None,
            },
        )
}

fn response() -> impl Strategy<Value = Response> {
    let publish_info =
        (text(), text(), port_config()).prop_map(|(service, service_id, port)| PublishInfo {
            service,
            service_id,
            port,
        });
    prop_oneof![
        text().prop_map(|message| Response::Error { message }),
        vec(node_info(), 0..3).prop_map(|nodes| Response::Nodes { nodes }),
        node_info().prop_map(|node| Response::Node { node }),
        vec(network(), 0..3).prop_map(|networks| Response::Networks { networks }),
        network_detail().prop_map(|network| Response::Network { network }),
        vec(service_info(), 0..3).prop_map(|services| Response::Services { services }),
        service_info().prop_map(|service| Response::Service {
            service: Box::new(service)
        }),
        vec(task_info(), 0..3).prop_map(|tasks| Response::Tasks { tasks }),
        vec(publish_info, 0..3).prop_map(|ports| Response::Ports { ports }),
        text().prop_map(|id| Response::Removed { id }),
        (role(), text(), text()).prop_map(|(role, token, manager)| Response::JoinToken {
            role,
            token,
            manager
        }),
        texts().prop_map(|ids| Response::RemovedMany { ids }),
    ]
}

/// A valid frame of any of the four message types, as a peer could send it.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        agent_msg().prop_map(|m| encode_frame(&m)),
        manager_msg().prop_map(|m| encode_frame(&m)),
        request().prop_map(|m| encode_frame(&m)),
        response().prop_map(|m| encode_frame(&m)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Mutations of valid frames.

/// JSON tokens, our tags and field names, and troublemakers, to splice into frames.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\",
    "null",
    "true",
    "false",
    "-",
    "0",
    "-0",
    "1e999",
    "-1",
    "1.5",
    "\"type\"",
    "\"hello\"",
    "\"assign\"",
    "\"join\"",
    "\"task_status\"",
    "\"service_create\"",
    "\"nodes\"",
    "\"revision\"",
    "\"networks\"",
    "\"peers\"",
    "\"spec\"",
    "\"labels\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\uZZZZ\"",
    "\n",
    "\r",
    "\u{feff}",
    "\u{0}",
    "\u{7f}",
    "\u{10ffff}",
    "\u{fffd}",
    "\"10.0.0.1/33\"",
    "\"::1\"",
    "\"1.2.3.4/0\"",
    "\"256.1.1.1\"",
    "18446744073709551616",
    "4294967296",
    "65536",
];

/// Numbers that overflow or do not fit the field they replace.
const HUGE: &[&str] = &[
    "18446744073709551616",
    "18446744073709551615",
    "-9223372036854775809",
    "340282366920938463463374607431768211456",
    "1e308",
    "1e999",
    "-1e999",
    "4294967296",
    "65536",
    "-1",
    "0.5",
    "1E2",
    "99999999999999999999999999999999999999999999999999999999999999999999999999999999",
];

/// What a deep nesting is made of.
const OPENERS: &[&str] = &[
    "[",
    "{\"a\":",
    "{\"type\":\"assign\",\"networks\":[",
    "[{\"x\":",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    Swap {
        a: usize,
        b: usize,
    },
    /// Repeats the `nth` key with another value, as `{"k":1,"k":"x"}`.
    DuplicateKey {
        nth: usize,
        value: &'static str,
    },
    /// Replaces the `nth` run of digits.
    HugeNumber {
        nth: usize,
        number: &'static str,
    },
    /// Opens `depth` arrays or objects at the `nth` value position, closed or not.
    Nest {
        nth: usize,
        depth: usize,
        open: &'static str,
        closed: bool,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        2 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        3 => (
            any::<usize>(),
            prop_oneof![
                select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
                vec(any::<u8>(), 1..8),
            ]
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        2 => (any::<usize>(), select(TOKENS))
            .prop_map(|(nth, value)| Mutation::DuplicateKey { nth, value }),
        2 => (any::<usize>(), select(HUGE))
            .prop_map(|(nth, number)| Mutation::HugeNumber { nth, number }),
        1 => (
            any::<usize>(),
            prop_oneof![1usize..200, 100usize..20_000],
            select(OPENERS),
            any::<bool>()
        )
            .prop_map(|(nth, depth, open, closed)| Mutation::Nest {
                nth,
                depth,
                open,
                closed
            }),
    ]
}

/// Start offsets of the keys (`"key":`) of a compact JSON encoding.
fn key_starts(frame: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, w) in frame.windows(2).enumerate() {
        if (w[0] == b'{' || w[0] == b',') && w[1] == b'"' {
            out.push(i + 1);
        }
    }
    out
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let len = frame.len();
    let pos = |at: usize| if len == 0 { 0 } else { at % (len + 1) };
    match m {
        Mutation::Flip { at, xor } => {
            if len > 0 {
                frame[at % len] ^= xor;
            }
        }
        Mutation::Truncate { at } => frame.truncate(pos(*at)),
        Mutation::Insert { at, bytes } => {
            let at = pos(*at);
            frame.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let at = pos(*at);
            let end = (at + n).min(len);
            frame.drain(at..end);
        }
        Mutation::Swap { a, b } => {
            if len > 0 {
                frame.swap(a % len, b % len);
            }
        }
        Mutation::DuplicateKey { nth, value } => {
            let keys = key_starts(frame);
            if keys.is_empty() {
                return;
            }
            let start = keys[nth % keys.len()];
            // The key runs to the first `":` after its opening quote (keys have no escapes).
            let Some(colon) = frame[start + 1..]
                .windows(2)
                .position(|w| w == b"\":")
                .map(|p| start + 1 + p + 2)
            else {
                return;
            };
            let mut dup = frame[start..colon].to_vec();
            dup.extend_from_slice(value.as_bytes());
            dup.push(b',');
            frame.splice(start..start, dup);
        }
        Mutation::HugeNumber { nth, number } => {
            let mut runs = Vec::new();
            let mut i = 0;
            while i < len {
                if frame[i].is_ascii_digit() {
                    let s = i;
                    while i < len && frame[i].is_ascii_digit() {
                        i += 1;
                    }
                    runs.push((s, i));
                } else {
                    i += 1;
                }
            }
            if runs.is_empty() {
                return;
            }
            let (s, e) = runs[nth % runs.len()];
            frame.splice(s..e, number.bytes());
        }
        Mutation::Nest {
            nth,
            depth,
            open,
            closed,
        } => {
            // Value positions: after a `:`, or the whole frame.
            let colons: Vec<usize> = frame
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b':')
                .map(|(i, _)| i + 1)
                .collect();
            let at = if colons.is_empty() || nth % 4 == 0 {
                0
            } else {
                colons[nth % colons.len()]
            };
            let mut nest = open.repeat(*depth).into_bytes();
            if *closed {
                let close: String = open
                    .chars()
                    .rev()
                    .filter_map(|c| match c {
                        '[' => Some(']'),
                        '{' => Some('}'),
                        _ => None,
                    })
                    .collect();
                nest.extend_from_slice(b"0");
                nest.extend_from_slice(close.repeat(*depth).as_bytes());
                if at > 0 {
                    // Replace the value that was there up to the next `,` or `}`.
                    let end = frame[at..]
                        .iter()
                        .position(|&b| b == b',' || b == b'}')
                        .map_or(frame.len(), |p| at + p);
                    frame.splice(at..end, nest);
                    return;
                }
            }
            frame.splice(at..at, nest);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The decoders under test.

/// Decodes with `T`'s decoder; returns the time taken. The answer must be an error or a value
/// that encodes and decodes to itself.
fn decode_one<T>(input: &[u8]) -> Result<Duration, TestCaseError>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let t0 = Instant::now();
    let got = decode_frame::<T>(input);
    let took = t0.elapsed();
    match got {
        Ok(v) => {
            // Whatever was accepted must mean something stable: it re-encodes to a frame that
            // decodes to the same value.
            let again = decode_frame::<T>(&encode_frame(&v)).map_err(|e| {
                TestCaseError::fail(format!("re-encoded value does not decode: {e}"))
            })?;
            prop_assert_eq!(again, v);
        }
        Err(FrameError::Json(e)) => {
            // Errors are what callers quote to peers and logs: bounded by what they explain,
            // not by the input.
            let shown = proto::wire::frame_error(&FrameError::Json(e));
            prop_assert!(shown.len() < 4096, "error of {} bytes", shown.len());
        }
        Err(FrameError::TooLarge(n)) => prop_assert!(n > proto::MAX_FRAME_BYTES),
    }
    Ok(took)
}

/// Every network decoder on one input: none panics, each answers within [`SLOW`].
fn decode_all(input: &[u8]) -> Result<(), TestCaseError> {
    let took = [
        decode_one::<AgentMsg>(input)?,
        decode_one::<ManagerMsg>(input)?,
        decode_one::<Request>(input)?,
        decode_one::<Response>(input)?,
    ];
    for t in took {
        prop_assert!(t < SLOW, "a decode of {} bytes took {t:?}", input.len());
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // Cases from PROPTEST_CASES (256 when unset).
    ProptestConfig::default()
}

proptest! {
    #![proptest_config(config())]

    /// (a) Arbitrary bytes, short and long.
    #[test]
    fn decoders_survive_arbitrary_bytes(
        input in prop_oneof![
            4 => vec(any::<u8>(), 0..64),
            2 => vec(any::<u8>(), 0..4096),
            1 => vec(any::<u8>(), 0..65536),
        ]
    ) {
        decode_all(&input)?;
    }

    /// (a') A soup of JSON tokens and our own tags and fields: gets deeper into the parsers
    /// than random bytes do.
    #[test]
    fn decoders_survive_token_soup(tokens in vec(select(TOKENS), 0..200)) {
        decode_all(tokens.concat().as_bytes())?;
    }

    /// (b) Valid frames of every type, mutated a few times over.
    #[test]
    fn decoders_survive_mutated_frames(
        frame in any_frame(),
        mutations in vec(mutation(), 1..5),
    ) {
        let mut input = frame;
        for m in &mutations {
            apply(&mut input, m);
        }
        decode_all(&input)?;
    }

    /// (b') Nesting 10k deep, balanced or not, at the top and inside a valid frame; and an
    /// unknown field holding a deep value (decoders skip unknown fields).
    #[test]
    fn decoders_survive_deep_nesting(
        frame in any_frame(),
        open in select(OPENERS),
        depth in prop_oneof![Just(10_000usize), 1usize..20_000],
        at in any::<usize>(),
        closed in any::<bool>(),
    ) {
        let mut top = frame.clone();
        apply(&mut top, &Mutation::Nest { nth: 0, depth, open, closed });
        decode_all(&top)?;
        let mut inner = frame.clone();
        apply(&mut inner, &Mutation::Nest { nth: at | 1, depth, open, closed });
        decode_all(&inner)?;
        // `{"type":"heartbeat","zz":[[[...]]]}`: valid JSON, an unknown field.
        if let Some(brace) = frame.iter().rposition(|&b| b == b'}') {
            let mut unknown = frame.clone();
            let mut deep = b",\"zz\":".to_vec();
            deep.extend_from_slice("[".repeat(depth).as_bytes());
            deep.extend_from_slice("]".repeat(depth).as_bytes());
            unknown.splice(brace..brace, deep);
            decode_all(&unknown)?;
        }
    }

    /// (c) Valid frames of random messages decode to the message encoded.
    #[test]
    fn agent_messages_round_trip(msg in agent_msg()) {
        let line = encode_frame(&msg);
        prop_assert_eq!(decode_frame::<AgentMsg>(&line).unwrap(), msg);
    }

    #[test]
    fn manager_messages_round_trip(msg in manager_msg()) {
        let line = encode_frame(&msg);
        prop_assert_eq!(decode_frame::<ManagerMsg>(&line).unwrap(), msg);
    }

    #[test]
    fn requests_round_trip(msg in request()) {
        let line = encode_frame(&msg);
        prop_assert_eq!(decode_frame::<Request>(&line).unwrap(), msg);
    }

    #[test]
    fn responses_round_trip(msg in response()) {
        let line = encode_frame(&msg);
        prop_assert_eq!(decode_frame::<Response>(&line).unwrap(), msg);
    }

    /// A frame is one line: no encoding carries a raw newline before its end.
    #[test]
    fn encodings_are_one_line(frame in any_frame()) {
        prop_assert_eq!(frame.iter().filter(|&&b| b == b'\n').count(), 1);
        prop_assert_eq!(frame.last(), Some(&b'\n'));
    }

    /// `read_frame` over arbitrary bytes, any chunking, stalls and cancellations, small limits:
    /// exactly the frames the reference model expects, never more than limit + 1 bytes held,
    /// never a read past limit + 1 bytes of an over-long line.
    #[test]
    fn read_frame_bounds_and_returns_whole_frames(
        lines in vec((vec(any::<u8>(), 0..400), prop::bool::weighted(0.85)), 0..8),
        limit in prop_oneof![0usize..8, 0usize..300],
        chunks in vec(prop_oneof![4 => 1usize..16, 1 => 1usize..4096], 1..16),
        stalls in vec(any::<bool>(), 1..8),
        cancel in any::<bool>(),
    ) {
        let mut data = Vec::new();
        for (mut line, newline) in lines {
            for b in &mut line {
                if *b == b'\n' {
                    *b = b'x';
                }
            }
            data.extend_from_slice(&line);
            if newline {
                data.push(b'\n');
            }
        }
        let mut reader = Chunked::new(&data, &chunks, &stalls);
        let expected = model(&data, limit);
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            let line_start = reader.pos;
            let r = drive(&mut reader, &mut buf, limit, cancel);
            prop_assert!(
                buf.len() <= limit + 1,
                "{} bytes buffered with a limit of {limit}",
                buf.len()
            );
            match r {
                Ok(true) => {
                    got.push(Outcome::Frame(std::mem::take(&mut buf)));
                }
                Ok(false) => {
                    got.push(Outcome::End);
                    break;
                }
                Err(e) => {
                    prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    prop_assert!(
                        reader.pos - line_start <= limit + 1,
                        "read {} bytes of a line with a limit of {limit}",
                        reader.pos - line_start
                    );
                    got.push(Outcome::TooLong);
                    break;
                }
            }
            prop_assert!(got.len() <= data.len() + 1, "read_frame does not advance");
        }
        prop_assert_eq!(got, expected);
    }

    /// Valid messages sent back to back, cut anywhere: each comes out whole and decodes to
    /// what was sent, with the limit exactly the longest frame's.
    #[test]
    fn read_frame_returns_valid_messages_whole(
        msgs in vec(agent_msg(), 1..6),
        chunks in vec(1usize..64, 1..16),
        stalls in vec(any::<bool>(), 1..8),
        cancel in any::<bool>(),
    ) {
        let frames: Vec<Vec<u8>> = msgs.iter().map(encode_frame).collect();
        // The limit counts the frame without its newline.
        let limit = frames.iter().map(|f| f.len() - 1).max().unwrap();
        let data = frames.concat();
        let mut reader = Chunked::new(&data, &chunks, &stalls);
        let mut buf = Vec::new();
        for msg in &msgs {
            prop_assert!(drive(&mut reader, &mut buf, limit, cancel).unwrap());
            prop_assert_eq!(&decode_frame::<AgentMsg>(&buf).unwrap(), msg);
            buf.clear();
        }
        prop_assert!(!drive(&mut reader, &mut buf, limit, cancel).unwrap());
    }
}

#[test]
fn a_frame_past_the_decoders_limit_is_refused_unread() {
    let big = vec![b' '; proto::MAX_FRAME_BYTES + 1];
    let err = decode_frame::<AgentMsg>(&big).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
}

#[test]
fn nesting_ten_thousand_deep_is_an_error_not_a_crash() {
    for open in OPENERS {
        let deep = open.repeat(10_000);
        decode_all(deep.as_bytes()).unwrap();
        let err = decode_frame::<Request>(deep.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("malformed frame"), "{err}");
    }
    let balanced = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    decode_all(balanced.as_bytes()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// read_frame's harness: an in-memory stream served in given chunks, stalling (Pending) on a
// schedule, driven by hand so that a stall can also cancel the call, as `select!` does.

#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Vec<u8>),
    End,
    TooLong,
}

/// What `read_frame` must return over `data` with `limit`: each line (newline included) whose
/// content is at most `limit` bytes, a last line without its newline likewise, then the end; or
/// `TooLong` at the first longer line.
fn model(data: &[u8], limit: usize) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        match rest.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                if nl > limit {
                    out.push(Outcome::TooLong);
                    return out;
                }
                out.push(Outcome::Frame(rest[..=nl].to_vec()));
                rest = &rest[nl + 1..];
            }
            None => {
                if rest.len() > limit {
                    out.push(Outcome::TooLong);
                    return out;
                }
                if !rest.is_empty() {
                    out.push(Outcome::Frame(rest.to_vec()));
                }
                out.push(Outcome::End);
                return out;
            }
        }
    }
}

struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    /// Ends of the chunks the stream is served in, ascending.
    cuts: Vec<usize>,
    /// Whether each successive fill first answers Pending (cycled).
    stalls: Vec<bool>,
    fills: usize,
    stalled: bool,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], sizes: &[usize], stalls: &[bool]) -> Chunked<'a> {
        let mut cuts = Vec::new();
        let mut at = 0;
        for size in sizes.iter().cycle() {
            at += size;
            cuts.push(at.min(data.len()));
            if at >= data.len() {
                break;
            }
        }
        Chunked {
            data,
            pos: 0,
            cuts,
            stalls: stalls.to_vec(),
            fills: 0,
            stalled: false,
        }
    }

    fn chunk(&self) -> &'a [u8] {
        let end = self
            .cuts
            .iter()
            .copied()
            .find(|&c| c > self.pos)
            .unwrap_or(self.data.len());
        &self.data[self.pos..end]
    }
}

impl AsyncBufRead for Chunked<'_> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        let stall = this.stalls[this.fills % this.stalls.len()];
        this.fills += 1;
        if stall && !this.stalled {
            this.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        Poll::Ready(Ok(this.chunk()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        assert!(amt <= this.chunk().len(), "consumed more than was filled");
        this.pos += amt;
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let chunk = match self.as_mut().poll_fill_buf(cx) {
            Poll::Ready(Ok(c)) => c,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

/// Runs `read_frame` to completion. With `cancel`, every Pending drops the call and starts a
/// new one on the same buffer, as a `select!` whose other branch won would.
fn drive(
    reader: &mut Chunked<'_>,
    buf: &mut Vec<u8>,
    limit: usize,
    cancel: bool,
) -> io::Result<bool> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut polls = 0usize;
    loop {
        let mut fut = std::pin::pin!(read_frame(reader, buf, limit));
        loop {
            polls += 1;
            assert!(polls < 1_000_000, "read_frame does not finish");
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => return r,
                Poll::Pending if cancel => break,
                Poll::Pending => {}
            }
        }
    }
}
