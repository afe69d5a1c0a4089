//! The cluster's root CA and the certificates it issues, after swarmkit's ca/: ECDSA P-256
//! keys; node certificates with CN = node id, OU = role, O = cluster id; the manager's own
//! certificate named [`MANAGER_SERVER_NAME`] for agents and meshctl to check.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::Error;

/// The name every manager's certificate carries and every client checks, whatever address it
/// dialled: the CA, not DNS, is what vouches for a manager.
pub const MANAGER_SERVER_NAME: &str = "mesh-manager";
/// Node certificates' lifetime unless `--cert-expiry` says otherwise (swarmkit's 2160 h).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Short lifetimes are for tests; below this, renewals would crowd the connection.
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(20);
const ROOT_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Certificates start this far in the past, so a node whose clock is a little behind the
/// manager's accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// What a certificate allows its holder, carried in its OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Manager,
    Worker,
    /// meshctl over TCP: the API, nothing else.
    Admin,
}

impl CertRole {
    pub fn ou(self) -> &'static str {
        match self {
            CertRole::Manager => "mesh-manager",
            CertRole::Worker => "mesh-worker",
            CertRole::Admin => "mesh-admin",
        }
    }

    pub fn from_ou(ou: &str) -> Option<CertRole> {
        [CertRole::Manager, CertRole::Worker, CertRole::Admin]
            .into_iter()
            .find(|r| r.ou() == ou)
    }
}

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub common_name: String,
    pub role: CertRole,
    pub cluster_id: String,
}

/// What a verified peer certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub common_name: String,
    /// `None` for an OU that is none of ours.
    pub role: Option<CertRole>,
    pub cluster_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Identity {
    pub fn from_der(der: &[u8]) -> Result<Identity, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Parse(format!("certificate: {e}")))?;
        let first = |mut it: Box<
            dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>> + '_,
        >| {
            it.next()
                .and_then(|a| a.as_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let subject = cert.subject();
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok(Identity {
            common_name: first(Box::new(subject.iter_common_name())),
            role: CertRole::from_ou(&first(Box::new(subject.iter_organizational_unit()))),
            cluster_id: first(Box::new(subject.iter_organization())),
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
        })
    }

    pub fn from_pem(pem: &str) -> Result<Identity, Error> {
        Identity::from_der(&first_cert(pem)?)
    }

    /// When to ask for a new certificate: `fraction` (0.5 to 0.8, see [`renewal_fraction`]) of
    /// the way from issue to expiry, as swarmkit does, so nodes do not renew all at once.
    pub fn renew_at(&self, fraction: f64) -> SystemTime {
        let issued = self.not_before + BACKDATE;
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// A random point between 50 % and 80 % of a certificate's life.
pub fn renewal_fraction() -> f64 {
    let r: [u8; 4] = crate::token::random().unwrap_or([0; 4]);
    0.5 + 0.3 * (f64::from(u32::from_be_bytes(r)) / f64::from(u32::MAX))
}

/// A new key and a certificate signing request for it. The CSR names nobody: the manager
/// decides the subject.
pub struct KeyRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

impl KeyRequest {
    pub fn generate() -> Result<KeyRequest, Error> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("generate a key"))?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(cert_err("make a signing request"))?;
        Ok(KeyRequest {
            key_pem: key.serialize_pem(),
            csr_pem: csr,
        })
    }
}

pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    issuer_params_pem: String,
}

impl Ca {
    /// A new self-signed root for the cluster `cluster_id`.
    pub fn generate(cluster_id: &str) -> Result<Ca, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "meshnet root CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_id);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, ROOT_LIFETIME)?;
        let cert = params.self_signed(&key).map_err(cert_err("sign the CA"))?;
        Ca::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// A root brought by the operator (or loaded from the data dir): it must be a CA
    /// certificate and the key must be its own.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        let der = first_cert(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Error::Parse(format!("CA certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(Error::Parse(
                "CA certificate: it is not a CA (no basicConstraints CA:TRUE)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(cert_err("read the CA key"))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(Error::Parse(
                "CA key: it does not belong to the CA certificate".into(),
            ));
        }
        // Only the first certificate is the root; a bundle's others are not ours to serve.
        let cert_pem = first_block(cert_pem)?;
        Ok(Ca {
            issuer_params_pem: cert_pem.clone(),
            cert_pem,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs the key in `csr_pem` for `subject`, ignoring whatever the request itself names.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        subject: &Subject,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert_err("read the signing request"))?;
        let params = leaf_params(subject, &[], lifetime)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(cert_err("sign the certificate"))?;
        Ok(cert.pem())
    }

    /// A new key and its certificate for `subject` (the manager's own, the admin bundle), with
    /// extra names (`sans`: DNS names or IP addresses).
    pub fn issue(
        &self,
        subject: &Subject,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), Error> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("generate a key"))?;
        let params = leaf_params(subject, sans, lifetime)?;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(cert_err("sign the certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, Error> {
        Issuer::from_ca_cert_pem(&self.issuer_params_pem, &self.key)
            .map_err(cert_err("read the CA certificate"))
    }
}

