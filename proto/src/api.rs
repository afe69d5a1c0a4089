//! Messages between `meshctl` and `mesh-manager`.
//!
//! The API listens on a Unix socket (default [`DEFAULT_API_SOCKET`]) and optionally on TCP. Each
//! connection carries newline-delimited JSON frames: the client sends one [`Request`], the
//! manager answers exactly one [`Response`], and the client may send the next request on the
//! same connection. A refused request is answered with [`Response::Error`] and changes nothing.
//!
//! Objects are named by id, by name, or by an unambiguous id prefix, as with `docker`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::agent::LbServiceReport;
use crate::model::{
    Availability, Constraint, EndpointMode, Health, HealthCheck, Network, Node, PortConfig,
    Protocol, Role, ServiceMode, TaskState, UpdateConfig, UpdateStatus,
};

/// Where `mesh-manager` listens for `meshctl` unless told otherwise.
pub const DEFAULT_API_SOCKET: &str = "/run/meshnet/manager.sock";

/// The name of the routing-mesh network; users can neither create nor remove it.
pub const INGRESS_NETWORK: &str = "ingress";

// Limits the manager enforces on every request, whatever the client; `meshctl --help` and the
// README state them. A value past one is a mistake or an attack, not a plan.

/// Network and service names: 1 to this many of `[a-zA-Z0-9_.-]`, starting with a letter or digit.
pub const MAX_NAME_CHARS: usize = 32;
/// Replicas of one service.
pub const MAX_REPLICAS: u64 = 10_000;
/// Bytes of a node label key; keys have no spaces, `=` or control characters.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Bytes of a node label value; values have no control characters.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
/// Labels on one node.
pub const MAX_LABELS: usize = 64;
/// Placement constraints of one service.
pub const MAX_CONSTRAINTS: usize = 32;
/// Bytes of one placement constraint.
pub const MAX_CONSTRAINT_BYTES: usize = 256;
/// Aliases of a service on one network; each is a name like a service's.
pub const MAX_ALIASES: usize = 16;
/// Arguments (argv entries, the program included) of a service's command.
pub const MAX_COMMAND_ARGS: usize = 1024;
/// Bytes of a service's command, all arguments together.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    NodeLs,
    NodeInspect {
        node: String,
    },
    /// `meshctl node update`: fields left out are kept.
    NodeUpdate {
        node: String,
        #[serde(default)]
        availability: Option<Availability>,
        #[serde(default)]
        label_add: BTreeMap<String, String>,
        #[serde(default)]
        label_rm: Vec<String>,
    },
    /// `meshctl node rm`: revokes the node's certificate and moves its tasks. A ready node is
    /// removed only with `force`.
    NodeRm {
        node: String,
        #[serde(default)]
        force: bool,
    },
    /// `meshctl node promote|demote`: the role the node's next certificate carries.
    NodeRole {
        node: String,
        role: Role,
    },
    /// `meshctl join-token worker|manager [--rotate]`.
    JoinToken {
        role: Role,
        #[serde(default)]
        rotate: bool,
    },
    NetworkCreate {
        name: String,
        driver: String,
        /// A CIDR such as "10.0.9.0/24"; the manager picks a free /24 from 10.0.0.0/8 when absent.
        /// Kept as text so that the manager validates it and explains what is wrong.
        #[serde(default)]
        subnet: Option<String>,
        /// Driver options (`--opt key[=value]`), checked by the manager: only `encrypted`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        options: BTreeMap<String, String>,
    },
    NetworkLs,
    NetworkInspect {
        network: String,
    },
    NetworkRm {
        network: String,
    },
    /// `meshctl network rm a b`: removes every network or none; answered with
    /// [`Response::RemovedMany`].
    NetworkRmMany {
        networks: Vec<String>,
    },
    ServiceCreate {
        spec: ServiceSpec,
    },
    ServiceLs,
    ServiceInspect {
        service: String,
    },
    /// The service's tasks, current ones first per slot, then their history.
    ServicePs {
        service: String,
    },
    ServiceScale {
        service: String,
        replicas: u64,
    },
    /// `meshctl service scale a=1 b=2`: scales every service or, if one is refused, none.
    /// Answered with [`Response::Services`], in the order asked.
    ServiceScaleMany {
        scales: Vec<Scale>,
    },
    ServiceRm {
        service: String,
    },
    /// `meshctl service rm a b`: removes every service or none; answered with
    /// [`Response::RemovedMany`].
    ServiceRmMany {
        services: Vec<String>,
    },
    /// `meshctl service update`: removes `publish_rm`, then adds `publish_add`, all or nothing.
    /// When the service gains its first ingress-mode port or loses its last, it joins or leaves
    /// the ingress network: its fwmark is allocated or freed and its tasks are replaced.
    ServiceUpdate {
        service: String,
        #[serde(default)]
        publish_add: Vec<PortConfig>,
        #[serde(default)]
        publish_rm: Vec<PublishedPort>,
        /// A new endpoint mode: vip allocates the service's VIPs, dnsrr frees them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_mode: Option<EndpointMode>,
        /// The rest of this request changes the tasks' spec; when it differs, the service's
        /// version goes up and its tasks are replaced by a rolling update (see
        /// [`UpdateConfig`]).
        #[serde(flatten)]
        spec: SpecUpdate,
    },
    /// `meshctl service rollback`: back to the spec before the last update, rolled out the
    /// same way.
    ServiceRollback {
        service: String,
    },
    /// Every published port of every service.
    PublishLs,
    /// Unpublishes a port from whichever service publishes it.
    PublishRm {
        protocol: Protocol,
        published: u16,
    },
    /// `meshctl publish rm 80 53/udp`: unpublishes every port or none. Answered with
    /// [`Response::Services`]: the service that published each port, in the order asked.
    PublishRmMany {
        ports: Vec<PublishedPort>,
    },
}

