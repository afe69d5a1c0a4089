//! Service discovery in the desired state: each vip-mode service's VIPs (one on every network it
//! is attached to, and one on ingress with an ingress-mode port), each node's load-balancer
//! address on the networks it carries (eth0 of its `lb_<network>` namespace, where IPVS holds
//! the VIPs), and the per-network service records from which agents balance VIPs and answer DNS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use proto::agent::{NetworkService, ServiceTask};
use proto::model::EndpointMode;

use crate::alloc::{self, AllocError};
use crate::state::{Service, State};

impl Service {
    /// A service holds a fwmark while something balances it: the routing mesh (an ingress-mode
    /// port) or a VIP on one of its networks. One mark serves both, since each network's
    /// balancer lives in its own namespace.
    pub(crate) fn wants_fwmark(&self) -> bool {
        self.has_ingress_port()
            || (self.spec.endpoint_mode == EndpointMode::Vip && !self.spec.networks.is_empty())
    }
}

impl State {
    /// The next free address of a network, serial after the last one handed out there (tasks,
    /// VIPs and load-balancer endpoints share one sequence).
    pub(crate) fn next_addr(&mut self, network_id: &str) -> Result<Ipv4Addr, AllocError> {
        let record = &self.networks[network_id];
        let ip = alloc::next_ip(
            record.network.subnet,
            &self.addrs_in_use(&record.network),
            record.last_ip,
        )?;
        self.networks
            .get_mut(network_id)
            .expect("network exists")
            .last_ip = Some(ip);
        Ok(ip)
    }

    /// Gives a service a VIP on every network it needs one on (vip mode: its networks, and
    /// ingress with an ingress-mode port) and frees the others. A VIP, once given, stays while
    /// the service stays on that network.
    pub(crate) fn sync_vips(&mut self, service_id: &str) -> Result<(), AllocError> {
        let service = &self.services[service_id];
        let wanted: Vec<String> = if service.spec.endpoint_mode == EndpointMode::Vip {
            self.task_networks(service)
        } else {
            Vec::new()
        };
        let service = self.services.get_mut(service_id).expect("service exists");
        service.vips.retain(|network, _| wanted.contains(network));
        for network in wanted {
            if !self.services[service_id].vips.contains_key(&network) {
                let ip = self.next_addr(&network)?;
                self.services
                    .get_mut(service_id)
                    .expect("service exists")
                    .vips
                    .insert(network, ip);
            }
        }
        Ok(())
    }

