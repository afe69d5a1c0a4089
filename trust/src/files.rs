//! Credentials on disk. Private keys are written 0600, every file atomically (a temp file
//! renamed over the old one), so a crash never leaves a half-written key.
//!
//! Layouts: a node keeps `ca.pem` and `node.pem` (certificate and key in one file, so a
//! renewal replaces both at once); a client bundle for meshctl is `ca.pem`, `cert.pem`,
//! `key.pem`, as Docker's `--tlsverify` directories are.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::pki::Identity;
use crate::Error;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

const CA: &str = "ca.pem";
const NODE: &str = "node.pem";
const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";

impl Credentials {
    /// A node's credentials in `dir`, or `None` if it has none yet.
    pub fn load_node(dir: &Path) -> Result<Option<Credentials>, Error> {
        let (Some(ca_pem), Some(node)) = (read(&dir.join(CA))?, read(&dir.join(NODE))?) else {
            return Ok(None);
        };
        let key_start = node
            .find("-----BEGIN PRIVATE KEY-----")
            .or_else(|| node.find("-----BEGIN EC PRIVATE KEY-----"))
            .ok_or_else(|| {
                Error::Parse(format!(
                    "{}: no private key in it",
                    dir.join(NODE).display()
                ))
            })?;
        Ok(Some(Credentials {
            ca_pem,
            cert_pem: node[..key_start].to_string(),
            key_pem: node[key_start..].to_string(),
        }))
    }

    pub fn store_node(&self, dir: &Path) -> Result<(), Error> {
        create_dir(dir)?;
        write(&dir.join(CA), &self.ca_pem, 0o644)?;
        let cert = self.cert_pem.trim_end();
        write(&dir.join(NODE), &format!("{cert}\n{}", self.key_pem), 0o600)
    }

    /// A meshctl client bundle in `dir`.
    pub fn load_client(dir: &Path) -> Result<Credentials, Error> {
        let need = |name: &str| {
            let path = dir.join(name);
            read(&path)?.ok_or_else(|| Error::File {
                what: "read the TLS client bundle file",
                path,
                source: io::ErrorKind::NotFound.into(),
            })
        };
        Ok(Credentials {
            ca_pem: need(CA)?,
            cert_pem: need(CERT)?,
            key_pem: need(KEY)?,
        })
    }

    pub fn store_client(&self, dir: &Path) -> Result<(), Error> {
        create_dir(dir)?;
        write(&dir.join(CA), &self.ca_pem, 0o644)?;
        write(&dir.join(KEY), &self.key_pem, 0o600)?;
        write(&dir.join(CERT), &self.cert_pem, 0o644)
    }

    pub fn identity(&self) -> Result<Identity, Error> {
        Identity::from_pem(&self.cert_pem)
    }

    /// A TLS client presenting these credentials and trusting only their CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        crate::tls::client_config(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)))
    }
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::File {
        what: "create the credentials dir",
        path: dir.to_path_buf(),
        source,
    })?;
    // Keys inside are 0600 anyway; the directory need not be listable by others either.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| Error::File {
        what: "restrict the credentials dir",
        path: dir.to_path_buf(),
        source,
    })
}

/// A file's contents, `None` if it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::File {
            what: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces `path` atomically with `contents`, created with `mode` (the temp file has it from
/// the start, so a key is never readable by others even for a moment).
pub fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let err = |source| Error::File {
        what: "write",
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    // An older file may have had looser bits; the rename keeps the new file's own.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertRole, Subject, DEFAULT_CERT_EXPIRY};

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("trust-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn creds() -> Credentials {
        let ca = Ca::generate("c").unwrap();
        let subject = Subject {
            common_name: "n1".into(),
            role: CertRole::Worker,
            cluster_id: "c".into(),
        };
        let (cert_pem, key_pem) = ca.issue(&subject, &[], DEFAULT_CERT_EXPIRY).unwrap();
        Credentials {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem,
            key_pem,
        }
    }

    #[test]
    fn node_credentials_round_trip_with_the_key_private() {
        let dir = tempdir("node");
        assert!(Credentials::load_node(&dir).unwrap().is_none());
        let c = creds();
        c.store_node(&dir).unwrap();
        let back = Credentials::load_node(&dir).unwrap().unwrap();
        assert_eq!(back.identity().unwrap().common_name, "n1");
        assert_eq!(back.key_pem, c.key_pem);
        back.client_config().unwrap();
        let mode = fs::metadata(dir.join("node.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn client_bundles_round_trip_and_a_missing_file_is_named() {
        let dir = tempdir("client");
        let c = creds();
        c.store_client(&dir).unwrap();
        assert_eq!(Credentials::load_client(&dir).unwrap(), c);
        let mode = fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_file(dir.join("cert.pem")).unwrap();
        let err = Credentials::load_client(&dir).unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