/// The task-spec part of `meshctl service update`; what is left out is kept.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecUpdate {
    /// `--command`: the whole argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `--args`: replaces everything after the program (after `command`, when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_rm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraint_add: Vec<Constraint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraint_rm: Vec<Constraint>,
    /// Replace every task even if nothing else changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// The whole new update config (meshctl merges its flags over the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_config: Option<UpdateConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    /// A new health check; with `health_none`, the check is removed instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_none: bool,
}

/// One target of [`Request::ServiceScaleMany`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    pub service: String,
    pub replicas: u64,
}

/// A published port as the nodes see it: what `--publish-rm` and `publish rm` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: Protocol,
    pub published: u16,
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.published, self.protocol)
    }
}

impl From<&PortConfig> for PublishedPort {
    fn from(p: &PortConfig) -> PublishedPort {
        PublishedPort {
            protocol: p.protocol,
            published: p.published,
        }
    }
}

/// One row of `meshctl publish ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishInfo {
    pub service: String,
    pub service_id: String,
    #[serde(flatten)]
    pub port: PortConfig,
}

/// What one node's load balancer holds, from its agent's latest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLb {
    pub node_id: String,
    pub hostname: String,
    /// "ipvs" or "nftables".
    pub backend: crate::model::LbKind,
    /// fwmark → backends with weights; in a service's view only that service's fwmark.
    pub services: Vec<LbServiceReport>,
}

/// A node's ingress_sbox endpoint on the ingress network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressSbox {
    pub node_id: String,
    pub hostname: String,
    pub addr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Error {
        message: String,
    },
    Nodes {
        nodes: Vec<NodeInfo>,
    },
    Node {
        node: NodeInfo,
    },
    Networks {
        networks: Vec<Network>,
    },
    Network {
        network: NetworkDetail,
    },
    Services {
        services: Vec<ServiceInfo>,
    },
    Service {
        service: Box<ServiceInfo>,
    },
    Tasks {
        tasks: Vec<TaskInfo>,
    },
    Ports {
        ports: Vec<PublishInfo>,
    },
    /// The id of the object that a `rm` removed.
    Removed {
        id: String,
    },
    /// A join token and where agents reach the managers (ADDR:PORT, comma-separated when
    /// there are several, as `mesh-agent --manager` takes them).
    JoinToken {
        role: Role,
        token: String,
        manager: String,
    },
    /// The ids of the objects that a `rm` of several removed, in the order asked.
    RemovedMany {
        ids: Vec<String>,
    },
}

