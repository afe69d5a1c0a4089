//! The desired state of the cluster and every change to it, as pure functions of (state, input,
//! time). Operations validate everything before they touch anything, so a refused request leaves
//! the state exactly as it was; [`State::reconcile`] then converges tasks to the services' specs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use proto::agent::DEFAULT_GWBRIDGE_SUBNET;
use proto::agent::{
    Assignment, DrainingBackend, EspSupport, IngressSpec, NetworkService, NetworkSpec, Peer,
    PublishedService, TaskSpec, TaskStatus, ESP_KEY_BYTES,
};
use proto::api::{
    PublishedPort, ServiceSpec, SpecUpdate, INGRESS_NETWORK, MAX_ALIASES, MAX_COMMAND_ARGS,
    MAX_COMMAND_BYTES, MAX_CONSTRAINTS, MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES,
    MAX_REPLICAS,
};
use proto::excerpt;
use proto::model::{
    endpoint_mac, Attachment, Availability, EndpointMode, Health, Network, Node, NodeStatus,
    PortConfig, Protocol, PublishMode, Role, ServiceMode, TaskState,
};
use serde::{Deserialize, Serialize};

use crate::alloc::{self, AllocError};
use crate::keys::{KeyRing, StepKind};
use crate::rollout::{self, Drain, Rollout, SpecError, TaskRuntime};
use crate::sched::{self, Candidate, Constraint, ConstraintError, GlobalFit};

/// Finished tasks kept per slot for `service ps`, besides the current one (Docker keeps 5 in all).
pub const TASK_HISTORY: usize = 4;
/// A slot whose task failed or completed is refilled no sooner than this (Docker's default
/// restart delay), so a command that exits at once does not spin the cluster.
pub const RESTART_DELAY_SECS: u64 = 5;
/// The UDP port of VXLAN between nodes: publishing it would swallow the overlays' traffic.
pub const VXLAN_PORT: u16 = 4789;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub networks: BTreeMap<String, NetworkRecord>,
    pub services: BTreeMap<String, Service>,
    pub tasks: BTreeMap<String, Task>,
    /// The last assignment revision handed out. One counter for all nodes, persisted, so a node's
    /// revisions only ever grow, also across manager restarts.
    pub revision: u64,
    /// The last VNI handed out: VNIs are allocated serially after it.
    pub last_vni: u32,
    /// The last fwmark handed out: fwmarks are allocated serially after it, like VNIs.
    #[serde(default)]
    pub last_fwmark: u32,
    /// The manager's agent port (TCP): configuration, not state, so it is not stored. Publishing
    /// it would cut the agents off.
    #[serde(skip)]
    pub agent_port: Option<u16>,
    /// The manager's TCP API port, if it serves one: configuration too, reserved the same way.
    #[serde(skip)]
    pub api_port: Option<u16>,
    /// The cluster's id: the O of every certificate its CA issues. Made at first start.
    #[serde(default)]
    pub cluster_id: String,
    /// The secrets of the current join tokens; rotating one replaces it.
    #[serde(default)]
    pub join_secrets: JoinSecrets,
    /// Nodes removed from the cluster: their certificates are refused from then on.
    #[serde(default)]
    pub revoked: BTreeSet<String>,
    /// The last subnet allocated automatically: the next goes on from there (see
    /// `alloc::next_free_subnet`).
    #[serde(default)]
    pub last_subnet: Option<Ipv4Net>,
    /// The IPsec keys of encrypted networks, made with the first one (see [`crate::keys`]).
    /// Stored like the rest of the state (the file is private to the manager), so a restart
    /// keeps the keys the nodes use.
    #[serde(default)]
    pub esp_keys: KeyRing,
}

/// Hex of each join token's 16-byte secret (the token itself also carries the CA's digest).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JoinSecrets {
    pub worker: String,
    pub manager: String,
}

