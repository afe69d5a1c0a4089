//! meshnet's cluster trust, after swarmkit's ca/ package: a root CA created by the manager at
//! first start, join tokens that pin it ([`token`]), node certificates issued against a CSR
//! ([`pki`]), mutual-TLS configurations for every connection ([`tls`]), credentials on disk
//! ([`files`]), and a joining node's first contact with the manager ([`join`]).

pub mod files;
pub mod join;
pub mod pki;
pub mod tls;
pub mod token;

use std::io;
use std::path::PathBuf;

pub use files::Credentials;
pub use pki::{Ca, CertRole, Identity, KeyRequest, Subject};
pub use proto::excerpt;
pub use token::JoinToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("{0}")]
    Token(String),
    #[error("the system gave no secure random numbers")]
    Random,
    #[error("the manager's CA does not match the join token: the manager at {0} belongs to another cluster, or something in between is not the manager")]
    CaMismatch(String),
    #[error("refused by the manager: {0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Net { what: String, source: io::Error },
    #[error("{0}")]
    Protocol(String),
    /// A follower's answer: only the leader of the managers takes joins.
    #[error("the manager at {addr} is not the leader ({})", leader_hint(.leader))]
    NotLeader {
        addr: String,
        leader: Option<String>,
    },
}

fn leader_hint(leader: &Option<String>) -> String {
    match leader {
        Some(l) => format!("the leader is at {}", excerpt(l)),
        None => "there is no leader right now".into(),
    }
}

impl Error {
    /// Whether trying again later may succeed (the manager was unreachable, or the managers
    /// were electing or moving their leader), as opposed to an answer that will not change (a
    /// wrong token, another cluster's manager).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Net { .. } | Error::NotLeader { .. })
    }
}
