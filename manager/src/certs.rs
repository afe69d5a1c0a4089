//! The manager's side of the cluster's trust: the root CA in `<data-dir>/tls/` (made at first
//! start, or brought by the operator), join tokens checked against it, node certificates issued
//! on join and renewal, the manager's own certificate (renewed while it runs), and the admin
//! client bundle in `<data-dir>/client/` for meshctl over TCP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use proto::model::Role;
use trust::pki::{renewal_fraction, MANAGER_SERVER_NAME};
use trust::tls::{certified_key, server_config, CertSlot, ClientAuth};
use trust::{files, Ca, CertRole, Credentials, Identity, JoinToken, Subject};

use crate::state::JoinSecrets;

/// The admin bundle lasts longer than node certificates: a person, not a process, renews it
/// (by restarting the manager once it is past half its life).
const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct Pki {
    ca: Ca,
    cluster_id: String,
    cert_expiry: Duration,
    own: Arc<CertSlot>,
    own_sans: Vec<String>,
    pub agent_tls: Arc<rustls::ServerConfig>,
    pub api_tls: Arc<rustls::ServerConfig>,
    /// A follower's client for the leader's API: an admin certificate of its own, in memory.
    pub forward_tls: Arc<rustls::ClientConfig>,
}

pub struct ExternalCa<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

pub fn client_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("client")
}

impl Pki {
    /// Loads the cluster's CA from the data dir, or creates it (or takes the operator's) at
    /// first start; issues the manager's own certificate and, when missing or aging, the admin
    /// client bundle.
    pub fn open(
        data_dir: &Path,
        external: Option<ExternalCa<'_>>,
        cluster_id: &str,
        cert_expiry: Duration,
        sans: Vec<String>,
    ) -> anyhow::Result<Pki> {
        let dir = tls_dir(data_dir);
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let stored = files::read(&cert_path)?.zip(files::read(&key_path)?);
        let ca = match (stored, external) {
            (Some((cert, key)), external) => {
                let ca = Ca::from_pem(&cert, &key)
                    .with_context(|| format!("load the cluster CA from {}", dir.display()))?;
                if let Some(ext) = external {
                    let given = read_external(&ext)?;
                    if given.cert_pem() != ca.cert_pem() {
                        bail!(
                            "--external-ca-cert {} is not this cluster's CA ({}): an external CA can only be given when the cluster is created",
                            ext.cert.display(),
                            cert_path.display()
                        );
                    }
                }
                ca
            }
            (None, Some(ext)) => {
                let ca = read_external(&ext)?;
                tracing::info!(cert = %ext.cert.display(), "using the operator's CA");
                store_ca(&ca, &cert_path, &key_path)?;
                ca
            }
            (None, None) => {
                let ca = Ca::generate(cluster_id).context("create the cluster CA")?;
                store_ca(&ca, &cert_path, &key_path)?;
                tracing::info!(path = %cert_path.display(), "created the cluster's root CA");
                ca
            }
        };
        let subject = Subject {
            common_name: MANAGER_SERVER_NAME.into(),
            role: CertRole::Manager,
            cluster_id: cluster_id.into(),
        };
        let (cert, key) = ca
            .issue(&subject, &sans, cert_expiry)
            .context("issue the manager's certificate")?;
        let own = CertSlot::new(certified_key(&cert, &key)?);
        let forward = Subject {
            common_name: "manager-forward".into(),
            role: CertRole::Admin,
            cluster_id: cluster_id.into(),
        };
        let (fcert, fkey) = ca
            .issue(&forward, &[], ADMIN_LIFETIME)
            .context("issue the forwarding client certificate")?;
        let pki = Pki {
            forward_tls: trust::tls::client_config(ca.cert_pem(), Some((&fcert, &fkey)))
                .context("the forwarding client's TLS")?,
            agent_tls: server_config(ca.cert_pem(), own.clone(), ClientAuth::Optional)?,
            api_tls: server_config(ca.cert_pem(), own.clone(), ClientAuth::Required)?,
            ca,
            cluster_id: cluster_id.into(),
            cert_expiry,
            own,
            own_sans: sans,
        };
        pki.ensure_admin_bundle(&client_dir(data_dir))?;
        Ok(pki)
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn token(&self, secret: [u8; 16]) -> JoinToken {
        JoinToken {
            ca_digest: trust::token::ca_digest(self.ca.cert_pem()),
            secret,
        }
    }

    /// The role a join token admits, or why it admits nobody.
    pub fn check_token(&self, token: &str, secrets: &JoinSecrets) -> Result<Role, String> {
        let token: JoinToken = token.parse().map_err(|e: trust::Error| e.to_string())?;
        if !token.pins(self.ca.cert_pem()) {
            return Err(
                "the join token is for another cluster (its CA digest is not this cluster's)"
                    .into(),
            );
        }
        // Both are compared, whichever matches, so the time taken says nothing about which.
        let worker = secrets
            .get(Role::Worker)
            .is_some_and(|s| token.secret_is(&s));
        let manager = secrets
            .get(Role::Manager)
            .is_some_and(|s| token.secret_is(&s));
        match (worker, manager) {
            (true, _) => Ok(Role::Worker),
            (_, true) => Ok(Role::Manager),
            _ => Err("invalid join token: it was rotated, or never issued by this cluster (meshctl join-token worker prints the current one)".into()),
        }
    }

    /// A certificate for node `node_id` with `role`, for the key in `csr`.
    pub fn sign_node(&self, csr: &str, node_id: &str, role: Role) -> Result<String, trust::Error> {
        let subject = Subject {
            common_name: node_id.into(),
            role: match role {
                Role::Manager => CertRole::Manager,
                Role::Worker => CertRole::Worker,
            },
            cluster_id: self.cluster_id.clone(),
        };
        self.ca.sign_request(csr, &subject, self.cert_expiry)
    }

    fn ensure_admin_bundle(&self, dir: &Path) -> anyhow::Result<()> {
        if let Ok(existing) = Credentials::load_client(dir) {
            let fresh = existing.ca_pem == self.ca.cert_pem()
                && existing
                    .identity()
                    .is_ok_and(|id| id.renew_at(0.5) > SystemTime::now());
            if fresh {
                return Ok(());
            }
        }
        let subject = Subject {
            common_name: "admin".into(),
            role: CertRole::Admin,
            cluster_id: self.cluster_id.clone(),
        };
        let (cert_pem, key_pem) = self
            .ca
            .issue(&subject, &[], ADMIN_LIFETIME)
            .context("issue the admin client certificate")?;
        Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem,
            key_pem,
        }
        .store_client(dir)?;
        tracing::info!(dir = %dir.display(), "wrote the admin client bundle for meshctl --tls-dir");
        Ok(())
    }

