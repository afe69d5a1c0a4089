//! The cluster objects, as the manager stores them and the API shows them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// Underlay address: the VTEP of this node's VXLAN traffic.
    pub addr: IpAddr,
    pub role: Role,
    pub availability: Availability,
    pub status: NodeStatus,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Why the node cannot carry encrypted networks (its kernel has no IPsec ESP, or its agent
    /// has not said): their tasks are not placed there. None: it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_encryption: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// Always "overlay" for now.
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// The routing-mesh network that exists on every node.
    #[serde(default)]
    pub ingress: bool,
    /// `--opt encrypted`: VXLAN traffic between nodes is carried in IPsec ESP.
    #[serde(default)]
    pub encrypted: bool,
}

/// The lifecycle of a task, as in `docker service ps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Created by the manager, not yet on a node.
    Pending,
    /// Sent to a node.
    Assigned,
    /// The agent is building its network and starting its process.
    Starting,
    Running,
    /// Its process exited with success.
    Complete,
    /// Its process exited with an error, or could not start.
    Failed,
    /// Stopped on the manager's request.
    Shutdown,
    /// Its node went down while it ran.
    Orphaned,
}

impl TaskState {
    /// A task in a terminal state never runs again; the manager replaces it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Complete | TaskState::Failed | TaskState::Shutdown | TaskState::Orphaned
        )
    }
}

/// A task's endpoint on one overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network_id: String,
    /// The task's address with the network's prefix length, e.g. 10.0.0.5/24.
    pub addr: Ipv4Net,
    /// `02:42:` followed by the four address bytes.
    pub mac: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As users write it, and as the rules and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = ();

    fn from_str(s: &str) -> Result<Protocol, ()> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(()),
        }
    }
}

/// What a constraint looks at on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintField {
    Role,
    Hostname,
    Label(String),
}

/// One placement constraint: `<field>==<value>` or `<field>!=<value>`. Parsed once, where it
/// enters (meshctl, the API's decoding); stored and sent as its canonical text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Constraint {
    pub field: ConstraintField,
    pub equal: bool,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("invalid constraint {:?}: expected <field>==<value> or <field>!=<value>", crate::excerpt(.0))]
    Syntax(String),
    #[error(
        "invalid constraint {:?}: the field must be node.role, node.hostname or node.labels.<key>",
        crate::excerpt(.0)
    )]
    Field(String),
    #[error("invalid constraint {:?}: node.role is either manager or worker", crate::excerpt(.0))]
    Role(String),
    #[error("invalid constraint {:?}: the value is empty", crate::excerpt(.0))]
    EmptyValue(String),
    #[error("invalid constraint {:?}: longer than {} bytes", crate::excerpt(.0), crate::api::MAX_CONSTRAINT_BYTES)]
    TooLong(String),
}

impl Constraint {
    pub fn parse(text: &str) -> Result<Self, ConstraintError> {
        if text.len() > crate::api::MAX_CONSTRAINT_BYTES {
            return Err(ConstraintError::TooLong(text.to_string()));
        }
        let (field, value, equal) = if let Some((f, v)) = text.split_once("==") {
            (f, v, true)
        } else if let Some((f, v)) = text.split_once("!=") {
            (f, v, false)
        } else {
            return Err(ConstraintError::Syntax(text.to_string()));
        };
        let (field, value) = (field.trim(), value.trim());
        if value.is_empty() {
            return Err(ConstraintError::EmptyValue(text.to_string()));
        }
        let field = match field {
            "node.role" => {
                if value != "manager" && value != "worker" {
                    return Err(ConstraintError::Role(text.to_string()));
                }
                ConstraintField::Role
            }
            "node.hostname" => ConstraintField::Hostname,
            f => match f.strip_prefix("node.labels.") {
                Some(key) if !key.is_empty() => ConstraintField::Label(key.to_string()),
                _ => return Err(ConstraintError::Field(text.to_string())),
            },
        };
        Ok(Constraint {
            field,
            equal,
            value: value.to_string(),
        })
    }

