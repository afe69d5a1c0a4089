//! Messages between `mesh-agent` and `mesh-manager`.
//!
//! Every connection is TLS. A node without a certificate (no client certificate in the
//! handshake) may only send one of:
//! - [`AgentMsg::GetCa`]: the manager answers [`ManagerMsg::Ca`] and closes; the node checks the
//!   CA against its join token's digest before trusting anything else;
//! - [`AgentMsg::Join`] (on a connection that verified the manager against that CA): the manager
//!   checks the token, registers the node and answers [`ManagerMsg::Joined`] with its
//!   certificate, or [`ManagerMsg::Refused`]; then closes.
//!
//! A node with a certificate of the cluster's CA keeps one connection open. Flow:
//! 1. agent → [`AgentMsg::Hello`]; manager → [`ManagerMsg::Welcome`] (or [`ManagerMsg::Refused`]
//!    and close). The node is the certificate's CN, whatever the Hello says.
//! 2. manager → [`ManagerMsg::Assign`] with the node's complete desired state, at once and after
//!    every change that concerns the node (to an agent slow to read, only the newest of those
//!    waiting). Each carries a higher `revision`; the agent applies the newest and answers
//!    [`AgentMsg::Applied`].
//! 3. agent → [`AgentMsg::TaskStatus`] whenever a task changes state, and [`AgentMsg::Heartbeat`]
//!    every [`HEARTBEAT_SECS`]. The manager marks a node down after [`NODE_DOWN_SECS`] of silence.
//! 4. agent → [`AgentMsg::Renew`] when its certificate is between 50 % and 80 % of its life;
//!    manager → [`ManagerMsg::Certificate`]. The connection stays up.
//!
//! The assignment is the whole truth for the node: anything the agent owns that it does not name
//! is stale and goes. While the manager is unreachable the agent keeps the last one applied.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{Attachment, EndpointMode, Health, HealthCheck, Role, TaskState};

pub const HEARTBEAT_SECS: u64 = 2;
pub const NODE_DOWN_SECS: u64 = 10;
/// The gwbridge subnet of a node whose agent does not say otherwise (Docker's docker_gwbridge).
pub const DEFAULT_GWBRIDGE_SUBNET: &str = "172.18.0.0/16";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Hello {
        version: u32,
        hostname: String,
        /// The node's underlay address (VTEP).
        advertise_addr: IpAddr,
        /// The node's gwbridge subnet (`mesh-agent --gwbridge-subnet`), which no overlay may
        /// overlap; agents that do not send it use [`DEFAULT_GWBRIDGE_SUBNET`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gwbridge_subnet: Option<Ipv4Net>,
        /// Whether the node's kernel can do IPsec ESP, as the agent found at start. None: an
        /// agent that does not say, which gets no encrypted network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        esp: Option<EspSupport>,
    },
    /// Before joining: the cluster's CA certificate, please.
    GetCa,
    /// Before joining: a join token and a signing request for the node's new key.
    Join {
        version: u32,
        token: String,
        /// PEM; its subject is ignored, the manager names the node.
        csr: String,
        hostname: String,
        advertise_addr: IpAddr,
    },
    /// A signing request for a new key, to replace the certificate before it expires.
    Renew {
        csr: String,
    },
    TaskStatus(TaskStatus),
    Applied {
        revision: u64,
    },
    Heartbeat,
    /// The load balancer as programmed on this node, sent after it changes (for inspection).
    LbState(LbReport),
}

/// The agent's finding about IPsec ESP on its kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EspSupport {
    Supported,
    /// With what the kernel said, e.g. "add an ESP state: Function not implemented".
    Unsupported {
        reason: String,
    },
}