/// What a user asks for with `meshctl service create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// replicated (default: `replicas` tasks) or global (one task on every eligible node).
    #[serde(default)]
    pub mode: ServiceMode,
    /// Tasks of a replicated service; 0 for a global one.
    pub replicas: u64,
    /// Network names or ids in a request; the manager stores ids. The first becomes eth0.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Placement constraints such as `node.role==worker` or `node.labels.zone==a`.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// argv of each task's process.
    pub command: Vec<String>,
    /// Published ports; one in ingress mode attaches the tasks to the ingress network.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// vip (default) or dnsrr; dnsrr cannot have ingress-mode ports.
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// More names of the service on some of its networks (`--network name=N,alias=A`), keyed
    /// like `networks` (names or ids in a request; ids as stored).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Environment of each task's process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How updates and rollbacks replace the tasks.
    #[serde(default)]
    pub update_config: UpdateConfig,
    /// Between SIGTERM and SIGKILL when a task stops (`--stop-grace-period`).
    #[serde(default = "crate::model::default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// A task gets traffic only once its check passes, and is replaced when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(flatten)]
    pub node: Node,
    /// Tasks the manager wants on this node now.
    pub tasks: usize,
    /// The revision of the node's latest assignment, and the one its agent reported applied.
    pub revision: u64,
    pub applied_revision: u64,
    /// Why the node has no routing mesh (the ingress network is encrypted and the node cannot
    /// do IPsec ESP). None: it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_routing_mesh: Option<String>,
    /// A manager node's part in the control plane, as `docker node ls` shows it; None for
    /// workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_status: Option<ManagerStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagerStatus {
    /// Runs the orchestrator and the scheduler.
    Leader,
    /// A manager is running there and follows the leader.
    Reachable,
    /// The node has the manager role but no manager is running there that the leader can see.
    Unreachable,
}