    pub fn matches(&self, node: &Node) -> bool {
        let actual = match &self.field {
            ConstraintField::Role => Some(match node.role {
                Role::Manager => "manager",
                Role::Worker => "worker",
            }),
            ConstraintField::Hostname => Some(node.hostname.as_str()),
            ConstraintField::Label(key) => node.labels.get(key).map(String::as_str),
        };
        // As in Swarm, a missing label equals nothing, so `!=` holds for it.
        (actual == Some(self.value.as_str())) == self.equal
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = match &self.field {
            ConstraintField::Role => "node.role".to_string(),
            ConstraintField::Hostname => "node.hostname".to_string(),
            ConstraintField::Label(key) => format!("node.labels.{key}"),
        };
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{field}{op}{}", self.value)
    }
}

impl TryFrom<String> for Constraint {
    type Error = ConstraintError;

    fn try_from(text: String) -> Result<Constraint, ConstraintError> {
        Constraint::parse(&text)
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

/// Which load balancer a node's routing mesh and VIPs use.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LbKind {
    /// IPVS FWM services balance; the nftables tables only mark and SNAT.
    Ipvs,
    /// The nftables tables balance: `numgen` round robin over a map of backend slots. Works on
    /// every kernel with nf_tables, so it is what a report says before any balancer is known.
    #[default]
    Nftables,
}

impl LbKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LbKind::Ipvs => "ipvs",
            LbKind::Nftables => "nftables",
        }
    }
}

impl std::fmt::Display for LbKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a published port reaches the service, as in `docker service create --publish mode=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// The routing mesh: every node answers and balances over every task.
    Ingress,
    /// Only nodes that run a task answer, straight to their local task; the client IP is kept.
    Host,
}

/// How a service's name resolves inside its networks, as in `docker service create
/// --endpoint-mode`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// The name resolves to one virtual IP per network, balanced over the running tasks.
    #[default]
    Vip,
    /// The name resolves to the running tasks' addresses, shuffled per query; no VIP.
    Dnsrr,
}

impl EndpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        }
    }
}

/// How a service's tasks are counted: a number of replicas, or one on every eligible node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// `replicas` tasks, spread over the eligible nodes.
    #[default]
    Replicated,
    /// One task on every node that is ready, active and satisfies the constraints.
    Global,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::Replicated => "replicated",
            ServiceMode::Global => "global",
        }
    }
}

/// Docker's default `--stop-grace-period`: 10 s.
pub fn default_stop_grace_ms() -> u64 {
    10_000
}

/// A task's health as its agent's checks find it, as Docker's health status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No check has passed yet; the task gets no traffic.
    Starting,
    Healthy,
    /// `retries` checks in a row failed (after the start period): the task is replaced.
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// What a health check runs, inside the task's namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthTest {
    /// argv run in the task's network and mount namespaces; exit status 0 is healthy.
    Cmd { argv: Vec<String> },
    /// `GET path` to 127.0.0.1:port inside the task's network namespace; any 2xx or 3xx
    /// status is healthy.
    Http { port: u16, path: String },
}

/// `--health-*`: how and how often a task's health is checked, as Docker's HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub test: HealthTest,
    /// Between checks once the task has been healthy. Until its first pass a task is checked
    /// sooner (from 50 ms, backing off to a second, at most `interval`), so that a new task
    /// gets traffic as soon as it can; failures then count at most once per interval.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// A check that takes longer fails.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Failures in a row that make the task unhealthy.
    #[serde(default = "default_health_retries")]
    pub retries: u32,
    /// Failures within this time after the task starts do not count.
    #[serde(default)]
    pub start_period_ms: u64,
}

fn default_health_interval_ms() -> u64 {
    30_000
}

fn default_health_timeout_ms() -> u64 {
    30_000
}

fn default_health_retries() -> u32 {
    3
}

impl HealthCheck {
    /// A check with Docker's defaults: every 30 s, 30 s timeout, 3 retries, no start period.
    pub fn new(test: HealthTest) -> HealthCheck {
        HealthCheck {
            test,
            interval_ms: default_health_interval_ms(),
            timeout_ms: default_health_timeout_ms(),
            retries: default_health_retries(),
            start_period_ms: 0,
        }
    }
}

/// Which goes first when a slot's task is replaced by an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// The old task leaves the load balancers and stops, then the new one starts (Swarm's
    /// default).
    #[default]
    StopFirst,
    /// The new task starts; once it is up, the old one leaves the load balancers and stops.
    StartFirst,
}

impl UpdateOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOrder::StopFirst => "stop-first",
            UpdateOrder::StartFirst => "start-first",
        }
    }
}

/// What a rolling update does when a new task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