    /// The CA's certificate and key (PEM), shared through etcd with the other managers.
    pub fn ca_pems(&self) -> (String, String) {
        (self.ca.cert_pem().to_string(), self.ca.key_pem())
    }

    /// Replaces the manager's own certificate at 50-80 % of its life, for as long as it runs;
    /// connections open meanwhile are not touched.
    pub async fn renew_own(self: Arc<Self>) {
        let subject = Subject {
            common_name: MANAGER_SERVER_NAME.into(),
            role: CertRole::Manager,
            cluster_id: self.cluster_id.clone(),
        };
        let mut renew_at = SystemTime::now() + self.cert_expiry.mul_f64(renewal_fraction());
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            let issued = self
                .ca
                .issue(&subject, &self.own_sans, self.cert_expiry)
                .map_err(anyhow::Error::from)
                .and_then(|(cert, key)| {
                    let id = Identity::from_pem(&cert)?;
                    self.own.replace(certified_key(&cert, &key)?);
                    Ok(id)
                });
            match issued {
                Ok(id) => {
                    tracing::info!("renewed the manager's certificate");
                    renew_at = id.renew_at(renewal_fraction());
                }
                Err(e) => {
                    tracing::error!("renew the manager's certificate: {e:#}");
                    renew_at = SystemTime::now() + Duration::from_secs(10);
                }
            }
        }
    }
}

fn read_external(ext: &ExternalCa<'_>) -> anyhow::Result<Ca> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .with_context(|| format!("read the external CA file {}", p.display()))
    };
    Ca::from_pem(&read(ext.cert)?, &read(ext.key)?).context("the external CA")
}

fn store_ca(ca: &Ca, cert: &Path, key: &Path) -> anyhow::Result<()> {
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restrict {}", dir.display()))?;
    }
    files::write(key, &ca.key_pem(), 0o600)?;
    files::write(cert, ca.cert_pem(), 0o644)?;
    Ok(())
}

/// Whether the data dir holds a CA.
pub fn has_ca(data_dir: &Path) -> bool {
    tls_dir(data_dir).join("ca.pem").exists()
}

