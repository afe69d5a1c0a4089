//! A node's first contact with the manager, as swarmkit's GetRemoteCA and IssueNodeCertificate:
//! fetch the CA over an unverified TLS connection and check it against the join token's digest,
//! then, over a connection that verifies the manager against that CA, send the token with a
//! signing request and receive the node's certificate.
//!
//! Only the leader of the managers takes joins: a follower answers
//! [`ManagerMsg::NotLeader`], and the join starts over at the leader it names, CA check
//! included.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proto::agent::{AgentMsg, ManagerMsg};
use proto::wire::{read_frame, write_frame};
use tokio::io::BufReader;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use crate::files::Credentials;
use crate::pki::KeyRequest;
use crate::token::JoinToken;
use crate::{tls, Error};

/// Each step (connect, handshake, answer) must finish within this.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Followers' redirects a join follows: a leader normally is one hop away, and more means the
/// leadership is moving, which a later try outlives.
pub const MAX_REDIRECTS: usize = 3;

/// Opens a TLS connection to the manager at `addr` with `config`, checking its certificate
/// against [`crate::pki::MANAGER_SERVER_NAME`].
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, Error> {
    connect_from(addr, None, config).await
}

/// [`connect`] from the source address `local`, or one the kernel picks (`None`): many
/// simulated nodes on one machine (the B11 benchmark) each dial from an address of their own.
pub async fn connect_from(
    addr: &str,
    local: Option<IpAddr>,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, Error> {
    let net = |what: &str| {
        let what = format!("{what} the manager at {addr}");
        move |source| Error::Net { what, source }
    };
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let tcp = tokio::time::timeout(STEP_TIMEOUT, dial(addr, local))
        .await
        .map_err(|_| timed_out())
        .and_then(|r| r)
        .map_err(net("connect to"))?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(
        STEP_TIMEOUT,
        TlsConnector::from(config).connect(tls::manager_name(), tcp),
    )
    .await
    .map_err(|_| timed_out())
    .and_then(|r| r)
    .map_err(|e| {
        // A certificate the CA did not sign is not a network hiccup: say so.
        if let Some(tls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Error::Protocol(format!(
                "TLS handshake with the manager at {addr}: {tls_err}"
            ));
        }
        net("TLS handshake with")(e)
    })
}

async fn dial(addr: &str, local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(addr).await;
    };
    let to = tokio::net::lookup_host(addr)
        .await?
        .find(|to| to.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrNotAvailable))?;
    let sock = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(local, 0))?;
    sock.connect(to).await
}