fn leaf_params(
    subject: &Subject,
    sans: &[String],
    lifetime: Duration,
) -> Result<CertificateParams, Error> {
    // swarmkit's SANs: the role and the node id, so either can be checked as a name.
    let mut names = vec![subject.role.ou().to_string()];
    if is_dns_label(&subject.common_name) {
        names.push(subject.common_name.clone());
    }
    names.extend(sans.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(cert_err("name the certificate"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, subject.common_name.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, subject.role.ou());
    params
        .distinguished_name
        .push(DnType::OrganizationName, subject.cluster_id.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, lifetime)?;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<(), Error> {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    let mut serial: [u8; 16] = crate::token::random()?;
    serial[0] &= 0x7f; // a positive integer, as RFC 5280 asks
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The first certificate of a PEM bundle.
pub(crate) fn first_cert(pem: &str) -> Result<CertificateDer<'static>, Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| Error::Parse("no certificate in the PEM data".into()))?
        .map_err(|e| Error::Parse(format!("certificate PEM: {e}")))
}

/// The text of the first certificate block of a PEM bundle, with its final newline.
fn first_block(pem: &str) -> Result<String, Error> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN);
    let end = start.and_then(|s| pem[s..].find(END).map(|e| s + e + END.len()));
    match (start, end) {
        (Some(s), Some(e)) => Ok(format!("{}\n", &pem[s..e])),
        _ => Err(Error::Parse("no certificate in the PEM data".into())),
    }
}

fn cert_err(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |source| Error::Cert { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(cn: &str, role: CertRole) -> Subject {
        Subject {
            common_name: cn.into(),
            role,
            cluster_id: "c1".into(),
        }
    }

    #[test]
    fn a_signed_request_names_who_the_ca_says_not_who_the_request_says() {
        let ca = Ca::generate("c1").unwrap();
        let req = KeyRequest::generate().unwrap();
        let cert = ca
            .sign_request(
                &req.csr_pem,
                &subject("abc123", CertRole::Worker),
                DEFAULT_CERT_EXPIRY,
            )
            .unwrap();
        let id = Identity::from_pem(&cert).unwrap();
        assert_eq!(id.common_name, "abc123");
        assert_eq!(id.role, Some(CertRole::Worker));
        assert_eq!(id.cluster_id, "c1");
        let life = id.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            life > DEFAULT_CERT_EXPIRY - Duration::from_secs(60),
            "{life:?}"
        );
        assert!(id.not_before < SystemTime::now());
    }

    #[test]
    fn a_ca_reloads_from_its_pem_and_refuses_a_foreign_key_or_a_leaf() {
        let ca = Ca::generate("c1").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let other = Ca::generate("c2").unwrap();
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).err().unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let (leaf, key) = ca
            .issue(&subject("m", CertRole::Manager), &[], DEFAULT_CERT_EXPIRY)
            .unwrap();
        let err = Ca::from_pem(&leaf, &key).err().unwrap();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn renewal_falls_between_half_and_four_fifths_of_the_life() {
        let ca = Ca::generate("c1").unwrap();
        let (cert, _) = ca
            .issue(
                &subject("n", CertRole::Worker),
                &[],
                Duration::from_secs(1000),
            )
            .unwrap();
        let id = Identity::from_pem(&cert).unwrap();
        let issued = id.not_before + BACKDATE;
        for _ in 0..50 {
            let f = renewal_fraction();
            assert!((0.5..=0.8).contains(&f), "{f}");
            let at = id.renew_at(f).duration_since(issued).unwrap().as_secs();
            assert!((499..=801).contains(&at), "{at}");
        }
    }

    #[test]
    fn roles_round_trip_through_the_ou() {
        for r in [CertRole::Manager, CertRole::Worker, CertRole::Admin] {
            assert_eq!(CertRole::from_ou(r.ou()), Some(r));
        }
        assert_eq!(CertRole::from_ou("swarm-worker"), None);
    }
}