/// Removes a CA this manager made a moment ago and that another manager's replaced.
pub fn forget_ca(data_dir: &Path) -> anyhow::Result<()> {
    for f in ["ca.pem", "ca-key.pem"] {
        let path = tls_dir(data_dir).join(f);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Puts the cluster's CA, as another manager made it, in this manager's data dir, where
/// [`Pki::open`] finds it. A data dir that holds another CA belongs to another cluster: refused.
pub fn install_ca(data_dir: &Path, cert: &str, key: &str) -> anyhow::Result<()> {
    let dir = tls_dir(data_dir);
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if let Some(existing) = files::read(&cert_path)? {
        if existing.trim() != cert.trim() {
            bail!(
                "{} holds another cluster's CA than the one in etcd: give this manager an empty --data-dir",
                cert_path.display()
            );
        }
        return Ok(());
    }
    let ca = Ca::from_pem(cert, key).context("the CA in etcd")?;
    store_ca(&ca, &cert_path, &key_path)
}

/// Parses `90d`, `2160h`, `30m`, `45s` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| {
        format!(
            "invalid duration {}: expected e.g. 90d, 2160h, 30m, 45s",
            proto::excerpt(s)
        )
    })?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "invalid duration {}: the unit must be s, m, h or d",
                proto::excerpt(s)
            ))
        }
    };
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration {}: too long", proto::excerpt(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn secrets() -> JoinSecrets {
        let mut s = JoinSecrets::default();
        s.set(Role::Worker, [1; 16]);
        s.set(Role::Manager, [2; 16]);
        s
    }

    #[test]
    fn the_ca_is_made_once_with_a_private_key_and_reused() {
        let tmp = TempDir::new("pki");
        let sans = vec!["127.0.0.1".to_string()];
        let a = Pki::open(&tmp.0, None, "c1", Duration::from_secs(3600), sans.clone()).unwrap();
        let key = tmp.0.join("tls/ca-key.pem");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let client_key = tmp.0.join("client/key.pem");
        assert_eq!(
            std::fs::metadata(&client_key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = Pki::open(&tmp.0, None, "c1", Duration::from_secs(3600), sans).unwrap();
        assert_eq!(a.ca_pem(), b.ca_pem());
        let admin = Credentials::load_client(&tmp.0.join("client")).unwrap();
        assert_eq!(admin.identity().unwrap().role, Some(CertRole::Admin));
    }

    #[test]
    fn an_external_ca_is_taken_at_creation_and_must_stay() {
        let tmp = TempDir::new("pki-ext");
        let ext = Ca::generate("c1").unwrap();
        std::fs::write(tmp.0.join("ca.pem"), ext.cert_pem()).unwrap();
        std::fs::write(tmp.0.join("ca.key"), ext.key_pem()).unwrap();
        let data = tmp.0.join("data");
        let (cert, key) = (tmp.0.join("ca.pem"), tmp.0.join("ca.key"));
        let given = || {
            Some(ExternalCa {
                cert: &cert,
                key: &key,
            })
        };
        let pki = Pki::open(&data, given(), "c1", Duration::from_secs(3600), vec![]).unwrap();
        assert_eq!(pki.ca_pem(), ext.cert_pem());
        Pki::open(&data, given(), "c1", Duration::from_secs(3600), vec![]).unwrap();
        let other = Ca::generate("c2").unwrap();
        std::fs::write(&cert, other.cert_pem()).unwrap();
        std::fs::write(&key, other.key_pem()).unwrap();
        let err = Pki::open(&data, given(), "c1", Duration::from_secs(3600), vec![])
            .err()
            .unwrap();
        assert!(err.to_string().contains("not this cluster's CA"), "{err}");
    }

    #[test]
    fn tokens_admit_their_role_and_nothing_else() {
        let tmp = TempDir::new("pki-token");
        let pki = Pki::open(&tmp.0, None, "c1", Duration::from_secs(3600), vec![]).unwrap();
        let s = secrets();
        let worker = pki.token(s.get(Role::Worker).unwrap()).to_string();
        let manager = pki.token(s.get(Role::Manager).unwrap()).to_string();
        assert_eq!(pki.check_token(&worker, &s), Ok(Role::Worker));
        assert_eq!(pki.check_token(&manager, &s), Ok(Role::Manager));
        let stale = pki.token([3; 16]).to_string();
        assert!(pki
            .check_token(&stale, &s)
            .unwrap_err()
            .starts_with("invalid join token"));
        let foreign = JoinToken {
            ca_digest: [9; 32],
            secret: [1; 16],
        }
        .to_string();
        assert!(pki
            .check_token(&foreign, &s)
            .unwrap_err()
            .contains("another cluster"));
        assert!(pki
            .check_token("garbage", &s)
            .unwrap_err()
            .starts_with("invalid join token"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(
            parse_duration("2160h"),
            Ok(Duration::from_secs(2160 * 3600))
        );
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["", "d", "1w", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
