//! The cluster's names, per network, built from an applied assignment (pure).
//!
//! On each network a task can resolve:
//! - `<service>` and each alias: the service's VIP (vip mode) or its running tasks' addresses
//!   (dnsrr, shuffled per query);
//! - `tasks.<service>` and `tasks.<alias>`: every running task's address;
//! - `<service>.<slot>`, the task id and the full task name `<service>.<slot>.<id>`: that task's
//!   address;
//! - PTR: a task address → its full name, a VIP → the service name.
//!
//! Keys are lower case without a trailing dot; lookups normalise the same way.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use proto::agent::{Assignment, NetworkSpec};
use proto::model::EndpointMode;

/// What a name resolves to. An empty list is a name that exists with no address now (a dnsrr
/// service with no running task): it gets an empty answer, not a forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub addrs: Vec<Ipv4Addr>,
    /// dnsrr service names: the order changes per query.
    pub shuffle: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetRecords {
    names: HashMap<String, Entry>,
    ptr: HashMap<Ipv4Addr, String>,
}

impl NetRecords {
    /// The first definition of a name wins; callers insert in order of precedence.
    fn add(&mut self, name: &str, entry: Entry) {
        self.names.entry(normalize(name)).or_insert(entry);
    }

    fn build(net: &NetworkSpec) -> NetRecords {
        let mut r = NetRecords::default();
        // Services (and their aliases) first, then tasks.<…>, then single tasks: a task id that
        // happens to equal a service name does not hide the service.
        for svc in &net.services {
            let running: Vec<Ipv4Addr> = svc.tasks.iter().map(|t| t.addr).collect();
            let entry = match (svc.endpoint_mode, svc.vip) {
                (EndpointMode::Vip, Some(vip)) => Entry {
                    addrs: vec![vip],
                    shuffle: false,
                },
                // A vip-mode service without its VIP yet still names its tasks.
                _ => Entry {
                    addrs: running.clone(),
                    shuffle: true,
                },
            };
            for name in std::iter::once(&svc.name).chain(&svc.aliases) {
                r.add(name, entry.clone());
            }
            if let Some(vip) = svc.vip {
                r.ptr.entry(vip).or_insert_with(|| svc.name.clone());
            }
        }
        for svc in &net.services {
            let all = Entry {
                addrs: svc.tasks.iter().map(|t| t.addr).collect(),
                shuffle: true,
            };
            for name in std::iter::once(&svc.name).chain(&svc.aliases) {
                r.add(&format!("tasks.{name}"), all.clone());
            }
        }
        for svc in &net.services {
            for t in &svc.tasks {
                let one = Entry {
                    addrs: vec![t.addr],
                    shuffle: false,
                };
                let full = format!("{}.{}.{}", svc.name, t.slot, t.task_id);
                r.add(&full, one.clone());
                r.add(&format!("{}.{}", svc.name, t.slot), one.clone());
                r.add(&t.task_id, one);
                r.ptr.entry(t.addr).or_insert(full);
            }
        }
        r
    }
}

/// Every network's records, and which networks each local task is on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    nets: HashMap<String, NetRecords>,
    /// Task name → its networks' ids, in attachment order (the order names are looked up in).
    task_nets: HashMap<String, Vec<String>>,
}

/// What a name of the cluster gives, as seen from one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'a> {
    Addrs(&'a Entry),
    Ptr(&'a str),
}

impl Records {
    pub fn build(assignment: &Assignment) -> Records {
        let nets = assignment
            .networks
            .iter()
            .map(|n| (n.id.clone(), NetRecords::build(n)))
            .collect();
        let task_nets = assignment
            .tasks
            .iter()
            .map(|t| {
                let ids = t.attachments.iter().map(|a| a.network_id.clone());
                (t.name.clone(), ids.collect())
            })
            .collect();
        Records { nets, task_nets }
    }

    /// The networks of `task` that have records, in its attachment order.
    fn scope<'a>(&'a self, task: &str) -> impl Iterator<Item = &'a NetRecords> + 'a {
        self.task_nets
            .get(task)
            .into_iter()
            .flatten()
            .filter_map(|id| self.nets.get(id))
    }

    /// A normalized name as `task` sees it: from the first of its networks that has it. None:
    /// not a name of the cluster for this task.
    fn lookup_key(&self, task: &str, key: &str) -> Option<&Entry> {
        self.scope(task).find_map(|n| n.names.get(key))
    }

    /// The name of a cluster address (task or VIP) on one of `task`'s networks.
    pub fn reverse(&self, task: &str, addr: Ipv4Addr) -> Option<&str> {
        self.scope(task)
            .find_map(|n| n.ptr.get(&addr).map(String::as_str))
    }

    /// A forward name or an `in-addr.arpa` name (any case, with or without a trailing dot),
    /// resolved for `task`.
    pub fn find(&self, task: &str, name: &str) -> Option<Found<'_>> {
        let key = normalize(name);
        match parse_normalized_arpa(&key) {
            Some(addr) => self.reverse(task, addr).map(Found::Ptr),
            None => self.lookup_key(task, &key).map(Found::Addrs),
        }
    }
}

/// Lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// `d.c.b.a.in-addr.arpa` (normalized) → a.b.c.d; anything else (IPv6, partial) → None.
fn parse_normalized_arpa(name: &str) -> Option<Ipv4Addr> {
    let rev = name.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = rev.split('.');
    for o in octets.iter_mut().rev() {
        let p = parts.next()?;
        // No leading zeros or signs: one spelling per address.
        if p.is_empty()
            || !p.bytes().all(|b| b.is_ascii_digit())
            || (p.len() > 1 && p.starts_with('0'))
        {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::agent::{NetworkService, ServiceTask, TaskSpec};
    use proto::model::{endpoint_mac, Attachment};

    pub fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn service(
        name: &str,
        mode: EndpointMode,
        vip: Option<&str>,
        tasks: &[(&str, u64, &str)],
    ) -> NetworkService {
        NetworkService {
            service_id: format!("id-{name}"),
            name: name.into(),
            aliases: vec![],
            endpoint_mode: mode,
            vip: vip.map(ip),
            fwmark: if vip.is_some() { 257 } else { 0 },
            tasks: tasks
                .iter()
                .map(|(id, slot, addr)| ServiceTask {
                    task_id: (*id).into(),
                    slot: *slot,
                    addr: ip(addr),
                })
                .collect(),
        }
    }

    fn network(id: &str, subnet: &str, services: Vec<NetworkService>) -> NetworkSpec {
        NetworkSpec {
            id: id.into(),
            name: format!("name-{id}"),
            subnet: subnet.parse().unwrap(),
            gateway: subnet.replace(".0/", ".1/").parse().unwrap(),
            vni: 4096,
            peers: vec![],
            lb_addr: None,
            draining: vec![],
            services,
            encrypted: false,
        }
    }

    pub fn task(name: &str, nets: &[(&str, &str)]) -> TaskSpec {
        TaskSpec {
            id: name.rsplit('.').next().unwrap().into(),
            name: name.into(),
            service_id: "x".into(),
            service_name: name.split('.').next().unwrap().into(),
            command: vec!["sleep".into()],
            attachments: nets
                .iter()
                .map(|(net, addr)| Attachment {
                    network_id: (*net).into(),
                    addr: format!("{addr}/24").parse().unwrap(),
                    mac: endpoint_mac(ip(addr)),
                })
                .collect(),
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    /// Network n1 (10.0.9.0/24): web (vip 10.0.9.2, alias `www`, tasks a and b), dns-rr `rr`
    /// (tasks c, d), `client.1.k` on n1; network n2 (10.0.8.0/24): `other` (vip) and task
    /// `lone.1.z` on n2 only.
    pub fn sample() -> Assignment {
        let mut web = service(
            "web",
            EndpointMode::Vip,
            Some("10.0.9.2"),
            &[("a", 1, "10.0.9.3"), ("b", 2, "10.0.9.4")],
        );
        web.aliases = vec!["www".into()];
        let rr = service(
            "rr",
            EndpointMode::Dnsrr,
            None,
            &[("c", 1, "10.0.9.5"), ("d", 2, "10.0.9.6")],
        );
        let client = service(
            "client",
            EndpointMode::Vip,
            Some("10.0.9.7"),
            &[("k", 1, "10.0.9.8")],
        );
        let other = service(
            "other",
            EndpointMode::Vip,
            Some("10.0.8.2"),
            &[("z", 1, "10.0.8.3")],
        );
        Assignment {
            revision: 1,
            networks: vec![
                network("n1", "10.0.9.0/24", vec![web, rr, client]),
                network("n2", "10.0.8.0/24", vec![other]),
            ],
            tasks: vec![
                task("client.1.k", &[("n1", "10.0.9.8")]),
                task("other.1.z", &[("n2", "10.0.8.3")]),
            ],
            ..Assignment::default()
        }
    }

    fn addrs(r: &Records, task: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
        r.lookup(task, name).map(|e| {
            let mut a = e.addrs.clone();
            a.sort();
            a
        })
    }

    #[test]
    fn services_aliases_and_tasks_resolve_on_the_tasks_network() {
        let r = Records::build(&sample());
        let c = "client.1.k";
        assert_eq!(addrs(&r, c, "web"), Some(vec![ip("10.0.9.2")]));
        assert_eq!(addrs(&r, c, "www"), Some(vec![ip("10.0.9.2")]));
        let both = Some(vec![ip("10.0.9.3"), ip("10.0.9.4")]);
        assert_eq!(addrs(&r, c, "tasks.web"), both);
        assert_eq!(addrs(&r, c, "tasks.www"), both);
        assert_eq!(addrs(&r, c, "web.2"), Some(vec![ip("10.0.9.4")]));
        assert_eq!(addrs(&r, c, "b"), Some(vec![ip("10.0.9.4")]));
        assert_eq!(addrs(&r, c, "web.1.a"), Some(vec![ip("10.0.9.3")]));
        assert!(!r.lookup(c, "web").unwrap().shuffle);
        // dnsrr: the tasks themselves, in an order that changes per query.
        let rr = r.lookup(c, "rr").unwrap();
        assert!(rr.shuffle);
        assert_eq!(
            addrs(&r, c, "rr"),
            Some(vec![ip("10.0.9.5"), ip("10.0.9.6")])
        );
    }

    #[test]
    fn names_are_case_insensitive_with_or_without_the_trailing_dot() {
        let r = Records::build(&sample());
        for name in ["WEB", "Web.", "web.", "TASKS.Web.", "wWw"] {
            assert!(r.lookup("client.1.k", name).is_some(), "{name}");
        }
        assert!(r.lookup("client.1.k", "web..").is_none());
    }

    #[test]
    fn a_name_of_another_network_is_not_there() {
        let r = Records::build(&sample());
        assert_eq!(r.lookup("client.1.k", "other"), None);
        assert_eq!(r.lookup("client.1.k", "tasks.other"), None);
        assert_eq!(r.lookup("client.1.k", "z"), None);
        assert_eq!(addrs(&r, "other.1.z", "other"), Some(vec![ip("10.0.8.2")]));
        assert_eq!(r.lookup("other.1.z", "web"), None);
        // A task the records do not know (not in the assignment) sees no cluster name.
        assert_eq!(r.lookup("gone.1.q", "web"), None);
    }

    #[test]
    fn a_task_on_two_networks_sees_both_first_network_first() {
        let mut a = sample();
        a.tasks
            .push(task("multi.1.m", &[("n2", "10.0.8.9"), ("n1", "10.0.9.9")]));
        // The same service name on both networks: the task's first network answers.
        let mut dup = a.networks[0].services[0].clone();
        dup.vip = Some(ip("10.0.8.50"));
        a.networks[1].services.push(dup);
        let r = Records::build(&a);
        assert_eq!(addrs(&r, "multi.1.m", "other"), Some(vec![ip("10.0.8.2")]));
        assert_eq!(addrs(&r, "multi.1.m", "tasks.rr").map(|v| v.len()), Some(2));
        assert_eq!(addrs(&r, "multi.1.m", "web"), Some(vec![ip("10.0.8.50")]));
        assert_eq!(addrs(&r, "client.1.k", "web"), Some(vec![ip("10.0.9.2")]));
    }

    #[test]
    fn ptr_names_tasks_and_vips_on_the_tasks_networks_only() {
        let r = Records::build(&sample());
        let c = "client.1.k";
        assert_eq!(
            r.find(c, "3.9.0.10.in-addr.arpa."),
            Some(Found::Ptr("web.1.a"))
        );
        assert_eq!(r.find(c, "2.9.0.10.IN-ADDR.ARPA"), Some(Found::Ptr("web")));
        assert_eq!(r.find(c, "2.8.0.10.in-addr.arpa."), None);
        assert_eq!(r.find(c, "99.9.0.10.in-addr.arpa."), None);
        assert_eq!(
            r.find("other.1.z", "2.8.0.10.in-addr.arpa."),
            Some(Found::Ptr("other"))
        );
    }

    impl Records {
        fn lookup(&self, task: &str, name: &str) -> Option<&Entry> {
            self.lookup_key(task, &normalize(name))
        }
    }

    fn parse_arpa(name: &str) -> Option<Ipv4Addr> {
        parse_normalized_arpa(&normalize(name))
    }

    #[test]
    fn arpa_names_parse_strictly() {
        assert_eq!(parse_arpa("4.3.2.1.in-addr.arpa."), Some(ip("1.2.3.4")));
        for bad in [
            "3.2.1.in-addr.arpa.",
            "5.4.3.2.1.in-addr.arpa.",
            "04.3.2.1.in-addr.arpa.",
            "256.3.2.1.in-addr.arpa.",
            "+4.3.2.1.in-addr.arpa.",
            "4..2.1.in-addr.arpa.",
            "4.3.2.1.ip6.arpa.",
            "in-addr.arpa.",
        ] {
            assert_eq!(parse_arpa(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_service_name_wins_over_a_task_id_that_equals_it() {
        let mut a = sample();
        a.networks[0].services[0].tasks[0].task_id = "rr".into();
        let r = Records::build(&a);
        assert!(r.lookup("client.1.k", "rr").unwrap().shuffle);
    }

    #[test]
    fn a_dnsrr_service_without_tasks_is_a_name_without_addresses() {
        let mut a = sample();
        a.networks[0].services[1].tasks.clear();
        let r = Records::build(&a);
        assert_eq!(addrs(&r, "client.1.k", "rr"), Some(vec![]));
        assert_eq!(addrs(&r, "client.1.k", "tasks.rr"), Some(vec![]));
    }
}
