//! Table output modelled on docker's: the same columns and state words, aligned like its
//! tabwriter (cells at least 10 wide, 3 spaces of padding).

use std::fmt::Write;

use proto::api::{
    ManagerStatus, NetworkDetail, NodeInfo, NodeLb, PublishInfo, ServiceInfo, TaskInfo,
};
use proto::model::{
    Availability, Health, HealthCheck, HealthTest, Network, NodeStatus, ServiceMode, TaskState,
};

use crate::ports;
use crate::spec::format_duration;

/// Renders rows under headers; every line ends with a newline, trailing blanks trimmed.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let width = (widths[i] + 3).max(10);
                line.push_str(&" ".repeat(width - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Docker shows ids cut to 12 characters in listings.
fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn title(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

pub fn state_word(state: TaskState) -> String {
    title(
        serde_json::to_value(state)
            .ok()
            .as_ref()
            .and_then(|v| v.as_str())
            .unwrap_or("unknown"),
    )
}

/// A task's health as `docker service ps` words it after the state: `Running 5 seconds ago
/// (health: starting)`.
pub fn health_note(health: Health) -> &'static str {
    match health {
        Health::Starting => "health: starting",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

/// "3 minutes ago", as docker's units.HumanDuration words it (lower-cased, as `service ps`
/// shows it after the state).
pub fn ago(then: u64, now: u64) -> String {
    let secs = now.saturating_sub(then);
    let text = match secs {
        0 => "less than a second".to_string(),
        1 => "1 second".to_string(),
        2..=59 => format!("{secs} seconds"),
        60..=119 => "about a minute".to_string(),
        120..=3599 => format!("{} minutes", secs / 60),
        3600..=7199 => "about an hour".to_string(),
        7200..=172_799 => format!("{} hours", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    };
    format!("{text} ago")
}

pub fn nodes(nodes: &[NodeInfo]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|info| {
            let n = &info.node;
            vec![
                n.id.clone(),
                n.hostname.clone(),
                match n.status {
                    NodeStatus::Ready => "Ready",
                    NodeStatus::Down => "Down",
                }
                .to_string(),
                match n.availability {
                    Availability::Active => "Active",
                    Availability::Pause => "Pause",
                    Availability::Drain => "Drain",
                }
                .to_string(),
                match info.manager_status {
                    Some(ManagerStatus::Leader) => "Leader",
                    Some(ManagerStatus::Reachable) => "Reachable",
                    Some(ManagerStatus::Unreachable) => "Unreachable",
                    None => "",
                }
                .to_string(),
                n.addr.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOSTNAME",
            "STATUS",
            "AVAILABILITY",
            "MANAGER STATUS",
            "ADDRESS",
        ],
        &rows,
    )
}

pub fn networks(networks: &[Network]) -> String {
    let rows: Vec<Vec<String>> = networks
        .iter()
        .map(|n| {
            vec![
                short(&n.id),
                n.name.clone(),
                n.driver.clone(),
                "swarm".to_string(),
            ]
        })
        .collect();
    table(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], &rows)
}

pub fn services(services: &[ServiceInfo]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                short(&s.id),
                s.spec.name.clone(),
                s.spec.mode.as_str().to_string(),
                format!("{}/{}", s.running, s.desired_tasks()),
                s.spec.command.join(" "),
                s.spec
                    .ports
                    .iter()
                    .map(ports::short)
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "MODE", "REPLICAS", "COMMAND", "PORTS"],
        &rows,
    )
}

/// `meshctl publish ls`.
pub fn published(ports: &[PublishInfo]) -> String {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            vec![
                p.service.clone(),
                p.port.published.to_string(),
                p.port.target.to_string(),
                p.port.protocol.to_string(),
                ports::mode_word(p.port.mode).to_string(),
            ]
        })
        .collect();
    table(
        &["SERVICE", "PUBLISHED", "TARGET", "PROTOCOL", "MODE"],
        &rows,
    )
}