impl JoinSecrets {
    pub fn get(&self, role: Role) -> Option<[u8; 16]> {
        let hex = match role {
            Role::Worker => &self.worker,
            Role::Manager => &self.manager,
        };
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    pub fn set(&mut self, role: Role, secret: [u8; 16]) {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        match role {
            Role::Worker => self.worker = hex,
            Role::Manager => self.manager = hex,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: Node,
    /// The node's desired state as last computed; sent on connect and whenever it changes.
    pub assignment: Assignment,
    /// The newest revision the node's agent reported applied.
    pub applied_revision: u64,
    /// The node's ingress_sbox address on the ingress network; kept for the node's life.
    #[serde(default)]
    pub ingress_addr: Option<Ipv4Addr>,
    /// The gwbridge subnet the node's agent reported; None: [`DEFAULT_GWBRIDGE_SUBNET`].
    #[serde(default)]
    pub gwbridge_subnet: Option<Ipv4Net>,
    /// Network id → the node's load-balancer address there, on each user network it carries.
    #[serde(default)]
    pub lb_addrs: BTreeMap<String, Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub network: Network,
    pub created_at: u64,
    /// The address handed out last: allocation goes on from there (see `alloc::next_ip`).
    #[serde(default)]
    pub last_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    /// `networks` holds network ids.
    pub spec: ServiceSpec,
    pub created_at: u64,
    pub updated_at: u64,
    /// The balancers' mark, held while the service has an ingress-mode port or a VIP (see
    /// [`Service::wants_fwmark`]).
    #[serde(default)]
    pub fwmark: Option<u32>,
    /// Network id → the service's VIP there (vip mode).
    #[serde(default)]
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// A global service: node id → the slot of its tasks there, kept for the service's life so
    /// that a node's tasks share one slot and their history.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_slots: BTreeMap<String, u64>,
    /// Goes up with every change that replaces the tasks; each task records the one it runs.
    #[serde(default)]
    pub version: u64,
    /// `service update --force` count: part of what a task runs, so a forced update replaces
    /// every task.
    #[serde(default)]
    pub force: u64,
    /// The spec before the last update that replaced the tasks: `service rollback` returns to
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<ServiceSpec>,
    /// The rolling update in progress, or how the last one ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// `service rm`: gone for every user (no name, ports, VIPs or networks), kept only until
    /// its tasks have drained; then reconcile deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

impl Service {
    pub fn has_ingress_port(&self) -> bool {
        has_ingress_port(&self.spec.ports)
    }

    pub fn is_global(&self) -> bool {
        self.spec.mode == ServiceMode::Global
    }
}

impl NodeRecord {
    fn gwbridge(&self) -> Ipv4Net {
        self.gwbridge_subnet.unwrap_or_else(default_gwbridge)
    }
}

fn default_gwbridge() -> Ipv4Net {
    DEFAULT_GWBRIDGE_SUBNET
        .parse()
        .expect("the default gwbridge subnet is valid")
}

fn has_ingress_port(ports: &[PortConfig]) -> bool {
    ports.iter().any(|p| p.mode == PublishMode::Ingress)
}

/// Swarm's rule: dnsrr has no VIP, so nothing could balance an ingress-mode port.
fn check_endpoint_mode(mode: EndpointMode, ports: &[PortConfig]) -> Result<(), Reason> {
    if mode == EndpointMode::Dnsrr && has_ingress_port(ports) {
        return Err(Reason::DnsrrIngress);
    }
    Ok(())
}

/// The first host-mode port: with one, the service runs at most one task per node.
fn host_port(ports: &[PortConfig]) -> Option<PublishedPort> {
    ports
        .iter()
        .find(|p| p.mode == PublishMode::Host)
        .map(PublishedPort::from)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    /// Replica number from 1; a replacement keeps the slot of the task it replaces.
    pub slot: u64,
    pub node_id: Option<String>,
    /// `Running` while the manager wants the task; `Shutdown` once it is history.
    pub desired_state: TaskState,
    pub state: TaskState,
    pub error: Option<String>,
    pub pid: Option<u32>,
    pub netns: Option<String>,
    /// Endpoints, in the order of the service's networks. Released (emptied) when the task
    /// becomes history, so its addresses can be handed out again.
    pub attachments: Vec<Attachment>,
    pub created_at: u64,
    pub updated_at: u64,
    /// The service version whose spec the task runs.
    #[serde(default)]
    pub spec_version: u64,
    /// What the task runs, fixed when it is made; None for a task from before tasks kept it
    /// (it runs its service's spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<TaskRuntime>,
    /// With a health check, while it runs: what its agent's checks find.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Set while the task leaves the balancers before it stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// Set once the task has left every balancer and its node was told to stop it. Until its
    /// agent reports it ended, or this time passes (its grace period and a margin), its
    /// addresses stay reachable from the other nodes and listed to their balancers as
    /// draining, so its open connections can finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping_until_ms: Option<u64>,
}

impl Task {
    /// A task the manager still wants: it counts for its slot and holds its addresses.
    pub fn is_current(&self) -> bool {
        self.desired_state == TaskState::Running && !self.state.is_terminal()
    }

    /// A current task that is on a node.
    pub(crate) fn is_placed(&self) -> bool {
        self.is_current() && self.node_id.is_some()
    }

    /// A task whose process the node keeps: a placed one, or one draining there. It is in its
    /// node's assignment, and its addresses stay reachable from the other nodes.
    pub(crate) fn is_on_node(&self) -> bool {
        (self.is_current() || self.is_draining()) && self.node_id.is_some()
    }

    /// A task told to stop whose process may still run (see `stopping_until_ms`).
    pub fn is_stopping(&self) -> bool {
        self.stopping_until_ms.is_some()
    }

    /// A task whose addresses the other nodes still reach: on its node, or stopping there.
    pub(crate) fn is_reachable(&self) -> bool {
        (self.is_on_node() || self.is_stopping()) && self.node_id.is_some()
    }

    /// A task whose process has left for good: the history `service ps` shows.
    pub(crate) fn is_history(&self) -> bool {
        !(self.is_current() || self.is_draining() || self.is_stopping())
    }

    /// A new task of `service` in `slot`, on no node yet, running the service's spec now.
    pub(crate) fn pending(service: &Service, slot: u64, now: u64) -> Task {
        Task {
            id: alloc::new_id(),
            service_id: service.id.clone(),
            slot,
            node_id: None,
            desired_state: TaskState::Running,
            state: TaskState::Pending,
            error: None,
            pid: None,
            netns: None,
            attachments: Vec::new(),
            created_at: now,
            updated_at: now,
            spec_version: service.version,
            runtime: Some(service.runtime()),
            health: None,
            drain: None,
            stopping_until_ms: None,
        }
    }

    pub(crate) fn retire(&mut self, state: TaskState, error: Option<String>, now: u64) {
        self.desired_state = TaskState::Shutdown;
        self.drain = None;
        self.stopping_until_ms = None;
        if self.state != state {
            self.state = state;
            self.updated_at = now;
        }
        if error.is_some() {
            self.error = error;
        }
        self.attachments.clear();
    }
}

/// Why a request was refused; [`OpError`] adds what was being done to which object.
/// What placing tasks needs to know about the others, gathered once per scheduling pass rather
/// than by a scan of every task for each task placed (which made 10,000 unplaceable replicas
/// cost seconds per pass), and kept up to date as the pass places tasks.
struct PlacementIndex {
    /// Each (service, slot) with ended tasks: when it may start again (the last failed or
    /// completed task's end plus the restart delay), and the nodes where its tasks failed, which
    /// a replacement avoids if it can.
    history: BTreeMap<(String, u64), SlotHistory>,
    /// Current placed tasks per node.
    load: BTreeMap<String, NodeLoad>,
    /// Each service's constraints, parsed once.
    constraints: BTreeMap<String, Vec<Constraint>>,
}

#[derive(Default)]
struct SlotHistory {
    restart_at: Option<u64>,
    nodes: BTreeSet<String>,
}

#[derive(Default)]
struct NodeLoad {
    total: usize,
    per_service: BTreeMap<String, usize>,
}

impl PlacementIndex {
    fn new(s: &State) -> PlacementIndex {
        let mut history: BTreeMap<(String, u64), SlotHistory> = BTreeMap::new();
        let mut load: BTreeMap<String, NodeLoad> = BTreeMap::new();
        for t in s.tasks.values() {
            // A draining task still holds its node (and any host-mode port there).
            if t.is_current() || t.is_draining() {
                if let Some(node) = t.node_id.clone() {
                    let l = load.entry(node).or_default();
                    l.total += 1;
                    *l.per_service.entry(t.service_id.clone()).or_default() += 1;
                }
                continue;
            }
            let h = history.entry((t.service_id.clone(), t.slot)).or_default();
            // Only where a task failed is avoided: a task replaced by an update may come back
            // to its node.
            if matches!(t.state, TaskState::Failed | TaskState::Complete) {
                h.restart_at = h.restart_at.max(Some(t.updated_at + RESTART_DELAY_SECS));
                h.nodes.extend(t.node_id.clone());
            }
        }
        let constraints = s
            .services
            .values()
            .map(|svc| {
                let parsed = svc
                    .spec
                    .constraints
                    .iter()
                    .filter_map(|c| Constraint::parse(c).ok())
                    .collect();
                (svc.id.clone(), parsed)
            })
            .collect();
        PlacementIndex {
            history,
            load,
            constraints,
        }
    }

    fn constraints(&self, service: &Service) -> &[Constraint] {
        self.constraints.get(&service.id).map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    #[error("no such {kind}: {}", excerpt(name))]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} id prefix {:?} is ambiguous", excerpt(prefix))]
    Ambiguous { kind: &'static str, prefix: String },
    #[error("a {kind} named {name} already exists")]
    Duplicate { kind: &'static str, name: String },
    #[error("the name {INGRESS_NETWORK} is reserved for the routing mesh")]
    ReservedName,
    #[error("unsupported driver {:?}: only overlay is supported", excerpt(.0))]
    Driver(String),
    #[error("it is in use by services: {}", .0.join(", "))]
    InUse(Vec<String>),
    #[error("a command is required (meshctl service create ... -- CMD [ARG...])")]
    EmptyCommand,
    #[error("{0} replicas is more than the limit of {MAX_REPLICAS}")]
    TooManyReplicas(u64),
    #[error("replicas can only be used with replicated mode: a global service runs one task on every eligible node")]
    ReplicasGlobal,
    #[error("scale can only be used with replicated mode")]
    ScaleGlobal,
    #[error("{kind} {} is given more than once", excerpt(name))]
    Twice { kind: &'static str, name: String },
    #[error("no {0} is given")]
    NoneGiven(&'static str),
    #[error(
        "invalid label key {:?}: it must have 1 to {MAX_LABEL_KEY_BYTES} bytes, without spaces, = or control characters",
        excerpt(.0)
    )]
    LabelKey(String),
    #[error(
        "invalid value {:?} of label {}: it must have at most {MAX_LABEL_VALUE_BYTES} bytes, without control characters",
        excerpt(value),
        excerpt(key)
    )]
    LabelValue { key: String, value: String },
    #[error("label {} is both added and removed", excerpt(.0))]
    LabelAddedAndRemoved(String),
    #[error("{0} labels is more than the limit of {MAX_LABELS} per node")]
    TooManyLabels(usize),
    #[error("{0} constraints is more than the limit of {MAX_CONSTRAINTS}")]
    TooManyConstraints(usize),
    #[error("the command has {0} arguments, more than the limit of {MAX_COMMAND_ARGS}")]
    TooManyArgs(usize),
    #[error("the command has {0} bytes, more than the limit of {MAX_COMMAND_BYTES}")]
    CommandTooLong(usize),
    #[error("argument {} of the command ({:?}) contains a NUL byte", .0 + 1, excerpt(.1))]
    CommandNul(usize, String),
    #[error("invalid node id {:?}: expected up to 64 letters and digits", excerpt(.0))]
    NodeId(String),
    #[error("invalid hostname {:?}: expected 1 to 253 characters without spaces", excerpt(.0))]
    Hostname(String),
    #[error("task {} is not assigned to this node", excerpt(.0))]
    NotYourTask(String),
    #[error("a node named {} is already in the cluster: remove it first (meshctl node rm) or give this one another --hostname", excerpt(.0))]
    HostnameTaken(String),
    #[error("node {0} was removed from the cluster: its certificate is revoked; join it again with a new token (meshctl join-token worker)")]
    Revoked(String),
    #[error("node {} is not part of this cluster", excerpt(.0))]
    UnknownNode(String),
    #[error("node {0} is ready: stop its agent first, or remove it anyway with --force")]
    NodeReady(String),
    #[error("node {0} is the only manager: promote another node first")]
    LastManager(String),
    #[error("an agent cannot report state {0:?}")]
    ReportedState(TaskState),
    #[error("the {INGRESS_NETWORK} network belongs to the routing mesh and cannot be removed")]
    IngressRemove,
    #[error("the {INGRESS_NETWORK} network cannot be attached directly: publish a port (--publish) to join the routing mesh")]
    IngressAttach,
    #[error("its address {addr} is inside the {INGRESS_NETWORK} subnet {subnet}")]
    NodeInIngress { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("invalid port {0}: published and target ports must be between 1 and 65535")]
    PortZero(String),
    #[error("port {port} is already published by service {service}")]
    PortTaken {
        port: PublishedPort,
        service: String,
    },
    #[error("port {0} is given more than once")]
    PortTwice(PublishedPort),
    #[error("port {port} is reserved: {why}")]
    PortReserved {
        port: PublishedPort,
        why: &'static str,
    },
    #[error("service {service} does not publish port {port}")]
    NotPublished {
        port: PublishedPort,
        service: String,
    },
    #[error("no service publishes port {0}")]
    NobodyPublishes(PublishedPort),
    #[error("endpoint mode dnsrr cannot be used with ports published in ingress mode: publish them with mode=host, or use --endpoint-mode vip")]
    DnsrrIngress,
    #[error("alias given for network {}, which the service is not attached to", excerpt(.0))]
    AliasOffNetwork(String),
    #[error("{0} aliases on one network is more than the limit of {MAX_ALIASES}")]
    TooManyAliases(usize),
    #[error("alias {} is the service's own name", excerpt(.0))]
    AliasIsName(String),
    #[error(
        "all fwmarks from {} to {} are in use",
        alloc::FIRST_FWMARK,
        alloc::MAX_FWMARK
    )]
    NoFreeFwmark,
    #[error("unsupported network option {}: only encrypted is supported", excerpt(.0))]
    NetworkOption(String),
    #[error("invalid value {} for option encrypted: give it without a value, or true or false", excerpt(.0))]
    EncryptedValue(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {reason}")]
pub struct OpError {
    pub op: String,
    pub reason: Reason,
}

fn refuse<T>(op: impl Into<String>, reason: impl Into<Reason>) -> Result<T, OpError> {
    Err(OpError {
        op: op.into(),
        reason: reason.into(),
    })
}

/// Finds an object by exact id, exact name, or unique id prefix, in that order.
fn resolve<'a>(
    kind: &'static str,
    key: &str,
    objects: impl Iterator<Item = (&'a String, &'a str)> + Clone,
) -> Result<String, Reason> {
    if let Some((id, _)) = objects.clone().find(|(id, _)| id.as_str() == key) {
        return Ok(id.clone());
    }
    if let Some((id, _)) = objects.clone().find(|(_, name)| *name == key) {
        return Ok(id.clone());
    }
    let mut by_prefix = objects.filter(|(id, _)| !key.is_empty() && id.starts_with(key));
    match (by_prefix.next(), by_prefix.next()) {
        (Some((id, _)), None) => Ok(id.clone()),
        (Some(_), Some(_)) => Err(Reason::Ambiguous {
            kind,
            prefix: key.to_string(),
        }),
        (None, _) => Err(Reason::NotFound {
            kind,
            name: key.to_string(),
        }),
    }
}

impl State {
    pub fn find_node(&self, key: &str) -> Result<String, Reason> {
        resolve(
            "node",
            key,
            self.nodes
                .iter()
                .map(|(id, r)| (id, r.node.hostname.as_str())),
        )
    }

    pub fn find_network(&self, key: &str) -> Result<String, Reason> {
        resolve(
            "network",
            key,
            self.networks
                .iter()
                .map(|(id, r)| (id, r.network.name.as_str())),
        )
    }

    /// A service by id, name or id prefix; one being removed is no longer found.
    pub fn find_service(&self, key: &str) -> Result<String, Reason> {
        resolve(
            "service",
            key,
            self.services
                .iter()
                .filter(|(_, s)| !s.removing)
                .map(|(id, s)| (id, s.spec.name.as_str())),
        )
    }

    /// The routing mesh's network, once it exists.
    pub fn ingress(&self) -> Option<&Network> {
        self.networks
            .values()
            .map(|r| &r.network)
            .find(|n| n.ingress)
    }

    /// The nodes' underlay addresses, and the manager's, that no overlay subnet may contain;
    /// lowest address first, so a refusal names the same node every time.
    fn underlay(&self, manager_ip: IpAddr) -> Vec<(String, Ipv4Addr)> {
        let mut underlay: Vec<(String, Ipv4Addr)> = self
            .nodes
            .values()
            .filter_map(|r| match r.node.addr {
                IpAddr::V4(ip) => Some((format!("node {}", r.node.hostname), ip)),
                IpAddr::V6(_) => None,
            })
            .collect();
        if let IpAddr::V4(ip) = manager_ip {
            if !ip.is_unspecified() {
                underlay.push(("the manager".to_string(), ip));
            }
        }
        underlay.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        underlay
    }

    /// The nodes' gwbridge subnets, which no overlay may overlap: what each agent reported, else
    /// the default, which also stands for the nodes yet to join while none has.
    fn gwbridges(&self) -> Vec<(String, Ipv4Net)> {
        let mut gwbridges: Vec<(String, Ipv4Net)> = self
            .nodes
            .values()
            .map(|r| (format!("node {}", r.node.hostname), r.gwbridge()))
            .collect();
        if gwbridges.is_empty() {
            gwbridges.push(("every node by default".to_string(), default_gwbridge()));
        }
        gwbridges.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        gwbridges
    }

    /// Records the gwbridge subnet a node's agent reported (None: the default). One that
    /// overlaps an existing overlay cannot be refused (the node is up already), so it is logged.
    pub fn set_gwbridge_subnet(&mut self, node_id: &str, subnet: Option<Ipv4Net>) {
        let Some(record) = self.nodes.get_mut(node_id) else {
            return;
        };
        record.gwbridge_subnet = subnet;
        let (hostname, gwbridge) = (&record.node.hostname, record.gwbridge());
        for network in self.networks.values().map(|r| &r.network) {
            if alloc::overlaps(&gwbridge, &network.subnet) {
                tracing::warn!(node = %hostname, %gwbridge, network = %network.name, subnet = %network.subnet, "the node's gwbridge overlaps a network: its tasks on it lose their egress route");
            }
        }
    }

    /// Addresses taken on a network: its task endpoints, the services' VIPs, the nodes'
    /// load-balancer endpoints, and on ingress also the sboxes.
    pub(crate) fn addrs_in_use(&self, network: &Network) -> BTreeSet<Ipv4Addr> {
        let tasks = self
            .tasks
            .values()
            .flat_map(|t| &t.attachments)
            .filter(|a| a.network_id == network.id)
            .map(|a| a.addr.addr());
        let sboxes = self
            .nodes
            .values()
            .filter(|_| network.ingress)
            .filter_map(|r| r.ingress_addr);
        let vips = self
            .services
            .values()
            .filter_map(|s| s.vips.get(&network.id));
        let lbs = self
            .nodes
            .values()
            .filter_map(|r| r.lb_addrs.get(&network.id));
        tasks
            .chain(sboxes)
            .chain(vips.copied())
            .chain(lbs.copied())
            .collect()
    }

    /// Creates the ingress network at first start (it takes the first VNI) and gives every node
    /// an ingress_sbox address. Returns whether anything changed. An existing ingress network
    /// keeps its subnet: its addresses are in use on every node.
    pub fn ensure_ingress(
        &mut self,
        subnet: &str,
        manager_ip: IpAddr,
        now: u64,
    ) -> Result<bool, OpError> {
        let op = format!("create the {INGRESS_NETWORK} network");
        let wanted = alloc::parse_subnet(subnet).or_else(|e| refuse(&op, e))?;
        let mut changed = false;
        match self.ingress() {
            Some(existing) => {
                if existing.subnet != wanted {
                    tracing::warn!(stored = %existing.subnet, given = %wanted, "the ingress network keeps its stored subnet");
                }
            }
            None => {
                alloc::check_underlay(wanted, &self.underlay(manager_ip))
                    .or_else(|e| refuse(&op, e))?;
                alloc::check_gwbridge(wanted, &self.gwbridges()).or_else(|e| refuse(&op, e))?;
                let vnis: BTreeSet<u32> = self.networks.values().map(|r| r.network.vni).collect();
                let vni = alloc::next_vni(&vnis, self.last_vni).or_else(|e| refuse(&op, e))?;
                let id = alloc::new_id();
                self.last_vni = vni;
                self.networks.insert(
                    id.clone(),
                    NetworkRecord {
                        network: Network {
                            id,
                            name: INGRESS_NETWORK.to_string(),
                            driver: "overlay".to_string(),
                            subnet: wanted,
                            gateway: alloc::gateway_of(wanted),
                            vni,
                            ingress: true,
                            encrypted: false,
                        },
                        created_at: now,
                        last_ip: None,
                    },
                );
                changed = true;
            }
        }
        let missing: Vec<String> = self
            .nodes
            .values()
            .filter(|r| r.ingress_addr.is_none())
            .map(|r| r.node.id.clone())
            .collect();
        for id in missing {
            let ip = self.next_sbox_addr().or_else(|e| refuse(&op, e))?;
            self.nodes.get_mut(&id).expect("node exists").ingress_addr = ip;
            changed = true;
        }
        Ok(changed)
    }

    /// A free ingress address for a node's ingress_sbox; None while there is no ingress network.
    /// Serial with the task endpoints on ingress (one `last_ip`), so a node never gets an address
    /// a task had a moment ago while peers may still hold its ARP, FDB or conntrack state.
    fn next_sbox_addr(&mut self) -> Result<Option<Ipv4Addr>, AllocError> {
        let Some(ingress) = self.ingress() else {
            return Ok(None);
        };
        let id = ingress.id.clone();
        self.next_addr(&id).map(Some)
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// A node joined with a valid token: a new node, with a new id, until its agent says Hello
    /// (with the certificate issued now) it is down. A hostname already in the cluster is
    /// refused rather than taken over.
    pub fn join_node(
        &mut self,
        id: &str,
        hostname: &str,
        addr: IpAddr,
        role: Role,
    ) -> Result<String, OpError> {
        let op = || format!("join node {}", excerpt(hostname));
        if self.nodes.values().any(|r| r.node.hostname == hostname) {
            return refuse(op(), Reason::HostnameTaken(hostname.to_string()));
        }
        if self.nodes.contains_key(id) || self.revoked.contains(id) {
            return refuse(op(), Reason::NodeId(id.to_string()));
        }
        let id = self.register_node(hostname, addr, Some(id), role)?;
        self.set_node_status(&id, NodeStatus::Down);
        Ok(id)
    }

    /// The agent of node `id` (its certificate's CN) said Hello: its hostname and address follow
    /// the Hello, its role stays what the cluster says.
    pub fn connect_node(
        &mut self,
        id: &str,
        hostname: &str,
        addr: IpAddr,
    ) -> Result<Role, OpError> {
        let op = || format!("connect node {}", excerpt(id));
        if self.revoked.contains(id) {
            return refuse(op(), Reason::Revoked(id.to_string()));
        }
        let Some(record) = self.nodes.get(id) else {
            return refuse(op(), Reason::UnknownNode(id.to_string()));
        };
        let role = record.node.role;
        if self
            .nodes
            .values()
            .any(|r| r.node.id != id && r.node.hostname == hostname)
        {
            return refuse(op(), Reason::HostnameTaken(hostname.to_string()));
        }
        self.register_node(hostname, addr, Some(id), role)?;
        Ok(role)
    }

    /// `meshctl node rm`: the node's certificate is refused from now on and its tasks are
    /// replaced elsewhere. A ready node goes only with `force`.
    pub fn remove_node(&mut self, key: &str, force: bool, now: u64) -> Result<String, OpError> {
        let op = || format!("remove node {key}");
        let id = self.find_node(key).or_else(|r| refuse(op(), r))?;
        let node = &self.nodes[&id].node;
        if node.status == NodeStatus::Ready && !force {
            return refuse(op(), Reason::NodeReady(node.hostname.clone()));
        }
        if node.role == Role::Manager && self.managers().count() == 1 && !force {
            return refuse(op(), Reason::LastManager(node.hostname.clone()));
        }
        let error = format!("node {} was removed", node.hostname);
        for task in self.tasks.values_mut() {
            if task.node_id.as_deref() == Some(&id) && task.is_current() {
                task.retire(TaskState::Orphaned, Some(error.clone()), now);
            }
        }
        self.nodes.remove(&id);
        self.revoked.insert(id.clone());
        Ok(id)
    }

    /// `meshctl node promote|demote`: the role the node's next certificate carries.
    pub fn set_node_role(&mut self, key: &str, role: Role) -> Result<String, OpError> {
        let op = || format!("change the role of node {key}");
        let id = self.find_node(key).or_else(|r| refuse(op(), r))?;
        let node = &self.nodes[&id].node;
        if role == Role::Worker && node.role == Role::Manager && self.managers().count() == 1 {
            return refuse(op(), Reason::LastManager(node.hostname.clone()));
        }
        self.nodes
            .get_mut(&id)
            .expect("id was just resolved")
            .node
            .role = role;
        Ok(id)
    }

    fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .map(|r| &r.node)
            .filter(|n| n.role == Role::Manager)
    }

    /// An agent said Hello. The node keeps its id when the agent remembers it or when the
    /// hostname is known; its address, role and status follow the latest Hello.
    pub fn register_node(
        &mut self,
        hostname: &str,
        addr: IpAddr,
        node_id: Option<&str>,
        role: Role,
    ) -> Result<String, OpError> {
        let op = || format!("register node {}", excerpt(hostname));
        if hostname.is_empty()
            || hostname.len() > 253
            || hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return refuse(op(), Reason::Hostname(hostname.to_string()));
        }
        if let Some(id) = node_id {
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return refuse(op(), Reason::NodeId(id.to_string()));
            }
        }
        let id = node_id.map(str::to_string).or_else(|| {
            self.nodes
                .values()
                .find(|r| r.node.hostname == hostname)
                .map(|r| r.node.id.clone())
        });
        let id = id.unwrap_or_else(alloc::new_id);
        if let (Some(ingress), IpAddr::V4(ip)) = (self.ingress(), addr) {
            if ingress.subnet.contains(&ip) {
                return refuse(
                    op(),
                    Reason::NodeInIngress {
                        addr: ip,
                        subnet: ingress.subnet,
                    },
                );
            }
        }
        let sbox = match self.nodes.get(&id).and_then(|r| r.ingress_addr) {
            Some(ip) => Some(ip),
            None => self.next_sbox_addr().or_else(|e| refuse(op(), e))?,
        };
        if let Some(record) = self.nodes.get_mut(&id) {
            record.ingress_addr = sbox;
            record.node.hostname = hostname.to_string();
            record.node.addr = addr;
            record.node.role = role;
            record.node.status = NodeStatus::Ready;
        } else {
            let revision = self.next_revision();
            self.nodes.insert(
                id.clone(),
                NodeRecord {
                    node: Node {
                        id: id.clone(),
                        hostname: hostname.to_string(),
                        addr,
                        role,
                        availability: Availability::Active,
                        status: NodeStatus::Ready,
                        labels: BTreeMap::new(),
                        // Until its agent's Hello says otherwise.
                        no_encryption: no_encryption(None),
                    },
                    assignment: Assignment {
                        revision,
                        ..Assignment::default()
                    },
                    applied_revision: 0,
                    ingress_addr: sbox,
                    gwbridge_subnet: None,
                    lb_addrs: BTreeMap::new(),
                },
            );
        }
        Ok(id)
    }

    pub fn update_node(
        &mut self,
        key: &str,
        availability: Option<Availability>,
        label_add: &BTreeMap<String, String>,
        label_rm: &[String],
    ) -> Result<String, OpError> {
        let op = || format!("update node {}", excerpt(key));
        let id = self.find_node(key).or_else(|r| refuse(op(), r))?;
        if let Some(bad) = label_add.keys().chain(label_rm).find(|k| {
            k.is_empty()
                || k.len() > MAX_LABEL_KEY_BYTES
                || k.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '=')
        }) {
            return refuse(op(), Reason::LabelKey(bad.clone()));
        }
        if let Some((key, value)) = label_add
            .iter()
            .find(|(_, v)| v.len() > MAX_LABEL_VALUE_BYTES || v.chars().any(char::is_control))
        {
            return refuse(
                op(),
                Reason::LabelValue {
                    key: key.clone(),
                    value: value.clone(),
                },
            );
        }
        // Which of the two would win is a guess: the user has to say.
        if let Some(both) = label_rm.iter().find(|k| label_add.contains_key(*k)) {
            return refuse(op(), Reason::LabelAddedAndRemoved(both.clone()));
        }
        let labels = &self.nodes[&id].node.labels;
        let after = labels
            .keys()
            .filter(|k| !label_rm.contains(k))
            .chain(label_add.keys().filter(|k| !labels.contains_key(*k)))
            .count();
        if after > MAX_LABELS {
            return refuse(op(), Reason::TooManyLabels(after));
        }
        let node = &mut self.nodes.get_mut(&id).expect("id was just resolved").node;
        if let Some(a) = availability {
            node.availability = a;
        }
        for key in label_rm {
            node.labels.remove(key);
        }
        node.labels
            .extend(label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(id)
    }

    pub fn set_node_status(&mut self, id: &str, status: NodeStatus) {
        if let Some(record) = self.nodes.get_mut(id) {
            record.node.status = status;
        }
    }

    /// Records the revision an agent applied; a stale or unknown one is ignored.
    pub fn set_applied(&mut self, id: &str, revision: u64) {
        if let Some(record) = self.nodes.get_mut(id) {
            if revision <= record.assignment.revision && revision > record.applied_revision {
                record.applied_revision = revision;
            }
        }
    }

    /// Creates an overlay network. `manager_ip` joins the nodes' addresses as underlay that no
    /// overlay subnet may contain: traffic to it would be routed into the overlay.
    pub fn create_network(
        &mut self,
        name: &str,
        driver: &str,
        subnet: Option<&str>,
        options: &BTreeMap<String, String>,
        manager_ip: IpAddr,
        now: u64,
    ) -> Result<String, OpError> {
        let op = format!("create network {}", excerpt(name));
        let encrypted = network_options(options).or_else(|e| refuse(&op, e))?;
        if name == INGRESS_NETWORK {
            return refuse(op, Reason::ReservedName);
        }
        alloc::validate_name("network", name).or_else(|e| refuse(&op, e))?;
        if self.networks.values().any(|r| r.network.name == name) {
            return refuse(
                op,
                Reason::Duplicate {
                    kind: "network",
                    name: name.to_string(),
                },
            );
        }
        if driver != "overlay" {
            return refuse(op, Reason::Driver(driver.to_string()));
        }
        let underlay = self.underlay(manager_ip);
        let gwbridges = self.gwbridges();
        let subnet = match subnet {
            Some(text) => {
                // Overlays are isolated from each other (own VNI, own sandbox), so a user may
                // reuse a subnet on another network; what breaks is a subnet that holds the
                // nodes' own addresses, or one task on two overlapping networks (refused at
                // service create).
                let subnet = alloc::parse_subnet(text).or_else(|e| refuse(&op, e))?;
                alloc::check_underlay(subnet, &underlay).or_else(|e| refuse(&op, e))?;
                // Every task with a published port is on ingress too, so no user network may
                // overlap it.
                alloc::check_overlap(subnet, self.ingress().map(|n| (n.name.as_str(), n.subnet)))
                    .or_else(|e| refuse(&op, e))?;
                // A task's route to its overlay would shadow its own gwbridge leg.
                alloc::check_gwbridge(subnet, &gwbridges).or_else(|e| refuse(&op, e))?;
                subnet
            }
            None => {
                let taken: Vec<Ipv4Net> = self
                    .networks
                    .values()
                    .map(|r| r.network.subnet)
                    .chain(underlay.iter().map(|(_, ip)| Ipv4Net::from(*ip)))
                    .chain(gwbridges.iter().map(|(_, gw)| *gw))
                    .collect();
                let subnet = alloc::next_free_subnet(&taken, self.last_subnet)
                    .or_else(|e| refuse(&op, e))?;
                self.last_subnet = Some(subnet);
                subnet
            }
        };
        let vnis: BTreeSet<u32> = self.networks.values().map(|r| r.network.vni).collect();
        let vni = alloc::next_vni(&vnis, self.last_vni).or_else(|e| refuse(&op, e))?;
        let id = alloc::new_id();
        self.last_vni = vni;
        self.networks.insert(
            id.clone(),
            NetworkRecord {
                network: Network {
                    id: id.clone(),
                    name: name.to_string(),
                    driver: "overlay".to_string(),
                    subnet,
                    gateway: alloc::gateway_of(subnet),
                    vni,
                    ingress: false,
                    encrypted,
                },
                created_at: now,
                last_ip: None,
            },
        );
        Ok(id)
    }

    /// Whether the cluster has an encrypted network, whose nodes need the key ring.
    pub fn has_encrypted_networks(&self) -> bool {
        self.networks.values().any(|r| r.network.encrypted)
    }

    /// Makes the key ring, or begins a rotation when one is due, while an encrypted network
    /// exists. The rotation's further steps follow the nodes' confirmations
    /// ([`State::advance_keys`]).
    pub fn rotate_keys(
        &mut self,
        now_ms: u64,
        interval_secs: u64,
        fresh: &mut impl FnMut() -> [u8; ESP_KEY_BYTES],
    ) {
        if self.has_encrypted_networks() {
            let step = self.esp_keys.step.is_some();
            self.esp_keys.rotate(now_ms, interval_secs, fresh);
            if !step && self.esp_keys.step.is_some() {
                tracing::info!(
                    key = self.esp_keys.last_tag,
                    "IPsec key rotation: a new key, for receiving only until every node has it"
                );
            }
        }
    }

    /// Of the nodes in `revisions` (node → the revision carrying a change: a drain, a key
    /// step), those that are ready and have not applied theirs: a node that is down or gone
    /// holds nothing back.
    pub(crate) fn unconfirmed(&self, revisions: &BTreeMap<String, u64>) -> Vec<String> {
        revisions
            .iter()
            .filter(|(node, rev)| {
                self.nodes.get(*node).is_some_and(|r| {
                    r.node.status == NodeStatus::Ready && r.applied_revision < **rev
                })
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Whether a step of the key rotation under way can be taken now: every node confirmed the
    /// one before, or it waited [`crate::keys::KEY_STEP_TIMEOUT_MS`].
    pub fn key_step_ready(&self, now_ms: u64) -> bool {
        self.esp_keys
            .ready(now_ms, |revisions| self.unconfirmed(revisions))
    }

    /// Takes the next step of a key rotation once the nodes applied the one before (see
    /// [`crate::keys`]).
    fn advance_keys(&mut self, now_ms: u64) {
        let mut ring = std::mem::take(&mut self.esp_keys);
        let done = ring.advance(now_ms, |revisions| self.unconfirmed(revisions));
        self.esp_keys = ring;
        let Some(done) = done else {
            return;
        };
        let hosts: Vec<&str> = done
            .unconfirmed
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|r| r.node.hostname.as_str())
            .collect();
        let next = match done.confirmed {
            StepKind::Added => "sending with the new key",
            StepKind::Switched => "dropping the oldest key",
        };
        if hosts.is_empty() {
            tracing::info!(
                send = self.esp_keys.send,
                keys = self.esp_keys.keys.len(),
                "IPsec key rotation: every node applied the last step, {next}"
            );
        } else {
            tracing::warn!(nodes = ?hosts, send = self.esp_keys.send, keys = self.esp_keys.keys.len(), "IPsec key rotation: {next} without these nodes' confirmation of the last step");
        }
    }

    /// Records the revision carrying a new key step to each ready node that carries keys:
    /// called once the assignments are computed.
    fn arm_keys(&mut self) {
        let nodes = &self.nodes;
        self.esp_keys.arm(|| {
            nodes
                .values()
                .filter(|r| r.node.status == NodeStatus::Ready && r.assignment.encryption.is_some())
                .map(|r| (r.node.id.clone(), r.assignment.revision))
                .collect()
        });
    }

    /// Whether any network of the service is encrypted: its tasks need a node with ESP.
    pub(crate) fn needs_encryption(&self, service: &Service) -> bool {
        self.task_networks(service)
            .iter()
            .any(|id| self.networks.get(id).is_some_and(|r| r.network.encrypted))
    }

    /// Records what a node's agent said about ESP (None: an agent that does not say).
    pub fn set_node_esp(&mut self, node_id: &str, esp: Option<&EspSupport>) {
        let Some(record) = self.nodes.get_mut(node_id) else {
            return;
        };
        record.node.no_encryption = no_encryption(esp);
        if esp.is_some() {
            if let Some(why) = self.no_routing_mesh(node_id) {
                let host = &self.nodes[node_id].node.hostname;
                tracing::warn!(node = %host, "no routing mesh on this node: {why}");
            }
        }
    }

    /// `mesh-manager --ingress-encrypted`: the ingress network follows the flag at every start.
    /// Returns whether that changed it.
    pub fn set_ingress_encrypted(&mut self, encrypted: bool) -> bool {
        let Some(r) = self.networks.values_mut().find(|r| r.network.ingress) else {
            return false;
        };
        let changed = r.network.encrypted != encrypted;
        r.network.encrypted = encrypted;
        changed
    }

    /// Why a node is not given the ingress network (the routing mesh): it is encrypted and the
    /// node cannot do IPsec ESP. Rather than carry the routing mesh's traffic in clear to and
    /// from such a node, the cluster leaves it out: its ingress-mode published ports do not
    /// answer, no other node balances to it, and no task with such a port is placed there.
    pub fn no_routing_mesh(&self, node_id: &str) -> Option<String> {
        let record = self.nodes.get(node_id)?;
        (!self.carries_ingress(record)).then(|| {
            "the ingress network is encrypted (mesh-manager --ingress-encrypted) and this node cannot do IPsec ESP (see no_encryption): it has no routing mesh, its ingress-mode published ports do not answer (host-mode ones do)".to_string()
        })
    }

    /// Whether a node gets the ingress network: every node, except, while it is encrypted,
    /// those that cannot do ESP (see [`State::no_routing_mesh`]).
    fn carries_ingress(&self, record: &NodeRecord) -> bool {
        record.node.no_encryption.is_none() || !self.ingress().is_some_and(|n| n.encrypted)
    }

    /// Names of the services that use a network, sorted.
    fn services_on(&self, network_id: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .values()
            .filter(|s| s.spec.networks.iter().any(|n| n == network_id))
            .map(|s| s.spec.name.clone())
            .collect();
        names.sort();
        names
    }

    pub fn remove_network(&mut self, key: &str) -> Result<String, OpError> {
        let op = format!("remove network {}", excerpt(key));
        let id = self.find_network(key).or_else(|r| refuse(&op, r))?;
        if self.networks[&id].network.ingress {
            return refuse(op, Reason::IngressRemove);
        }
        let users = self.services_on(&id);
        if !users.is_empty() {
            return refuse(op, Reason::InUse(users));
        }
        self.networks.remove(&id);
        Ok(id)
    }

    pub fn create_service(&mut self, spec: &ServiceSpec, now: u64) -> Result<String, OpError> {
        let op = format!("create service {}", excerpt(&spec.name));
        alloc::validate_name("service", &spec.name).or_else(|e| refuse(&op, e))?;
        if self
            .services
            .values()
            .any(|s| s.spec.name == spec.name && !s.removing)
        {
            return refuse(
                op,
                Reason::Duplicate {
                    kind: "service",
                    name: spec.name.clone(),
                },
            );
        }
        if spec.command.is_empty() || spec.command[0].is_empty() {
            return refuse(op, Reason::EmptyCommand);
        }
        check_command(&spec.command).or_else(|e| refuse(&op, e))?;
        rollout::check_runtime(spec).or_else(|e| refuse(&op, e))?;
        if spec.constraints.len() > MAX_CONSTRAINTS {
            return refuse(op, Reason::TooManyConstraints(spec.constraints.len()));
        }
        if spec.replicas > MAX_REPLICAS {
            return refuse(op, Reason::TooManyReplicas(spec.replicas));
        }
        if spec.mode == ServiceMode::Global && spec.replicas != 0 {
            return refuse(op, Reason::ReplicasGlobal);
        }
        let mut networks = Vec::new();
        for key in &spec.networks {
            let id = self.find_network(key).or_else(|r| refuse(&op, r))?;
            if self.networks[&id].network.ingress {
                return refuse(op, Reason::IngressAttach);
            }
            if networks.contains(&id) {
                return refuse(
                    op,
                    Reason::Twice {
                        kind: "network",
                        name: key.clone(),
                    },
                );
            }
            // A task's routes to two overlapping subnets would be ambiguous.
            alloc::check_overlap(
                self.networks[&id].network.subnet,
                networks.iter().map(|n: &String| {
                    let net = &self.networks[n].network;
                    (net.name.as_str(), net.subnet)
                }),
            )
            .or_else(|e| refuse(&op, e))?;
            networks.push(id);
        }
        let mut constraints = Vec::new();
        for text in &spec.constraints {
            constraints.push(
                Constraint::parse(text)
                    .or_else(|e| refuse(&op, e))?
                    .to_string(),
            );
        }
        self.check_ports(None, &spec.name, &[], &spec.ports)
            .or_else(|e| refuse(&op, e))?;
        check_endpoint_mode(spec.endpoint_mode, &spec.ports).or_else(|e| refuse(&op, e))?;
        let aliases = self
            .aliases_by_id(&spec.name, &spec.aliases, &networks)
            .or_else(|e| refuse(&op, e))?;
        if has_ingress_port(&spec.ports) {
            self.check_ingress_overlap(&networks)
                .or_else(|e| refuse(&op, e))?;
        }
        let id = alloc::new_id();
        self.services.insert(
            id.clone(),
            Service {
                id: id.clone(),
                spec: ServiceSpec {
                    name: spec.name.clone(),
                    mode: spec.mode,
                    replicas: spec.replicas,
                    networks,
                    constraints,
                    command: spec.command.clone(),
                    ports: spec.ports.clone(),
                    endpoint_mode: spec.endpoint_mode,
                    aliases,
                    env: spec.env.clone(),
                    update_config: spec.update_config.clone(),
                    stop_grace_ms: spec.stop_grace_ms,
                    health: spec.health.clone(),
                },
                created_at: now,
                updated_at: now,
                fwmark: None,
                vips: BTreeMap::new(),
                node_slots: BTreeMap::new(),
                version: 1,
                force: 0,
                previous_spec: None,
                rollout: None,
                removing: false,
            },
        );
        self.sync_fwmark(&id).or_else(|e| refuse(&op, e))?;
        self.sync_vips(&id).or_else(|e| refuse(&op, e))?;
        Ok(id)
    }

    /// Aliases keyed by network id, each a valid name, none twice on one network and none the
    /// service's own name; every key one of the service's networks (`networks`, ids).
    fn aliases_by_id(
        &self,
        service: &str,
        aliases: &BTreeMap<String, Vec<String>>,
        networks: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, Reason> {
        let mut out = BTreeMap::new();
        for (key, names) in aliases {
            let id = self.find_network(key)?;
            if !networks.contains(&id) {
                return Err(Reason::AliasOffNetwork(key.clone()));
            }
            if names.len() > MAX_ALIASES {
                return Err(Reason::TooManyAliases(names.len()));
            }
            let mut seen = BTreeSet::new();
            for name in names {
                alloc::validate_name("alias", name)?;
                if name == service {
                    return Err(Reason::AliasIsName(name.clone()));
                }
                if !seen.insert(name) {
                    return Err(Reason::Twice {
                        kind: "alias",
                        name: name.clone(),
                    });
                }
            }
            if !names.is_empty() && out.insert(id, names.clone()).is_some() {
                return Err(Reason::Twice {
                    kind: "network",
                    name: key.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Allocates the service's fwmark when it starts needing one and frees it when it stops.
    fn sync_fwmark(&mut self, service_id: &str) -> Result<(), Reason> {
        let service = &self.services[service_id];
        let mark = match (service.fwmark, service.wants_fwmark()) {
            (Some(mark), true) => Some(mark),
            (None, true) => {
                let mark = self.next_fwmark()?;
                self.last_fwmark = mark;
                Some(mark)
            }
            (_, false) => None,
        };
        self.services
            .get_mut(service_id)
            .expect("service exists")
            .fwmark = mark;
        Ok(())
    }

    /// Refuses ports in `add` that are invalid, reserved, given twice, published by another
    /// service or among `kept` (the ports `service` keeps), in any mode.
    fn check_ports(
        &self,
        service_id: Option<&str>,
        service: &str,
        kept: &[PortConfig],
        add: &[PortConfig],
    ) -> Result<(), Reason> {
        let mut seen = BTreeSet::new();
        for p in add {
            let port = PublishedPort::from(p);
            if p.published == 0 || p.target == 0 {
                return Err(Reason::PortZero(format!(
                    "{}:{}/{}",
                    p.published,
                    p.target,
                    protocol_word(p.protocol)
                )));
            }
            let why = match p.protocol {
                Protocol::Tcp if Some(p.published) == self.agent_port => {
                    Some("mesh-manager listens on it for agents")
                }
                Protocol::Tcp if Some(p.published) == self.api_port => {
                    Some("mesh-manager serves its API on it")
                }
                Protocol::Udp if p.published == VXLAN_PORT => {
                    Some("it carries the overlays' VXLAN traffic between nodes")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(Reason::PortReserved { port, why });
            }
            if !seen.insert(port) {
                return Err(Reason::PortTwice(port));
            }
            let publisher = self
                .services
                .values()
                .filter(|s| Some(s.id.as_str()) != service_id)
                .find(|s| s.spec.ports.iter().any(|q| PublishedPort::from(q) == port))
                .map(|s| s.spec.name.clone())
                .or_else(|| {
                    kept.iter()
                        .any(|q| PublishedPort::from(q) == port)
                        .then(|| service.to_string())
                });
            if let Some(service) = publisher {
                return Err(Reason::PortTaken { port, service });
            }
        }
        Ok(())
    }

    /// A task on ingress and on a user network overlapping it would have ambiguous routes.
    fn check_ingress_overlap(&self, networks: &[String]) -> Result<(), AllocError> {
        let Some(ingress) = self.ingress() else {
            return Ok(());
        };
        alloc::check_overlap(
            ingress.subnet,
            networks.iter().map(|n| {
                let net = &self.networks[n].network;
                (net.name.as_str(), net.subnet)
            }),
        )
    }

    fn next_fwmark(&self) -> Result<u32, Reason> {
        let in_use: BTreeSet<u32> = self.services.values().filter_map(|s| s.fwmark).collect();
        alloc::next_fwmark(&in_use, self.last_fwmark).ok_or(Reason::NoFreeFwmark)
    }

    /// `meshctl service update`, all or nothing: unpublishes `rm`, publishes `add`, sets the
    /// endpoint mode, and applies the task-spec changes. A change to what tasks run (command,
    /// environment, health check, stop grace period, constraints, `--force`) or to their
    /// networks (the first ingress-mode port added, the last removed) keeps the old spec for
    /// rollback, raises the version and starts a rolling update. Other port changes reach the
    /// nodes through the published list, tasks untouched.
    pub fn update_service(
        &mut self,
        key: &str,
        add: &[PortConfig],
        rm: &[PublishedPort],
        mode: Option<EndpointMode>,
        update: &SpecUpdate,
        now: u64,
    ) -> Result<String, OpError> {
        let op = format!("update service {}", excerpt(key));
        let id = self.find_service(key).or_else(|r| refuse(&op, r))?;
        let service = &self.services[&id];
        let mut ports = service.spec.ports.clone();
        let mut removed = BTreeSet::new();
        for port in rm {
            if !removed.insert(*port) {
                return refuse(op, Reason::PortTwice(*port));
            }
            let Some(at) = ports.iter().position(|p| PublishedPort::from(p) == *port) else {
                return refuse(
                    op,
                    Reason::NotPublished {
                        port: *port,
                        service: service.spec.name.clone(),
                    },
                );
            };
            ports.remove(at);
        }
        self.check_ports(Some(&id), &service.spec.name, &ports, add)
            .or_else(|e| refuse(&op, e))?;
        ports.extend_from_slice(add);
        let was_ingress = service.has_ingress_port();
        let is_ingress = has_ingress_port(&ports);
        let gains_host_port =
            host_port(&service.spec.ports).is_none() && host_port(&ports).is_some();
        let mode = mode.unwrap_or(service.spec.endpoint_mode);
        check_endpoint_mode(mode, &ports).or_else(|e| refuse(&op, e))?;
        if !was_ingress && is_ingress {
            self.check_ingress_overlap(&service.spec.networks)
                .or_else(|e| refuse(&op, e))?;
        }
        let mut next =
            rollout::apply_spec_update(&service.spec, update).or_else(|e| refuse(&op, e))?;
        check_command(&next.command).or_else(|e| refuse(&op, e))?;
        rollout::check_runtime(&next).or_else(|e| refuse(&op, e))?;
        if next.constraints.len() > MAX_CONSTRAINTS {
            return refuse(op, Reason::TooManyConstraints(next.constraints.len()));
        }
        let mut constraints = Vec::new();
        for text in &next.constraints {
            let canonical = Constraint::parse(text)
                .or_else(|e| refuse(&op, e))?
                .to_string();
            if constraints.contains(&canonical) {
                return refuse(
                    op,
                    Reason::Twice {
                        kind: "constraint",
                        name: canonical,
                    },
                );
            }
            constraints.push(canonical);
        }
        next.constraints = constraints;
        next.ports = ports;
        next.endpoint_mode = mode;
        let old = &service.spec;
        let replaces = update.force
            || was_ingress != is_ingress
            || next.command != old.command
            || next.env != old.env
            || next.health != old.health
            || next.stop_grace_ms != old.stop_grace_ms
            || next.constraints != old.constraints;
        let service = self.services.get_mut(&id).expect("id was just resolved");
        if service.spec != next {
            let old = std::mem::replace(&mut service.spec, next);
            if replaces {
                service.previous_spec = Some(old);
            }
            service.updated_at = now;
        }
        if update.force {
            service.force += 1;
        }
        self.sync_fwmark(&id).or_else(|e| refuse(&op, e))?;
        self.sync_vips(&id).or_else(|e| refuse(&op, e))?;
        if replaces {
            self.start_rollout(&id, false, now * 1000);
        } else if gains_host_port {
            self.retire_extra_host_tasks(&id, now);
        }
        Ok(id)
    }

    /// Once a service has a host-mode port, only one of its tasks per node can own it: the
    /// others (all but the lowest slot on each node) are replaced, and the scheduler places the
    /// replacements on other nodes or leaves them pending.
    fn retire_extra_host_tasks(&mut self, service_id: &str, now: u64) {
        let mut kept: BTreeSet<String> = BTreeSet::new();
        let mut placed: Vec<&mut Task> = self
            .tasks
            .values_mut()
            .filter(|t| t.service_id == service_id && t.is_placed())
            .collect();
        placed.sort_by_key(|t| t.slot);
        for task in placed {
            let node = task.node_id.clone().expect("a placed task has a node");
            if !kept.insert(node) {
                tracing::info!(task = %task.id, slot = task.slot, "replacing task: a host-mode port allows one task of the service per node");
                task.begin_drain(
                    Some(
                        "replaced: a host-mode port allows one task of the service per node".into(),
                    ),
                    false,
                    now * 1000,
                );
            }
        }
    }

    /// Unpublishes a port from whichever service publishes it.
    pub fn unpublish(&mut self, port: PublishedPort, now: u64) -> Result<String, OpError> {
        let publisher = self
            .services
            .values()
            .find(|s| s.spec.ports.iter().any(|p| PublishedPort::from(p) == port))
            .map(|s| s.id.clone());
        match publisher {
            Some(id) => self.update_service(&id, &[], &[port], None, &SpecUpdate::default(), now),
            None => refuse(
                format!("unpublish port {port}"),
                Reason::NobodyPublishes(port),
            ),
        }
    }

    /// Unpublishes every port or none; returns the id of each port's service, in order.
    pub fn unpublish_many(
        &mut self,
        ports: &[PublishedPort],
        now: u64,
    ) -> Result<Vec<String>, OpError> {
        if ports.is_empty() {
            return refuse("unpublish ports", Reason::NoneGiven("port"));
        }
        let mut seen = BTreeSet::new();
        if let Some(twice) = ports.iter().find(|p| !seen.insert(**p)) {
            return refuse(format!("unpublish port {twice}"), Reason::PortTwice(*twice));
        }
        self.all_or_none(|s| ports.iter().map(|p| s.unpublish(*p, now)).collect())
    }

    /// Runs `change` on a copy that replaces the state only if every step succeeded, so a
    /// request naming several objects changes all of them or none.
    fn all_or_none<T>(
        &mut self,
        change: impl FnOnce(&mut State) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let mut next = self.clone();
        let out = change(&mut next)?;
        *self = next;
        Ok(out)
    }

    /// Resolves every key to an id, refusing an unknown key and two keys for the same object
    /// (`rm web web`, or a name and its id): applied one after the other they would fail or,
    /// for scale, silently keep only the last.
    fn resolve_each(
        &self,
        kind: &'static str,
        verb: &str,
        keys: &[&str],
        find: impl Fn(&State, &str) -> Result<String, Reason>,
    ) -> Result<Vec<String>, OpError> {
        if keys.is_empty() {
            return refuse(format!("{verb} {kind}s"), Reason::NoneGiven(kind));
        }
        let mut ids = Vec::new();
        for key in keys {
            let op = || format!("{verb} {kind} {}", excerpt(key));
            let id = find(self, key).or_else(|r| refuse(op(), r))?;
            if ids.contains(&id) {
                return refuse(
                    op(),
                    Reason::Twice {
                        kind,
                        name: key.to_string(),
                    },
                );
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// Scales every service or none; returns their ids in order.
    pub fn scale_services(
        &mut self,
        scales: &[(String, u64)],
        now: u64,
    ) -> Result<Vec<String>, OpError> {
        let keys: Vec<&str> = scales.iter().map(|(k, _)| k.as_str()).collect();
        self.resolve_each("service", "scale", &keys, State::find_service)?;
        self.all_or_none(|s| {
            scales
                .iter()
                .map(|(key, replicas)| s.scale_service(key, *replicas, now))
                .collect()
        })
    }

    /// Removes every service or none; returns their ids in order.
    pub fn remove_services(&mut self, keys: &[String], now: u64) -> Result<Vec<String>, OpError> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.resolve_each("service", "remove", &keys, State::find_service)?;
        self.all_or_none(|s| keys.iter().map(|k| s.remove_service(k, now)).collect())
    }

    /// Removes every network or none; returns their ids in order.
    pub fn remove_networks(&mut self, keys: &[String]) -> Result<Vec<String>, OpError> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.resolve_each("network", "remove", &keys, State::find_network)?;
        self.all_or_none(|s| keys.iter().map(|k| s.remove_network(k)).collect())
    }

    pub fn scale_service(&mut self, key: &str, replicas: u64, now: u64) -> Result<String, OpError> {
        let op = format!("scale service {}", excerpt(key));
        let id = self.find_service(key).or_else(|r| refuse(&op, r))?;
        if self.services[&id].is_global() {
            return refuse(op, Reason::ScaleGlobal);
        }
        if replicas > MAX_REPLICAS {
            return refuse(op, Reason::TooManyReplicas(replicas));
        }
        let service = self.services.get_mut(&id).expect("id was just resolved");
        if service.spec.replicas != replicas {
            service.spec.replicas = replicas;
            service.updated_at = now;
        }
        Ok(id)
    }

    /// `meshctl service rollback` (see [`State::rollback_to_previous`]).
    pub fn rollback_service(&mut self, key: &str, now: u64) -> Result<String, OpError> {
        self.rollback_to_previous(key, now * 1000)
            .or_else(|r| refuse(format!("roll back service {}", excerpt(key)), r))
    }

    /// Removes a service: at once its name, ports, VIPs and networks are free and it is gone
    /// from every listing and every node's balancers and DNS; its running tasks drain, and
    /// are stopped once every node has applied that. Reconcile then deletes the service and
    /// its tasks (see [`State::finish_removals`]).
    pub fn remove_service(&mut self, key: &str, now: u64) -> Result<String, OpError> {
        let op = format!("remove service {}", excerpt(key));
        let id = self.find_service(key).or_else(|r| refuse(&op, r))?;
        let service = self.services.get_mut(&id).expect("id was just resolved");
        service.removing = true;
        service.rollout = None;
        service.spec.ports.clear();
        service.spec.networks.clear();
        service.spec.aliases.clear();
        self.sync_fwmark(&id).or_else(|e| refuse(&op, e))?;
        self.sync_vips(&id).or_else(|e| refuse(&op, e))?;
        for task in self.tasks.values_mut().filter(|t| t.service_id == id) {
            task.begin_drain(Some("service removed".into()), false, now * 1000);
        }
        Ok(id)
    }

    /// Deletes the services being removed whose tasks have all stopped draining.
    fn finish_removals(&mut self) {
        let done: Vec<String> = self
            .services
            .values()
            .filter(|s| s.removing)
            .filter(|s| {
                !self
                    .tasks
                    .values()
                    .any(|t| t.service_id == s.id && !t.is_history())
            })
            .map(|s| s.id.clone())
            .collect();
        for id in done {
            tracing::info!(service = %id, "removed service's tasks have stopped");
            self.services.remove(&id);
            self.tasks.retain(|_, t| t.service_id != id);
        }
    }

    /// A task state reported by the agent of `node_id`. Reports about tasks the manager has
    /// already given up on are ignored: a retired task never comes back.
    pub fn task_status(
        &mut self,
        node_id: &str,
        status: &TaskStatus,
        now: u64,
    ) -> Result<(), OpError> {
        let op = || format!("record status of task {}", excerpt(&status.task_id));
        if matches!(
            status.state,
            TaskState::Pending | TaskState::Assigned | TaskState::Orphaned
        ) {
            return refuse(op(), Reason::ReportedState(status.state));
        }
        let Some(task) = self.tasks.get_mut(&status.task_id) else {
            return refuse(
                op(),
                Reason::NotFound {
                    kind: "task",
                    name: status.task_id.clone(),
                },
            );
        };
        if task.node_id.as_deref() != Some(node_id) {
            return refuse(op(), Reason::NotYourTask(status.task_id.clone()));
        }
        if task.is_stopping() && status.state.is_terminal() {
            tracing::info!(task = %task.id, "stopped task has ended");
            // Keeps its error: why it was stopped.
            task.retire(TaskState::Shutdown, None, now);
            return Ok(());
        }
        if !task.is_current() {
            return Ok(());
        }
        if task.state != status.state {
            task.state = status.state;
            task.updated_at = now;
        }
        task.error = status.error.as_deref().map(task_error);
        task.pid = status.pid;
        task.netns = status.netns.clone();
        task.health = status.health.filter(|_| status.state == TaskState::Running);
        if task.health == Some(Health::Unhealthy) {
            // It already gets no traffic (only healthy tasks do); its slot gets a new task.
            let log = status.health_log.as_deref().map(task_error);
            let error = match log {
                Some(log) => format!("unhealthy: {log}"),
                None => "unhealthy".to_string(),
            };
            tracing::info!(task = %task.id, %error, "replacing unhealthy task");
            task.retire(TaskState::Failed, Some(error), now);
        }
        Ok(())
    }

    /// Converges tasks to the specs and the nodes: retires tasks that ended or whose node went
    /// down or is drained, fills empty slots, removes slots above the replica count, gives every
    /// eligible node its task of each global service, then gives pending tasks addresses and
    /// nodes.
    #[cfg(test)]
    pub fn reconcile(&mut self, now: u64) {
        self.reconcile_ms(now * 1000);
    }

    /// [`State::reconcile`] at a time in milliseconds, which drains and rolling updates count
    /// in. First the draining tasks every node has stopped balancing to are stopped and the
    /// tasks that must go begin draining; rolling updates advance once the slots are filled,
    /// before pending tasks are placed.
    pub fn reconcile_ms(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        self.advance_keys(now_ms);
        self.end_stops(now_ms);
        self.release_drains(now_ms);
        self.finish_removals();
        self.retire_lost_tasks(now_ms);
        self.drain_misplaced(now_ms);
        self.fill_slots(now);
        self.reconcile_global(now);
        self.advance_rollouts(now_ms);
        self.place_pending(now);
        self.prune_history();
    }

    fn retire_lost_tasks(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        for task in self.tasks.values_mut() {
            if task.desired_state != TaskState::Running {
                continue;
            }
            if task.state.is_terminal() {
                // The agent reported it finished: it becomes history and its slot is refilled.
                let state = task.state;
                task.retire(state, None, now);
                continue;
            }
            let Some(node) = task.node_id.as_ref().and_then(|id| self.nodes.get(id)) else {
                continue;
            };
            if node.node.status == NodeStatus::Down {
                let error = format!("node {} is down", node.node.hostname);
                tracing::info!(task = %task.id, node = %node.node.hostname, "orphaning task of down node");
                task.retire(TaskState::Orphaned, Some(error), now);
            } else if node.node.availability == Availability::Drain {
                let error = format!("node {} is drained", node.node.hostname);
                tracing::info!(task = %task.id, node = %node.node.hostname, "moving task off drained node");
                task.begin_drain(Some(error), false, now_ms);
            }
        }
    }

    fn fill_slots(&mut self, now: u64) {
        for service in self
            .services
            .values()
            .filter(|s| !s.is_global() && !s.removing)
        {
            let replicas = service.spec.replicas;
            // A slot is filled by a current task, or by one draining for a stop-first update.
            let filled: BTreeSet<u64> = self
                .tasks
                .values()
                .filter(|t| t.service_id == service.id)
                .filter(|t| t.is_current() || t.drain.as_ref().is_some_and(|d| d.hold_slot))
                .map(|t| t.slot)
                .collect();
            // Slots above the replica count go, history included; the highest slots go first
            // because the count only keeps the low ones. Their running tasks drain and stop first.
            for t in self.tasks.values_mut() {
                if t.service_id == service.id && t.slot > replicas {
                    t.begin_drain(Some("scaled down".into()), false, now * 1000);
                }
            }
            self.tasks
                .retain(|_, t| t.service_id != service.id || t.slot <= replicas || !t.is_history());
            for slot in (1..=replicas).filter(|s| !filled.contains(s)) {
                let task = Task::pending(service, slot, now);
                tracing::info!(service = %service.spec.name, slot, task = %task.id, "new task");
                self.tasks.insert(task.id.clone(), task);
            }
        }
    }

    /// Global services: one current task on every eligible node (ready, active, within the
    /// constraints), each node's in its own stable slot; a task on a node that stopped being
    /// eligible is retired (a paused node keeps its task but gets no new one). Tasks are placed
    /// straight on their node, not through the spread scheduler; one that cannot start yet (its
    /// slot's restart delay, no free address) stays pending with the reason, and is retried.
    fn reconcile_global(&mut self, now: u64) {
        let globals: Vec<String> = self
            .services
            .values()
            .filter(|s| s.is_global() && !s.removing)
            .map(|s| s.id.clone())
            .collect();
        if globals.is_empty() {
            return;
        }
        let mut index = PlacementIndex::new(self);
        for service_id in globals {
            self.reconcile_global_service(&service_id, now, &mut index);
        }
    }

    fn reconcile_global_service(&mut self, service_id: &str, now: u64, index: &mut PlacementIndex) {
        let service = &self.services[service_id];
        let encrypted = self.needs_encryption(service);
        let fits: BTreeMap<String, GlobalFit> = self
            .nodes
            .values()
            .map(|r| {
                let fit = sched::global_fit(&r.node, index.constraints(service), encrypted);
                (r.node.id.clone(), fit)
            })
            .collect();
        // By hostname, so that nodes get their slots in a predictable order.
        let mut order: Vec<&Node> = self.nodes.values().map(|r| &r.node).collect();
        order.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
        let order: Vec<String> = order.into_iter().map(|n| n.id.clone()).collect();
        let slot_nodes: BTreeMap<u64, String> = service
            .node_slots
            .iter()
            .map(|(node, slot)| (*slot, node.clone()))
            .collect();
        let name = service.spec.name.clone();
        // Current tasks that no longer belong where they are (or would go) become history.
        // A node whose task drains for a stop-first update gets its new one once it stopped.
        let mut placed: BTreeSet<String> = self
            .tasks
            .values()
            .filter(|t| t.service_id == service_id)
            .filter(|t| t.drain.as_ref().is_some_and(|d| d.hold_slot))
            .filter_map(|t| t.node_id.clone())
            .collect();
        let mut waiting: BTreeMap<String, String> = BTreeMap::new();
        for task in self
            .tasks
            .values_mut()
            .filter(|t| t.service_id == service_id && t.is_current())
        {
            let node = task
                .node_id
                .clone()
                .or_else(|| slot_nodes.get(&task.slot).cloned());
            let fit = node.as_ref().and_then(|n| fits.get(n));
            let why = match (fit, task.node_id.is_some()) {
                (Some(GlobalFit::Place), _) | (Some(GlobalFit::Keep), true) => None,
                (Some(GlobalFit::Keep), false) => {
                    let host = node.as_ref().and_then(|n| self.nodes.get(n));
                    let host = host.map_or("?", |r| r.node.hostname.as_str());
                    Some(format!("node {host} is paused"))
                }
                (Some(GlobalFit::Leave(why)), _) => Some(why.clone()),
                (None, _) => Some("node left the cluster".to_string()),
            };
            if let Some(why) = why {
                tracing::info!(task = %task.id, service = %name, %why, "retiring global task");
                task.retire(TaskState::Shutdown, Some(why), now);
                continue;
            }
            // A task with no reason to go has a node that fits.
            let Some(node) = node else { continue };
            if task.node_id.is_some() {
                placed.insert(node);
            } else {
                waiting.insert(node, task.id.clone());
            }
        }
        // Every eligible node without a task gets one: the pending one of its slot, or a new one.
        // A node with both a placed task and a waiting one gets the waiting one too: the new
        // task of a start-first update, which the old one makes way for once it serves.
        for node in &order {
            if fits.get(node) != Some(&GlobalFit::Place)
                || (placed.contains(node) && !waiting.contains_key(node))
            {
                continue;
            }
            let task_id = match waiting.get(node) {
                Some(id) => id.clone(),
                None => {
                    let service = self.services.get_mut(service_id).expect("service exists");
                    let next = service.node_slots.values().max().copied().unwrap_or(0) + 1;
                    let slot = *service.node_slots.entry(node.clone()).or_insert(next);
                    let task = Task::pending(service, slot, now);
                    tracing::info!(service = %name, slot, task = %task.id, %node, "new global task");
                    let id = task.id.clone();
                    self.tasks.insert(id.clone(), task);
                    id
                }
            };
            let placed = self
                .check_restart_delay(&task_id, now, index)
                .and_then(|()| self.assign(&task_id, node, now, index));
            if let Err(error) = placed {
                self.set_pending_error(&task_id, error);
            }
        }
    }

    fn place_pending(&mut self, now: u64) {
        let mut pending: Vec<(String, u64, String)> = self
            .tasks
            .values()
            .filter(|t| t.is_current() && t.node_id.is_none())
            .filter(|t| !self.services[&t.service_id].is_global())
            .map(|t| {
                (
                    self.services[&t.service_id].spec.name.clone(),
                    t.slot,
                    t.id.clone(),
                )
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort();
        let mut index = PlacementIndex::new(self);
        for (_, _, task_id) in pending {
            if let Err(error) = self.place(&task_id, now, &mut index) {
                self.set_pending_error(&task_id, error);
            }
        }
    }

    fn set_pending_error(&mut self, task_id: &str, error: String) {
        let task = self.tasks.get_mut(task_id).expect("pending task exists");
        if task.error.as_deref() != Some(error.as_str()) {
            tracing::debug!(task = %task_id, %error, "task stays pending");
            task.error = Some(error);
        }
    }

    /// A slot whose task failed or completed a moment ago waits before its next task starts.
    fn check_restart_delay(
        &self,
        task_id: &str,
        now: u64,
        index: &PlacementIndex,
    ) -> Result<(), String> {
        let task = &self.tasks[task_id];
        let history = index.history.get(&(task.service_id.clone(), task.slot));
        if history
            .and_then(|h| h.restart_at)
            .is_some_and(|at| now < at)
        {
            return Err(format!(
                "restart delayed: the previous task of this slot ended less than {RESTART_DELAY_SECS}s ago"
            ));
        }
        Ok(())
    }

    /// Gives one pending task a node and then its addresses (once), so a task no node can take
    /// holds no address.
    fn place(&mut self, task_id: &str, now: u64, index: &mut PlacementIndex) -> Result<(), String> {
        self.check_restart_delay(task_id, now, index)?;
        let task = &self.tasks[task_id];
        let history = index.history.get(&(task.service_id.clone(), task.slot));
        let service = &self.services[&task.service_id];
        let no_nodes = BTreeSet::new();
        let avoid = history.map_or(&no_nodes, |h| &h.nodes);
        let candidates: Vec<Candidate> = self
            .nodes
            .values()
            .map(|r| {
                let load = index.load.get(&r.node.id);
                Candidate {
                    node: &r.node,
                    service_tasks: load
                        .and_then(|l| l.per_service.get(&task.service_id))
                        .copied()
                        .unwrap_or(0),
                    total_tasks: load.map_or(0, |l| l.total),
                }
            })
            .collect();
        let node = sched::pick_node(
            &candidates,
            index.constraints(service),
            avoid,
            host_port(&service.spec.ports),
            self.needs_encryption(service),
        )
        .map_err(|e| e.to_string())?
        .id
        .clone();
        self.assign(task_id, &node, now, index)
    }

    /// Gives a pending task its addresses (once) and then `node`.
    fn assign(
        &mut self,
        task_id: &str,
        node: &str,
        now: u64,
        index: &mut PlacementIndex,
    ) -> Result<(), String> {
        let service = &self.services[&self.tasks[task_id].service_id];
        let networks = self.task_networks(service);
        if self.tasks[task_id].attachments.len() != networks.len() {
            let attachments = self.allocate_endpoints(&networks)?;
            self.tasks
                .get_mut(task_id)
                .expect("task exists")
                .attachments = attachments;
        }
        let task = self.tasks.get_mut(task_id).expect("task exists");
        let name = &self.services[&task.service_id].spec.name;
        tracing::info!(task = %task_id, service = %name, slot = task.slot, node = %node, "task assigned");
        let load = index.load.entry(node.to_string()).or_default();
        load.total += 1;
        *load.per_service.entry(task.service_id.clone()).or_default() += 1;
        task.node_id = Some(node.to_string());
        task.state = TaskState::Assigned;
        task.error = None;
        task.updated_at = now;
        Ok(())
    }

    /// The networks a service's tasks attach to, in interface order: the user's networks keep
    /// eth0, ingress comes last.
    pub(crate) fn task_networks(&self, service: &Service) -> Vec<String> {
        let mut networks = service.spec.networks.clone();
        if service.has_ingress_port() {
            networks.extend(self.ingress().map(|n| n.id.clone()));
        }
        networks
    }

    /// One endpoint per network, all or none.
    fn allocate_endpoints(&mut self, networks: &[String]) -> Result<Vec<Attachment>, String> {
        let mut out = Vec::new();
        for network_id in networks {
            let ip = self.next_addr(network_id).map_err(|e| {
                let name = &self.networks[network_id].network.name;
                format!("allocate an address on network {name}: {e}")
            })?;
            let prefix = self.networks[network_id].network.subnet.prefix_len();
            out.push(Attachment {
                network_id: network_id.clone(),
                addr: Ipv4Net::new(ip, prefix).expect("prefix of a valid subnet"),
                mac: endpoint_mac(ip),
            });
        }
        Ok(out)
    }

    fn prune_history(&mut self) {
        let mut history: BTreeMap<(&str, u64), Vec<&Task>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_history()) {
            history.entry((&t.service_id, t.slot)).or_default().push(t);
        }
        let mut drop = Vec::new();
        for (_, mut old) in history {
            old.sort_by_key(|t| (t.updated_at, t.created_at));
            let excess = old.len().saturating_sub(TASK_HISTORY);
            drop.extend(old.into_iter().take(excess).map(|t| t.id.clone()));
        }
        for id in drop {
            self.tasks.remove(&id);
        }
    }

    /// The complete desired state of one node, without its revision. Deterministic (sorted), so
    /// comparing it with the last one tells whether the node needs a new revision.
    pub fn assignment_for(
        &self,
        node_id: &str,
        published: &[PublishedService],
        services: &BTreeMap<String, Vec<NetworkService>>,
        draining: &BTreeMap<String, Vec<DrainingBackend>>,
    ) -> Assignment {
        let mine: Vec<&Task> = self
            .tasks
            .values()
            .filter(|t| t.is_on_node() && t.node_id.as_deref() == Some(node_id))
            .collect();
        let tasks = mine
            .iter()
            .map(|t| {
                let service = &self.services[&t.service_id];
                let runtime = t.runtime_in(service);
                TaskSpec {
                    id: t.id.clone(),
                    name: format!("{}.{}.{}", service.spec.name, t.slot, t.id),
                    service_id: service.id.clone(),
                    service_name: service.spec.name.clone(),
                    command: runtime.command,
                    attachments: t.attachments.clone(),
                    env: runtime.env,
                    stop_grace_ms: runtime.stop_grace_ms,
                    health: runtime.health,
                }
            })
            .collect();
        let network_ids: BTreeSet<&String> = mine
            .iter()
            .flat_map(|t| &t.attachments)
            .map(|a| &a.network_id)
            .collect();
        // Ingress is not among the lazily built networks: it has its own field, on every node.
        let networks: Vec<NetworkSpec> = network_ids
            .into_iter()
            .filter_map(|id| self.networks.get(id))
            .filter(|r| !r.network.ingress)
            .map(|r| {
                let mut spec = self.network_spec(&r.network, node_id, draining);
                spec.lb_addr = self.nodes.get(node_id).and_then(|n| {
                    let ip = *n.lb_addrs.get(&r.network.id)?;
                    Ipv4Net::new(ip, r.network.subnet.prefix_len()).ok()
                });
                spec.services = services.get(&r.network.id).cloned().unwrap_or_default();
                spec
            })
            .collect();
        let sbox = self
            .nodes
            .get(node_id)
            .filter(|r| self.carries_ingress(r))
            .and_then(|r| r.ingress_addr);
        let ingress = self.ingress().zip(sbox).map(|(net, ip)| {
            let mut network = self.network_spec(net, node_id, draining);
            network.peers.extend(
                self.nodes
                    .values()
                    .filter(|r| r.node.id != node_id && self.carries_ingress(r))
                    .filter_map(|r| {
                        Some(Peer {
                            ip: r.ingress_addr?,
                            mac: endpoint_mac(r.ingress_addr?),
                            vtep: r.node.addr,
                        })
                    }),
            );
            network.peers.sort_by_key(|p| (p.ip, p.vtep));
            Box::new(IngressSpec {
                network,
                sbox_addr: Ipv4Net::new(ip, net.subnet.prefix_len())
                    .expect("prefix of a valid subnet"),
            })
        });
        // Keys go only to nodes that carry an encrypted network (the ingress one included).
        let encryption = networks
            .iter()
            .chain(ingress.as_ref().map(|i| &i.network))
            .any(|n| n.encrypted)
            .then(|| self.esp_keys.for_agents())
            .flatten();
        Assignment {
            revision: 0,
            networks,
            tasks,
            ingress,
            published: published.to_vec(),
            encryption,
        }
    }

    fn network_spec(
        &self,
        network: &Network,
        node_id: &str,
        draining: &BTreeMap<String, Vec<DrainingBackend>>,
    ) -> NetworkSpec {
        NetworkSpec {
            id: network.id.clone(),
            name: network.name.clone(),
            subnet: network.subnet,
            gateway: Ipv4Net::new(network.gateway, network.subnet.prefix_len())
                .expect("prefix of a valid subnet"),
            vni: network.vni,
            peers: self.peers(&network.id, node_id),
            lb_addr: None,
            services: vec![],
            draining: draining.get(&network.id).cloned().unwrap_or_default(),
            encrypted: network.encrypted,
        }
    }

    /// Every service with published ports, by name, the same for every node. Backends are the
    /// ingress addresses of the service's running tasks, sorted; a service without an
    /// ingress-mode port has none and fwmark 0.
    pub fn published(&self) -> Vec<PublishedService> {
        let ingress = self.ingress().map(|n| n.id.as_str());
        let mut backends: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| self.serves(t)) {
            let addrs = t
                .attachments
                .iter()
                .filter(|a| Some(a.network_id.as_str()) == ingress)
                .map(|a| a.addr.addr());
            backends.entry(&t.service_id).or_default().extend(addrs);
        }
        let mut out: Vec<PublishedService> = self
            .services
            .values()
            .filter(|s| !s.spec.ports.is_empty())
            .map(|s| {
                let mut ips = backends.remove(s.id.as_str()).unwrap_or_default();
                ips.sort();
                let ingress_port = s.has_ingress_port();
                PublishedService {
                    service_id: s.id.clone(),
                    service_name: s.spec.name.clone(),
                    fwmark: s.fwmark.filter(|_| ingress_port).unwrap_or(0),
                    ports: s.spec.ports.clone(),
                    backends: ips,
                    vip: ingress.and_then(|n| s.vips.get(n)).copied(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        out
    }

    /// Endpoints of a network on nodes other than `node_id` (tasks and load balancers), each
    /// with its node's VTEP.
    fn peers(&self, network_id: &str, node_id: &str) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self
            .tasks
            .values()
            .filter(|t| t.is_reachable())
            .filter_map(|t| {
                let node = self.nodes.get(t.node_id.as_deref()?)?;
                (node.node.id != node_id).then_some((t, node.node.addr))
            })
            .flat_map(|(t, vtep)| {
                t.attachments
                    .iter()
                    .filter(|a| a.network_id == network_id)
                    .map(move |a| Peer {
                        ip: a.addr.addr(),
                        mac: a.mac.clone(),
                        vtep,
                    })
            })
            .collect();
        peers.extend(
            self.nodes
                .values()
                .filter(|r| r.node.id != node_id)
                .filter_map(|r| {
                    let ip = *r.lb_addrs.get(network_id)?;
                    Some(Peer {
                        ip,
                        mac: endpoint_mac(ip),
                        vtep: r.node.addr,
                    })
                }),
        );
        peers.sort_by_key(|p| (p.ip, p.vtep));
        peers
    }

    /// Recomputes every node's assignment; a node whose assignment changed gets the next
    /// revision. Returns the ids of those nodes, to be pushed to their agents.
    pub fn refresh_assignments(&mut self) -> Vec<String> {
        self.sync_lb_addrs();
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        let published = self.published();
        let services = self.network_services();
        let draining = self.draining_backends();
        let mut changed = Vec::new();
        for id in ids {
            let mut fresh = self.assignment_for(&id, &published, &services, &draining);
            let current = &self.nodes[&id].assignment;
            fresh.revision = current.revision;
            if fresh != *current {
                fresh.revision = self.next_revision();
                self.nodes.get_mut(&id).expect("node exists").assignment = fresh;
                changed.push(id);
            }
        }
        self.arm_drains();
        self.arm_keys();
        changed
    }
}

/// `network create --opt`: whether the network is encrypted; any other option is refused.
fn network_options(options: &BTreeMap<String, String>) -> Result<bool, Reason> {
    let mut encrypted = false;
    for (key, value) in options {
        if key != "encrypted" {
            return Err(Reason::NetworkOption(key.clone()));
        }
        encrypted = match value.as_str() {
            "" | "true" => true,
            "false" => false,
            other => return Err(Reason::EncryptedValue(other.to_string())),
        };
    }
    Ok(encrypted)
}

/// What `node inspect` says about a node that cannot carry encrypted networks.
fn no_encryption(esp: Option<&EspSupport>) -> Option<String> {
    match esp {
        Some(EspSupport::Supported) => None,
        // The agent's reason is the kernel's error: short, but bounded all the same.
        Some(EspSupport::Unsupported { reason }) => Some(format!(
            "its kernel cannot do IPsec ESP ({}): tasks of encrypted networks are not placed here",
            proto::excerpt_within(reason, 200)
        )),
        None => Some(
            "its agent has not reported IPsec ESP support: tasks of encrypted networks are not placed here"
                .to_string(),
        ),
    }
}

/// What the manager keeps and logs of a task error an agent reported: bounded, since it may
/// quote the task's command or output.
pub fn task_error(text: &str) -> String {
    proto::excerpt_within(text, 4 * proto::EXCERPT_CHARS).to_string()
}

/// A command exec can run and the store can hold: bounded in size, no NUL inside an argument.
pub(crate) fn check_command(command: &[String]) -> Result<(), Reason> {
    if command.len() > MAX_COMMAND_ARGS {
        return Err(Reason::TooManyArgs(command.len()));
    }
    let bytes: usize = command.iter().map(String::len).sum();
    if bytes > MAX_COMMAND_BYTES {
        return Err(Reason::CommandTooLong(bytes));
    }
    if let Some((at, arg)) = command.iter().enumerate().find(|(_, a)| a.contains('\0')) {
        return Err(Reason::CommandNul(at, arg.clone()));
    }
    Ok(())
}

fn protocol_word(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The manager's listen IP in these tests: node1's address.
    pub(crate) const MANAGER: &str = "192.168.56.11";

    pub(crate) fn spec(name: &str, replicas: u64, networks: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            mode: ServiceMode::Replicated,
            replicas,
            networks: networks.iter().map(|n| n.to_string()).collect(),
            constraints: vec![],
            command: vec!["hello-server".into(), "--port".into(), "8080".into()],
            ports: vec![],
            endpoint_mode: Default::default(),
            aliases: Default::default(),
            env: Default::default(),
            update_config: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    /// The manager's agent port in these tests.
    pub(crate) const AGENT_PORT: u16 = 2377;

    /// A new cluster as mesh-manager starts it: with the default ingress network.
    pub(crate) fn new_state() -> State {
        let mut s = State {
            agent_port: Some(AGENT_PORT),
            ..State::default()
        };
        assert!(s
            .ensure_ingress("10.255.0.0/16", MANAGER.parse().unwrap(), 0)
            .unwrap());
        s
    }

    /// A cluster of `n` ready nodes node1..noden at 192.168.56.11.., node1 the manager.
    pub(crate) fn cluster(n: u8) -> State {
        let mut s = new_state();
        for i in 1..=n {
            let role = if i == 1 { Role::Manager } else { Role::Worker };
            let addr = IpAddr::from([192, 168, 56, 10 + i]);
            s.register_node(&format!("node{i}"), addr, None, role)
                .unwrap();
        }
        s
    }

    /// Creates an overlay network with the given subnet (at time 1) and returns its id.
    pub(crate) fn add_network(s: &mut State, name: &str, subnet: &str) -> String {
        s.create_network(
            name,
            "overlay",
            Some(subnet),
            &BTreeMap::new(),
            MANAGER.parse().unwrap(),
            1,
        )
        .unwrap()
    }

    fn node_id(s: &State, hostname: &str) -> String {
        s.find_node(hostname).unwrap()
    }

    pub(crate) fn current<'a>(s: &'a State, service: &str) -> Vec<&'a Task> {
        let id = s.find_service(service).unwrap();
        let mut tasks: Vec<&Task> = s
            .tasks
            .values()
            .filter(|t| t.service_id == id && t.is_current())
            .collect();
        tasks.sort_by_key(|t| t.slot);
        tasks
    }

    /// Placed current tasks per hostname (pending ones are on no node).
    fn per_node(s: &State, service: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for t in current(s, service) {
            let Some(node) = &t.node_id else { continue };
            let host = &s.nodes[node].node.hostname;
            *out.entry(host.clone()).or_insert(0) += 1;
        }
        out
    }

    fn report(s: &mut State, task: &Task, state: TaskState, error: Option<&str>) {
        report_at(s, task, state, error, 200);
    }

    pub(crate) fn report_at(
        s: &mut State,
        task: &Task,
        state: TaskState,
        error: Option<&str>,
        now: u64,
    ) {
        let status = TaskStatus {
            task_id: task.id.clone(),
            state,
            error: error.map(str::to_string),
            pid: Some(42),
            netns: Some(format!("/run/meshnet/netns/{}", task.id)),
            health: None,
            health_log: None,
        };
        s.task_status(task.node_id.as_ref().unwrap(), &status, now)
            .unwrap();
    }

    pub(crate) fn port(
        published: u16,
        target: u16,
        protocol: Protocol,
        mode: PublishMode,
    ) -> PortConfig {
        PortConfig {
            protocol,
            published,
            target,
            mode,
        }
    }

    pub(crate) fn web(published: u16) -> PortConfig {
        port(published, 8080, Protocol::Tcp, PublishMode::Ingress)
    }

    pub(crate) fn published_spec(
        name: &str,
        replicas: u64,
        networks: &[&str],
        ports: &[PortConfig],
    ) -> ServiceSpec {
        ServiceSpec {
            ports: ports.to_vec(),
            ..spec(name, replicas, networks)
        }
    }

    fn ingress_id(s: &State) -> String {
        s.ingress().unwrap().id.clone()
    }

    pub(crate) fn run_all(s: &mut State, service: &str) {
        for t in current(s, service).into_iter().cloned().collect::<Vec<_>>() {
            report(s, &t, TaskState::Running, None);
        }
    }

    /// Every placed task that does not run yet reports Running at `now`.
    pub(crate) fn run_placed(s: &mut State, now: u64) {
        let placed: Vec<Task> = s
            .tasks
            .values()
            .filter(|t| t.is_placed() && t.state != TaskState::Running)
            .cloned()
            .collect();
        for t in &placed {
            report_at(s, t, TaskState::Running, None, now);
        }
    }

    /// Every node applies its newest assignment, as agents answer Applied.
    pub(crate) fn apply_all(s: &mut State) {
        let revisions: Vec<(String, u64)> = s
            .nodes
            .values()
            .map(|r| (r.node.id.clone(), r.assignment.revision))
            .collect();
        for (id, rev) in revisions {
            s.set_applied(&id, rev);
        }
    }

    /// One second of the cluster at `now` as the manager and well-behaved agents make it:
    /// tasks told to stop have ended, a pass, assignments applied at once, and every placed
    /// task running with the health `health` gives it (a failed check says "connection
    /// refused"). Returns the placed tasks that were not running yet.
    pub(crate) fn step(s: &mut State, now: u64, health: impl Fn(&Task) -> Option<Health>) -> usize {
        // Tasks told to stop a second ago have ended.
        let stopped: Vec<Task> = s
            .tasks
            .values()
            .filter(|t| t.is_stopping())
            .cloned()
            .collect();
        for t in &stopped {
            report_at(s, t, TaskState::Shutdown, None, now);
        }
        s.reconcile(now);
        s.refresh_assignments();
        apply_all(s);
        let placed: Vec<Task> = s
            .tasks
            .values()
            .filter(|t| t.is_placed())
            .cloned()
            .collect();
        for t in &placed {
            let status = TaskStatus {
                task_id: t.id.clone(),
                state: TaskState::Running,
                error: None,
                pid: Some(42),
                netns: Some(format!("/run/meshnet/netns/{}", t.id)),
                health: health(t),
                health_log: Some("connection refused".into()),
            };
            s.task_status(t.node_id.as_ref().unwrap(), &status, now)
                .unwrap();
        }
        placed
            .iter()
            .filter(|t| t.state != TaskState::Running)
            .count()
    }

    /// Steps the cluster a second at a time from `from` (see [`step`], tasks without a health
    /// check) until nothing drains or stops, no update rolls, no removal waits and every placed
    /// task runs. Returns the time reached.
    pub(crate) fn settle(s: &mut State, from: u64) -> u64 {
        for now in from..from + 600 {
            let starting = step(s, now, |_| None);
            let busy = s.tasks.values().any(|t| t.is_draining() || t.is_stopping())
                || s.services.values().any(|v| {
                    v.removing
                        || v.rollout
                            .as_ref()
                            .is_some_and(|r| r.status.state.is_active())
                });
            if !busy && starting == 0 {
                return now;
            }
        }
        panic!("the cluster did not settle in 600 steps");
    }

    #[test]
    fn encrypted_networks_place_on_esp_nodes_and_carry_keys_there_only() {
        let mut s = cluster(3);
        let opts = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let ip = MANAGER.parse().unwrap();
        // Unknown options and odd values change nothing.
        let before = s.clone();
        let err = s
            .create_network("sec", "overlay", None, &opts("mtu", "1400"), ip, 1)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create network sec: unsupported network option mtu: only encrypted is supported"
        );
        let err = s
            .create_network("sec", "overlay", None, &opts("encrypted", "yes"), ip, 1)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid value yes for option encrypted"),
            "{err}"
        );
        assert_eq!(s, before);

        let sec = s
            .create_network(
                "sec",
                "overlay",
                Some("10.0.7.0/24"),
                &opts("encrypted", ""),
                ip,
                1,
            )
            .unwrap();
        assert!(s.networks[&sec].network.encrypted);
        add_network(&mut s, "plain", "10.0.8.0/24");
        let mut fresh = {
            let mut n = 0u8;
            move || {
                n += 1;
                [n; ESP_KEY_BYTES]
            }
        };
        s.rotate_keys(1000, 3600, &mut fresh);
        assert_eq!(s.esp_keys.keys.len(), 1);

        // Until their agents say so, nodes cannot encrypt: nothing is placed.
        s.create_service(&spec("secure", 2, &["sec"]), 1).unwrap();
        s.create_service(&spec("open", 1, &["plain"]), 1).unwrap();
        s.reconcile(1);
        assert!(current(&s, "secure").iter().all(|t| t.node_id.is_none()));
        let (n1, n2, n3) = (
            node_id(&s, "node1"),
            node_id(&s, "node2"),
            node_id(&s, "node3"),
        );
        assert!(s.nodes[&n1]
            .node
            .no_encryption
            .as_deref()
            .unwrap()
            .contains("has not reported"));
        s.set_node_esp(&n1, Some(&EspSupport::Supported));
        s.set_node_esp(&n2, Some(&EspSupport::Supported));
        let no_esp = EspSupport::Unsupported {
            reason: "add an ESP state: Function not implemented".into(),
        };
        s.set_node_esp(&n3, Some(&no_esp));
        assert_eq!(
            s.nodes[&n3].node.no_encryption.as_deref(),
            Some("its kernel cannot do IPsec ESP (add an ESP state: Function not implemented): tasks of encrypted networks are not placed here")
        );
        s.reconcile(2);
        let placed: BTreeSet<String> = current(&s, "secure")
            .iter()
            .map(|t| t.node_id.clone().unwrap())
            .collect();
        assert_eq!(placed, BTreeSet::from([n1.clone(), n2.clone()]));

        s.refresh_assignments();
        for id in [&n1, &n2] {
            let a = &s.nodes[id].assignment;
            let net = a.networks.iter().find(|n| n.id == sec).unwrap();
            assert!(net.encrypted);
            let keys = a.encryption.as_ref().unwrap();
            assert_eq!(keys.keys.len(), 1);
            assert_eq!(keys.send, keys.keys[0].tag);
        }
        // The node with only the plain network's task gets no keys.
        let open_node = current(&s, "open")[0].node_id.clone().unwrap();
        let plain_only = [&n1, &n2, &n3]
            .into_iter()
            .find(|id| **id == open_node && !placed.contains(*id));
        if let Some(id) = plain_only {
            assert!(s.nodes[id].assignment.encryption.is_none());
        }
        assert!(s.nodes[&n3].assignment.encryption.is_none());
        assert!(s.nodes[&n3]
            .assignment
            .networks
            .iter()
            .all(|n| !n.encrypted));
    }

    /// Three ESP nodes with tasks of an encrypted network, each told its assignment; returns
    /// the state and the node ids.
    fn encrypted_cluster() -> (State, Vec<String>) {
        let mut s = cluster(3);
        let ip = MANAGER.parse().unwrap();
        let opts = BTreeMap::from([("encrypted".to_string(), String::new())]);
        s.create_network("sec", "overlay", Some("10.0.7.0/24"), &opts, ip, 1)
            .unwrap();
        let ids: Vec<String> = ["node1", "node2", "node3"]
            .iter()
            .map(|n| node_id(&s, n))
            .collect();
        for id in &ids {
            s.set_node_esp(id, Some(&EspSupport::Supported));
        }
        let mut n = 0u8;
        s.rotate_keys(1000, 60, &mut || {
            n += 1;
            [n; ESP_KEY_BYTES]
        });
        s.create_service(&spec("secure", 3, &["sec"]), 1).unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        apply_all(&mut s);
        (s, ids)
    }

    /// (tags of the keys, send tag) as `node` was last told them.
    fn told(s: &State, node: &str) -> (Vec<u32>, u32) {
        let k = s.nodes[node].assignment.encryption.as_ref().unwrap();
        (k.keys.iter().map(|k| k.tag).collect(), k.send)
    }

    /// A pass of the manager at `now_ms`, as `Cluster::transact` makes one.
    fn pass(s: &mut State, now_ms: u64) {
        s.reconcile_ms(now_ms);
        s.refresh_assignments();
    }

    #[test]
    fn a_key_rotation_moves_on_as_every_ready_node_applies_each_step() {
        let (mut s, ids) = encrypted_cluster();
        let mut n = 10u8;
        let mut fresh = move || {
            n += 1;
            [n; ESP_KEY_BYTES]
        };
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1], 1));
        }
        // Not due: nothing.
        s.rotate_keys(60_999, 60, &mut fresh);
        assert_eq!(s.esp_keys.keys.len(), 1);
        // Due: a new key, receive-only, on every node.
        s.rotate_keys(61_000, 60, &mut fresh);
        pass(&mut s, 61_000);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 1));
        }
        // Two of three nodes applied it: nobody sends with it yet, however often the
        // manager passes.
        for id in &ids[..2] {
            let rev = s.nodes[id].assignment.revision;
            s.set_applied(id, rev);
        }
        assert!(!s.key_step_ready(62_000));
        pass(&mut s, 62_000);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 1));
        }
        // The third one did: every node sends with it.
        let rev = s.nodes[&ids[2]].assignment.revision;
        s.set_applied(&ids[2], rev);
        assert!(s.key_step_ready(62_500));
        pass(&mut s, 62_500);
        for id in &ids {
            assert_eq!(told(&s, id), (vec![1, 2], 2));
        }
        // Node 3 goes down before it applies the switch: it does not hold the rotation.
        for id in &ids[..2] {
            let rev = s.nodes[id].assignment.revision;
            s.set_applied(id, rev);
        }
        assert!(s.esp_keys.step.is_some());
        s.set_node_status(&ids[2], NodeStatus::Down);
        pass(&mut s, 63_000);
        assert_eq!(s.esp_keys.step, None);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2], 2));

