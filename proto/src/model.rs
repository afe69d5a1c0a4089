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