/// Load balancer state as a table: one row per node and fwmark.
fn lb_table(lbs: &[NodeLb]) -> String {
    let mut rows = Vec::new();
    for lb in lbs {
        if lb.services.is_empty() {
            rows.push(vec![
                lb.hostname.clone(),
                lb.backend.to_string(),
                String::new(),
                "(none)".to_string(),
            ]);
        }
        for svc in &lb.services {
            let backends: Vec<String> = svc
                .backends
                .iter()
                .map(|b| format!("{} weight {}", b.ip, b.weight))
                .collect();
            rows.push(vec![
                lb.hostname.clone(),
                lb.backend.to_string(),
                svc.fwmark.to_string(),
                if backends.is_empty() {
                    "(none)".to_string()
                } else {
                    backends.join(", ")
                },
            ]);
        }
    }
    table(&["NODE", "LB", "FWMARK", "BACKENDS"], &rows)
}

/// A health check's test as docker shows one: `CMD-SHELL <cmd>` for what `--health-cmd` makes,
/// else `CMD <argv>`; ours over HTTP as `HTTP GET :<port><path>`.
fn health_test(test: &HealthTest) -> String {
    match test {
        HealthTest::Cmd { argv } => match argv.as_slice() {
            [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => format!("CMD-SHELL {cmd}"),
            argv => format!("CMD {}", argv.join(" ")),
        },
        HealthTest::Http { port, path } => format!("HTTP GET :{port}{path}"),
    }
}

fn healthcheck_pretty(out: &mut String, h: &HealthCheck) {
    let _ = writeln!(out, "Healthcheck:");
    let _ = writeln!(out, " Test = {}", health_test(&h.test));
    let _ = writeln!(out, " Interval = {}", format_duration(h.interval_ms));
    let _ = writeln!(out, " Timeout = {}", format_duration(h.timeout_ms));
    let _ = writeln!(out, " Retries = {}", h.retries);
    let _ = writeln!(out, " StartPeriod = {}", format_duration(h.start_period_ms));
}

/// `meshctl service inspect --pretty`, after docker's; `now` for the update status's times.
pub fn service_pretty(s: &ServiceInfo, now: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ID:\t\t{}", s.id);
    let _ = writeln!(out, "Name:\t\t{}", s.spec.name);
    let _ = writeln!(out, "Version:\t{}", s.version);
    match s.spec.mode {
        ServiceMode::Replicated => {
            let _ = writeln!(out, "Service Mode:\tReplicated");
            let _ = writeln!(
                out,
                " Replicas:\t{} (running {})",
                s.spec.replicas, s.running
            );
        }
        ServiceMode::Global => {
            let _ = writeln!(out, "Service Mode:\tGlobal");
            let _ = writeln!(out, " Tasks:\t\t{} (running {})", s.desired, s.running);
        }
    }
    if let Some(u) = &s.update_status {
        let _ = writeln!(out, "UpdateStatus:");
        let _ = writeln!(out, " State:\t\t{}", u.state.as_str());
        let _ = writeln!(out, " Started:\t{}", ago(u.started_at, now));
        if let Some(done) = u.completed_at {
            let _ = writeln!(out, " Completed:\t{}", ago(done, now));
        }
        let _ = writeln!(out, " Message:\t{}", u.message);
    }
    if !s.spec.constraints.is_empty() {
        let _ = writeln!(out, "Placement:");
        let texts: Vec<String> = s.spec.constraints.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, " Constraints:\t{}", texts.join(", "));
    }
    // Zero delay and monitor are left out, as docker does.
    let u = &s.spec.update_config;
    let _ = writeln!(out, "UpdateConfig:");
    let _ = writeln!(out, " Parallelism:\t{}", u.parallelism);
    if u.delay_ms > 0 {
        let _ = writeln!(out, " Delay:\t\t{}", format_duration(u.delay_ms));
    }
    let _ = writeln!(out, " On failure:\t{}", u.failure_action.as_str());
    if u.monitor_ms > 0 {
        let _ = writeln!(out, " Monitoring Period: {}", format_duration(u.monitor_ms));
    }
    let _ = writeln!(out, " Max failure ratio: {}", u.max_failure_ratio.0);
    let _ = writeln!(out, " Update order:      {}", u.order.as_str());
    let _ = writeln!(out, "Command:\t{}", s.spec.command.join(" "));
    if !s.spec.env.is_empty() {
        let _ = writeln!(out, "Env:");
        for (key, value) in &s.spec.env {
            let _ = writeln!(out, " {key}={value}");
        }
    }
    let _ = writeln!(
        out,
        "Stop grace period:\t{}",
        format_duration(s.spec.stop_grace_ms)
    );
    if let Some(h) = &s.spec.health {
        healthcheck_pretty(&mut out, h);
    }
    let _ = writeln!(out, "Networks:\t{}", s.network_names.join(" "));
    for (id, aliases) in &s.spec.aliases {
        let name = s
            .spec
            .networks
            .iter()
            .position(|n| n == id)
            .and_then(|i| s.network_names.get(i))
            .unwrap_or(id);
        let _ = writeln!(out, " Aliases on {name}:\t{}", aliases.join(" "));
    }
    let _ = writeln!(out, "Endpoint Mode:\t{}", s.spec.endpoint_mode.as_str());
    if !s.virtual_ips.is_empty() {
        let _ = writeln!(out, "Virtual IPs:");
        for v in &s.virtual_ips {
            let _ = writeln!(out, " {}:\t{}", v.network, v.addr);
        }
    }
    if !s.spec.ports.is_empty() {
        let _ = writeln!(out, "Ports:");
        for p in &s.spec.ports {
            let _ = writeln!(out, " PublishedPort = {}", p.published);
            let _ = writeln!(out, "  Protocol = {}", p.protocol);
            let _ = writeln!(out, "  TargetPort = {}", p.target);
            let _ = writeln!(out, "  PublishMode = {}", ports::mode_word(p.mode));
        }
    }
    if let Some(mark) = s.fwmark {
        let _ = writeln!(out, "Fwmark:\t\t{mark}");
    }
    if !s.lb.is_empty() {
        let _ = writeln!(out, "Load balancers:");
        out.push_str(&lb_table(&s.lb));
    }
    out
}