/// What the node's load balancer holds now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LbReport {
    /// "ipvs" or "nftables".
    pub backend: crate::model::LbKind,
    pub services: Vec<LbServiceReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbServiceReport {
    pub fwmark: u32,
    pub backends: Vec<LbBackendReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbBackendReport {
    pub ip: std::net::Ipv4Addr,
    /// 1 while it takes new connections, 0 while it drains.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task_id: String,
    pub state: TaskState,
    /// Why a task failed, e.g. "exit status 1" or "spawn hello-server: No such file or directory".
    pub error: Option<String>,
    pub pid: Option<u32>,
    /// The task's network namespace file on the node.
    pub netns: Option<String>,
    /// With a health check, while the task runs: what the checks found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The output or error of the last failed check (bounded), while not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_log: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ManagerMsg {
    Welcome {
        version: u32,
        node_id: String,
        role: Role,
    },
    Refused {
        reason: String,
    },
    /// Shared, so a manager keeps one copy of a node's assignment however many sends queue.
    Assign(Arc<Assignment>),
    /// The cluster's root CA certificate (PEM).
    Ca {
        cert: String,
    },
    /// A joined node's id and certificate (PEM).
    Joined {
        node_id: String,
        cert: String,
    },
    /// A renewed certificate (PEM).
    Certificate {
        cert: String,
    },
    /// This manager is a follower (several managers share the cluster's state in etcd; only
    /// the leader takes agents and joins): try the leader's agent address, when one is known.
    NotLeader {
        leader: Option<String>,
    },
    /// The agent addresses (ADDR:PORT) of every manager of the cluster, sent after Welcome and
    /// whenever the set changes: where an agent goes when its manager is gone.
    Managers {
        addrs: Vec<String>,
    },
}

impl ManagerMsg {
    /// The message's type, as on the wire, for errors that must not dump a whole assignment.
    pub fn kind(&self) -> &'static str {
        match self {
            ManagerMsg::Welcome { .. } => "welcome",
            ManagerMsg::Refused { .. } => "refused",
            ManagerMsg::Assign(_) => "assign",
            ManagerMsg::Ca { .. } => "ca",
            ManagerMsg::Joined { .. } => "joined",
            ManagerMsg::Certificate { .. } => "certificate",
            ManagerMsg::NotLeader { .. } => "not_leader",
            ManagerMsg::Managers { .. } => "managers",
        }
    }
}

/// The complete desired state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Assignment {
    pub revision: u64,
    /// Networks that have at least one task on this node (overlays are built lazily, as in Swarm).
    pub networks: Vec<NetworkSpec>,
    pub tasks: Vec<TaskSpec>,
    /// The routing mesh's network, present on every node (with its ingress_sbox) once the
    /// manager has one.
    #[serde(default)]
    pub ingress: Option<Box<IngressSpec>>,
    /// Every service with published ports, cluster-wide: each node balances ingress-mode ports
    /// over the backends, wherever they run; host-mode ports go to this node's own tasks.
    #[serde(default)]
    pub published: Vec<PublishedService>,
    /// The cluster's IPsec keys, only for a node with an encrypted network. The agent keeps
    /// them in memory only: it never writes them to disk nor logs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionKeys>,
}

/// The key ring of encrypted overlays, one per cluster (as Swarm's): every node receives with
/// every key of the ring and sends with `send`. A new key is receive-only until every node has
/// applied the revision that brought it, and a replaced key goes only once every node applied
/// the switch away from it (the manager's `keys` module), so nodes that apply a rotation at
/// different moments lose no packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionKeys {
    /// Oldest first; at most three.
    pub keys: Vec<EspKey>,
    /// The tag of the key to send with.
    pub send: u32,
}

/// One AES-GCM-128 key with its 4-byte salt (`rfc4106(gcm(aes))` takes both as one key of 20
/// bytes). Its Debug form shows the tag only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspKey {
    /// Serial, cluster-wide; both ends derive their SPIs from it.
    pub tag: u32,
    /// 16 key bytes then 4 salt bytes, as hex.
    #[serde(with = "hex20")]
    pub secret: [u8; ESP_KEY_BYTES],
}

/// AES-128 key plus salt.
pub const ESP_KEY_BYTES: usize = 20;

impl std::fmt::Debug for EspKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspKey")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