impl FailureAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureAction::Pause => "pause",
            FailureAction::Continue => "continue",
            FailureAction::Rollback => "rollback",
        }
    }
}

/// A fraction from 0 to 1 (the manager refuses anything else).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ratio(pub f64);

// Only finite values in 0..=1 are ever stored, so equality is total.
impl Eq for Ratio {}

/// `--update-*`: how an update (and a rollback) replaces a service's tasks, as Docker's
/// UpdateConfig.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Slots replaced at once; 0 replaces them all at once.
    pub parallelism: u64,
    /// Wait after a slot's new task is up and monitored, before the next slot starts.
    pub delay_ms: u64,
    pub order: UpdateOrder,
    /// How long a new task must stay up (running, and healthy with a health check) before its
    /// slot counts as updated; a task that fails within it is a failure of the update.
    pub monitor_ms: u64,
    pub failure_action: FailureAction,
    /// Failures tolerated, as a fraction of the tasks the update replaces, before
    /// `failure_action` applies.
    pub max_failure_ratio: Ratio,
}

impl Default for UpdateConfig {
    fn default() -> UpdateConfig {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            order: UpdateOrder::StopFirst,
            monitor_ms: 5_000,
            failure_action: FailureAction::Pause,
            max_failure_ratio: Ratio(0.0),
        }
    }
}

/// Where a service's last update or rollback stands, as Docker's UpdateStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Updating => "updating",
            UpdateState::Paused => "paused",
            UpdateState::Completed => "completed",
            UpdateState::RollbackStarted => "rollback_started",
            UpdateState::RollbackPaused => "rollback_paused",
            UpdateState::RollbackCompleted => "rollback_completed",
        }
    }

    /// An update or rollback still replacing tasks.
    pub fn is_active(self) -> bool {
        matches!(self, UpdateState::Updating | UpdateState::RollbackStarted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    /// Why it paused or rolled back, or how it ended.
    pub message: String,
}

/// One published port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: Protocol,
    /// The port on the nodes.
    pub published: u16,
    /// The port the task listens on.
    pub target: u16,
    pub mode: PublishMode,
}

/// The MAC of an overlay endpoint, derived from its IPv4 address as Docker does.
pub fn endpoint_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_constraints() {
        let c = Constraint::parse("node.role==worker").unwrap();
        assert_eq!((c.field.clone(), c.equal), (ConstraintField::Role, true));
        assert_eq!(c.to_string(), "node.role==worker");
        let c = Constraint::parse("node.hostname != node2").unwrap();
        assert_eq!(
            (c.field, c.equal, c.value.as_str()),
            (ConstraintField::Hostname, false, "node2")
        );
        let c = Constraint::parse("node.labels.zone==eu-1").unwrap();
        assert_eq!(c.field, ConstraintField::Label("zone".into()));
        assert_eq!(c.to_string(), "node.labels.zone==eu-1");

        assert!(matches!(
            Constraint::parse("node.role=worker"),
            Err(ConstraintError::Syntax(_))
        ));
        assert!(matches!(
            Constraint::parse("node.role==boss"),
            Err(ConstraintError::Role(_))
        ));
        assert!(matches!(
            Constraint::parse("node.ip==1.2.3.4"),
            Err(ConstraintError::Field(_))
        ));
        assert!(matches!(
            Constraint::parse("node.labels.==x"),
            Err(ConstraintError::Field(_))
        ));
        assert!(matches!(
            Constraint::parse("node.hostname=="),
            Err(ConstraintError::EmptyValue(_))
        ));
        let long = format!("node.hostname=={}", "x".repeat(10_000));
        let err = Constraint::parse(&long).unwrap_err();
        assert!(matches!(err, ConstraintError::TooLong(_)));
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn mac_is_derived_from_the_ip() {
        assert_eq!(
            endpoint_mac(Ipv4Addr::new(10, 0, 0, 5)),
            "02:42:0a:00:00:05"
        );
        assert_eq!(
            endpoint_mac(Ipv4Addr::new(10, 255, 1, 200)),
            "02:42:0a:ff:01:c8"
        );
    }

    #[test]
    fn terminal_states() {
        assert!(TaskState::Failed.is_terminal());
        assert!(TaskState::Shutdown.is_terminal());
        assert!(!TaskState::Running.is_terminal());
        assert!(!TaskState::Assigned.is_terminal());
    }
}