        // The next rotation: a node that is up but never answers (node 2) holds each step for
        // the timeout, no longer.
        s.set_node_status(&ids[2], NodeStatus::Ready);
        pass(&mut s, 64_000);
        apply_all(&mut s);
        s.rotate_keys(121_000, 60, &mut fresh);
        pass(&mut s, 121_000);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 2));
        let rev = s.nodes[&ids[0]].assignment.revision;
        s.set_applied(&ids[0], rev);
        let until = 121_000 + crate::keys::KEY_STEP_TIMEOUT_MS;
        pass(&mut s, until - 1);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 2));
        assert!(s.key_step_ready(until));
        pass(&mut s, until);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 3));
        let rev = s.nodes[&ids[0]].assignment.revision;
        s.set_applied(&ids[0], rev);
        pass(&mut s, until + 1);
        assert_eq!(told(&s, &ids[0]), (vec![1, 2, 3], 3));
        pass(&mut s, until + crate::keys::KEY_STEP_TIMEOUT_MS);
        for id in &ids[..2] {
            assert_eq!(told(&s, id), (vec![2, 3], 3));
        }
        assert_eq!(s.esp_keys.step, None);
    }

    #[test]
    fn an_encrypted_ingress_leaves_out_the_nodes_without_esp() {
        let mut s = cluster(3);
        let (n1, n2, n3) = (
            node_id(&s, "node1"),
            node_id(&s, "node2"),
            node_id(&s, "node3"),
        );
        for id in [&n1, &n2, &n3] {
            s.set_node_esp(id, Some(&EspSupport::Supported));
        }
        // A task with an ingress port on every node, while the ingress is plain.
        s.create_service(&published_spec("web", 3, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        run_all(&mut s, "web");
        let on = |s: &State| -> BTreeSet<String> {
            current(s, "web")
                .iter()
                .filter(|t| s.serves(t))
                .map(|t| t.node_id.clone().unwrap())
                .collect()
        };
        assert_eq!(on(&s), BTreeSet::from([n1.clone(), n2.clone(), n3.clone()]));
        assert!(!s.set_ingress_encrypted(false));
        assert_eq!(s.no_routing_mesh(&n3), None);

        // The manager restarts with --ingress-encrypted; node 3 reports it cannot do ESP.
        assert!(s.set_ingress_encrypted(true));
        assert!(!s.set_ingress_encrypted(true));
        assert!(s.ingress().unwrap().encrypted);
        assert!(s.has_encrypted_networks());
        let no_esp = EspSupport::Unsupported {
            reason: "add an ESP state: Function not implemented".into(),
        };
        s.set_node_esp(&n3, Some(&no_esp));
        let mut n = 0u8;
        s.rotate_keys(2000, 3600, &mut || {
            n += 1;
            [n; ESP_KEY_BYTES]
        });
        // Its task moves off node 3 (drains, then stops) to a node that can encrypt.
        let now = settle(&mut s, 2);
        assert_eq!(current(&s, "web").len(), 3);
        assert!(!on(&s).contains(&n3), "{:?}", on(&s));
        let history = s
            .tasks
            .values()
            .find(|t| t.node_id.as_ref() == Some(&n3) && t.is_history())
            .unwrap();
        assert!(
            history
                .error
                .as_deref()
                .unwrap()
                .contains("node node3 cannot do IPsec ESP"),
            "{:?}",
            history.error
        );
        s.reconcile(now);
        s.refresh_assignments();

        // Node 3: no ingress network, no keys; node inspect says why.
        let a3 = &s.nodes[&n3].assignment;
        assert!(a3.ingress.is_none());
        assert!(a3.encryption.is_none());
        let why = s.no_routing_mesh(&n3).unwrap();
        assert!(why.contains("the ingress network is encrypted"), "{why}");
        assert_eq!(
            crate::views::node(&s, &n3, &|_| None)
                .no_routing_mesh
                .as_deref(),
            Some(why.as_str())
        );
        // Nodes 1 and 2: an encrypted ingress whose peers are on each other only, and the keys,
        // without any encrypted user network.
        let ip3 = s.nodes[&n3].node.addr;
        for id in [&n1, &n2] {
            let a = &s.nodes[id].assignment;
            let ingress = a.ingress.as_ref().unwrap();
            assert!(ingress.network.encrypted);
            assert!(!ingress.network.peers.is_empty());
            assert!(ingress.network.peers.iter().all(|p| p.vtep != ip3));
            assert!(a.encryption.is_some());
            assert_eq!(s.no_routing_mesh(id), None);
            assert_eq!(crate::views::node(&s, id, &|_| None).no_routing_mesh, None);
        }
        // The balancers list the tasks on nodes 1 and 2 only.
        let backends = &s.published()[0].backends;
        assert_eq!(backends.len(), 3);
        for ip in backends {
            let t = s
                .tasks
                .values()
                .find(|t| s.serves(t) && t.attachments.iter().any(|a| a.addr.addr() == *ip))
                .unwrap();
            assert_ne!(t.node_id.as_ref(), Some(&n3));
        }

        // Back to a plain ingress: node 3 carries the routing mesh again.
        assert!(s.set_ingress_encrypted(false));
        s.refresh_assignments();
        assert!(s.nodes[&n3].assignment.ingress.is_some());
        assert_eq!(s.no_routing_mesh(&n3), None);
    }

    #[test]
    fn ingress_is_created_once_and_sbox_addresses_are_stable() {
        let s = cluster(3);
        let ingress = s.ingress().unwrap().clone();
        assert_eq!(
            (
                ingress.name.as_str(),
                ingress.vni,
                ingress.subnet.to_string()
            ),
            ("ingress", 4096, "10.255.0.0/16".to_string())
        );
        assert_eq!(ingress.gateway, Ipv4Addr::new(10, 255, 0, 1));
        let sbox = |s: &State, host: &str| s.nodes[&node_id(s, host)].ingress_addr.unwrap();
        // The gateway .1 stays free; nodes get .2, .3, .4 as they register.
        assert_eq!(sbox(&s, "node1"), Ipv4Addr::new(10, 255, 0, 2));
        assert_eq!(sbox(&s, "node3"), Ipv4Addr::new(10, 255, 0, 4));

        // A restart: the state comes back from its JSON, ensure_ingress finds nothing to do, even
        // with another --ingress-subnet, and a node re-registering keeps its address.
        let text = serde_json::to_string(&s).unwrap();
        let mut back: State = serde_json::from_str(&text).unwrap();
        back.agent_port = s.agent_port;
        assert_eq!(back, s);
        assert!(!back
            .ensure_ingress("10.254.0.0/16", MANAGER.parse().unwrap(), 9)
            .unwrap());
        assert_eq!(back, s);
        back.register_node(
            "node2",
            "192.168.56.12".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        assert_eq!(sbox(&back, "node2"), Ipv4Addr::new(10, 255, 0, 3));
        back.register_node(
            "node4",
            "192.168.56.14".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        assert_eq!(sbox(&back, "node4"), Ipv4Addr::new(10, 255, 0, 5));
        // The service's VIP and task endpoints on ingress skip the sboxes' addresses.
        back.create_service(&published_spec("web", 1, &[], &[web(80)]), 1)
            .unwrap();
        back.reconcile(1);
        assert_eq!(
            current(&back, "web")[0].attachments[0].addr.to_string(),
            "10.255.0.7/16"
        );

        // A node inside the ingress subnet is refused, and ingress cannot be removed.
        let err = back
            .register_node("bad", "10.255.9.9".parse().unwrap(), None, Role::Worker)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "register node bad: its address 10.255.9.9 is inside the ingress subnet 10.255.0.0/16"
        );
        let err = back.remove_network("ingress").unwrap_err();
        assert!(err.to_string().contains("cannot be removed"), "{err}");
    }

    #[test]
    fn the_ingress_subnet_is_checked_and_older_states_get_ingress() {
        // A state saved before the routing mesh: nodes and a user network, no ingress.
        let mut s = State::default();
        s.register_node(
            "node1",
            "192.168.56.11".parse().unwrap(),
            None,
            Role::Manager,
        )
        .unwrap();
        add_network(&mut s, "old", "10.255.1.0/24");
        assert_eq!(s.nodes.values().next().unwrap().ingress_addr, None);
        let before = s.clone();
        let err = s
            .ensure_ingress("192.168.0.0/16", MANAGER.parse().unwrap(), 2)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create the ingress network: subnet 192.168.0.0/16 contains 192.168.56.11, the underlay address of node node1"
        );
        let err = s
            .ensure_ingress("10.255.0.0/33", MANAGER.parse().unwrap(), 2)
            .unwrap_err();
        assert!(err.to_string().contains("invalid subnet"), "{err}");
        assert_eq!(s, before);
        assert!(s
            .ensure_ingress("10.255.0.0/16", MANAGER.parse().unwrap(), 2)
            .unwrap());
        assert_eq!(s.ingress().unwrap().vni, 4097);
        assert_eq!(
            s.nodes.values().next().unwrap().ingress_addr,
            Some(Ipv4Addr::new(10, 255, 0, 2))
        );
        // The old network overlapping ingress stays usable, but not by a published service.
        s.create_service(&spec("plain", 1, &["old"]), 3).unwrap();
        let err = s
            .create_service(&published_spec("web", 1, &["old"], &[web(80)]), 3)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create service web: subnet 10.255.0.0/16 overlaps subnet 10.255.1.0/24 of network old"
        );
        let err = s
            .update_service("plain", &[web(80)], &[], None, &SpecUpdate::default(), 3)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps subnet 10.255.1.0/24 of network old"),
            "{err}"
        );
    }

    #[test]
    fn several_services_or_networks_change_all_or_none() {
        let mut s = cluster(2);
        add_network(&mut s, "a", "10.0.9.0/24");
        add_network(&mut s, "b", "10.0.10.0/24");
        s.create_service(&spec("web", 1, &["a"]), 1).unwrap();
        s.create_service(&published_spec("api", 1, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        let before = s.clone();
        let scales = |list: &[(&str, u64)]| -> Vec<(String, u64)> {
            list.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let keys = |list: &[&str]| -> Vec<String> { list.iter().map(|k| k.to_string()).collect() };
        let web_id = s.find_service("web").unwrap();
        let p = |published| PublishedPort {
            protocol: Protocol::Tcp,
            published,
        };
        let refused = [
            (
                s.scale_services(&scales(&[("web", 2), ("nope", 5)]), 2),
                "scale service nope: no such service: nope",
            ),
            (
                s.scale_services(&scales(&[("web", 2), ("api", MAX_REPLICAS + 1)]), 2),
                "scale service api: 10001 replicas is more than the limit of 10000",
            ),
            (
                s.scale_services(&scales(&[("web", 2), (&web_id, 3)]), 2),
                "is given more than once",
            ),
            (
                s.scale_services(&[], 2),
                "scale services: no service is given",
            ),
            (
                s.remove_services(&keys(&["web", "nope"]), 1),
                "remove service nope: no such service: nope",
            ),
            (
                s.remove_services(&keys(&["web", "web"]), 1),
                "remove service web: service web is given more than once",
            ),
            (
                s.remove_networks(&keys(&["b", "a"])),
                "remove network a: it is in use by services: web",
            ),
            (
                s.remove_networks(&keys(&["b", "ingress"])),
                "remove network ingress: the ingress network belongs to the routing mesh",
            ),
            (
                s.unpublish_many(&[p(80), p(81)], 2),
                "unpublish port 81/tcp: no service publishes port 81/tcp",
            ),
            (
                s.unpublish_many(&[p(80), p(80)], 2),
                "unpublish port 80/tcp: port 80/tcp is given more than once",
            ),
        ];
        for (result, expected) in refused {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        assert_eq!(s, before, "a refused request changed something");

        assert_eq!(
            s.scale_services(&scales(&[("web", 2), ("api", 3)]), 2)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(s.services[&web_id].spec.replicas, 2);
        s.remove_services(&keys(&["web", "api"]), 3).unwrap();
        // Gone for users at once, their networks free; deleted once their tasks drained.
        assert!(s.find_service("web").is_err() && s.find_service("api").is_err());
        s.remove_networks(&keys(&["a", "b"])).unwrap();
        settle(&mut s, 3);
        assert!(s.services.is_empty());
        assert_eq!(s.networks.len(), 1, "only ingress is left");
    }

    #[test]
    fn user_subnets_stay_clear_of_gwbridges() {
        let mut s = cluster(2);
        let n2 = node_id(&s, "node2");
        s.set_gwbridge_subnet(&n2, Some("10.0.0.0/16".parse().unwrap()));
        let before = s.clone();
        let create = |s: &mut State, subnet: &str| {
            s.create_network(
                "bad",
                "overlay",
                Some(subnet),
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err()
            .to_string()
        };
        // node1 did not report one: the default 172.18.0.0/16 stands for it.
        assert_eq!(
            create(&mut s, "172.18.5.0/24"),
            "create network bad: subnet 172.18.5.0/24 overlaps 172.18.0.0/16, the gwbridge subnet of node node1: tasks there would lose their egress route"
        );
        assert!(create(&mut s, "172.16.0.0/12").contains("gwbridge subnet of node node1"));
        assert!(create(&mut s, "10.0.7.0/24")
            .contains("10.0.0.0/16, the gwbridge subnet of node node2"));
        assert!(create(&mut s, "10.255.3.0/24")
            .contains("overlaps subnet 10.255.0.0/16 of network ingress"));
        assert!(create(&mut s, "192.168.56.0/24").contains("the underlay address of node node1"));
        assert_eq!(s, before);
        // Automatic allocation skips node2's gwbridge, which covers the start of 10.0.0.0/8.
        let auto = s
            .create_network(
                "auto",
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        assert_eq!(net_of(&s, &auto).subnet.to_string(), "10.1.0.0/24");
        // Without any node, the default gwbridge is kept clear too, and so is ingress.
        let mut empty = new_state();
        let err = empty
            .create_network(
                "x",
                "overlay",
                Some("172.18.0.0/16"),
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the gwbridge subnet of every node by default"),
            "{err}"
        );
        let mut fresh = State::default();
        let err = fresh
            .ensure_ingress("172.18.0.0/16", MANAGER.parse().unwrap(), 0)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("create the ingress network: subnet 172.18.0.0/16 overlaps"),
            "{err}"
        );
        assert_eq!(fresh, State::default());
    }

    #[test]
    fn a_host_mode_port_places_at_most_one_task_per_node() {
        let mut s = cluster(2);
        let host = port(8081, 8080, Protocol::Tcp, PublishMode::Host);
        s.create_service(&published_spec("web", 3, &[], &[host]), 1)
            .unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        assert_eq!(per_node(&s, "web").len(), 2);
        let pending: Vec<&Task> = current(&s, "web")
            .into_iter()
            .filter(|t| t.node_id.is_none())
            .collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].state, TaskState::Pending);
        assert_eq!(
            pending[0].error.as_deref(),
            Some("no suitable node (host-mode port 8081/tcp is taken on every eligible node)")
        );
        // The extra task is started nowhere: each node runs exactly one.
        for r in s.nodes.values() {
            assert_eq!(r.assignment.tasks.len(), 1, "{}", r.node.hostname);
        }
        // A third node takes it.
        s.register_node(
            "node3",
            "192.168.56.13".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(2);
        assert_eq!(
            per_node(&s, "web").values().copied().collect::<Vec<_>>(),
            [1, 1, 1]
        );

        // A service stacked on one node that gains a host-mode port keeps one task there; the
        // others move or wait.
        let mut s = cluster(1);
        s.create_service(&spec("api", 2, &[]), 1).unwrap();
        s.reconcile(1);
        assert_eq!(per_node(&s, "api"), [("node1".into(), 2)].into());
        s.update_service(
            "api",
            &[port(9000, 9000, Protocol::Udp, PublishMode::Host)],
            &[],
            None,
            &SpecUpdate::default(),
            2,
        )
        .unwrap();
        s.reconcile(2);
        assert_eq!(per_node(&s, "api"), [("node1".into(), 1)].into());
        let waiting = current(&s, "api")[1];
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (2, None));
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .contains("host-mode port 9000/udp is taken"));
    }

    #[test]
    fn a_task_no_node_can_take_holds_no_address() {
        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        // More replicas than the /24 has addresses, none placeable.
        let mut big = spec("big", 300, &["backend"]);
        big.constraints = vec!["node.labels.zone==a".into()];
        s.create_service(&big, 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "big");
        assert_eq!(tasks.len(), 300);
        assert!(tasks
            .iter()
            .all(|t| t.node_id.is_none() && t.attachments.is_empty()));
        let why = tasks[0].error.as_deref().unwrap();
        assert!(why.contains("no suitable node"), "{why}");
        // The network's addresses stay free for tasks that can run.
        s.create_service(&spec("web", 1, &["backend"]), 2).unwrap();
        s.reconcile(2);
        let web = current(&s, "web");
        assert!(web[0].node_id.is_some());
        assert_eq!(web[0].attachments.len(), 1);
    }

    #[test]
    fn every_allocator_hands_out_a_freed_value_last() {
        let mut s = cluster(2);
        // Ingress: task endpoints, VIPs and node sboxes share one serial allocation. node1 and
        // node2 hold .2 and .3; a published service's VIP takes .4 and its task .5; both end,
        // and node3 must not get either back.
        s.create_service(&published_spec("web", 1, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        let ingress = s.ingress().unwrap().id.clone();
        let web_id = s.find_service("web").unwrap();
        assert_eq!(
            s.services[&web_id].vips[&ingress],
            Ipv4Addr::new(10, 255, 0, 4)
        );
        let task_ip = current(&s, "web")[0].attachments[0].addr.addr();
        assert_eq!(task_ip, Ipv4Addr::new(10, 255, 0, 5));
        s.remove_service("web", 2).unwrap();
        s.reconcile(2);
        s.register_node(
            "node3",
            "192.168.56.13".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        let sbox3 = s.nodes[&node_id(&s, "node3")].ingress_addr.unwrap();
        assert_eq!(sbox3, Ipv4Addr::new(10, 255, 0, 6));
        // ...and a VIP and task after it get neither node3's nor the freed ones.
        s.create_service(&published_spec("web", 1, &[], &[web(80)]), 3)
            .unwrap();
        s.reconcile(3);
        assert_eq!(
            current(&s, "web")[0].attachments[0].addr.addr(),
            Ipv4Addr::new(10, 255, 0, 8)
        );
        // Task endpoints on a user network (see also scale_up_then_down_...).
        add_network(&mut s, "backend", "10.0.9.0/24");
        // The VIP takes .2, the task .3; its replacement .4.
        s.create_service(&spec("db", 1, &["backend"]), 4).unwrap();
        s.reconcile(4);
        assert_eq!(
            current(&s, "db")[0].attachments[0].addr.to_string(),
            "10.0.9.3/24"
        );
        s.scale_service("db", 0, 5).unwrap();
        s.reconcile(5);
        s.scale_service("db", 1, 6).unwrap();
        s.reconcile(6);
        assert_eq!(
            current(&s, "db")[0].attachments[0].addr.to_string(),
            "10.0.9.4/24"
        );
        // Subnets, VNIs and fwmarks: a freed one is not the next one.
        let auto = |s: &mut State, name: &str| {
            let id = s
                .create_network(
                    name,
                    "overlay",
                    None,
                    &BTreeMap::new(),
                    MANAGER.parse().unwrap(),
                    7,
                )
                .unwrap();
            net_of(s, &id)
        };
        let first = auto(&mut s, "x");
        s.remove_network("x").unwrap();
        let second = auto(&mut s, "y");
        assert_ne!(second.subnet, first.subnet);
        assert_eq!(second.vni, first.vni + 1);
        let mark = |s: &State, name: &str| s.services[&s.find_service(name).unwrap()].fwmark;
        let freed = mark(&s, "web");
        s.remove_service("web", 8).unwrap();
        s.create_service(&published_spec("web2", 1, &[], &[web(80)]), 8)
            .unwrap();
        // db (for its VIP) took the mark after web's.
        assert_ne!(mark(&s, "web2"), freed);
        assert_eq!(mark(&s, "web2"), mark(&s, "db").map(|m| m + 1));
    }

    #[test]
    fn errors_quote_only_an_excerpt_of_huge_input() {
        let mut s = cluster(1);
        let huge = "x".repeat(10_000);
        let before = s.clone();
        let errors = [
            s.create_network(
                &huge,
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err(),
            s.create_network(
                "n",
                &huge,
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err(),
            s.create_network(
                "n",
                "overlay",
                Some(&huge),
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err(),
            s.create_service(&spec(&huge, 1, &[]), 1).unwrap_err(),
            s.scale_service(&huge, 1, 1).unwrap_err(),
            s.remove_service(&huge, 1).unwrap_err(),
            s.remove_network(&huge).unwrap_err(),
            s.update_service(&huge, &[], &[], None, &SpecUpdate::default(), 1)
                .unwrap_err(),
            s.update_node(&huge, None, &BTreeMap::new(), &[])
                .unwrap_err(),
            s.register_node(&huge, "192.168.56.99".parse().unwrap(), None, Role::Worker)
                .unwrap_err(),
        ];
        for err in errors {
            let text = err.to_string();
            assert!(text.len() < 400, "{} bytes: {}", text.len(), &text[..200]);
            assert!(text.contains("…(10000 bytes)"), "{text}");
        }
        assert_eq!(s, before);
    }

    #[test]
    fn labels_constraints_and_commands_are_bounded() {
        let mut s = cluster(1);
        let before = s.clone();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let long_key = "k".repeat(MAX_LABEL_KEY_BYTES + 1);
        let long_value = "v".repeat(MAX_LABEL_VALUE_BYTES + 1);
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let upd = |s: &mut State, add: &BTreeMap<String, String>, rm: &[&str]| {
            let rm: Vec<String> = rm.iter().map(|k| k.to_string()).collect();
            s.update_node("node1", None, add, &rm)
                .unwrap_err()
                .to_string()
        };
        assert!(upd(&mut s, &labels(&[(&long_key, "v")]), &[]).contains("invalid label key"));
        assert!(upd(&mut s, &labels(&[("zone", &long_value)]), &[]).contains("invalid value"));
        assert!(upd(&mut s, &labels(&[("zone", "a\nb")]), &[]).contains("of label zone"));
        assert!(upd(&mut s, &many, &[]).contains("65 labels is more than the limit of 64"));
        assert_eq!(
            upd(&mut s, &labels(&[("zone", "a")]), &["zone"]),
            "update node node1: label zone is both added and removed"
        );
        let with = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut sp = spec("api", 1, &[]);
            f(&mut sp);
            sp
        };
        let cases = [
            (
                with(&|sp| sp.command = vec!["x".into(); MAX_COMMAND_ARGS + 1]),
                "the command has 1025 arguments",
            ),
            (
                with(&|sp| sp.command = vec!["x".repeat(MAX_COMMAND_BYTES + 1)]),
                "the command has 65537 bytes",
            ),
            (
                with(&|sp| sp.command = vec!["sh".into(), "a\0b".into()]),
                "argument 2 of the command (\"a\\0b\") contains a NUL byte",
            ),
            (
                with(&|sp| sp.constraints = vec!["node.role==worker".into(); MAX_CONSTRAINTS + 1]),
                "33 constraints is more than the limit of 32",
            ),
            (
                with(&|sp| sp.constraints = vec![format!("node.hostname=={}", "h".repeat(300))]),
                "longer than 256 bytes",
            ),
        ];
        for (sp, expected) in cases {
            let err = s.create_service(&sp, 1).unwrap_err().to_string();
            assert!(err.starts_with("create service api: "), "{err}");
            assert!(err.contains(expected), "{err}");
        }
        assert_eq!(s, before);
    }

    #[test]
    fn user_subnets_stay_clear_of_ingress() {
        let mut s = State::default();
        s.ensure_ingress("10.0.0.0/16", MANAGER.parse().unwrap(), 0)
            .unwrap();
        let auto = s
            .create_network(
                "auto",
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        assert_eq!(net_of(&s, &auto).subnet.to_string(), "10.1.0.0/24");
        let err = s
            .create_network(
                "bad",
                "overlay",
                Some("10.0.5.0/24"),
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create network bad: subnet 10.0.5.0/24 overlaps subnet 10.0.0.0/16 of network ingress"
        );
    }

    #[test]
    fn ingress_is_attached_after_user_networks_and_fwmarks_are_allocated() {
        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        let ing = ingress_id(&s);
        let a = s
            .create_service(&published_spec("a", 1, &["backend"], &[web(80)]), 1)
            .unwrap();
        let b = s
            .create_service(&published_spec("b", 1, &[], &[web(81)]), 1)
            .unwrap();
        let host = port(82, 8080, Protocol::Tcp, PublishMode::Host);
        let h = s
            .create_service(&published_spec("h", 1, &["backend"], &[host]), 1)
            .unwrap();
        s.reconcile(1);
        let nets = |name: &str| -> Vec<String> {
            current(&s, name)[0]
                .attachments
                .iter()
                .map(|x| x.network_id.clone())
                .collect()
        };
        let backend = s.find_network("backend").unwrap();
        assert_eq!(nets("a"), [backend.clone(), ing.clone()]);
        assert_eq!(nets("b"), [ing]);
        // Host mode needs no routing mesh: no ingress endpoint; its fwmark is for its VIP on
        // backend.
        assert_eq!(nets("h"), [backend]);
        let mark = |id: &str| s.services[id].fwmark;
        assert_eq!(
            (mark(&a), mark(&b), mark(&h)),
            (Some(256), Some(257), Some(258))
        );

        // A freed mark is not reused at once, and a live one never.
        s.remove_service("a", 2).unwrap();
        let c = s
            .create_service(&published_spec("c", 1, &[], &[web(80)]), 2)
            .unwrap();
        assert_eq!(s.services[&c].fwmark, Some(259));
        let text = serde_json::to_string(&s).unwrap();
        let mut back: State = serde_json::from_str(&text).unwrap();
        let d = back
            .create_service(&published_spec("d", 1, &[], &[web(83)]), 2)
            .unwrap();
        assert_eq!(back.services[&d].fwmark, Some(260));
        assert_eq!(back.services[&b].fwmark, Some(257));
    }

    #[test]
    fn published_backends_follow_running_tasks_on_every_node() {
        let mut s = cluster(3);
        s.create_service(&published_spec("web", 2, &[], &[web(80)]), 1)
            .unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        let ids: Vec<String> = s.nodes.keys().cloned().collect();
        let revisions = |s: &State| -> Vec<u64> {
            ids.iter()
                .map(|id| s.nodes[id].assignment.revision)
                .collect()
        };
        // Every node, with or without tasks, has the ingress network, its sbox and the service;
        // no backend runs yet.
        for id in &ids {
            let a = &s.nodes[id].assignment;
            let ingress = a.ingress.as_ref().unwrap();
            assert_eq!(ingress.sbox_addr.addr(), s.nodes[id].ingress_addr.unwrap());
            assert_eq!(ingress.network.vni, 4096);
            assert!(a.networks.is_empty(), "ingress is not a lazy network");
            assert_eq!(a.published.len(), 1);
            assert_eq!(a.published[0].fwmark, 256);
            assert_eq!(a.published[0].ports, [web(80)]);
            assert!(a.published[0].backends.is_empty());
        }
        // Peers: the other nodes' sboxes and the remote tasks' ingress endpoints.
        let n3 = node_id(&s, "node3");
        let peers: Vec<(String, String)> = s.nodes[&n3]
            .assignment
            .ingress
            .as_ref()
            .unwrap()
            .network
            .peers
            .iter()
            .map(|p| {
                assert_eq!(p.mac, endpoint_mac(p.ip));
                (p.ip.to_string(), p.vtep.to_string())
            })
            .collect();
        let tasks = current(&s, "web");
        let mut expected = vec![
            ("10.255.0.2".to_string(), "192.168.56.11".to_string()),
            ("10.255.0.3".to_string(), "192.168.56.12".to_string()),
        ];
        for t in &tasks {
            let vtep = s.nodes[t.node_id.as_ref().unwrap()].node.addr.to_string();
            expected.push((t.attachments[0].addr.addr().to_string(), vtep));
        }
        expected.sort();
        assert_eq!(peers, expected);

        let before = revisions(&s);
        let first = tasks[0].clone();
        report(&mut s, &first, TaskState::Running, None);
        s.reconcile(2);
        assert_eq!(
            s.refresh_assignments().len(),
            3,
            "every node follows the backends"
        );
        assert!(revisions(&s).iter().zip(&before).all(|(a, b)| a > b));
        for id in &ids {
            assert_eq!(
                s.nodes[id].assignment.published[0].backends,
                [first.attachments[0].addr.addr()]
            );
        }
        run_all(&mut s, "web");
        s.reconcile(3);
        s.refresh_assignments();
        let mut all: Vec<Ipv4Addr> = current(&s, "web")
            .iter()
            .map(|t| t.attachments[0].addr.addr())
            .collect();
        all.sort();
        assert_eq!(s.nodes[&ids[0]].assignment.published[0].backends, all);

        // A dying task leaves the backends everywhere; its replacement joins once it runs.
        report(&mut s, &first, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);
        assert_eq!(s.refresh_assignments().len(), 3);
        let left = &s.nodes[&ids[1]].assignment.published[0].backends;
        assert_eq!(left.len(), 1);
        assert!(!left.contains(&first.attachments[0].addr.addr()));
        // Scaling to zero empties the backends but the service stays published.
        s.scale_service("web", 0, 301).unwrap();
        s.reconcile(301);
        s.refresh_assignments();
        assert!(s.nodes[&ids[2]].assignment.published[0].backends.is_empty());
        assert!(s.nodes[&ids[2]].assignment.ingress.is_some());
    }

    #[test]
    fn publishing_and_unpublishing_ingress_replaces_tasks() {
        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        let id = s.create_service(&spec("web", 2, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let old: Vec<String> = current(&s, "web").iter().map(|t| t.id.clone()).collect();
        s.refresh_assignments();
        assert!(s.nodes.values().all(|r| r.assignment.published.is_empty()));

        // Host mode only: same tasks, published everywhere with fwmark 0 and no backends.
        let host = port(81, 8080, Protocol::Udp, PublishMode::Host);
        s.update_service("web", &[host], &[], None, &SpecUpdate::default(), 2)
            .unwrap();
        s.reconcile(2);
        assert_eq!(
            current(&s, "web")
                .iter()
                .map(|t| t.id.clone())
                .collect::<Vec<_>>(),
            old
        );
        s.refresh_assignments();
        let p = &s.nodes.values().next().unwrap().assignment.published[0];
        assert_eq!((p.fwmark, p.ports.clone()), (0, vec![host]));

        // The first ingress port: a fwmark, and new tasks with an ingress endpoint after
        // backend, rolled out one at a time.
        s.update_service("web", &[web(80)], &[], None, &SpecUpdate::default(), 3)
            .unwrap();
        s.reconcile(3);
        assert_eq!(s.services[&id].fwmark, Some(256));
        assert_eq!(s.services[&id].updated_at, 3);
        let draining: Vec<&Task> = s.tasks.values().filter(|t| t.is_draining()).collect();
        assert_eq!(draining.len(), 1, "parallelism 1: one old task at a time");
        let now = settle(&mut s, 3);
        let new = current(&s, "web");
        assert_eq!(new.len(), 2);
        assert!(new
            .iter()
            .all(|t| !old.contains(&t.id) && t.attachments.len() == 2));
        assert!(old
            .iter()
            .all(|o| s.tasks[o].desired_state == TaskState::Shutdown));
        let replaced: Vec<String> = new.iter().map(|t| t.id.clone()).collect();

        // Another ingress port changes no task; removing both ingress ports drops the mesh.
        s.update_service("web", &[web(8000)], &[], None, &SpecUpdate::default(), now)
            .unwrap();
        s.reconcile(now);
        assert_eq!(
            current(&s, "web")
                .iter()
                .map(|t| t.id.clone())
                .collect::<Vec<_>>(),
            replaced
        );
        let p80 = PublishedPort {
            protocol: Protocol::Tcp,
            published: 80,
        };
        s.update_service("web", &[], &[p80], None, &SpecUpdate::default(), now)
            .unwrap();
        assert_eq!(s.services[&id].fwmark, Some(256));
        let p8000 = PublishedPort {
            protocol: Protocol::Tcp,
            published: 8000,
        };
        s.unpublish(p8000, now).unwrap();
        settle(&mut s, now);
        // Off the mesh, the service keeps its mark for its VIP on its own network, and loses
        // its ingress VIP.
        assert_eq!(s.services[&id].fwmark, Some(256));
        assert_eq!(
            s.services[&id].vips.keys().collect::<Vec<_>>(),
            [&s.services[&id].spec.networks[0]]
        );
        assert_eq!(s.services[&id].spec.ports, [host]);
        assert!(current(&s, "web")
            .iter()
            .all(|t| t.attachments.len() == 1 && !replaced.contains(&t.id)));
        // Swapping a port in one update: removals apply first.
        let moved = port(81, 9090, Protocol::Udp, PublishMode::Host);
        let p81 = PublishedPort {
            protocol: Protocol::Udp,
            published: 81,
        };
        s.update_service("web", &[moved], &[p81], None, &SpecUpdate::default(), 7)
            .unwrap();
        assert_eq!(s.services[&id].spec.ports, [moved]);
    }

    #[test]
    fn networks_get_serial_vnis_and_free_subnets() {
        let mut s = cluster(1);
        let a = s
            .create_network(
                "a",
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        let b = add_network(&mut s, "b", "10.0.9.0/24");
        let c = s
            .create_network(
                "c",
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        let net = |id: &str| s.networks[id].network.clone();
        // The ingress network took 4096 when the cluster was created.
        assert_eq!((net(&a).vni, net(&b).vni, net(&c).vni), (4097, 4098, 4099));
        assert_eq!(net(&a).subnet.to_string(), "10.0.0.0/24");
        assert_eq!(net(&c).subnet.to_string(), "10.0.1.0/24");
        assert_eq!(net(&b).gateway, Ipv4Addr::new(10, 0, 9, 1));
        s.remove_network("a").unwrap();
        // Neither the freed VNI nor the freed subnet is handed out again at once.
        let d = s
            .create_network(
                "d",
                "overlay",
                None,
                &BTreeMap::new(),
                MANAGER.parse().unwrap(),
                1,
            )
            .unwrap();
        assert_eq!(net_of(&s, &d).vni, 4100);
        assert_eq!(net_of(&s, &d).subnet.to_string(), "10.0.2.0/24");
    }

    fn net_of(s: &State, id: &str) -> Network {
        s.networks[id].network.clone()
    }

    #[test]
    fn replicas_spread_and_get_addresses() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "web");
        assert_eq!(tasks.len(), 3);
        assert_eq!(
            per_node(&s, "web"),
            [
                ("node1".into(), 1),
                ("node2".into(), 1),
                ("node3".into(), 1)
            ]
            .into()
        );
        let ips: Vec<String> = tasks
            .iter()
            .map(|t| t.attachments[0].addr.to_string())
            .collect();
        // .2 is the service's VIP.
        assert_eq!(ips, ["10.0.9.3/24", "10.0.9.4/24", "10.0.9.5/24"]);
        assert_eq!(tasks[0].attachments[0].mac, "02:42:0a:00:09:03");
        assert!(tasks.iter().all(|t| t.state == TaskState::Assigned));
    }

    #[test]
    fn scale_up_then_down_removes_highest_slots_and_frees_addresses() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        s.scale_service("web", 6, 2).unwrap();
        s.reconcile(2);
        assert_eq!(current(&s, "web").len(), 6);
        assert!(per_node(&s, "web").values().all(|&n| n == 2));
        let kept: Vec<String> = current(&s, "web")[..2]
            .iter()
            .map(|t| t.id.clone())
            .collect();

        s.scale_service("web", 2, 3).unwrap();
        s.reconcile(3);
        let tasks = current(&s, "web");
        assert_eq!(tasks.iter().map(|t| t.slot).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), kept);
        // Slots 3..6 drain first: off the balancers, still on their nodes until every node
        // applied that.
        let draining: Vec<&Task> = s.tasks.values().filter(|t| t.is_draining()).collect();
        assert_eq!(draining.len(), 4);
        assert!(draining.iter().all(|t| t.slot > 2 && t.is_on_node()));
        let freed: Vec<Ipv4Net> = draining.iter().map(|t| t.attachments[0].addr).collect();
        // Then they are gone entirely; their addresses are free, but handed out again only
        // after the ones never used (serial allocation: no stale state for a reused address).
        let now = settle(&mut s, 3);
        assert_eq!(s.tasks.len(), 2);
        s.scale_service("web", 3, now).unwrap();
        s.reconcile(now);
        let fresh = current(&s, "web")[2].attachments[0].addr;
        assert!(!freed.contains(&fresh), "{fresh} was handed out before");
    }

    #[test]
    fn a_failed_task_is_replaced_in_its_slot_on_another_node() {
        let mut s = cluster(3);
        s.create_service(&spec("web", 2, &[]), 1).unwrap();
        s.reconcile(1);
        let failed = current(&s, "web")[0].clone();
        report(&mut s, &failed, TaskState::Running, None);
        report(&mut s, &failed, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);

        let old = &s.tasks[&failed.id];
        assert_eq!(old.desired_state, TaskState::Shutdown);
        assert_eq!(old.state, TaskState::Failed);
        assert_eq!(old.error.as_deref(), Some("exit status 1"));
        let tasks = current(&s, "web");
        assert_eq!(tasks.len(), 2);
        let replacement = tasks.iter().find(|t| t.slot == failed.slot).unwrap();
        assert_ne!(replacement.id, failed.id);
        assert_ne!(replacement.node_id, failed.node_id);
        // node1 had slot 1 and node2 slot 2: the replacement takes the empty node3.
        assert_eq!(
            replacement.node_id.as_deref(),
            Some(node_id(&s, "node3").as_str())
        );
    }

    #[test]
    fn a_down_node_orphans_its_tasks_and_they_move() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        let n2 = node_id(&s, "node2");
        let lost: Task = current(&s, "web")
            .into_iter()
            .find(|t| t.node_id.as_deref() == Some(n2.as_str()))
            .unwrap()
            .clone();
        s.set_node_status(&n2, NodeStatus::Down);
        s.reconcile(5);
        let old = &s.tasks[&lost.id];
        assert_eq!(old.state, TaskState::Orphaned);
        assert_eq!(old.error.as_deref(), Some("node node2 is down"));
        assert!(old.attachments.is_empty());
        assert_eq!(current(&s, "web").len(), 3);
        assert_eq!(per_node(&s, "web").get("node2"), None);
        // The agent of the lost node reporting in late does not bring the task back.
        report(&mut s, &lost, TaskState::Running, None);
        assert_eq!(s.tasks[&lost.id].state, TaskState::Orphaned);
    }

    #[test]
    fn drain_moves_tasks_and_pause_only_stops_new_ones() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 2, &[]), 1).unwrap();
        s.reconcile(1);
        let none = BTreeMap::new();
        s.update_node("node2", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.scale_service("web", 3, 2).unwrap();
        s.reconcile(2);
        assert_eq!(
            per_node(&s, "web"),
            [("node1".into(), 2), ("node2".into(), 1)].into()
        );
        s.update_node("node2", Some(Availability::Drain), &none, &[])
            .unwrap();
        s.reconcile(3);
        assert_eq!(per_node(&s, "web"), [("node1".into(), 3)].into());
    }

    #[test]
    fn unplaceable_tasks_wait_until_a_node_fits() {
        let mut s = cluster(1);
        let mut sp = spec("web", 1, &[]);
        sp.constraints = vec!["node.role==worker".into()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        let task = current(&s, "web")[0].clone();
        assert_eq!(task.state, TaskState::Pending);
        assert_eq!(
            task.error.as_deref(),
            Some("no suitable node (scheduling constraints not satisfied on 1 node)")
        );
        s.register_node(
            "node2",
            "192.168.56.12".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(2);
        let task = &s.tasks[&task.id];
        assert_eq!(task.state, TaskState::Assigned);
        assert_eq!(task.node_id.as_deref(), Some(node_id(&s, "node2").as_str()));
        assert_eq!(task.error, None);
    }

    #[test]
    fn label_constraints_follow_node_updates() {
        let mut s = cluster(3);
        let add: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        s.update_node("node3", None, &add, &[]).unwrap();
        let mut sp = spec("web", 2, &[]);
        sp.constraints = vec!["node.labels.zone==b".into()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        assert_eq!(per_node(&s, "web"), [("node3".into(), 2)].into());
        let err = s
            .update_node(
                "node3",
                None,
                &[("a b".to_string(), "x".to_string())].into(),
                &[],
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("update node node3: invalid label key"),
            "{err}"
        );
    }

    fn global(name: &str, networks: &[&str]) -> ServiceSpec {
        ServiceSpec {
            mode: ServiceMode::Global,
            ..spec(name, 0, networks)
        }
    }

    /// Each node's current task of a service: hostname → (slot, state).
    fn by_node(s: &State, service: &str) -> BTreeMap<String, (u64, TaskState)> {
        current(s, service)
            .into_iter()
            .map(|t| {
                let node = t.node_id.as_ref().expect("a global task is on its node");
                (s.nodes[node].node.hostname.clone(), (t.slot, t.state))
            })
            .collect()
    }

    fn hosts(s: &State, service: &str) -> Vec<String> {
        by_node(s, service).into_keys().collect()
    }

    #[test]
    fn a_global_service_runs_one_task_on_every_node_and_on_nodes_that_join() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&global("agent", &["backend"]), 1).unwrap();
        s.reconcile(1);
        let tasks = current(&s, "agent");
        assert_eq!(tasks.len(), 3);
        assert!(tasks
            .iter()
            .all(|t| t.state == TaskState::Assigned && t.attachments.len() == 1));
        assert_eq!(
            by_node(&s, "agent"),
            [
                ("node1".to_string(), (1, TaskState::Assigned)),
                ("node2".to_string(), (2, TaskState::Assigned)),
                ("node3".to_string(), (3, TaskState::Assigned)),
            ]
            .into()
        );
        s.refresh_assignments();
        for r in s.nodes.values() {
            assert_eq!(r.assignment.tasks.len(), 1, "{}", r.node.hostname);
        }
        // A replicated service beside it still spreads as before.
        s.create_service(&spec("web", 2, &[]), 2).unwrap();
        s.reconcile(2);
        assert_eq!(current(&s, "web").len(), 2);
        assert_eq!(current(&s, "agent").len(), 3);

        // A fourth node joins: it gets a task, in a slot of its own; the others are untouched.
        let before: Vec<String> = current(&s, "agent").iter().map(|t| t.id.clone()).collect();
        s.register_node(
            "node4",
            "192.168.56.14".parse().unwrap(),
            None,
            Role::Worker,
        )
        .unwrap();
        s.reconcile(3);
        let after = current(&s, "agent");
        assert_eq!(after.len(), 4);
        assert_eq!(by_node(&s, "agent")["node4"], (4, TaskState::Assigned));
        assert!(before.iter().all(|id| s.tasks[id].is_current()));
        run_all(&mut s, "agent");
        let info =
            crate::views::service(&s, &Default::default(), &s.find_service("agent").unwrap());
        assert_eq!((info.running, info.desired), (4, 4));
        let names: Vec<String> = crate::views::tasks(&s, &info.id)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(
            names.contains(&format!("agent.{}", node_id(&s, "node4"))),
            "{names:?}"
        );
        // The mode and the nodes' slots survive a manager restart.
        let mut back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        back.agent_port = s.agent_port;
        assert_eq!(back, s);
        back.reconcile(4);
        assert_eq!(by_node(&back, "agent"), by_node(&s, "agent"));
    }

    #[test]
    fn a_global_service_follows_drain_pause_and_down_nodes() {
        let mut s = cluster(3);
        s.create_service(&global("agent", &[]), 1).unwrap();
        s.reconcile(1);
        run_all(&mut s, "agent");
        let none = BTreeMap::new();
        let n2 = node_id(&s, "node2");
        let old = current(&s, "agent")[1].clone();
        assert_eq!(old.node_id.as_deref(), Some(n2.as_str()));

        // Drain: node2's task goes and is not replaced elsewhere.
        s.update_node("node2", Some(Availability::Drain), &none, &[])
            .unwrap();
        s.reconcile(2);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
        let gone = &s.tasks[&old.id];
        assert_eq!(
            (gone.desired_state, gone.error.as_deref()),
            (TaskState::Shutdown, Some("node node2 is drained"))
        );
        // Active again: a new task there, in node2's slot, so its history stays together.
        s.update_node("node2", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(3);
        assert_eq!(
            by_node(&s, "agent")["node2"],
            (old.slot, TaskState::Assigned)
        );
        assert_ne!(current(&s, "agent")[1].id, old.id);
        run_all(&mut s, "agent");

        // Pause keeps the task there, but places none: once it ends nothing replaces it.
        s.update_node("node3", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.reconcile(4);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2", "node3"]);
        let on3 = current(&s, "agent")[2].clone();
        report(&mut s, &on3, TaskState::Failed, Some("exit status 1"));
        s.reconcile(300);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2"]);
        s.update_node("node3", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(301);
        assert_eq!(by_node(&s, "agent")["node3"], (3, TaskState::Assigned));

        // A failed task comes back on its own node, in its slot, after the restart delay.
        let on1 = current(&s, "agent")[0].clone();
        report_at(&mut s, &on1, TaskState::Running, None, 400);
        report_at(&mut s, &on1, TaskState::Failed, Some("exit status 1"), 400);
        s.reconcile(401);
        let waiting = current(&s, "agent")[0].clone();
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (1, None));
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .starts_with("restart delayed"));
        s.reconcile(400 + RESTART_DELAY_SECS);
        assert_eq!(by_node(&s, "agent")["node1"], (1, TaskState::Assigned));
        // One waiting for its restart delay on a node that is paused meanwhile is not placed.
        let on3 = current(&s, "agent")[2].clone();
        report_at(&mut s, &on3, TaskState::Running, None, 410);
        report_at(&mut s, &on3, TaskState::Failed, Some("exit status 1"), 410);
        s.reconcile(411);
        let waiting = current(&s, "agent")[2].clone();
        assert_eq!((waiting.slot, waiting.node_id.as_ref()), (3, None));
        s.update_node("node3", Some(Availability::Pause), &none, &[])
            .unwrap();
        s.reconcile(420);
        let gone = &s.tasks[&waiting.id];
        assert_eq!(
            (gone.desired_state, gone.error.as_deref()),
            (TaskState::Shutdown, Some("node node3 is paused"))
        );
        assert_eq!(hosts(&s, "agent"), ["node1", "node2"]);
        s.update_node("node3", Some(Availability::Active), &none, &[])
            .unwrap();
        s.reconcile(421);
        assert_eq!(by_node(&s, "agent")["node3"], (3, TaskState::Assigned));

        // A node that goes down: its task is orphaned and not replaced elsewhere.
        s.set_node_status(&n2, NodeStatus::Down);
        s.reconcile(500);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
        assert_eq!(current(&s, "agent").len(), 2);
        s.set_node_status(&n2, NodeStatus::Ready);
        s.reconcile(501);
        assert_eq!(hosts(&s, "agent"), ["node1", "node2", "node3"]);
        // A removed one loses its task for good.
        s.set_node_status(&n2, NodeStatus::Down);
        s.remove_node("node2", false, 502).unwrap();
        s.reconcile(502);
        assert_eq!(hosts(&s, "agent"), ["node1", "node3"]);
    }

    #[test]
    fn a_global_service_follows_label_constraints() {
        let mut s = cluster(3);
        let mut sp = global("agent", &[]);
        sp.constraints = vec!["node.labels.zone==a".into()];
        s.create_service(&sp, 1).unwrap();
        s.reconcile(1);
        assert!(current(&s, "agent").is_empty());
        let zone_a: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        s.update_node("node2", None, &zone_a, &[]).unwrap();
        s.update_node("node3", None, &zone_a, &[]).unwrap();
        s.reconcile(2);
        assert_eq!(hosts(&s, "agent"), ["node2", "node3"]);
        let on2 = current(&s, "agent")[0].clone();
        s.update_node("node2", None, &BTreeMap::new(), &["zone".to_string()])
            .unwrap();
        s.reconcile(3);
        assert_eq!(hosts(&s, "agent"), ["node3"]);
        assert_eq!(
            s.tasks[&on2.id].error.as_deref(),
            Some("node node2 does not satisfy constraint node.labels.zone==a")
        );
        // A paused node that stops matching loses its task too.
        s.update_node("node3", Some(Availability::Pause), &BTreeMap::new(), &[])
            .unwrap();
        let zone_b: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        s.update_node("node3", None, &zone_b, &[]).unwrap();
        s.reconcile(4);
        assert!(current(&s, "agent").is_empty());
    }

    #[test]
    fn a_global_service_with_a_host_mode_port_runs_on_every_node() {
        let mut s = cluster(3);
        let host = port(8081, 8080, Protocol::Tcp, PublishMode::Host);
        s.create_service(
            &ServiceSpec {
                ports: vec![host],
                ..global("web", &[])
            },
            1,
        )
        .unwrap();
        s.reconcile(1);
        assert_eq!(hosts(&s, "web"), ["node1", "node2", "node3"]);
        assert!(current(&s, "web").iter().all(|t| t.error.is_none()));
        // Ingress and host ports together: every task on ingress, one per node.
        s.update_service("web", &[web(80)], &[], None, &SpecUpdate::default(), 2)
            .unwrap();
        settle(&mut s, 2);
        assert_eq!(hosts(&s, "web"), ["node1", "node2", "node3"]);
        let ingress = ingress_id(&s);
        assert!(current(&s, "web")
            .iter()
            .all(|t| t.attachments.iter().any(|a| a.network_id == ingress)));
    }

    #[test]
    fn replicas_and_scale_are_refused_for_a_global_service() {
        let mut s = cluster(2);
        let before = s.clone();
        let err = s
            .create_service(
                &ServiceSpec {
                    replicas: 2,
                    ..global("agent", &[])
                },
                1,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "create service agent: replicas can only be used with replicated mode: a global service runs one task on every eligible node"
        );
        assert_eq!(s, before);
        s.create_service(&global("agent", &[]), 1).unwrap();
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        let before = s.clone();
        let err = s.scale_service("agent", 3, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scale service agent: scale can only be used with replicated mode"
        );
        let err = s
            .scale_services(&[("web".into(), 3), ("agent".into(), 3)], 2)
            .unwrap_err();
        assert!(err.to_string().contains("scale can only be used"), "{err}");
        assert_eq!(s, before);
    }

    #[test]
    fn history_is_bounded_per_slot() {
        let mut s = cluster(1);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        for round in 0..10 {
            let at = 1000 + round * 10;
            let t = current(&s, "web")[0].clone();
            report_at(&mut s, &t, TaskState::Failed, Some("exit status 1"), at);
            s.reconcile(at + RESTART_DELAY_SECS);
        }
        assert_eq!(s.tasks.len(), 1 + TASK_HISTORY);
        assert_eq!(current(&s, "web").len(), 1);
    }

    #[test]
    fn a_failing_slot_restarts_only_after_the_delay() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        let t = current(&s, "web")[0].clone();
        report_at(&mut s, &t, TaskState::Complete, None, 50);
        s.reconcile(50 + RESTART_DELAY_SECS - 1);
        let waiting = current(&s, "web")[0].clone();
        assert_eq!(
            (waiting.state, waiting.node_id.as_ref()),
            (TaskState::Pending, None)
        );
        assert!(waiting
            .error
            .as_deref()
            .unwrap()
            .starts_with("restart delayed"));
        s.reconcile(50 + RESTART_DELAY_SECS);
        let placed = &s.tasks[&waiting.id];
        assert_eq!(placed.state, TaskState::Assigned);
        assert_ne!(placed.node_id, t.node_id);
        assert_eq!(placed.error, None);
        // A task moved off a down node is not the task's fault: no delay.
        let node = placed.node_id.clone().unwrap();
        s.set_node_status(&node, NodeStatus::Down);
        s.reconcile(50 + RESTART_DELAY_SECS);
        assert_eq!(current(&s, "web")[0].state, TaskState::Assigned);
    }

    #[test]
    fn nodes_keep_their_ids() {
        let mut s = cluster(1);
        let id = node_id(&s, "node1");
        let again = s
            .register_node(
                "node1",
                "192.168.56.99".parse().unwrap(),
                None,
                Role::Worker,
            )
            .unwrap();
        assert_eq!(again, id);
        assert_eq!(s.nodes[&id].node.addr.to_string(), "192.168.56.99");
        let given = s
            .register_node(
                "renamed",
                "192.168.56.11".parse().unwrap(),
                Some(&id),
                Role::Manager,
            )
            .unwrap();
        assert_eq!(given, id);
        assert_eq!(s.nodes.len(), 1);
        assert!(s
            .register_node("", "192.168.56.5".parse().unwrap(), None, Role::Worker)
            .is_err());
        let err = s
            .register_node(
                "x",
                "192.168.56.5".parse().unwrap(),
                Some("../etc"),
                Role::Worker,
            )
            .unwrap_err();
        assert!(err.to_string().contains("invalid node id"), "{err}");
    }

    #[test]
    fn assignments_name_own_tasks_and_only_other_nodes_endpoints_as_peers() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        add_network(&mut s, "other", "10.0.10.0/24");
        s.create_service(&spec("web", 4, &["backend"]), 1).unwrap();
        s.create_service(&spec("db", 1, &["other"]), 1).unwrap();
        s.reconcile(1);
        let changed = s.refresh_assignments();
        assert_eq!(changed.len(), 3);

        let n1 = node_id(&s, "node1");
        let a = &s.nodes[&n1].assignment;
        assert!(a.revision > 0);
        // Placement runs by service name: db.1 takes node1, web.1 and web.2 the empty node2 and
        // node3, web.3 node1 (no web task yet), web.4 node2 (fewest tasks overall).
        let mut names: Vec<String> = a
            .tasks
            .iter()
            .map(|t| t.name.rsplit_once('.').unwrap().0.to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["db.1", "web.3"]);
        let backend = a.networks.iter().find(|n| n.name == "backend").unwrap();
        assert_eq!(backend.gateway.to_string(), "10.0.9.1/24");
        let own: BTreeSet<Ipv4Addr> = a
            .tasks
            .iter()
            .flat_map(|t| &t.attachments)
            .map(|x| x.addr.addr())
            .collect();
        // Three web tasks elsewhere, and node2's and node3's load balancers on backend.
        assert_eq!(backend.peers.len(), 5);
        let lb = |n: &str| s.nodes[&node_id(&s, n)].lb_addrs[&backend.id];
        for node in ["node2", "node3"] {
            assert!(backend.peers.iter().any(|p| p.ip == lb(node)), "{node}");
        }
        assert_eq!(backend.lb_addr.map(|a| a.addr()), Some(lb("node1")));
        let web = &backend.services[0];
        let web_id = s.find_service("web").unwrap();
        assert_eq!(
            (web.name.as_str(), web.vip, web.fwmark),
            (
                "web",
                Some(s.services[&web_id].vips[&backend.id]),
                s.services[&web_id].fwmark.unwrap()
            )
        );
        assert_eq!(backend.services.len(), 1);
        for peer in &backend.peers {
            assert!(
                !own.contains(&peer.ip),
                "own endpoint {} listed as a peer",
                peer.ip
            );
            assert_ne!(peer.vtep.to_string(), "192.168.56.11");
            assert_eq!(peer.mac, endpoint_mac(peer.ip));
        }
        let vteps: BTreeSet<String> = backend.peers.iter().map(|p| p.vtep.to_string()).collect();
        assert_eq!(
            vteps,
            ["192.168.56.12".to_string(), "192.168.56.13".to_string()].into()
        );
        let other = a.networks.iter().find(|n| n.name == "other").unwrap();
        assert!(other.peers.is_empty());

        // Nothing changed: no new revision. A task on node2 ending changes node1's peers.
        assert!(s.refresh_assignments().is_empty());
        let n2 = node_id(&s, "node2");
        let t2 = s
            .tasks
            .values()
            .find(|t| t.node_id.as_deref() == Some(n2.as_str()) && t.is_current())
            .unwrap()
            .clone();
        let before = s.nodes[&n1].assignment.revision;
        report(&mut s, &t2, TaskState::Failed, Some("exit status 2"));
        s.reconcile(5);
        let changed = s.refresh_assignments();
        assert!(changed.contains(&n1));
        assert!(s.nodes[&n1].assignment.revision > before);
        // A node without tasks has no networks: overlays are built lazily.
        s.scale_service("web", 0, 6).unwrap();
        s.remove_service("db", 6).unwrap();
        settle(&mut s, 6);
        assert_eq!(s.nodes[&n1].assignment.networks, vec![]);
        assert_eq!(s.nodes[&n1].assignment.tasks, vec![]);
    }

    #[test]
    fn applied_revisions_only_move_forward_to_what_was_sent() {
        let mut s = cluster(1);
        let n1 = node_id(&s, "node1");
        let sent = s.nodes[&n1].assignment.revision;
        s.set_applied(&n1, sent + 5);
        assert_eq!(s.nodes[&n1].applied_revision, 0);
        s.set_applied(&n1, sent);
        assert_eq!(s.nodes[&n1].applied_revision, sent);
        s.set_applied(&n1, sent - 1);
        assert_eq!(s.nodes[&n1].applied_revision, sent);
    }

    #[test]
    fn reports_are_checked_against_the_reporting_node() {
        let mut s = cluster(2);
        s.create_service(&spec("web", 1, &[]), 1).unwrap();
        s.reconcile(1);
        let t = current(&s, "web")[0].clone();
        let other = s
            .nodes
            .keys()
            .find(|id| Some(*id) != t.node_id.as_ref())
            .unwrap()
            .clone();
        let status = TaskStatus {
            task_id: t.id.clone(),
            state: TaskState::Running,
            error: None,
            pid: None,
            netns: None,
            health: None,
            health_log: None,
        };
        let err = s.task_status(&other, &status, 2).unwrap_err();
        assert!(
            err.to_string().contains("is not assigned to this node"),
            "{err}"
        );
        let bad = TaskStatus {
            state: TaskState::Pending,
            ..status
        };
        assert!(s.task_status(t.node_id.as_ref().unwrap(), &bad, 2).is_err());
        assert_eq!(s.tasks[&t.id].state, TaskState::Assigned);
        // An agent's error text is kept bounded: it may quote a long command.
        let long = TaskStatus {
            state: TaskState::Failed,
            error: Some(format!("spawn {}: No such file", "x".repeat(10_000))),
            ..bad
        };
        s.task_status(t.node_id.as_ref().unwrap(), &long, 3)
            .unwrap();
        let kept = s.tasks[&t.id].error.clone().unwrap();
        assert!(
            kept.len() < 300 && kept.ends_with("…(10020 bytes)"),
            "{kept}"
        );
    }
}
