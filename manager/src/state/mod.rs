//! The desired state of the cluster and every change to it, as pure functions of (state, input,
//! time). Operations validate everything before they touch anything, so a refused request leaves
//! the state exactly as it was; [`State::reconcile`] then converges tasks to the services' specs.
//!
//! This file holds the model: [`State`] and its records ([`NodeRecord`], [`NetworkRecord`],
//! [`Service`], [`Task`]), why a request is refused ([`Reason`], [`OpError`]), and the lookups
//! every part uses (`find_*`, `ingress`, `task_networks`, ...). What is done with it lives
//! beside it, one concern a file:
//!
//! - `nodes.rs`: nodes joining, leaving, changing role or labels, and what their agents report
//!   about them (status, applied revision, gwbridge, ESP);
//! - `networks.rs`: the ingress network and user overlays: create, remove, subnet checks;
//! - `services.rs`: service create, update, scale, rollback, remove, unpublish, and the checks
//!   of ports, aliases and commands;
//! - `orchestrate.rs`: the timed work of a manager pass: task reports, reconcile (retiring,
//!   filling slots, global services, placing), and the IPsec key rotation's steps;
//! - `project.rs`: what each node's agent is told: its [`proto::agent::Assignment`] (tasks,
//!   networks with their peers, ingress, published ports, keys) and its revisions.
//!
//! Other parts of the manager add to `impl State` by concern too: rolling updates and drains in
//! [`crate::rollout`], VIPs, DNS and load-balancer addresses in [`crate::discovery`], and the
//! read-only API views in [`crate::views`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use proto::agent::{Assignment, DEFAULT_GWBRIDGE_SUBNET};
use proto::api::{
    PublishedPort, ServiceSpec, INGRESS_NETWORK, MAX_ALIASES, MAX_COMMAND_ARGS, MAX_COMMAND_BYTES,
    MAX_CONSTRAINTS, MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES, MAX_REPLICAS,
};
use proto::excerpt;
use proto::model::{
    Attachment, Health, Network, Node, PortConfig, PublishMode, Role, ServiceMode, TaskState,
};
use serde::{Deserialize, Serialize};

pub use cow::ArcCow;

use crate::alloc::{self, AllocError};
use crate::keys::KeyRing;
use crate::rollout::{Drain, Rollout, SpecError, TaskRuntime};
use proto::model::ConstraintError;

mod cow;
mod networks;
mod nodes;
mod orchestrate;
mod project;
mod services;

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
    /// Shared between copies of the state until changed (see [`ArcCow`]).
    pub tasks: BTreeMap<String, ArcCow<Task>>,
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
    /// The node's desired state as last computed; sent on connect and whenever it changes. A
    /// projection of the rest, so it is not stored: a starting manager computes it afresh, under
    /// a new revision. Shared, so copying the state does not copy every node's assignment.
    #[serde(skip)]
    pub assignment: Arc<Assignment>,
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

impl NodeRecord {
    /// Equal in all the projection to agents reads (see [`State::projects_as`]): all but its
    /// assignment, the projection's output, and the revision its agent applied.
    pub fn projects_as(&self, other: &NodeRecord) -> bool {
        let NodeRecord {
            node,
            assignment: _,
            applied_revision: _,
            ingress_addr,
            gwbridge_subnet,
            lb_addrs,
        } = self;
        *node == other.node
            && *ingress_addr == other.ingress_addr
            && *gwbridge_subnet == other.gwbridge_subnet
            && *lb_addrs == other.lb_addrs
    }

    /// Equal as stored: in all but the assignment, which is not stored. Listing every field
    /// makes a new one a compile error here, so none is left out of the store by mistake.
    pub fn same_stored(&self, other: &NodeRecord) -> bool {
        let NodeRecord {
            node,
            assignment: _,
            applied_revision,
            ingress_addr,
            gwbridge_subnet,
            lb_addrs,
        } = self;
        *node == other.node
            && *applied_revision == other.applied_revision
            && *ingress_addr == other.ingress_addr
            && *gwbridge_subnet == other.gwbridge_subnet
            && *lb_addrs == other.lb_addrs
    }
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
    /// Equal in all the projection to agents reads (see [`State::projects_as`]): all but what
    /// its agent reports of a running process and the times. Listing every field makes a new
    /// one a compile error here.
    pub fn projects_as(&self, other: &Task) -> bool {
        let Task {
            id,
            service_id,
            slot,
            node_id,
            desired_state,
            state,
            error: _,
            pid: _,
            netns: _,
            attachments,
            created_at: _,
            updated_at: _,
            spec_version,
            runtime,
            health,
            drain,
            stopping_until_ms,
        } = self;
        *id == other.id
            && *service_id == other.service_id
            && *slot == other.slot
            && *node_id == other.node_id
            && *desired_state == other.desired_state
            && *state == other.state
            && *attachments == other.attachments
            && *spec_version == other.spec_version
            && *runtime == other.runtime
            && *health == other.health
            && *drain == other.drain
            && *stopping_until_ms == other.stopping_until_ms
    }

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

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Whether the cluster has an encrypted network, whose nodes need the key ring.
    pub fn has_encrypted_networks(&self) -> bool {
        self.networks.values().any(|r| r.network.encrypted)
    }

