//! rustls configurations for every meshnet connection: the manager's agent port (client
//! certificate optional, so that a node without one can fetch the CA and join, and nothing
//! else), its TCP API (client certificate required), agents and meshctl (the cluster's CA as
//! the only root, [`MANAGER_SERVER_NAME`] as the name checked).

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::pki::{first_cert, Identity, MANAGER_SERVER_NAME};
use crate::Error;

/// Whether a listener lets peers without a certificate finish the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The agent port: a peer without a certificate may only fetch the CA or join.
    Optional,
    /// The TCP API.
    Required,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots
        .add(first_cert(ca_pem)?)
        .map_err(|e| Error::Parse(format!("CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

fn chain(cert_pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Parse(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Parse("no certificate in the PEM data".into()));
    }
    Ok(chain)
}

fn private_key(key_pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Parse(format!("private key PEM: {e}")))
}

/// A certificate and its key as rustls serves them.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, Error> {
    let key = provider()
        .key_provider
        .load_private_key(private_key(key_pem)?)
        .map_err(Error::Tls)?;
    Ok(Arc::new(CertifiedKey::new(chain(cert_pem)?, key)))
}

/// The manager's certificate, replaceable while the listeners run (renewal needs no restart).
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<CertSlot> {
        Arc::new(CertSlot(RwLock::new(key)))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A listener's configuration: clients are checked against the CA in `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    cert: Arc<CertSlot>,
    clients: ClientAuth,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = match clients {
        ClientAuth::Optional => verifier.allow_unauthenticated(),
        ClientAuth::Required => verifier,
    }
    .build()
    .map_err(|e| Error::Parse(format!("client verifier: {e}")))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    Ok(Arc::new(config))
}

/// A client that trusts only the cluster's CA and, given `identity` (certificate and key
/// PEM), presents it.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_root_certificates(roots(ca_pem)?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(chain(cert)?, private_key(key)?)
            .map_err(Error::Tls)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// For a joining node's first contact only: any server certificate is accepted, because what
/// is asked for there (the CA) is checked against the join token's digest before any of it is
/// trusted, as swarmkit's GetRemoteCA does.
pub fn first_contact_config() -> Arc<ClientConfig> {
    let p = provider();
    let config = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(p.signature_verification_algorithms)))
        .with_no_client_auth();
    Arc::new(config)
}

/// The name clients check on a manager's certificate.
pub fn manager_name() -> ServerName<'static> {
    ServerName::try_from(MANAGER_SERVER_NAME).expect("a valid DNS name")
}

/// What the peer's verified certificate says; `None` when it sent none.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Result<Identity, Error>> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::from_der(c))
}

#[derive(Debug)]
struct AnyServer(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // The handshake's own signatures are still checked: the peer holds the key it shows.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