    /// Gives every node an address on each user network it carries (one with a task of its
    /// own on it) for its load balancer, and frees the addresses of networks it no longer
    /// carries. A full subnet leaves the node without one, which only its IPVS balancer needs.
    pub(crate) fn sync_lb_addrs(&mut self) {
        let mut carried: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.is_on_node()) {
            let node = t.node_id.clone().expect("a task on a node has a node");
            let nets = carried.entry(node).or_default();
            for a in &t.attachments {
                if self
                    .networks
                    .get(&a.network_id)
                    .is_some_and(|r| !r.network.ingress)
                {
                    nets.insert(a.network_id.clone());
                }
            }
        }
        let node_ids: Vec<String> = self.nodes.keys().cloned().collect();
        for node_id in node_ids {
            let wanted = carried.remove(&node_id).unwrap_or_default();
            let record = self.nodes.get_mut(&node_id).expect("node exists");
            record.lb_addrs.retain(|n, _| wanted.contains(n));
            for network in wanted {
                if self.nodes[&node_id].lb_addrs.contains_key(&network) {
                    continue;
                }
                match self.next_addr(&network) {
                    Ok(ip) => {
                        self.nodes
                            .get_mut(&node_id)
                            .expect("node exists")
                            .lb_addrs
                            .insert(network, ip);
                    }
                    Err(e) => {
                        let node = &self.nodes[&node_id].node.hostname;
                        tracing::warn!(%node, %network, "no load-balancer address: {e}");
                    }
                }
            }
        }
    }

    /// Every service of every user network, as the tasks of that network see it: its VIP and
    /// mark, its aliases there and its running tasks' addresses there, by service name. The
    /// same for every node, so it is computed once per refresh.
    pub(crate) fn network_services(&self) -> BTreeMap<String, Vec<NetworkService>> {
        let mut tasks: BTreeMap<(&str, &str), Vec<ServiceTask>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| self.serves(t)) {
            for a in &t.attachments {
                tasks
                    .entry((t.service_id.as_str(), a.network_id.as_str()))
                    .or_default()
                    .push(ServiceTask {
                        task_id: t.id.clone(),
                        slot: t.slot,
                        addr: a.addr.addr(),
                    });
            }
        }
        let mut out: BTreeMap<String, Vec<NetworkService>> = BTreeMap::new();
        for s in self.services.values() {
            for network in &s.spec.networks {
                let mut running = tasks
                    .remove(&(s.id.as_str(), network.as_str()))
                    .unwrap_or_default();
                running.sort_by(|a, b| (a.slot, &a.task_id).cmp(&(b.slot, &b.task_id)));
                let vip = s.vips.get(network).copied();
                out.entry(network.clone())
                    .or_default()
                    .push(NetworkService {
                        service_id: s.id.clone(),
                        name: s.spec.name.clone(),
                        aliases: s.spec.aliases.get(network).cloned().unwrap_or_default(),
                        endpoint_mode: s.spec.endpoint_mode,
                        vip,
                        fwmark: if vip.is_some() {
                            s.fwmark.unwrap_or(0)
                        } else {
                            0
                        },
                        tasks: running,
                    });
            }
        }
        for services in out.values_mut() {
            services.sort_by(|a, b| a.name.cmp(&b.name));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proto::api::{ServiceSpec, SpecUpdate};

    use super::*;
    use crate::state::tests::{
        add_network, cluster, current, port, published_spec, run_all, spec, web,
    };
    use proto::model::{Protocol, PublishMode};

    fn dnsrr(name: &str, networks: &[&str]) -> ServiceSpec {
        ServiceSpec {
            endpoint_mode: EndpointMode::Dnsrr,
            ..spec(name, 2, networks)
        }
    }

    #[test]
    fn vips_follow_the_mode_the_networks_and_the_mesh() {
        let mut s = cluster(2);
        let backend = add_network(&mut s, "backend", "10.0.9.0/24");
        let ingress = s.ingress().unwrap().id.clone();
        let id = s
            .create_service(&published_spec("web", 2, &["backend"], &[web(80)]), 1)
            .unwrap();
        let vips = |s: &State| s.services[&id].vips.clone();
        // The first address of each network goes to the VIP, before any task.
        assert_eq!(vips(&s)[&backend], Ipv4Addr::new(10, 0, 9, 2));
        assert!(vips(&s).contains_key(&ingress));
        s.reconcile(1);
        assert!(current(&s, "web").iter().all(|t| t
            .attachments
            .iter()
            .all(|a| a.addr.addr() != vips(&s)[&a.network_id])));

        // Off the mesh: the ingress VIP goes, the backend one stays the same.
        let p80 = (&web(80)).into();
        s.update_service("web", &[], &[p80], None, &SpecUpdate::default(), 2)
            .unwrap();
        assert_eq!(vips(&s).keys().collect::<Vec<_>>(), [&backend]);
        assert_eq!(vips(&s)[&backend], Ipv4Addr::new(10, 0, 9, 2));
        // dnsrr frees every VIP and the mark; back to vip gets a new VIP, not the freed one.
        s.update_service(
            "web",
            &[],
            &[],
            Some(EndpointMode::Dnsrr),
            &SpecUpdate::default(),
            3,
        )
        .unwrap();
        assert!(vips(&s).is_empty());
        assert_eq!(s.services[&id].fwmark, None);
        s.update_service(
            "web",
            &[],
            &[],
            Some(EndpointMode::Vip),
            &SpecUpdate::default(),
            4,
        )
        .unwrap();
        assert_ne!(vips(&s)[&backend], Ipv4Addr::new(10, 0, 9, 2));
        assert!(s.services[&id].fwmark.is_some());
        // A service on no network and with no ingress port has nothing to balance.
        let lone = s.create_service(&spec("lone", 1, &[]), 5).unwrap();
        assert!(s.services[&lone].vips.is_empty());
        assert_eq!(s.services[&lone].fwmark, None);
    }

    #[test]
    fn dnsrr_refuses_ingress_ports_and_changes_nothing() {
        let mut s = cluster(1);
        add_network(&mut s, "backend", "10.0.9.0/24");
        let bad = ServiceSpec {
            ports: vec![web(80)],
            ..dnsrr("db", &["backend"])
        };
        let err = s.create_service(&bad, 1).unwrap_err().to_string();
        assert!(
            err.contains("dnsrr cannot be used with ports published in ingress mode"),
            "{err}"
        );
        // Host mode is fine with dnsrr.
        let host = port(81, 8080, Protocol::Tcp, PublishMode::Host);
        let ok = ServiceSpec {
            ports: vec![host],
            ..dnsrr("db", &["backend"])
        };
        s.create_service(&ok, 1).unwrap();
        let before = s.clone();
        let err = s
            .update_service("db", &[web(80)], &[], None, &SpecUpdate::default(), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dnsrr"), "{err}");
        s.create_service(&published_spec("web", 1, &["backend"], &[web(82)]), 3)
            .unwrap();
        let before_web = s.clone();
        let err = s
            .update_service(
                "web",
                &[],
                &[],
                Some(EndpointMode::Dnsrr),
                &SpecUpdate::default(),
                4,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("dnsrr"), "{err}");
        assert_eq!(s, before_web);
        assert_ne!(s, before);
    }

    #[test]
    fn aliases_are_checked_and_stored_by_network_id() {
        let mut s = cluster(1);
        let backend = add_network(&mut s, "backend", "10.0.9.0/24");
        add_network(&mut s, "other", "10.0.10.0/24");
        let with = |aliases: &[(&str, &[&str])]| ServiceSpec {
            aliases: aliases
                .iter()
                .map(|(n, a)| (n.to_string(), a.iter().map(|x| x.to_string()).collect()))
                .collect(),
            ..spec("api", 1, &["backend"])
        };
        for (bad, why) in [
            (with(&[("other", &["x"])]), "not attached"),
            (with(&[("nope", &["x"])]), "no such network"),
            (with(&[("backend", &["bad name"])]), "invalid alias"),
            (with(&[("backend", &["api"])]), "own name"),
            (with(&[("backend", &["x", "x"])]), "more than once"),
        ] {
            let before = s.clone();
            let err = s.create_service(&bad, 1).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert_eq!(s, before);
        }
        let id = s
            .create_service(&with(&[("backend", &["api-v1", "legacy"])]), 1)
            .unwrap();
        assert_eq!(
            s.services[&id].spec.aliases[&backend],
            ["api-v1".to_string(), "legacy".to_string()]
        );
        let records = s.network_services();
        assert_eq!(records[&backend][0].aliases, ["api-v1", "legacy"]);
    }

    #[test]
    fn records_list_running_tasks_per_network_and_nodes_get_lb_addresses() {
        let mut s = cluster(2);
        let backend = add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 2, &["backend"]), 1).unwrap();
        s.create_service(&dnsrr("db", &["backend"]), 1).unwrap();
        s.reconcile(1);
        // Not running yet: the names exist, with no task behind them.
        let records = s.network_services();
        let names: Vec<&str> = records[&backend].iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        assert!(records[&backend].iter().all(|r| r.tasks.is_empty()));
        run_all(&mut s, "web");
        run_all(&mut s, "db");
        let records = s.network_services();
        let (db, web) = (&records[&backend][0], &records[&backend][1]);
        assert_eq!((db.vip, db.fwmark), (None, 0));
        assert!(web.vip.is_some() && web.fwmark >= 256);
        let slots: Vec<u64> = web.tasks.iter().map(|t| t.slot).collect();
        assert_eq!(slots, [1, 2]);
        for t in &web.tasks {
            assert_eq!(s.tasks[&t.task_id].attachments[0].addr.addr(), t.addr);
        }

        // Both nodes carry backend: each gets a load-balancer address, distinct from every
        // task and VIP, and loses it once it carries the network no more.
        s.refresh_assignments();
        let lb: Vec<Ipv4Addr> = s.nodes.values().map(|n| n.lb_addrs[&backend]).collect();
        assert_eq!(lb.len(), 2);
        let taken: BTreeSet<Ipv4Addr> = s
            .tasks
            .values()
            .flat_map(|t| t.attachments.iter().map(|a| a.addr.addr()))
            .chain(web.vip)
            .collect();
        assert!(lb.iter().all(|ip| !taken.contains(ip)) && lb[0] != lb[1]);
        s.remove_services(&["web".into(), "db".into()], 5).unwrap();
        crate::state::tests::settle(&mut s, 5);
        assert!(s.nodes.values().all(|n| n.lb_addrs.is_empty()));
    }
}
