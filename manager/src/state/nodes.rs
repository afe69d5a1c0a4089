//! Nodes: joining with a token, an agent's Hello (connect, register), removal, promotion and
//! demotion, availability and labels; and what agents report about their node: its status,
//! the assignment revision it applied, its gwbridge subnet and whether it can do IPsec ESP.
//! These are the API's node mutations and the agent handshake, kept apart from the services
//! and networks that run on the nodes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use proto::agent::{Assignment, EspSupport};
use proto::api::{MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES};
use proto::excerpt;
use proto::model::{Availability, Node, NodeStatus, Role, TaskState};

use super::{refuse, NodeRecord, OpError, Reason, State};
use crate::alloc;

impl State {
    /// Records the gwbridge subnet a node's agent reported (None: the default). One that
    /// overlaps an existing overlay cannot be refused (the node is up already), so it is logged.
    pub fn set_gwbridge_subnet(&mut self, node_id: &str, subnet: Option<Ipv4Net>) {
        let Some(record) = self.nodes.get_mut(node_id) else {
            return;
        };
        record.gwbridge_subnet = subnet;
        let (hostname, gwbridge) = (&record.node.hostname, record.gwbridge());
        for network in self.networks.values().map(|r| &r.network) {
            if proto::subnets_overlap(&gwbridge, &network.subnet) {
                tracing::warn!(node = %hostname, %gwbridge, network = %network.name, subnet = %network.subnet, "the node's gwbridge overlaps a network: its tasks on it lose their egress route");
            }
        }
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
                    assignment: Arc::new(Assignment {
                        revision,
                        ..Assignment::default()
                    }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, node_id};

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
}
