//! Table output modelled on docker's: the same columns and state words, aligned like its
//! tabwriter (cells at least 10 wide, 3 spaces of padding).

use proto::api::{NodeInfo, ServiceInfo, TaskInfo};
use proto::model::{Availability, Network, NodeStatus, Role, TaskState};

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
        .map(|n| {
            let n = &n.node;
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
                match n.role {
                    Role::Manager => "Leader",
                    Role::Worker => "",
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
                "replicated".to_string(),
                format!("{}/{}", s.running, s.spec.replicas),
                s.spec.command.join(" "),
            ]
        })
        .collect();
    table(&["ID", "NAME", "MODE", "REPLICAS", "COMMAND"], &rows)
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
                format!("{} {}", state_word(t.state), ago(t.updated_at, now)),
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
    use proto::api::{ServiceSpec, TaskEndpoint};
    use proto::model::Node;
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
    fn service_ls_shows_replicas_as_running_over_desired() {
        let out = services(&[ServiceInfo {
            id: "0123456789abcdef0123456789".into(),
            spec: ServiceSpec {
                name: "web".into(),
                replicas: 3,
                networks: vec!["n".into()],
                constraints: vec![],
                command: vec!["hello-server".into(), "--port".into(), "8080".into()],
            },
            network_names: vec!["backend".into()],
            running: 2,
            created_at: 0,
            updated_at: 0,
        }]);
        assert_eq!(
            out,
            "ID             NAME      MODE         REPLICAS   COMMAND\n\
             0123456789ab   web       replicated   2/3        hello-server --port 8080\n"
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
            },
            tasks: 0,
            revision: 3,
            applied_revision: 3,
        };
        let out = nodes(&[node]);
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
        }]);
        assert_eq!(
            out,
            "NETWORK ID     NAME      DRIVER    SCOPE\n\
             1qc6vhwhaeqn   ingress   overlay   swarm\n"
        );
    }
}
