//! Networks: the routing mesh's ingress network (created at first start, an address for every
//! node's ingress_sbox), user overlays (create, remove; their VNI and subnet, kept clear of the
//! nodes' underlay and gwbridge subnets and of ingress), and whether ingress is encrypted.
//! These are the API's network mutations; the addresses on a network are handed out in
//! [`crate::discovery`] and [`crate::alloc`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use proto::api::INGRESS_NETWORK;
use proto::excerpt;
use proto::model::Network;

use super::{default_gwbridge, refuse, NetworkRecord, OpError, Reason, State};
use crate::alloc::{self, AllocError};

impl State {
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
    pub(super) fn next_sbox_addr(&mut self) -> Result<Option<Ipv4Addr>, AllocError> {
        let Some(ingress) = self.ingress() else {
            return Ok(None);
        };
        let id = ingress.id.clone();
        self.next_addr(&id).map(Some)
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

    /// Removes every network or none; returns their ids in order.
    pub fn remove_networks(&mut self, keys: &[String]) -> Result<Vec<String>, OpError> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.resolve_each("network", "remove", &keys, State::find_network)?;
        self.all_or_none(|s| keys.iter().map(|k| s.remove_network(k)).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{
        add_network, as_stored, cluster, current, net_of, new_state, node_id, published_spec, spec,
        web, MANAGER,
    };
    use proto::api::SpecUpdate;
    use proto::model::Role;

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
        assert_eq!(back, as_stored(&s));
        assert!(!back
            .ensure_ingress("10.254.0.0/16", MANAGER.parse().unwrap(), 9)
            .unwrap());
        assert_eq!(back, as_stored(&s));
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
}