/// Sends one message and reads the one answer.
async fn ask(
    stream: TlsStream<TcpStream>,
    addr: &str,
    msg: &AgentMsg,
) -> Result<ManagerMsg, Error> {
    let (rd, mut wr) = tokio::io::split(stream);
    let net = |what: &str| {
        let what = format!("{what} the manager at {addr}");
        move |source| Error::Net { what, source }
    };
    write_frame(&mut wr, msg).await.map_err(net("send to"))?;
    let mut buf = Vec::new();
    let got = tokio::time::timeout(
        STEP_TIMEOUT,
        read_frame(
            &mut BufReader::new(rd),
            &mut buf,
            proto::PREAUTH_FRAME_BYTES * 4,
        ),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
    .and_then(|r| r)
    .map_err(net("read the answer of"))?;
    if !got {
        return Err(Error::Protocol(format!(
            "the manager at {addr} closed the connection without answering"
        )));
    }
    proto::decode_frame(&buf)
        .map_err(|e| Error::Protocol(format!("answer of the manager at {addr}: {e}")))
}

/// The cluster's CA from the manager at `addr`, checked against `token`.
pub async fn fetch_ca(addr: &str, token: &JoinToken) -> Result<String, Error> {
    fetch_ca_from(addr, None, token).await
}

async fn fetch_ca_from(
    addr: &str,
    local: Option<IpAddr>,
    token: &JoinToken,
) -> Result<String, Error> {
    let stream = connect_from(addr, local, tls::first_contact_config()).await?;
    match ask(stream, addr, &AgentMsg::GetCa).await? {
        ManagerMsg::Ca { cert } if token.pins(&cert) => Ok(cert),
        ManagerMsg::Ca { .. } => Err(Error::CaMismatch(addr.to_string())),
        other => Err(wrong_answer(addr, other)),
    }
}

/// Joins the cluster of the manager at `addr`, or of the leader it names if it is a follower:
/// returns the node id and its credentials.
pub async fn join(
    addr: &str,
    token: &JoinToken,
    hostname: &str,
    advertise_addr: IpAddr,
) -> Result<(String, Credentials), Error> {
    join_from(addr, None, token, hostname, advertise_addr).await
}

/// [`join`] dialling from the source address `local` (see [`connect_from`]).
pub async fn join_from(
    addr: &str,
    local: Option<IpAddr>,
    token: &JoinToken,
    hostname: &str,
    advertise_addr: IpAddr,
) -> Result<(String, Credentials), Error> {
    let mut at = addr.to_string();
    let mut redirects = 0;
    loop {
        match join_at(&at, local, token, hostname, advertise_addr).await {
            Err(Error::NotLeader {
                leader: Some(leader),
                ..
            }) if redirects < MAX_REDIRECTS => {
                info!(manager = %at, leader = %proto::excerpt(&leader), "not the leader: joining at the leader");
                redirects += 1;
                at = leader;
            }
            done => return done,
        }
    }
}

/// One attempt at the manager at `addr`, whose CA is fetched and checked against the token
/// anew: a redirect is only a hint, what it leads to must prove itself again.
async fn join_at(
    addr: &str,
    local: Option<IpAddr>,
    token: &JoinToken,
    hostname: &str,
    advertise_addr: IpAddr,
) -> Result<(String, Credentials), Error> {
    let ca_pem = fetch_ca_from(addr, local, token).await?;
    let key = KeyRequest::generate()?;
    let stream = connect_from(addr, local, tls::client_config(&ca_pem, None)?).await?;
    let msg = AgentMsg::Join {
        version: proto::PROTOCOL_VERSION,
        token: token.to_string(),
        csr: key.csr_pem,
        hostname: hostname.to_string(),
        advertise_addr,
    };
    match ask(stream, addr, &msg).await? {
        ManagerMsg::Joined { node_id, cert } => {
            let creds = Credentials {
                ca_pem,
                cert_pem: cert,
                key_pem: key.key_pem,
            };
            // What the manager issued must be what this node will present: check it now.
            let id = creds.identity()?;
            if id.common_name != node_id {
                return Err(Error::Protocol(format!(
                    "the manager issued a certificate for {} but said the node is {}",
                    crate::excerpt(&id.common_name),
                    crate::excerpt(&node_id)
                )));
            }
            creds.client_config()?;
            Ok((node_id, creds))
        }
        other => Err(wrong_answer(addr, other)),
    }
}

/// The error for any answer but the one asked for.
fn wrong_answer(addr: &str, msg: ManagerMsg) -> Error {
    match msg {
        ManagerMsg::Refused { reason } => Error::Refused(reason),
        ManagerMsg::NotLeader { leader } => Error::NotLeader {
            addr: addr.to_string(),
            leader,
        },
        other => Error::Protocol(format!(
            "the manager at {addr} answered with an unexpected {} message",
            other.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertRole, Subject};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    /// A manager's TLS side with a certificate of `ca`.
    fn acceptor(ca: &Ca) -> TlsAcceptor {
        let subject = Subject {
            common_name: "mesh-manager".into(),
            role: CertRole::Manager,
            cluster_id: "c1".into(),
        };
        let (cert, key) = ca.issue(&subject, &[], Duration::from_secs(3600)).unwrap();
        let slot = tls::CertSlot::new(tls::certified_key(&cert, &key).unwrap());
        TlsAcceptor::from(
            tls::server_config(ca.cert_pem(), slot, tls::ClientAuth::Optional).unwrap(),
        )
    }

    /// A fake manager that answers each connection's one request with `answer`: its address
    /// and how many requests it had.
    async fn manager(
        ca: &Ca,
        answer: impl Fn(AgentMsg) -> ManagerMsg + Send + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tls = acceptor(ca);
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let s = tls.accept(s).await.unwrap();
                let (r, mut w) = tokio::io::split(s);
                let mut buf = Vec::new();
                read_frame(&mut BufReader::new(r), &mut buf, proto::MAX_FRAME_BYTES)
                    .await
                    .unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let msg = answer(proto::decode_frame(&buf).unwrap());
                write_frame(&mut w, &msg).await.unwrap();
            }
        });
        (addr, asked)
    }

    fn follower(leader: Option<String>) -> impl Fn(AgentMsg) -> ManagerMsg + Send + 'static {
        move |_| ManagerMsg::NotLeader {
            leader: leader.clone(),
        }
    }

    #[tokio::test]
    async fn a_join_at_a_follower_is_completed_at_the_leader() {
        let ca = Arc::new(Ca::generate("c1").unwrap());
        let token = JoinToken::generate(ca.cert_pem()).unwrap();
        let signer = ca.clone();
        let (leader, at_leader) = manager(&ca, move |msg| match msg {
            AgentMsg::GetCa => ManagerMsg::Ca {
                cert: signer.cert_pem().to_string(),
            },
            AgentMsg::Join { csr, .. } => {
                let subject = Subject {
                    common_name: "node-1".into(),
                    role: CertRole::Worker,
                    cluster_id: "c1".into(),
                };
                ManagerMsg::Joined {
                    node_id: "node-1".into(),
                    cert: signer
                        .sign_request(&csr, &subject, Duration::from_secs(3600))
                        .unwrap(),
                }
            }
            other => panic!("unexpected {other:?}"),
        })
        .await;
        let (follower, at_follower) = manager(&ca, follower(Some(leader))).await;

        let (node_id, creds) = join(&follower, &token, "n1", "10.0.0.1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(node_id, "node-1");
        assert_eq!(creds.identity().unwrap().common_name, "node-1");
        assert_eq!(creds.ca_pem, ca.cert_pem());
        // The follower was asked for the CA only; the leader for the CA and the join.
        assert_eq!(at_follower.load(Ordering::SeqCst), 1);
        assert_eq!(at_leader.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_leader_of_another_cluster_is_refused_like_any_manager() {
        let ca = Ca::generate("c1").unwrap();
        let token = JoinToken::generate(ca.cert_pem()).unwrap();
        let other = Ca::generate("c2").unwrap();
        let other_pem = other.cert_pem().to_string();
        let (leader, _) = manager(&other, move |_| ManagerMsg::Ca {
            cert: other_pem.clone(),
        })
        .await;
        let (follower, _) = manager(&ca, follower(Some(leader.clone()))).await;
        let err = join(&follower, &token, "n1", "10.0.0.1".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::CaMismatch(at) if *at == leader),
            "{err}"
        );
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn redirects_are_bounded_and_no_leader_is_worth_another_try() {
        let ca = Ca::generate("c1").unwrap();
        let token = JoinToken::generate(ca.cert_pem()).unwrap();
        // Two followers that name each other (stale hints while the leadership moves).
        let hint = Arc::new(std::sync::Mutex::new(String::new()));
        let a_hint = hint.clone();
        let (a, a_asked) = manager(&ca, move |_| ManagerMsg::NotLeader {
            leader: Some(a_hint.lock().unwrap().clone()),
        })
        .await;
        let (b, b_asked) = manager(&ca, follower(Some(a.clone()))).await;
        *hint.lock().unwrap() = b.clone();
        let (c, c_asked) = manager(&ca, follower(Some(b.clone()))).await;
        let err = join(&c, &token, "n1", "10.0.0.1".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotLeader {
                    leader: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.is_transient(),
            "the leadership settles: try again later"
        );
        // c, then b, a, b...: one contact more than the redirects followed.
        let contacts = [&c_asked, &b_asked, &a_asked].map(|n| n.load(Ordering::SeqCst));
        assert_eq!(contacts.iter().sum::<usize>(), MAX_REDIRECTS + 1);

        let (none, _) = manager(&ca, follower(None)).await;
        let err = join(&none, &token, "n1", "10.0.0.1".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(&err, Error::NotLeader { leader: None, addr } if *addr == none));
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("no leader right now"), "{err}");
    }
}
