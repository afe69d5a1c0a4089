//! The meshctl API: one [`Request`] per line in, one [`Response`] per line out. The Unix socket
//! is root's alone (0600); the TCP API speaks TLS and serves only clients whose certificate, of
//! the cluster's CA, is an admin's or a manager's. Requests are bounded in size, idle
//! connections are closed, and a full table of connections makes room by closing the one idle
//! the longest, so a flood of idle connections never locks meshctl out.

use std::sync::Arc;

use proto::api::{PublishedPort, Request, Response};
use proto::excerpt;
use proto::model::Role;
use proto::wire::{frame_error, read_frame, write_frame};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::TlsAcceptor;
use trust::CertRole;

use crate::cluster::{lock, Cluster, Shared};
use crate::limits::{
    Slot, Slots, API_IDLE, HANDSHAKE_TIMEOUT, MAX_API_CONNS, MAX_PENDING, MAX_PENDING_PER_PEER,
};
use crate::views;

/// Every Unix-socket client counts as this one address (they are all root); only the table's
/// bound applies to them.
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

pub async fn serve_unix(listener: UnixListener, cluster: Shared) {
    let conns = Slots::new(MAX_API_CONNS, usize::MAX);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(slot) = conns.admit(LOCAL) else {
                    continue;
                };
                tokio::spawn(serve(stream, cluster.clone(), slot, None));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

pub async fn serve_tcp(listener: TcpListener, cluster: Shared, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let pending = Slots::new(MAX_PENDING, MAX_PENDING_PER_PEER);
    let conns = Slots::new(MAX_API_CONNS, usize::MAX);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = pending.admit(peer.ip()) else {
                    tracing::debug!(%peer, "too many API handshakes from this address: closing");
                    continue;
                };
                let (acceptor, cluster, conns) = (acceptor.clone(), cluster.clone(), conns.clone());
                tokio::spawn(async move {
                    let accepted = tokio::select! {
                        a = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => a,
                        _ = slot.evicted() => return tracing::debug!(%peer, "API handshake closed to make room"),
                    };
                    drop(slot);
                    let tls = match accepted {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::info!(%peer, "API TLS handshake: {e}"),
                        Err(_) => return tracing::info!(%peer, "API TLS handshake: timed out"),
                    };
                    let who = trust::tls::peer_identity(tls.get_ref().1).and_then(Result::ok);
                    let refused = match &who {
                        Some(id) => api_access(&lock(&cluster), id).err(),
                        None => Some("no client certificate".to_string()),
                    };
                    if let Some(message) = refused {
                        tracing::warn!(%peer, "API client refused: {message}");
                        let (_, mut wr) = tokio::io::split(tls);
                        let _ = write_frame(&mut wr, &Response::Error { message }).await;
                        return;
                    }
                    let Some(slot) = conns.admit(peer.ip()) else {
                        return;
                    };
                    serve(tls, cluster, slot, who).await
                });
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Whether the holder of certificate `id` may use the API now: an admin of this cluster, or a
/// manager node that is still one (not removed, not demoted since its certificate was issued).
fn api_access(cluster: &Cluster, id: &trust::Identity) -> Result<(), String> {
    const NEEDS: &str = "this certificate may not use the API: it needs an admin or manager certificate of this cluster (the manager's <data-dir>/client/)";
    if id.cluster_id != cluster.pki().cluster_id() {
        return Err(NEEDS.into());
    }
    match id.role {
        Some(CertRole::Admin) => Ok(()),
        Some(CertRole::Manager) if !cluster.leading() => Err(format!(
            "this manager follows the leader, which alone checks a manager certificate: use an admin certificate here, or the leader's API{}",
            cluster.leader_api().map(|a| format!(" at {a}")).unwrap_or_default()
        )),
        Some(CertRole::Manager) => {
            let node = cluster.state().nodes.get(&id.common_name);
            if cluster.state().revoked.contains(&id.common_name) || node.is_none() {
                return Err(format!(
                    "node {} was removed from the cluster: its certificate no longer opens the API",
                    excerpt(&id.common_name)
                ));
            }
            match node.map(|r| r.node.role) {
                Some(Role::Manager) => Ok(()),
                _ => Err(format!(
                    "node {} is no longer a manager: its certificate no longer opens the API",
                    excerpt(&id.common_name)
                )),
            }
        }
        _ => Err(NEEDS.into()),
    }
}

async fn accept_failed(e: std::io::Error) {
    // Out of file descriptors and the like: back off instead of spinning.
    tracing::error!(error = %e, "accept API connection");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
}

/// Serves one API connection until the client closes it, goes idle, or is evicted. A TCP
/// client's certificate (`who`) is checked again at every request: a node removed or demoted
/// meanwhile loses the API at once.
async fn serve<S: AsyncRead + AsyncWrite>(
    stream: S,
    cluster: Shared,
    guard: Slot,
    who: Option<trust::Identity>,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let mut upstream: Option<Upstream> = None;
    loop {
        guard.set_busy(false);
        let read = tokio::select! {
            read = tokio::time::timeout(API_IDLE, read_frame(&mut rd, &mut buf, proto::API_REQUEST_BYTES)) => read,
            _ = guard.evicted() => return tracing::debug!("idle API connection closed to make room"),
        };
        match read {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return,
            Ok(Err(e)) => {
                let message = format!("read request: {e}");
                tracing::warn!("{message}");
                let _ = write_frame(&mut wr, &Response::Error { message }).await;
                return;
            }
            Err(_) => return tracing::debug!("idle API connection closed"),
        }
        guard.set_busy(true);
        let response = match proto::decode_frame::<Request>(&buf) {
            Ok(req) => {
                let span = tracing::info_span!("api", request = request_kind(&req));
                let answered = {
                    let mut c = lock(&cluster);
                    match who.as_ref().map(|id| api_access(&c, id)) {
                        Some(Err(message)) => Err(message),
                        _ if !c.leading() => Ok(Answer::Forward {
                            leader: c.leader_api(),
                            tls: c.pki().forward_tls.clone(),
                            req,
                        }),
                        _ => Ok(Answer::Here(span.in_scope(|| handle(&mut c, req)))),
                    }
                };
                let answered = match answered {
                    Ok(Answer::Forward { leader, tls, req }) => {
                        Ok(forward(&mut upstream, tls, leader, &req).await)
                    }
                    Ok(Answer::Here(response)) => Ok(response),
                    Err(message) => Err(message),
                };
                match answered {
                    Ok(response) => response,
                    Err(message) => {
                        tracing::warn!("API client refused: {message}");
                        let _ = write_frame(&mut wr, &Response::Error { message }).await;
                        return;
                    }
                }
            }
            Err(e) => Response::Error {
                message: format!("decode request: {}", frame_error(&e)),
            },
        };
        buf.clear();
        if let Err(e) = write_frame(&mut wr, &response).await {
            tracing::warn!(error = %e, "write API response");
            return;
        }
    }
}

/// Where a request is answered: here (the leader), or by the leader (a follower forwards it
/// once the cluster's lock is released).
enum Answer {
    Here(Response),
    Forward {
        leader: Option<String>,
        tls: Arc<rustls::ClientConfig>,
        req: Request,
    },
}

/// A follower's connection to the leader's API, kept for the client's connection.
struct Upstream {
    api: String,
    rd: BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    wr: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
}

/// How long a follower waits for the leader to answer a forwarded request: as long as meshctl
/// waits for any manager.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// A follower passes a request to the leader (`leader`: its API address, when one is known)
/// and its answer back, as the admin of its cluster.
async fn forward(
    upstream: &mut Option<Upstream>,
    tls: Arc<rustls::ClientConfig>,
    leader: Option<String>,
    req: &Request,
) -> Response {
    let Some(api) = leader else {
        return Response::Error {
            message: crate::store::StoreError::NotLeader(None).to_string(),
        };
    };
    if upstream.as_ref().is_some_and(|u| u.api != api) {
        *upstream = None;
    }
    let answer = async {
        if upstream.is_none() {
            let tcp = TcpStream::connect(&api).await?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(trust::tls::manager_name(), tcp)
                .await?;
            let (rd, wr) = tokio::io::split(stream);
            *upstream = Some(Upstream {
                api: api.clone(),
                rd: BufReader::new(rd),
                wr,
            });
        }
        let u = upstream.as_mut().expect("connected above");
        write_frame(&mut u.wr, req).await?;
        let mut buf = Vec::new();
        if !read_frame(&mut u.rd, &mut buf, proto::MAX_FRAME_BYTES).await? {
            return Err(std::io::Error::other("the leader closed the connection"));
        }
        proto::decode_frame::<Response>(&buf).map_err(|e| std::io::Error::other(frame_error(&e)))
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, answer).await {
        Ok(Ok(response)) => response,
        failed => {
            *upstream = None;
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {}s", FORWARD_TIMEOUT.as_secs()),
            };
            Response::Error {
                message: format!(
                    "this manager follows and could not reach the leader's API at {api}: {why}"
                ),
            }
        }
    }
}

fn request_kind(req: &Request) -> &'static str {
    match req {
        Request::NodeLs => "node ls",
        Request::NodeInspect { .. } => "node inspect",
        Request::NodeUpdate { .. } => "node update",
        Request::NodeRm { .. } => "node rm",
        Request::NodeRole { .. } => "node promote/demote",
        Request::JoinToken { .. } => "join-token",
        Request::NetworkCreate { .. } => "network create",
        Request::NetworkLs => "network ls",
        Request::NetworkInspect { .. } => "network inspect",
        Request::NetworkRm { .. } => "network rm",
        Request::NetworkRmMany { .. } => "network rm",
        Request::ServiceCreate { .. } => "service create",
        Request::ServiceLs => "service ls",
        Request::ServiceInspect { .. } => "service inspect",
        Request::ServicePs { .. } => "service ps",
        Request::ServiceScale { .. } => "service scale",
        Request::ServiceScaleMany { .. } => "service scale",
        Request::ServiceRm { .. } => "service rm",
        Request::ServiceRmMany { .. } => "service rm",
        Request::ServiceUpdate { .. } => "service update",
        Request::ServiceRollback { .. } => "service rollback",
        Request::PublishLs => "publish ls",
        Request::PublishRm { .. } => "publish rm",
        Request::PublishRmMany { .. } => "publish rm",
    }
}