mod hex20 {
    use super::ESP_KEY_BYTES;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; ESP_KEY_BYTES], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; ESP_KEY_BYTES], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; ESP_KEY_BYTES];
        if text.len() != 2 * ESP_KEY_BYTES || !text.is_ascii() {
            return Err(D::Error::custom("an ESP key is 40 hex digits"));
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| D::Error::custom("an ESP key is 40 hex digits"))?;
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressSpec {
    /// The `ingress` overlay. Its peers are every node's ingress_sbox endpoint and every task
    /// endpoint on it (the agent skips those behind its own VTEP).
    pub network: NetworkSpec,
    /// This node's address on it: eth0 of ingress_sbox.
    pub sbox_addr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedService {
    pub service_id: String,
    pub service_name: String,
    /// Cluster-wide and stable for the life of the service; from 256, as in Swarm. 0 when the
    /// service publishes only host-mode ports (nothing to balance).
    pub fwmark: u32,
    pub ports: Vec<crate::model::PortConfig>,
    /// The ingress-network addresses of the service's running tasks, on every node.
    pub backends: Vec<std::net::Ipv4Addr>,
    /// The service's VIP on the ingress network (vip mode with an ingress-mode port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub id: String,
    pub name: String,
    pub subnet: Ipv4Net,
    /// The gateway address with its prefix, held by the sandbox's br0.
    pub gateway: Ipv4Net,
    pub vni: u32,
    /// Every endpoint of this network (tasks, load balancers), with the VTEP of its node: the
    /// same list for every node, so the manager builds it once; an agent skips the endpoints
    /// behind its own VTEP.
    pub peers: Vec<Peer>,
    /// This node's load-balancer endpoint on the network (eth0 of the `lb_<name>` namespace,
    /// where the IPVS balancer holds the network's VIPs and SNATs to this address). Its peers
    /// on other nodes are in `peers`. None from an older manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb_addr: Option<Ipv4Net>,
    /// Every service attached to the network, cluster-wide, by name: what its VIP balances
    /// over and what its names resolve to for tasks on this network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<NetworkService>,
    /// Tasks on this network that left the balancers but whose process may still run
    /// (draining, or told to stop and within their grace period). Their open connections go
    /// on: an IPVS balancer keeps them as weight-0 destinations until they leave this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<DrainingBackend>,
    /// Its VXLAN traffic to and from other nodes goes in ESP, with the assignment's keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// A task's address under its service's mark, for a balancer to keep without new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DrainingBackend {
    pub fwmark: u32,
    pub addr: std::net::Ipv4Addr,
}

/// A service as the tasks of one network see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkService {
    pub service_id: String,
    pub name: String,
    /// More names of the service on this network (`--network name=N,alias=A`); each also has
    /// `tasks.<alias>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub endpoint_mode: EndpointMode,
    /// The service's VIP on this network: vip mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
    /// The mark that selects the VIP's IPVS service in `lb_<name>`; cluster-wide and stable
    /// (the same as the service's ingress fwmark). 0 in dnsrr mode.
    pub fwmark: u32,
    /// The service's running tasks on this network, on every node, by slot.
    pub tasks: Vec<ServiceTask>,
}