    /// Whether any network of the service is encrypted: its tasks need a node with ESP.
    pub(crate) fn needs_encryption(&self, service: &Service) -> bool {
        self.task_networks(service)
            .iter()
            .any(|id| self.networks.get(id).is_some_and(|r| r.network.encrypted))
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

    /// The networks a service's tasks attach to, in interface order: the user's networks keep
    /// eth0, ingress comes last.
    pub(crate) fn task_networks(&self, service: &Service) -> Vec<String> {
        let mut networks = service.spec.networks.clone();
        if service.has_ingress_port() {
            networks.extend(self.ingress().map(|n| n.id.clone()));
        }
        networks
    }
}

/// What the manager keeps and logs of a task error an agent reported: bounded, since it may
/// quote the task's command or output.
pub fn task_error(text: &str) -> String {
    proto::excerpt_within(text, 4 * proto::EXCERPT_CHARS).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The state as a restart finds it in the store: without the assignments.
    pub(crate) fn as_stored(s: &State) -> State {
        let mut s = s.clone();
        for r in s.nodes.values_mut() {
            r.assignment = Default::default();
        }
        s
    }
    use proto::agent::TaskStatus;
    use proto::api::SpecUpdate;
    use proto::model::Protocol;
    use std::net::IpAddr;

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

    pub(super) fn node_id(s: &State, hostname: &str) -> String {
        s.find_node(hostname).unwrap()
    }

    /// The tasks draining now, in id order.
    pub(crate) fn draining(s: &State) -> Vec<&Task> {
        s.tasks
            .values()
            .filter(|t| t.is_draining())
            .map(|t| &**t)
            .collect()
    }

    pub(crate) fn current<'a>(s: &'a State, service: &str) -> Vec<&'a Task> {
        let id = s.find_service(service).unwrap();
        let mut tasks: Vec<&Task> = s
            .tasks
            .values()
            .filter(|t| t.service_id == id && t.is_current())
            .map(|t| &**t)
            .collect();
        tasks.sort_by_key(|t| t.slot);
        tasks
    }

    /// Placed current tasks per hostname (pending ones are on no node).
    pub(super) fn per_node(s: &State, service: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for t in current(s, service) {
            let Some(node) = &t.node_id else { continue };
            let host = &s.nodes[node].node.hostname;
            *out.entry(host.clone()).or_insert(0) += 1;
        }
        out
    }

    pub(super) fn report(s: &mut State, task: &Task, state: TaskState, error: Option<&str>) {
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

    pub(super) fn ingress_id(s: &State) -> String {
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
            .map(|t| Task::clone(t))
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
            .map(|t| Task::clone(t))
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
            .map(|t| Task::clone(t))
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

    pub(super) fn net_of(s: &State, id: &str) -> Network {
        s.networks[id].network.clone()
    }

    pub(super) fn global(name: &str, networks: &[&str]) -> ServiceSpec {
        ServiceSpec {
            mode: ServiceMode::Global,
            ..spec(name, 0, networks)
        }
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
                with(&|sp| {
                    sp.constraints = vec![
                        proto::model::Constraint::parse("node.role==worker")
                            .unwrap();
                        MAX_CONSTRAINTS + 1
                    ]
                }),
                "33 constraints is more than the limit of 32",
            ),
        ];
        for (sp, expected) in cases {
            let err = s.create_service(&sp, 1).unwrap_err().to_string();
            assert!(err.starts_with("create service api: "), "{err}");
            assert!(err.contains(expected), "{err}");
        }
        assert_eq!(s, before);
    }
}
