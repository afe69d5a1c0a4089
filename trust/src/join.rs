//! A node's first contact with the manager, as swarmkit's GetRemoteCA and IssueNodeCertificate:
//! fetch the CA over an unverified TLS connection and check it against the join token's digest,
//! then, over a connection that verifies the manager against that CA, send the token with a
//! signing request and receive the node's certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proto::agent::{AgentMsg, ManagerMsg};
use proto::wire::{read_frame, write_frame};
use tokio::io::BufReader;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::files::Credentials;
use crate::pki::KeyRequest;
use crate::token::JoinToken;
use crate::{tls, Error};

/// Each step (connect, handshake, answer) must finish within this.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

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
        ManagerMsg::Refused { reason } => Err(Error::Refused(reason)),
        other => Err(unexpected(addr, &other)),
    }
}

/// Joins the cluster of the manager at `addr`: returns the node id and its credentials.
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
        ManagerMsg::Refused { reason } => Err(Error::Refused(reason)),
        other => Err(unexpected(addr, &other)),
    }
}

fn unexpected(addr: &str, msg: &ManagerMsg) -> Error {
    Error::Protocol(format!(
        "the manager at {addr} answered with an unexpected {} message",
        msg.kind()
    ))
}