/// `meshctl network inspect`: the network with its endpoints and the nodes that carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    #[serde(flatten)]
    pub network: Network,
    pub created_at: u64,
    pub endpoints: Vec<NetworkEndpoint>,
    /// Nodes with at least one endpoint on this network, as in Docker's `Peers`.
    pub peers: Vec<NetworkPeer>,
    /// The ingress network only: every node's ingress_sbox address.
    #[serde(default)]
    pub sboxes: Vec<IngressSbox>,
    /// The ingress network only: every node's load balancer as its agent last reported it.
    #[serde(default)]
    pub lb: Vec<NodeLb>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEndpoint {
    pub task_id: String,
    /// The task's full name `<service>.<slot>.<task id>`.
    pub task_name: String,
    pub service: String,
    pub addr: Ipv4Net,
    pub mac: String,
    pub node_id: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPeer {
    pub node_id: String,
    /// The node's hostname.
    pub name: String,
    /// The node's underlay address (VTEP).
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub id: String,
    /// The spec as stored: `networks` holds network ids.
    pub spec: ServiceSpec,
    /// The same networks as `spec.networks`, by name.
    pub network_names: Vec<String>,
    /// Tasks that run now, against `desired`.
    pub running: usize,
    /// Tasks the manager wants: `spec.replicas` for a replicated service; for a global one, the
    /// nodes it has a task on (every eligible node, and paused ones that keep theirs).
    #[serde(default)]
    pub desired: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// The balancers' mark for this service: with an ingress-mode port or a VIP.
    #[serde(default)]
    pub fwmark: Option<u32>,
    /// With an ingress-mode port: each node's routing-mesh balancer entry for `fwmark`
    /// (ingress_sbox), as its agent last reported it.
    #[serde(default)]
    pub lb: Vec<NodeLb>,
    /// The service's VIPs (vip mode): one per network it is attached to, and one on ingress
    /// with an ingress-mode port; as Docker's `Endpoint.VirtualIPs`.
    #[serde(default)]
    pub virtual_ips: Vec<VirtualIp>,
    /// Goes up with every change of the tasks' spec; each task records the version it runs.
    #[serde(default)]
    pub version: u64,
    /// The spec before the last update: what `service rollback` returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<Box<ServiceSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
}

impl ServiceInfo {
    /// The tasks the service wants: the replica count of a replicated service (so also from a
    /// manager that predates `desired`), `desired` for a global one.
    pub fn desired_tasks(&self) -> u64 {
        match self.spec.mode {
            ServiceMode::Replicated => self.spec.replicas,
            ServiceMode::Global => self.desired,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualIp {
    pub network_id: String,
    pub network: String,
    /// The VIP with the network's prefix length, e.g. 10.0.9.2/24.
    pub addr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: String,
    /// `<service>.<slot>`, as `docker service ps` shows it.
    pub name: String,
    pub service_id: String,
    pub service_name: String,
    pub slot: u64,
    pub node_id: Option<String>,
    /// The hostname of the node the task is assigned to.
    pub node: Option<String>,
    /// `running` for a current task, `shutdown` for one kept as history.
    pub desired_state: TaskState,
    pub state: TaskState,
    pub error: Option<String>,
    pub pid: Option<u32>,
    /// The task's network namespace file on its node, once the agent reported it.
    pub netns: Option<String>,
    pub endpoints: Vec<TaskEndpoint>,
    pub created_at: u64,
    /// When `state` last changed (seconds since the Unix epoch).
    pub updated_at: u64,
    /// The service version whose spec the task runs.
    #[serde(default)]
    pub spec_version: u64,
    /// With a health check, while the task runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEndpoint {
    pub network_id: String,
    pub network: String,
    pub addr: Ipv4Net,
    pub mac: String,
}

impl TaskEndpoint {
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_frame, encode_frame};

    #[test]
    fn requests_have_a_stable_wire_form() {
        let req = Request::ServiceScale {
            service: "web".into(),
            replicas: 3,
        };
        let line = encode_frame(&req);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"service_scale\",\"service\":\"web\",\"replicas\":3}\n"
        );
        assert_eq!(decode_frame::<Request>(&line).unwrap(), req);
    }

    #[test]
    fn requests_for_several_objects_have_a_stable_wire_form() {
        let req = Request::ServiceScaleMany {
            scales: vec![Scale {
                service: "web".into(),
                replicas: 2,
            }],
        };
        let line = encode_frame(&req);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"service_scale_many\",\"scales\":[{\"service\":\"web\",\"replicas\":2}]}\n"
        );
        assert_eq!(decode_frame::<Request>(&line).unwrap(), req);
        let req: Request =
            decode_frame(br#"{"type":"network_rm_many","networks":["a","b"]}"#).unwrap();
        assert_eq!(
            req,
            Request::NetworkRmMany {
                networks: vec!["a".into(), "b".into()]
            }
        );
    }

    #[test]
    fn optional_request_fields_may_be_left_out() {
        let req: Request =
            decode_frame(br#"{"type":"network_create","name":"backend","driver":"overlay"}"#)
                .unwrap();
        assert_eq!(
            req,
            Request::NetworkCreate {
                name: "backend".into(),
                driver: "overlay".into(),
                subnet: None,
                options: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn a_negative_replica_count_is_not_a_request() {
        let err =
            decode_frame::<Request>(br#"{"type":"service_scale","service":"web","replicas":-1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("malformed frame"), "{err}");
    }

    #[test]
    fn older_service_specs_and_details_still_parse() {
        let spec: ServiceSpec =
            decode_frame(br#"{"name":"web","replicas":1,"command":["x"]}"#).unwrap();
        assert!(spec.ports.is_empty());
        assert_eq!(spec.mode, ServiceMode::Replicated);
        let global: ServiceSpec =
            decode_frame(br#"{"name":"web","mode":"global","replicas":0,"command":["x"]}"#)
                .unwrap();
        assert_eq!(global.mode, ServiceMode::Global);
        let value: serde_json::Value = serde_json::from_slice(&encode_frame(&global)).unwrap();
        assert_eq!(value["mode"], "global");
        // A manager that predates global mode sends no `desired`: the replicas stand for it.
        let info: ServiceInfo = decode_frame(
            br#"{"id":"x","spec":{"name":"web","replicas":3,"command":["x"]},"network_names":[],"running":1,"created_at":0,"updated_at":0}"#,
        )
        .unwrap();
        assert_eq!((info.desired, info.desired_tasks()), (0, 3));
        let info = ServiceInfo {
            spec: global,
            desired: 4,
            ..info
        };
        assert_eq!(info.desired_tasks(), 4);
        let req: Request = decode_frame(br#"{"type":"service_update","service":"web"}"#).unwrap();
        assert_eq!(
            req,
            Request::ServiceUpdate {
                service: "web".into(),
                publish_add: vec![],
                publish_rm: vec![],
                endpoint_mode: None,
                spec: SpecUpdate::default(),
            }
        );
        // The spec part rides flattened in the same frame, and comes back whole.
        let req = Request::ServiceUpdate {
            service: "web".into(),
            publish_add: vec![],
            publish_rm: vec![],
            endpoint_mode: None,
            spec: SpecUpdate {
                args: Some(vec!["--v2".into()]),
                env_add: [("K".to_string(), "V".to_string())].into(),
                force: true,
                update_config: Some(UpdateConfig {
                    parallelism: 2,
                    max_failure_ratio: crate::model::Ratio(0.25),
                    ..UpdateConfig::default()
                }),
                health: Some(HealthCheck::new(crate::model::HealthTest::Http {
                    port: 8080,
                    path: "/".into(),
                })),
                ..SpecUpdate::default()
            },
        };
        let wire = encode_frame(&req);
        let value: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(value["args"][0], "--v2");
        assert_eq!(value["update_config"]["order"], "stop-first");
        assert_eq!(decode_frame::<Request>(&wire).unwrap(), req);
        // A spec from before updates existed gets Docker's defaults.
        let spec: ServiceSpec =
            decode_frame(br#"{"name":"web","replicas":1,"command":["x"]}"#).unwrap();
        assert_eq!(spec.stop_grace_ms, 10_000);
        assert_eq!(spec.update_config, UpdateConfig::default());
        let port = PublishedPort {
            protocol: Protocol::Udp,
            published: 53,
        };
        assert_eq!(port.to_string(), "53/udp");
    }

    #[test]
    fn network_detail_flattens_the_network() {
        let detail = NetworkDetail {
            network: Network {
                id: "abc".into(),
                name: "backend".into(),
                driver: "overlay".into(),
                subnet: "10.0.9.0/24".parse().unwrap(),
                gateway: "10.0.9.1".parse().unwrap(),
                vni: 4097,
                ingress: false,
                encrypted: true,
            },
            created_at: 1,
            endpoints: vec![],
            peers: vec![NetworkPeer {
                node_id: "n1".into(),
                name: "node1".into(),
                ip: "192.168.56.11".parse().unwrap(),
            }],
            sboxes: vec![],
            lb: vec![],
        };
        let value: serde_json::Value = serde_json::from_slice(&encode_frame(&detail)).unwrap();
        assert_eq!(value["vni"], 4097);
        assert_eq!(value["peers"][0]["ip"], "192.168.56.11");
        let back: NetworkDetail = decode_frame(&encode_frame(&detail)).unwrap();
        assert_eq!(back, detail);
    }
}