/// `meshctl network inspect --pretty`; for ingress also the sboxes and load balancers.
pub fn network_pretty(n: &NetworkDetail) -> String {
    let mut out = String::new();
    let net = &n.network;
    let _ = writeln!(out, "ID:\t\t{}", net.id);
    let _ = writeln!(out, "Name:\t\t{}", net.name);
    let _ = writeln!(out, "Driver:\t\t{}", net.driver);
    let _ = writeln!(out, "Ingress:\t{}", net.ingress);
    let _ = writeln!(out, "Encrypted:\t{}", net.encrypted);
    let _ = writeln!(out, "Subnet:\t\t{}", net.subnet);
    let _ = writeln!(out, "Gateway:\t{}", net.gateway);
    let _ = writeln!(out, "VNI:\t\t{}", net.vni);
    let _ = writeln!(out, "Endpoints:");
    let rows: Vec<Vec<String>> = n
        .endpoints
        .iter()
        .map(|e| {
            vec![
                e.task_name.clone(),
                e.node.clone().unwrap_or_default(),
                e.addr.to_string(),
                e.mac.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["TASK", "NODE", "ADDRESS", "MAC"], &rows));
    if net.ingress {
        let _ = writeln!(out, "Ingress sandboxes:");
        let rows: Vec<Vec<String>> = n
            .sboxes
            .iter()
            .map(|b| vec![b.hostname.clone(), b.addr.to_string()])
            .collect();
        out.push_str(&table(&["NODE", "ADDRESS"], &rows));
        let _ = writeln!(out, "Load balancers:");
        out.push_str(&lb_table(&n.lb));
    }
    out
}

/// CURRENT STATE of `service ps`: the state, since when, and the health of a running task with
/// a check.
fn current_state(t: &TaskInfo, now: u64) -> String {
    let text = format!("{} {}", state_word(t.state), ago(t.updated_at, now));
    match t.health {
        Some(h) if t.state == TaskState::Running => format!("{text} ({})", health_note(h)),
        _ => text,
    }
}

pub fn tasks(tasks: &[TaskInfo], now: u64) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            // History rows hang under the slot's current task, as in `docker service ps`.
            let name = if t.desired_state == TaskState::Running {
                t.name.clone()
            } else {
                format!(" \\_ {}", t.name)
            };
            vec![
                short(&t.id),
                name,
                t.node.clone().unwrap_or_default(),
                state_word(t.desired_state),
                current_state(t, now),
                t.error
                    .as_ref()
                    .map(|e| format!("{e:?}"))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "NODE",
            "DESIRED STATE",
            "CURRENT STATE",
            "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::{LbBackendReport, LbServiceReport};
    use proto::api::{IngressSbox, ServiceSpec, TaskEndpoint, VirtualIp};
    use proto::model::{Node, PortConfig, Protocol, PublishMode, Role};
    use std::collections::BTreeMap;

    #[test]
    fn tables_align_like_docker() {
        let out = table(
            &["ID", "NAME", "MODE"],
            &[
                vec!["abc".into(), "web".into(), "replicated".into()],
                vec!["abcdefghijkl".into(), "x".into(), "".into()],
            ],
        );
        assert_eq!(
            out,
            "ID             NAME      MODE\n\
             abc            web       replicated\n\
             abcdefghijkl   x\n"
        );
    }

    #[test]
    fn durations_read_like_docker() {
        assert_eq!(ago(100, 100), "less than a second ago");
        assert_eq!(ago(100, 110), "10 seconds ago");
        assert_eq!(ago(100, 190), "about a minute ago");
        assert_eq!(ago(0, 600), "10 minutes ago");
        assert_eq!(ago(0, 5000), "about an hour ago");
        assert_eq!(ago(0, 3 * 86_400), "3 days ago");
        // A clock that went backwards never underflows.
        assert_eq!(ago(200, 100), "less than a second ago");
    }

    fn task(slot: u64, desired: TaskState, state: TaskState, error: Option<&str>) -> TaskInfo {
        TaskInfo {
            id: format!("{slot}bcdefghijklmnopqrstuvwxy"),
            name: format!("web.{slot}"),
            service_id: "svc".into(),
            service_name: "web".into(),
            slot,
            node_id: Some("n1".into()),
            node: Some("node1".into()),
            desired_state: desired,
            state,
            error: error.map(str::to_string),
            pid: Some(7),
            netns: None,
            endpoints: vec![TaskEndpoint {
                network_id: "net".into(),
                network: "backend".into(),
                addr: "10.0.9.2/24".parse().unwrap(),
                mac: "02:42:0a:00:09:02".into(),
            }],
            created_at: 0,
            updated_at: 90,
            spec_version: 0,
            health: None,
        }
    }

    #[test]
    fn service_ps_shows_history_and_errors() {
        let out = tasks(
            &[
                task(1, TaskState::Running, TaskState::Running, None),
                task(
                    1,
                    TaskState::Shutdown,
                    TaskState::Failed,
                    Some("exit status 1"),
                ),
            ],
            100,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "ID             NAME        NODE      DESIRED STATE   CURRENT STATE            ERROR"
        );
        assert_eq!(
            lines[1],
            "1bcdefghijkl   web.1       node1     Running         Running 10 seconds ago"
        );
        assert_eq!(
            lines[2],
            "1bcdefghijkl    \\_ web.1   node1     Shutdown        Failed 10 seconds ago    \"exit status 1\""
        );
    }

    #[test]
    fn service_ps_shows_the_health_of_running_tasks() {
        let with = |state, health| TaskInfo {
            health,
            ..task(1, TaskState::Running, state, None)
        };
        let current = |t: TaskInfo| current_state(&t, 95);
        assert_eq!(
            current(with(TaskState::Running, Some(Health::Healthy))),
            "Running 5 seconds ago (healthy)"
        );
        assert_eq!(
            current(with(TaskState::Running, Some(Health::Unhealthy))),
            "Running 5 seconds ago (unhealthy)"
        );
        assert_eq!(
            current(with(TaskState::Running, Some(Health::Starting))),
            "Running 5 seconds ago (health: starting)"
        );
        // No check, or a task no longer running: no health.
        assert_eq!(
            current(with(TaskState::Running, None)),
            "Running 5 seconds ago"
        );
        assert_eq!(
            current(with(TaskState::Failed, Some(Health::Unhealthy))),
            "Failed 5 seconds ago"
        );
        let out = tasks(&[with(TaskState::Running, Some(Health::Healthy))], 95);
        assert!(
            out.ends_with("Running         Running 5 seconds ago (healthy)\n"),
            "{out}"
        );
    }

    #[test]
    fn pretty_inspect_shows_the_update_status_config_env_and_health_check() {
        use proto::model::{
            FailureAction, Ratio, UpdateConfig, UpdateOrder, UpdateState, UpdateStatus,
        };
        let spec = ServiceSpec {
            name: "web".into(),
            mode: Default::default(),
            replicas: 3,
            networks: vec![],
            constraints: vec![],
            command: vec!["hello-server".into(), "--v2".into()],
            ports: vec![],
            endpoint_mode: Default::default(),
            aliases: Default::default(),
            env: [
                ("GREETING".to_string(), "hello world".to_string()),
                ("PORT".to_string(), "8080".to_string()),
            ]
            .into(),
            update_config: UpdateConfig {
                parallelism: 2,
                delay_ms: 10_000,
                order: UpdateOrder::StartFirst,
                monitor_ms: 5_000,
                failure_action: FailureAction::Rollback,
                max_failure_ratio: Ratio(0.25),
            },
            stop_grace_ms: 30_000,
            health: Some(HealthCheck {
                start_period_ms: 1_500,
                ..HealthCheck::new(HealthTest::Cmd {
                    argv: vec!["/bin/sh".into(), "-c".into(), "curl -f localhost".into()],
                })
            }),
        };
        let info = ServiceInfo {
            id: "svc".into(),
            spec,
            network_names: vec![],
            running: 3,
            desired: 3,
            created_at: 0,
            updated_at: 0,
            fwmark: None,
            lb: vec![],
            virtual_ips: vec![],
            version: 4,
            previous_spec: None,
            update_status: Some(UpdateStatus {
                state: UpdateState::Completed,
                started_at: 1_000,
                completed_at: Some(1_070),
                message: "update completed".into(),
            }),
        };
        let out = service_pretty(&info, 1_100);
        for part in [
            "Name:\t\tweb\nVersion:\t4\n",
            "UpdateStatus:\n State:\t\tcompleted\n Started:\tabout a minute ago\n \
             Completed:\t30 seconds ago\n Message:\tupdate completed\n",
            "UpdateConfig:\n Parallelism:\t2\n Delay:\t\t10s\n On failure:\trollback\n \
             Monitoring Period: 5s\n Max failure ratio: 0.25\n Update order:      start-first\n",
            "Env:\n GREETING=hello world\n PORT=8080\n",
            "Stop grace period:\t30s\n",
            "Healthcheck:\n Test = CMD-SHELL curl -f localhost\n Interval = 30s\n \
             Timeout = 30s\n Retries = 3\n StartPeriod = 1.5s\n",
        ] {
            assert!(out.contains(part), "{part:?} not in:\n{out}");
        }
        // Docker leaves out a zero delay and monitor; an update under way has no end yet.
        let paused = ServiceInfo {
            spec: ServiceSpec {
                update_config: UpdateConfig::default(),
                env: Default::default(),
                health: Some(HealthCheck::new(HealthTest::Http {
                    port: 8080,
                    path: "/healthz".into(),
                })),
                ..info.spec.clone()
            },
            update_status: Some(UpdateStatus {
                state: UpdateState::Paused,
                started_at: 1_090,
                completed_at: None,
                message: "task web.2 failed: exit status 1".into(),
            }),
            ..info
        };
        let out = service_pretty(&paused, 1_100);
        assert!(
            out.contains(
                " State:\t\tpaused\n Started:\t10 seconds ago\n \
                 Message:\ttask web.2 failed: exit status 1\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(" Parallelism:\t1\n On failure:\tpause\n Monitoring Period: 5s\n"),
            "{out}"
        );
        assert!(!out.contains("Env:"), "{out}");
        assert!(out.contains(" Test = HTTP GET :8080/healthz\n"), "{out}");
    }

    #[test]
    fn service_ls_shows_replicas_as_running_over_desired() {
        let replicated = ServiceInfo {
            id: "0123456789abcdef0123456789".into(),
            spec: ServiceSpec {
                name: "web".into(),
                mode: Default::default(),
                replicas: 3,
                networks: vec!["n".into()],
                constraints: vec![],
                command: vec!["hello-server".into(), "--port".into(), "8080".into()],
                ports: vec![
                    PortConfig {
                        protocol: Protocol::Tcp,
                        published: 80,
                        target: 8080,
                        mode: PublishMode::Ingress,
                    },
                    PortConfig {
                        protocol: Protocol::Udp,
                        published: 53,
                        target: 5353,
                        mode: PublishMode::Host,
                    },
                ],
                endpoint_mode: Default::default(),
                aliases: Default::default(),
                env: Default::default(),
                update_config: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            },
            network_names: vec!["backend".into()],
            running: 2,
            desired: 3,
            created_at: 0,
            updated_at: 0,
            fwmark: Some(256),
            lb: vec![],
            virtual_ips: vec![],
            version: 0,
            previous_spec: None,
            update_status: None,
        };
        // A global service: running over the nodes it belongs on.
        let global = ServiceInfo {
            id: "1123456789abcdef0123456789".into(),
            spec: ServiceSpec {
                name: "agent".into(),
                mode: ServiceMode::Global,
                replicas: 0,
                ports: vec![],
                command: vec!["sleep".into(), "1d".into()],
                ..replicated.spec.clone()
            },
            running: 4,
            desired: 4,
            ..replicated.clone()
        };
        let out = services(&[replicated, global.clone()]);
        assert_eq!(
            out,
            "ID             NAME      MODE         REPLICAS   COMMAND                    PORTS\n\
             0123456789ab   web       replicated   2/3        hello-server --port 8080   *:80->8080/tcp, *:53->5353/udp\n\
             1123456789ab   agent     global       4/4        sleep 1d\n"
        );
        let out = service_pretty(&global, 0);
        assert!(
            out.contains("Service Mode:\tGlobal\n Tasks:\t\t4 (running 4)\n"),
            "{out}"
        );
        assert!(!out.contains("Replicas"), "{out}");
    }

    fn lb(hostname: &str, backends: &[(&str, u32)]) -> NodeLb {
        NodeLb {
            node_id: format!("id-{hostname}"),
            hostname: hostname.into(),
            backend: proto::model::LbKind::Ipvs,
            services: vec![LbServiceReport {
                fwmark: 256,
                backends: backends
                    .iter()
                    .map(|(ip, weight)| LbBackendReport {
                        ip: ip.parse().unwrap(),
                        weight: *weight,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn publish_ls_and_pretty_inspect_show_ports_and_load_balancers() {
        let port = PortConfig {
            protocol: Protocol::Udp,
            published: 53,
            target: 5353,
            mode: PublishMode::Host,
        };
        assert_eq!(
            published(&[PublishInfo {
                service: "dns".into(),
                service_id: "x".into(),
                port,
            }]),
            "SERVICE   PUBLISHED   TARGET    PROTOCOL   MODE\n\
             dns       53          5353      udp        host\n"
        );
        let info = ServiceInfo {
            id: "svc".into(),
            spec: ServiceSpec {
                mode: Default::default(),
                name: "web".into(),
                replicas: 2,
                networks: vec![],
                constraints: vec![],
                command: vec!["hello-server".into()],
                ports: vec![port],
                endpoint_mode: Default::default(),
                aliases: Default::default(),
                env: Default::default(),
                update_config: Default::default(),
                stop_grace_ms: 10_000,
                health: None,
            },
            network_names: vec![],
            running: 2,
            desired: 2,
            created_at: 0,
            updated_at: 0,
            fwmark: Some(256),
            lb: vec![
                lb("node1", &[("10.255.0.5", 1), ("10.255.0.6", 0)]),
                lb("node2", &[]),
            ],
            virtual_ips: vec![],
            version: 0,
            previous_spec: None,
            update_status: None,
        };
        let out = service_pretty(&info, 0);
        assert!(out.contains(" PublishedPort = 53\n  Protocol = udp\n  TargetPort = 5353\n  PublishMode = host\n"), "{out}");
        assert!(out.contains("Fwmark:\t\t256\n"), "{out}");
        assert!(
            out.ends_with(
                "NODE      LB        FWMARK    BACKENDS\n\
                 node1     ipvs      256       10.255.0.5 weight 1, 10.255.0.6 weight 0\n\
                 node2     ipvs      256       (none)\n"
            ),
            "{out}"
        );
        // A VIP-only service: its mode, aliases and VIPs; no routing-mesh balancers.
        let vip_only = ServiceInfo {
            spec: ServiceSpec {
                networks: vec!["n1".into()],
                ports: vec![],
                aliases: [("n1".to_string(), vec!["www".to_string()])].into(),
                ..info.spec.clone()
            },
            network_names: vec!["backend".into()],
            lb: vec![],
            virtual_ips: vec![VirtualIp {
                network_id: "n1".into(),
                network: "backend".into(),
                addr: "10.0.9.2/24".parse().unwrap(),
            }],
            ..info
        };
        let out = service_pretty(&vip_only, 0);
        assert!(
            out.contains(
                "Networks:\tbackend\n Aliases on backend:\twww\nEndpoint Mode:\tvip\n\
                 Virtual IPs:\n backend:\t10.0.9.2/24\n"
            ),
            "{out}"
        );
        assert!(!out.contains("Load balancers"), "{out}");
        let detail = NetworkDetail {
            network: Network {
                id: "ing".into(),
                name: "ingress".into(),
                driver: "overlay".into(),
                subnet: "10.255.0.0/16".parse().unwrap(),
                gateway: "10.255.0.1".parse().unwrap(),
                vni: 4096,
                ingress: true,
                encrypted: false,
            },
            created_at: 0,
            endpoints: vec![],
            peers: vec![],
            sboxes: vec![IngressSbox {
                node_id: "n1".into(),
                hostname: "node1".into(),
                addr: "10.255.0.2/16".parse().unwrap(),
            }],
            lb: vec![lb("node1", &[("10.255.0.5", 1)])],
        };
        let out = network_pretty(&detail);
        assert!(out.contains("VNI:\t\t4096\n"), "{out}");
        assert!(
            out.contains("NODE      ADDRESS\nnode1     10.255.0.2/16\n"),
            "{out}"
        );
        assert!(
            out.contains("node1     ipvs      256       10.255.0.5 weight 1\n"),
            "{out}"
        );
    }

    #[test]
    fn node_and_network_listings() {
        let node = NodeInfo {
            node: Node {
                id: "tkxuxun03da7y2bozka50mpxi".into(),
                hostname: "node1".into(),
                addr: "192.168.56.11".parse().unwrap(),
                role: Role::Manager,
                availability: Availability::Drain,
                status: NodeStatus::Ready,
                labels: BTreeMap::new(),
                no_encryption: None,
            },
            tasks: 0,
            revision: 3,
            applied_revision: 3,
            no_routing_mesh: None,
            manager_status: Some(ManagerStatus::Leader),
        };
        let mut other = node.clone();
        other.node.hostname = "node2".into();
        other.manager_status = Some(ManagerStatus::Unreachable);
        let out = nodes(&[node.clone(), other]);
        assert!(
            out.lines().nth(2).unwrap().contains(" Unreachable "),
            "{out}"
        );
        assert_eq!(
            out.lines().nth(1).unwrap(),
            "tkxuxun03da7y2bozka50mpxi   node1      Ready     Drain          Leader           192.168.56.11"
        );
        let out = networks(&[Network {
            id: "1qc6vhwhaeqn0n9z2hdlawz72".into(),
            name: "ingress".into(),
            driver: "overlay".into(),
            subnet: "10.255.0.0/16".parse().unwrap(),
            gateway: "10.255.0.1".parse().unwrap(),
            vni: 4096,
            ingress: true,
            encrypted: false,
        }]);
        assert_eq!(
            out,
            "NETWORK ID     NAME      DRIVER    SCOPE\n\
             1qc6vhwhaeqn   ingress   overlay   swarm\n"
        );
    }
}