/// One running task of a [`NetworkService`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTask {
    pub task_id: String,
    pub slot: u64,
    /// The task's address on the network.
    pub addr: std::net::Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub ip: std::net::Ipv4Addr,
    pub mac: String,
    /// The underlay address of the node that holds the endpoint.
    pub vtep: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    /// `<service>.<slot>.<task id>`: also the name of the task's namespace file.
    pub name: String,
    pub service_id: String,
    pub service_name: String,
    /// argv of the task's process, run inside its namespace.
    pub command: Vec<String>,
    /// One endpoint per network; the first becomes eth0, the next eth1, …
    pub attachments: Vec<Attachment>,
    /// Environment of the task's process, besides what the agent sets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// SIGTERM, then SIGKILL after this long, when the task is stopped.
    #[serde(default = "crate::model::default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// Checked by the agent, which reports the result in [`TaskStatus::health`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_frame, encode_frame};

    #[test]
    fn hello_has_a_stable_wire_form() {
        let msg = AgentMsg::Hello {
            version: 1,
            hostname: "node1".into(),
            advertise_addr: "192.168.56.11".parse().unwrap(),
            gwbridge_subnet: None,
            esp: None,
        };
        let line = encode_frame(&msg);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"hello\",\"version\":1,\"hostname\":\"node1\",\"advertise_addr\":\"192.168.56.11\"}\n"
        );
        assert_eq!(decode_frame::<AgentMsg>(&line).unwrap(), msg);
        // A newer agent reports its gwbridge; the field is optional both ways.
        let newer = AgentMsg::Hello {
            version: 1,
            hostname: "node1".into(),
            advertise_addr: "192.168.56.11".parse().unwrap(),
            gwbridge_subnet: Some("172.30.0.0/16".parse().unwrap()),
            esp: Some(EspSupport::Supported),
        };
        let line = encode_frame(&newer);
        assert!(std::str::from_utf8(&line)
            .unwrap()
            .contains("\"gwbridge_subnet\":\"172.30.0.0/16\""));
        assert_eq!(decode_frame::<AgentMsg>(&line).unwrap(), newer);
    }

    #[test]
    fn assignment_round_trips() {
        let a = ManagerMsg::Assign(Arc::new(Assignment {
            revision: 7,
            networks: vec![NetworkSpec {
                id: "n1".into(),
                name: "backend".into(),
                subnet: "10.0.9.0/24".parse().unwrap(),
                gateway: "10.0.9.1/24".parse().unwrap(),
                vni: 4096,
                peers: vec![Peer {
                    ip: "10.0.9.3".parse().unwrap(),
                    mac: "02:42:0a:00:09:03".into(),
                    vtep: "192.168.56.12".parse().unwrap(),
                }],
                lb_addr: Some("10.0.9.4/24".parse().unwrap()),
                draining: vec![],
                services: vec![NetworkService {
                    service_id: "s2".into(),
                    name: "api".into(),
                    aliases: vec!["backend-api".into()],
                    endpoint_mode: EndpointMode::Vip,
                    vip: Some("10.0.9.2".parse().unwrap()),
                    fwmark: 257,
                    tasks: vec![ServiceTask {
                        task_id: "t1".into(),
                        slot: 1,
                        addr: "10.0.9.3".parse().unwrap(),
                    }],
                }],
                encrypted: true,
            }],
            tasks: vec![],
            ingress: Some(Box::new(IngressSpec {
                network: NetworkSpec {
                    id: "ing".into(),
                    name: "ingress".into(),
                    subnet: "10.255.0.0/16".parse().unwrap(),
                    gateway: "10.255.0.1/16".parse().unwrap(),
                    vni: 4096,
                    peers: vec![],
                    lb_addr: None,
                    draining: vec![],
                    services: vec![],
                    encrypted: false,
                },
                sbox_addr: "10.255.0.2/16".parse().unwrap(),
            })),
            published: vec![PublishedService {
                service_id: "s1".into(),
                service_name: "web".into(),
                fwmark: 256,
                ports: vec![crate::model::PortConfig {
                    protocol: crate::model::Protocol::Tcp,
                    published: 80,
                    target: 8080,
                    mode: crate::model::PublishMode::Ingress,
                }],
                backends: vec!["10.255.0.5".parse().unwrap()],
                vip: Some("10.255.0.3".parse().unwrap()),
            }],
            encryption: Some(EncryptionKeys {
                keys: vec![EspKey {
                    tag: 1,
                    secret: [0xab; ESP_KEY_BYTES],
                }],
                send: 1,
            }),
        }));
        let back: ManagerMsg = decode_frame(&encode_frame(&a)).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn an_assignment_from_an_older_manager_has_no_mesh() {
        let old = br#"{"type":"assign","revision":3,"networks":[],"tasks":[]}"#;
        let back: ManagerMsg = decode_frame(old).unwrap();
        assert_eq!(
            back,
            ManagerMsg::Assign(Arc::new(Assignment {
                revision: 3,
                ..Assignment::default()
            }))
        );
    }

    #[test]
    fn keys_travel_as_hex_and_never_show_in_debug() {
        let key = EspKey {
            tag: 7,
            secret: *b"0123456789abcdefsalt",
        };
        let wire = serde_json::to_string(&key).unwrap();
        assert_eq!(
            wire,
            r#"{"tag":7,"secret":"3031323334353637383961626364656673616c74"}"#
        );
        assert_eq!(serde_json::from_str::<EspKey>(&wire).unwrap(), key);
        let shown = format!("{key:?}");
        assert_eq!(shown, "EspKey { tag: 7, .. }");
        let short = r#"{"tag":7,"secret":"abcd"}"#;
        assert!(serde_json::from_str::<EspKey>(short)
            .unwrap_err()
            .to_string()
            .contains("40 hex digits"));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = decode_frame::<AgentMsg>(b"{\"type\":\"nope\"}").unwrap_err();
        assert!(err.to_string().contains("malformed frame"), "{err}");
    }
}
