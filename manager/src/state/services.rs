//! Services: the API's create, update, scale, rollback and remove, one object or several all or
//! none, and unpublishing a port; with the checks they share (published ports, aliases,
//! endpoint mode, commands) and the fwmark a service holds. They only change specs: the tasks
//! follow at the next [`State::reconcile_ms`] (see `orchestrate.rs`) or through a rolling update
//! ([`crate::rollout`]).

use std::collections::{BTreeMap, BTreeSet};

use proto::api::{
    PublishedPort, ServiceSpec, SpecUpdate, MAX_ALIASES, MAX_COMMAND_ARGS, MAX_COMMAND_BYTES,
    MAX_CONSTRAINTS, MAX_REPLICAS,
};
use proto::excerpt;
use proto::model::{EndpointMode, PortConfig, Protocol, ServiceMode};

use super::{
    has_ingress_port, host_port, refuse, ArcCow, OpError, Reason, Service, State, Task, VXLAN_PORT,
};
use crate::alloc::{self, AllocError};
use crate::rollout;

impl State {
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
                    constraints: spec.constraints.clone(),
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
                    p.published, p.target, p.protocol
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
        for (i, c) in next.constraints.iter().enumerate() {
            if next.constraints[..i].contains(c) {
                return refuse(
                    op,
                    Reason::Twice {
                        kind: "constraint",
                        name: c.to_string(),
                    },
                );
            }
        }
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
        // Written only where a task is replaced: the others stay shared.
        let mut placed: Vec<&mut ArcCow<Task>> = self
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
}

/// Swarm's rule: dnsrr has no VIP, so nothing could balance an ingress-mode port.
fn check_endpoint_mode(mode: EndpointMode, ports: &[PortConfig]) -> Result<(), Reason> {
    if mode == EndpointMode::Dnsrr && has_ingress_port(ports) {
        return Err(Reason::DnsrrIngress);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{
        add_network, cluster, current, global, ingress_id, port, published_spec, settle, spec, web,
    };
    use proto::model::{PublishMode, TaskState};

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
        let draining = crate::state::tests::draining(&s);
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
}