fn role_word(role: Role) -> &'static str {
    match role {
        Role::Worker => "worker",
        Role::Manager => "manager",
    }
}

/// Answers one request. Changes go through [`Cluster::transact`], so a refused one changes nothing.
pub fn handle(cluster: &mut Cluster, req: Request) -> Response {
    let lookup = |op: &str, found: Result<String, crate::state::Reason>| {
        found.map_err(|reason| format!("{op}: {reason}"))
    };
    let err = |e: crate::cluster::TxError| e.to_string();
    let result: Result<Response, String> = (|| {
        Ok(match req {
            Request::NodeLs => Response::Nodes {
                nodes: views::nodes(cluster.state(), &|n| cluster.manager_status(n)),
            },
            Request::NodeInspect { node } => {
                let id = lookup(
                    &format!("inspect node {}", excerpt(&node)),
                    cluster.state().find_node(&node),
                )?;
                Response::Node {
                    node: views::node(cluster.state(), &id, &|n| cluster.manager_status(n)),
                }
            }
            Request::NodeUpdate {
                node,
                availability,
                label_add,
                label_rm,
            } => {
                let id = cluster
                    .transact(|s, _| s.update_node(&node, availability, &label_add, &label_rm))
                    .map_err(err)?;
                tracing::info!(node = %node, ?availability, "node updated");
                Response::Node {
                    node: views::node(cluster.state(), &id, &|n| cluster.manager_status(n)),
                }
            }
            Request::NodeRm { node, force } => {
                let id = cluster.remove_node(&node, force).map_err(err)?;
                tracing::warn!(node = %node, %id, "node removed: its certificate is revoked");
                Response::Removed { id }
            }
            Request::NodeRole { node, role } => {
                cluster.check_demote(&node, role)?;
                let id = cluster
                    .transact(|s, _| s.set_node_role(&node, role))
                    .map_err(err)?;
                tracing::info!(node = %node, ?role, "node role changed: its next certificate carries it");
                Response::Node {
                    node: views::node(cluster.state(), &id, &|n| cluster.manager_status(n)),
                }
            }
            Request::JoinToken { role, rotate } => {
                if rotate {
                    let secret = trust::JoinToken::generate(cluster.pki().ca_pem())
                        .map_err(|e| format!("rotate the {} join token: {e}", role_word(role)))?
                        .secret;
                    cluster
                        .transact(|s, _| {
                            s.join_secrets.set(role, secret);
                            Ok(())
                        })
                        .map_err(err)?;
                    tracing::warn!(
                        role = role_word(role),
                        "join token rotated: the old one no longer joins"
                    );
                }
                let secret =
                    cluster.state().join_secrets.get(role).ok_or_else(|| {
                        format!("the cluster has no {} join token", role_word(role))
                    })?;
                Response::JoinToken {
                    role,
                    token: cluster.pki().token(secret).to_string(),
                    manager: cluster.agent_addrs().join(","),
                }
            }
            Request::NetworkCreate {
                name,
                driver,
                subnet,
                options,
            } => {
                let manager_ip = cluster.manager_ip();
                let rotation = cluster.key_rotation_secs();
                let id = cluster
                    .transact(|s, now| {
                        let id = s.create_network(
                            &name,
                            &driver,
                            subnet.as_deref(),
                            &options,
                            manager_ip,
                            now,
                        )?;
                        // An encrypted network's first tasks find the keys ready.
                        s.rotate_keys(
                            now.saturating_mul(1000),
                            rotation,
                            &mut crate::cluster::fresh_esp_key,
                        );
                        Ok(id)
                    })
                    .map_err(err)?;
                let network = views::network(cluster.state(), cluster.lb(), &id);
                tracing::info!(network = %name, subnet = %network.network.subnet, vni = network.network.vni, "network created");
                Response::Network { network }
            }
            Request::NetworkLs => Response::Networks {
                networks: views::networks(cluster.state()),
            },
            Request::NetworkInspect { network } => {
                let id = lookup(
                    &format!("inspect network {}", excerpt(&network)),
                    cluster.state().find_network(&network),
                )?;
                Response::Network {
                    network: views::network(cluster.state(), cluster.lb(), &id),
                }
            }
            Request::NetworkRm { network } => {
                let id = cluster
                    .transact(|s, _| s.remove_network(&network))
                    .map_err(err)?;
                tracing::info!(%network, "network removed");
                Response::Removed { id }
            }
            Request::NetworkRmMany { networks } => {
                let ids = cluster
                    .transact(|s, _| s.remove_networks(&networks))
                    .map_err(err)?;
                tracing::info!(?networks, "networks removed");
                Response::RemovedMany { ids }
            }
            Request::ServiceCreate { spec } => {
                let id = cluster
                    .transact(|s, now| s.create_service(&spec, now))
                    .map_err(err)?;
                tracing::info!(service = %spec.name, replicas = spec.replicas, "service created");
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::ServiceLs => Response::Services {
                services: views::services(cluster.state(), cluster.lb()),
            },
            Request::ServiceInspect { service } => {
                let id = lookup(
                    &format!("inspect service {}", excerpt(&service)),
                    cluster.state().find_service(&service),
                )?;
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::ServicePs { service } => {
                let id = lookup(
                    &format!("list tasks of service {}", excerpt(&service)),
                    cluster.state().find_service(&service),
                )?;
                Response::Tasks {
                    tasks: views::tasks(cluster.state(), &id),
                }
            }
            Request::ServiceScale { service, replicas } => {
                let id = cluster
                    .transact(|s, now| s.scale_service(&service, replicas, now))
                    .map_err(err)?;
                tracing::info!(%service, replicas, "service scaled");
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::ServiceScaleMany { scales } => {
                let scales: Vec<(String, u64)> = scales
                    .into_iter()
                    .map(|s| (s.service, s.replicas))
                    .collect();
                let ids = cluster
                    .transact(|s, now| s.scale_services(&scales, now))
                    .map_err(err)?;
                tracing::info!(?scales, "services scaled");
                Response::Services {
                    services: ids
                        .iter()
                        .map(|id| views::service(cluster.state(), cluster.lb(), id))
                        .collect(),
                }
            }
            Request::ServiceRm { service } => {
                let id = cluster
                    .transact(|s, now| s.remove_service(&service, now))
                    .map_err(err)?;
                tracing::info!(%service, "service removed");
                Response::Removed { id }
            }
            Request::ServiceRmMany { services } => {
                let ids = cluster
                    .transact(|s, now| s.remove_services(&services, now))
                    .map_err(err)?;
                tracing::info!(?services, "services removed");
                Response::RemovedMany { ids }
            }
            Request::ServiceUpdate {
                service,
                publish_add,
                publish_rm,
                endpoint_mode,
                spec,
            } => {
                let id = cluster
                    .transact(|s, now| {
                        s.update_service(
                            &service,
                            &publish_add,
                            &publish_rm,
                            endpoint_mode,
                            &spec,
                            now,
                        )
                    })
                    .map_err(err)?;
                tracing::info!(%service, ?publish_add, ?publish_rm, ?endpoint_mode, ?spec, "service updated");
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::ServiceRollback { service } => {
                let id = cluster
                    .transact(|s, now| s.rollback_service(&service, now))
                    .map_err(err)?;
                tracing::info!(%service, "service rollback");
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::PublishLs => Response::Ports {
                ports: views::published(cluster.state()),
            },
            Request::PublishRm {
                protocol,
                published,
            } => {
                let port = PublishedPort {
                    protocol,
                    published,
                };
                let id = cluster
                    .transact(|s, now| s.unpublish(port, now))
                    .map_err(err)?;
                tracing::info!(%port, "port unpublished");
                Response::Service {
                    service: Box::new(views::service(cluster.state(), cluster.lb(), &id)),
                }
            }
            Request::PublishRmMany { ports } => {
                let ids = cluster
                    .transact(|s, now| s.unpublish_many(&ports, now))
                    .map_err(err)?;
                tracing::info!(?ports, "ports unpublished");
                Response::Services {
                    services: ids
                        .iter()
                        .map(|id| views::service(cluster.state(), cluster.lb(), id))
                        .collect(),
                }
            }
        })
    })();
    result.unwrap_or_else(|message| {
        tracing::info!(%message, "request refused");
        Response::Error { message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::spec;
    use crate::state::tests::{port, web, AGENT_PORT};
    use crate::store::tests::TempDir;
    use proto::agent::{LbBackendReport, LbReport, LbServiceReport};
    use proto::api::ServiceSpec;
    use proto::model::{Availability, Constraint, PortConfig, Protocol, PublishMode};
    use std::collections::BTreeMap;

    fn cluster(tmp: &TempDir) -> Cluster {
        let mut c = crate::cluster::tests::cluster(tmp);
        let (tx, _rx) = crate::outbox::outbox();
        for i in 1..=3u8 {
            crate::cluster::tests::join_and_connect(
                &mut c,
                &format!("node{i}"),
                [192, 168, 56, 10 + i].into(),
                tx.clone(),
            );
        }
        c
    }

    fn ok(c: &mut Cluster, req: Request) -> Response {
        let resp = handle(c, req);
        assert!(!matches!(resp, Response::Error { .. }), "{resp:?}");
        resp
    }

    fn create(spec: ServiceSpec) -> Request {
        Request::ServiceCreate { spec }
    }

    fn published(name: &str, ports: &[PortConfig]) -> ServiceSpec {
        ServiceSpec {
            ports: ports.to_vec(),
            ..spec(name, 1, &[])
        }
    }

    /// A constraint is parsed where the request is decoded: a bad one never reaches an
    /// operation, and the refusal says what is wrong with it.
    #[test]
    fn bad_constraints_are_refused_as_the_request_is_decoded() {
        let long = format!("node.hostname=={}", "h".repeat(300));
        for (text, expected) in [
            (
                "node.role=worker",
                "expected <field>==<value> or <field>!=<value>",
            ),
            (
                "node.labels.==x",
                "the field must be node.role, node.hostname or node.labels.<key>",
            ),
            ("node.role==boss", "node.role is either manager or worker"),
            ("node.hostname==", "the value is empty"),
            (long.as_str(), "longer than 256 bytes"),
        ] {
            let mut sp = serde_json::to_value(spec("api", 1, &[])).unwrap();
            sp["constraints"] = serde_json::json!([text]);
            let req = serde_json::json!({"type": "service_create", "spec": sp});
            let err = proto::decode_frame::<Request>(req.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
        let mut sp = serde_json::to_value(spec("api", 1, &[])).unwrap();
        sp["constraints"] = serde_json::json!(["node.role == worker"]);
        let req = serde_json::json!({"type": "service_create", "spec": sp});
        let Request::ServiceCreate { spec } =
            proto::decode_frame(req.to_string().as_bytes()).unwrap()
        else {
            panic!("a create");
        };
        assert_eq!(
            spec.constraints[0].to_string(),
            "node.role==worker",
            "kept canonical"
        );
    }
    #[test]
    fn publishing_and_load_balancer_state_through_the_api() {
        let tmp = TempDir::new("api-publish");
        let mut c = cluster(&tmp);
        let Response::Service { service } = ok(&mut c, create(published("web", &[web(80)]))) else {
            panic!("service create answers with the service")
        };
        assert_eq!(service.fwmark, Some(256));
        let dns = port(53, 5353, Protocol::Udp, PublishMode::Host);
        ok(&mut c, create(spec("dns", 1, &[])));
        let Response::Service { service: d } = ok(
            &mut c,
            Request::ServiceUpdate {
                service: "dns".into(),
                publish_add: vec![dns],
                publish_rm: vec![],
                endpoint_mode: None,
                spec: Default::default(),
            },
        ) else {
            panic!("service update answers with the service")
        };
        assert_eq!((d.fwmark, d.spec.ports.clone()), (None, vec![dns]));
        let Response::Ports { ports } = ok(&mut c, Request::PublishLs) else {
            panic!("publish ls answers with ports")
        };
        let rows: Vec<(&str, u16)> = ports
            .iter()
            .map(|p| (p.service.as_str(), p.port.published))
            .collect();
        assert_eq!(rows, [("dns", 53), ("web", 80)]);

        // What node1's agent reports shows in service inspect (its fwmark only) and in network
        // inspect ingress (everything), with the sboxes of every node.
        let n1 = c.state().find_node("node1").unwrap();
        let backend = LbBackendReport {
            ip: "10.255.0.5".parse().unwrap(),
            weight: 1,
        };
        c.record_lb(
            &n1,
            LbReport {
                backend: proto::model::LbKind::Nftables,
                services: vec![
                    LbServiceReport {
                        fwmark: 256,
                        backends: vec![backend.clone()],
                    },
                    LbServiceReport {
                        fwmark: 999,
                        backends: vec![],
                    },
                ],
            },
        );
        let Response::Service { service } = ok(
            &mut c,
            Request::ServiceInspect {
                service: "web".into(),
            },
        ) else {
            panic!("service inspect answers with the service")
        };
        assert_eq!(service.lb.len(), 1);
        assert_eq!(
            (
                service.lb[0].hostname.as_str(),
                service.lb[0].backend.as_str()
            ),
            ("node1", "nftables")
        );
        assert_eq!(
            service.lb[0].services,
            [LbServiceReport {
                fwmark: 256,
                backends: vec![backend]
            }]
        );
        let Response::Network { network } = ok(
            &mut c,
            Request::NetworkInspect {
                network: "ingress".into(),
            },
        ) else {
            panic!("network inspect answers with the network")
        };
        assert!(network.network.ingress);
        let sboxes: Vec<(String, String)> = network
            .sboxes
            .iter()
            .map(|b| (b.hostname.clone(), b.addr.to_string()))
            .collect();
        assert_eq!(
            sboxes,
            [
                ("node1".to_string(), "10.255.0.2/16".to_string()),
                ("node2".to_string(), "10.255.0.3/16".to_string()),
                ("node3".to_string(), "10.255.0.4/16".to_string())
            ]
        );
        assert_eq!(network.lb[0].services.len(), 2);
        assert_eq!(network.endpoints.len(), 1, "web's task is on ingress");

        let Response::Service { service } = ok(
            &mut c,
            Request::PublishRm {
                protocol: Protocol::Tcp,
                published: 80,
            },
        ) else {
            panic!("publish rm answers with the service")
        };
        assert_eq!((service.spec.name.as_str(), service.fwmark), ("web", None));
        assert!(service.lb.is_empty());
    }

    /// Every bad request is answered with an error naming the operation, and leaves both the
    /// state in memory and the store file byte for byte as they were.
    #[test]
    fn bad_input_changes_nothing() {
        let tmp = TempDir::new("api-bad");
        let mut c = cluster(&tmp);
        ok(
            &mut c,
            Request::NetworkCreate {
                name: "backend".into(),
                driver: "overlay".into(),
                subnet: Some("10.0.9.0/24".into()),
                options: Default::default(),
            },
        );
        ok(&mut c, create(spec("web", 2, &["backend"])));
        let dns = port(53, 5353, Protocol::Udp, PublishMode::Host);
        ok(&mut c, create(published("pub", &[web(80), dns])));
        // Overlays are isolated: reusing part of a subnet on another network is fine...
        ok(
            &mut c,
            Request::NetworkCreate {
                name: "twin".into(),
                driver: "overlay".into(),
                subnet: Some("10.0.9.0/25".into()),
                options: Default::default(),
            },
        );
        let net = |name: &str, subnet: Option<&str>| Request::NetworkCreate {
            name: name.into(),
            driver: "overlay".into(),
            subnet: subnet.map(str::to_string),
            options: Default::default(),
        };
        let mut empty_cmd = spec("api", 1, &["backend"]);
        empty_cmd.command.clear();
        let mut late_bad_network = spec("api", 1, &["backend", "nope"]);
        late_bad_network.constraints = vec![Constraint::parse("node.role==worker").unwrap()];
        let add =
            |service: &str, ports: &[PortConfig], rm: &[(Protocol, u16)]| Request::ServiceUpdate {
                service: service.into(),
                publish_add: ports.to_vec(),
                publish_rm: rm
                    .iter()
                    .map(|&(protocol, published)| PublishedPort {
                        protocol,
                        published,
                    })
                    .collect(),
                endpoint_mode: None,
                spec: Default::default(),
            };
        let host80 = port(80, 8080, Protocol::Tcp, PublishMode::Host);
        let ingress53 = port(53, 53, Protocol::Udp, PublishMode::Ingress);
        let cases: Vec<(Request, &str)> = vec![
            // A published port is taken in every mode, whichever way round, by any service.
            (create(published("api", &[host80])), "create service api: port 80/tcp is already published by service pub"),
            (create(published("api", &[ingress53])), "create service api: port 53/udp is already published by service pub"),
            (add("web", &[web(80)], &[]), "update service web: port 80/tcp is already published by service pub"),
            (add("pub", &[host80], &[]), "update service pub: port 80/tcp is already published by service pub"),
            (create(published("api", &[web(81), port(81, 9, Protocol::Tcp, PublishMode::Host)])), "create service api: port 81/tcp is given more than once"),
            (add("web", &[web(81), web(81)], &[]), "update service web: port 81/tcp is given more than once"),
            (create(published("api", &[web(0)])), "create service api: invalid port 0:8080/tcp"),
            (create(published("api", &[port(81, 0, Protocol::Udp, PublishMode::Host)])), "invalid port 81:0/udp"),
            (create(published("api", &[web(AGENT_PORT)])), "create service api: port 2377/tcp is reserved: mesh-manager listens on it for agents"),
            (add("web", &[port(4789, 4789, Protocol::Udp, PublishMode::Ingress)], &[]), "update service web: port 4789/udp is reserved"),
            (add("web", &[], &[(Protocol::Tcp, 99)]), "update service web: service web does not publish port 99/tcp"),
            (add("pub", &[], &[(Protocol::Tcp, 80), (Protocol::Tcp, 80)]), "update service pub: port 80/tcp is given more than once"),
            // All or nothing: a valid removal does not happen when an addition is refused.
            (add("pub", &[web(0)], &[(Protocol::Udp, 53)]), "update service pub: invalid port 0:8080/tcp"),
            (add("nope", &[web(81)], &[]), "update service nope: no such service: nope"),
            (Request::PublishRm { protocol: Protocol::Udp, published: 80 }, "unpublish port 80/udp: no service publishes port 80/udp"),
            (net("bad", Some("10.0.300.0/24")), "create network bad: invalid subnet \"10.0.300.0/24\""),
            // ...but not one task on both.
            (create(spec("api", 1, &["backend", "twin"])), "create service api: subnet 10.0.9.0/25 overlaps subnet 10.0.9.0/24 of network backend"),
            (net("bad", Some("192.168.0.0/16")), "create network bad: subnet 192.168.0.0/16 contains 192.168.56.11, the underlay address of node node1"),
            (net("bad", Some("192.168.56.12/30")), "contains 192.168.56.12, the underlay address of node node2"),
            (net("backend", None), "create network backend: a network named backend already exists"),
            (net("ingress", None), "create network ingress: the name ingress is reserved"),
            (net("-bad", None), "create network -bad: invalid network name"),
            (
                Request::NetworkCreate { name: "b2".into(), driver: "bridge".into(), subnet: None, options: Default::default() },
                "unsupported driver \"bridge\"",
            ),
            (Request::NetworkRm { network: "backend".into() }, "remove network backend: it is in use by services: web"),
            (Request::NetworkRm { network: "ingress".into() }, "remove network ingress: the ingress network belongs to the routing mesh and cannot be removed"),
            (Request::NetworkRm { network: "nope".into() }, "remove network nope: no such network: nope"),
            (create(spec("web", 1, &[])), "create service web: a service named web already exists"),
            (create(spec("api", 1, &["nope"])), "create service api: no such network: nope"),
            (create(late_bad_network), "create service api: no such network: nope"),
            (create(spec("api", 1, &["ingress"])), "create service api: the ingress network cannot be attached directly"),
            (create(spec("api", 1, &["backend", "backend"])), "network backend is given more than once"),
            (create(empty_cmd), "create service api: a command is required"),
            (create(spec("api", 1_000_000, &[])), "1000000 replicas is more than the limit"),
            (create(spec("bad name", 1, &[])), "invalid service name"),
            (
                create(ServiceSpec { mode: proto::model::ServiceMode::Global, ..spec("api", 2, &[]) }),
                "create service api: replicas can only be used with replicated mode",
            ),
            (Request::ServiceScale { service: "nope".into(), replicas: 3 }, "scale service nope: no such service: nope"),
            (Request::ServiceScale { service: "web".into(), replicas: 20_000 }, "scale service web: 20000 replicas"),
            (Request::ServiceRm { service: "nope".into() }, "remove service nope: no such service"),
            (Request::ServicePs { service: "nope".into() }, "list tasks of service nope: no such service"),
            (Request::NodeInspect { node: "nope".into() }, "inspect node nope: no such node"),
            (
                Request::NodeUpdate {
                    node: "node1".into(),
                    availability: Some(Availability::Drain),
                    label_add: [("".to_string(), "x".to_string())].into(),
                    label_rm: vec![],
                },
                "update node node1: invalid label key",
            ),
        ];
        let mut cases = cases;
        cases.extend(malformed_inputs());
        assert!(cases.len() >= 80, "{} cases", cases.len());
        for (req, expected) in cases {
            let shown = format!("{req:?}");
            let shown = proto::excerpt_within(&shown, 300);
            let state_before = c.state().clone();
            let file_before = crate::store::tests::stored_bytes(&tmp.0);
            match handle(&mut c, req) {
                Response::Error { message } => {
                    assert!(message.contains(expected), "{shown}: {message}");
                    // Whatever was sent, the answer quotes at most an excerpt of it.
                    assert!(message.len() < 500, "{shown}: {} bytes", message.len());
                }
                other => panic!("{shown} was accepted: {other:?}"),
            }
            assert_eq!(c.state(), &state_before, "{shown} changed the state");
            assert_eq!(
                crate::store::tests::stored_bytes(&tmp.0),
                file_before,
                "{shown} changed the store"
            );
        }
    }

    /// Malformed input for every kind of request, with the error each must get, for
    /// [`bad_input_changes_nothing`]: huge names and keys, labels, constraints and commands past
    /// their limits, subnets clashing with gwbridges, and requests for several objects of which
    /// one is bad (all or none). Expects the cluster that test builds: networks backend and
    /// twin, services web (on backend) and pub (80/tcp ingress, 53/udp host), nodes node1..3.
    fn malformed_inputs() -> Vec<(Request, &'static str)> {
        let huge = "x".repeat(10_000);
        let cut = "…(10000 bytes)";
        let net = |name: &str, subnet: &str| Request::NetworkCreate {
            name: name.into(),
            driver: "overlay".into(),
            subnet: Some(subnet.into()),
            options: Default::default(),
        };
        let with = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut sp = spec("api", 1, &[]);
            f(&mut sp);
            create(sp)
        };
        let labels = |add: &[(&str, &str)], rm: &[&str]| Request::NodeUpdate {
            node: "node1".into(),
            availability: None,
            label_add: add
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            label_rm: rm.iter().map(|k| k.to_string()).collect(),
        };
        let scale = |targets: &[(&str, u64)]| Request::ServiceScaleMany {
            scales: targets
                .iter()
                .map(|(service, replicas)| proto::api::Scale {
                    service: service.to_string(),
                    replicas: *replicas,
                })
                .collect(),
        };
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let tcp = |published| PublishedPort {
            protocol: Protocol::Tcp,
            published,
        };
        let many_labels: Vec<(String, String)> = (0..=proto::api::MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        vec![
            // Echoes of huge input are excerpts, for every request naming an object.
            (net(&huge, "10.0.50.0/24"), cut),
            (net("n", &huge), cut),
            (Request::NetworkCreate { name: "n".into(), driver: huge.clone(), subnet: None, options: Default::default() }, cut),
            (Request::NetworkInspect { network: huge.clone() }, cut),
            (Request::NetworkRm { network: huge.clone() }, cut),
            (Request::NodeInspect { node: huge.clone() }, cut),
            (Request::NodeUpdate { node: huge.clone(), availability: None, label_add: BTreeMap::new(), label_rm: vec![] }, cut),
            (create(spec(&huge, 1, &[])), cut),
            (create(spec("api", 1, &[&huge])), cut),
            (Request::ServiceInspect { service: huge.clone() }, cut),
            (Request::ServicePs { service: huge.clone() }, cut),
            (Request::ServiceScale { service: huge.clone(), replicas: 1 }, cut),
            (Request::ServiceRm { service: huge.clone() }, cut),
            (Request::ServiceUpdate { service: huge.clone(), publish_add: vec![], publish_rm: vec![], endpoint_mode: None, spec: Default::default() }, cut),
            (scale(&[("web", 1), (&huge, 1)]), cut),
            (Request::ServiceRmMany { services: vec!["web".into(), huge.clone()] }, cut),
            (Request::NetworkRmMany { networks: vec!["twin".into(), huge.clone()] }, cut),
            (labels(&[(&huge, "v")], &[]), cut),
            (labels(&[("zone", &huge)], &[]), cut),
            (labels(&[], &[&huge]), cut),
            (with(&|sp| sp.command = vec![huge.clone(); 7]), "the command has 70000 bytes, more than the limit of 65536"),
            // Labels, constraints and commands within bounds.
            (labels(&[("zone", &"v".repeat(513))], &[]), "invalid value"),
            (labels(&[("zone", "a\tb")], &[]), "of label zone: it must have at most 512 bytes, without control characters"),
            (labels(&[("zo ne", "a")], &[]), "invalid label key \"zo ne\""),
            (labels(&[("a=b", "a")], &[]), "invalid label key \"a=b\""),
            (labels(&[(&"k".repeat(129), "a")], &[]), "it must have 1 to 128 bytes"),
            (labels(&[("zone", "a")], &["zone"]), "update node node1: label zone is both added and removed"),
            (
                Request::NodeUpdate { node: "node1".into(), availability: None, label_add: many_labels.into_iter().collect(), label_rm: vec![] },
                "65 labels is more than the limit of 64 per node",
            ),
            (with(&|sp| sp.constraints = vec![Constraint::parse("node.role==worker").unwrap(); 33]), "33 constraints is more than the limit of 32"),
            (with(&|sp| sp.command = vec!["x".into(); 1025]), "the command has 1025 arguments, more than the limit of 1024"),
            (with(&|sp| sp.command = vec!["sh".into(), "-c".into(), "a\0b".into()]), "argument 3 of the command"),
            (with(&|sp| sp.command = vec!["".into(), "x".into()]), "a command is required"),
            (with(&|sp| sp.replicas = proto::api::MAX_REPLICAS + 1), "10001 replicas is more than the limit of 10000"),
            (create(spec(&"x".repeat(33), 1, &[])), "have at most 32 of [a-zA-Z0-9_.-]"),
            // Subnets clashing with a gwbridge, ingress or the underlay; none is taken.
            (net("gw", "172.18.5.0/24"), "create network gw: subnet 172.18.5.0/24 overlaps 172.18.0.0/16, the gwbridge subnet of node node1"),
            (net("gw", "172.16.0.0/12"), "overlaps 172.18.0.0/16, the gwbridge subnet"),
            (net("gw", "10.255.7.0/24"), "overlaps subnet 10.255.0.0/16 of network ingress"),
            (net("gw", "10.0.0.0/8"), "overlaps subnet 10.255.0.0/16 of network ingress"),
            (net("gw", "192.168.56.8/29"), "contains 192.168.56.11, the underlay address of node node1"),
            (net("gw", "10.0.9.0/33"), "invalid subnet"),
            (net("gw", "10.0.9.1/24"), "host bits are set"),
            (net("gw", "127.0.0.0/8"), "loopback, multicast and reserved ranges"),
            // Several objects at once: one bad target refuses them all, and says which.
            (scale(&[("web", 5), ("nope", 5)]), "scale service nope: no such service: nope"),
            (scale(&[("web", 5), ("pub", 20_000)]), "scale service pub: 20000 replicas is more than the limit"),
            (scale(&[("web", 5), ("web", 6)]), "scale service web: service web is given more than once"),
            (scale(&[]), "scale services: no service is given"),
            (Request::ServiceRmMany { services: names(&["web", "nope"]) }, "remove service nope: no such service: nope"),
            (Request::ServiceRmMany { services: names(&["pub", "pub"]) }, "remove service pub: service pub is given more than once"),
            (Request::ServiceRmMany { services: vec![] }, "remove services: no service is given"),
            (Request::NetworkRmMany { networks: names(&["twin", "backend"]) }, "remove network backend: it is in use by services: web"),
            (Request::NetworkRmMany { networks: names(&["twin", "ingress"]) }, "remove network ingress: the ingress network belongs to the routing mesh"),
            (Request::NetworkRmMany { networks: names(&["twin", "twin"]) }, "remove network twin: network twin is given more than once"),
            (Request::NetworkRmMany { networks: names(&["twin", "nope"]) }, "remove network nope: no such network: nope"),
            (Request::PublishRmMany { ports: vec![tcp(80), tcp(81)] }, "unpublish port 81/tcp: no service publishes port 81/tcp"),
            (Request::PublishRmMany { ports: vec![tcp(80), tcp(80)] }, "unpublish port 80/tcp: port 80/tcp is given more than once"),
            (Request::PublishRmMany { ports: vec![] }, "unpublish ports: no port is given"),
            // A host-mode port is still one port: published once, cluster-wide.
            (create(published("api", &[port(53, 53, Protocol::Udp, PublishMode::Host)])), "port 53/udp is already published by service pub"),
        ]
    }

    #[test]
    fn several_objects_change_in_one_request() {
        let tmp = TempDir::new("api-many");
        let mut c = cluster(&tmp);
        for name in ["a", "b"] {
            ok(
                &mut c,
                Request::NetworkCreate {
                    name: name.into(),
                    driver: "overlay".into(),
                    subnet: None,
                    options: Default::default(),
                },
            );
        }
        ok(&mut c, create(spec("web", 1, &["a"])));
        ok(&mut c, create(published("api", &[web(80), web(81)])));
        let scale = |service: &str, replicas| proto::api::Scale {
            service: service.into(),
            replicas,
        };
        let Response::Services { services } = ok(
            &mut c,
            Request::ServiceScaleMany {
                scales: vec![scale("web", 3), scale("api", 2)],
            },
        ) else {
            panic!("service scale answers with the services")
        };
        let scaled: Vec<(&str, u64)> = services
            .iter()
            .map(|s| (s.spec.name.as_str(), s.spec.replicas))
            .collect();
        assert_eq!(scaled, [("web", 3), ("api", 2)]);
        let tcp = |published| PublishedPort {
            protocol: Protocol::Tcp,
            published,
        };
        let Response::Services { services } = ok(
            &mut c,
            Request::PublishRmMany {
                ports: vec![tcp(80), tcp(81)],
            },
        ) else {
            panic!("publish rm answers with the services")
        };
        assert_eq!(services.len(), 2);
        assert!(services[1].spec.ports.is_empty());
        let web_id = c.state().find_service("web").unwrap();
        let Response::RemovedMany { ids } = ok(
            &mut c,
            Request::ServiceRmMany {
                services: vec!["web".into(), "api".into()],
            },
        ) else {
            panic!("service rm answers with the ids")
        };
        assert_eq!((ids.len(), &ids[0]), (2, &web_id));
        let Response::RemovedMany { ids } = ok(
            &mut c,
            Request::NetworkRmMany {
                networks: vec!["a".into(), "b".into()],
            },
        ) else {
            panic!("network rm answers with the ids")
        };
        assert_eq!(ids.len(), 2);
        let s = c.state();
        assert!(s.find_service("web").is_err() && s.find_service("api").is_err());
        assert!(s.services.values().all(|v| v.removing) && s.networks.len() == 1);
    }

    #[test]
    fn requests_change_and_show_the_cluster() {
        let tmp = TempDir::new("api-ok");
        let mut c = cluster(&tmp);
        let Response::Network { network } = ok(
            &mut c,
            Request::NetworkCreate {
                name: "backend".into(),
                driver: "overlay".into(),
                subnet: None,
                options: Default::default(),
            },
        ) else {
            panic!("network create answers with the network")
        };
        assert_eq!(network.network.subnet.to_string(), "10.0.0.0/24");
        let Response::Service { service } = ok(&mut c, create(spec("web", 3, &["backend"]))) else {
            panic!("service create answers with the service")
        };
        assert_eq!(service.network_names, ["backend"]);
        assert_eq!(
            service.spec.networks,
            std::slice::from_ref(&network.network.id)
        );
        let Response::Tasks { tasks } = ok(
            &mut c,
            Request::ServicePs {
                service: "web".into(),
            },
        ) else {
            panic!("service ps answers with tasks")
        };
        let nodes: Vec<_> = tasks.iter().map(|t| t.node.clone().unwrap()).collect();
        assert_eq!(nodes, ["node1", "node2", "node3"]);
        let Response::Network { network } = ok(
            &mut c,
            Request::NetworkInspect {
                network: "backend".into(),
            },
        ) else {
            panic!("network inspect answers with the network")
        };
        assert_eq!(network.endpoints.len(), 3);
        assert_eq!(network.peers.len(), 3);
        let prefix = &service.id[..6];
        let Response::Service { service } = ok(
            &mut c,
            Request::ServiceScale {
                service: prefix.into(),
                replicas: 1,
            },
        ) else {
            panic!("service scale answers with the service")
        };
        assert_eq!(service.spec.replicas, 1);
        let Response::Node { node } = ok(
            &mut c,
            Request::NodeUpdate {
                node: "node2".into(),
                availability: Some(Availability::Drain),
                label_add: [("zone".to_string(), "a".to_string())].into(),
                label_rm: vec![],
            },
        ) else {
            panic!("node update answers with the node")
        };
        assert_eq!(node.node.availability, Availability::Drain);
        assert_eq!(
            node.node.labels,
            BTreeMap::from([("zone".to_string(), "a".to_string())])
        );
        ok(
            &mut c,
            Request::ServiceRm {
                service: "web".into(),
            },
        );
        // Gone for users at once; its tasks drain until the nodes (none here) confirm.
        assert!(c.state().find_service("web").is_err());
        assert!(c.state().tasks.values().all(|t| !t.is_current()));
        ok(
            &mut c,
            Request::NetworkRm {
                network: "backend".into(),
            },
        );
        let Response::Networks { networks } = ok(&mut c, Request::NetworkLs) else {
            panic!("network ls answers with networks")
        };
        let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["ingress"]);
    }
}
