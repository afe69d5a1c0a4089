use std::io;

/// An IPVS operation that failed. Every variant names the operation and the object, e.g.
/// `add destination 10.0.0.2:0 to service FWM 256: File exists (errno 17)`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no "IPVS" generic netlink family: IPVS is not built in, and no `ip_vs`
    /// module could be loaded (the kernel tries when the family is resolved). Callers can fall
    /// back to another load balancer.
    #[error("IPVS is not available in this kernel (no generic netlink family \"IPVS\", built in or as a module the kernel could load)")]
    NoIpvs,
    /// The service (ESRCH) or destination (ENOENT) does not exist.
    #[error("{op}: {}", kernel_message(*.errno, .ext_ack))]
    NotFound {
        op: String,
        errno: i32,
        ext_ack: Option<String>,
    },
    /// The service or destination already exists (EEXIST).
    #[error("{op}: {}", kernel_message(*.errno, .ext_ack))]
    Exists {
        op: String,
        errno: i32,
        ext_ack: Option<String>,
    },
    /// Adding or updating a service named a scheduler the kernel has no module for
    /// (the kernel answers ENOENT).
    #[error("{op}: unknown scheduler {scheduler:?} (no kernel module ip_vs_{scheduler}): {}", kernel_message(*.errno, .ext_ack))]
    UnknownScheduler {
        op: String,
        scheduler: String,
        errno: i32,
        ext_ack: Option<String>,
    },
    /// Any other error the kernel returned.
    #[error("{op}: {}", kernel_message(*.errno, .ext_ack))]
    Kernel {
        op: String,
        errno: i32,
        ext_ack: Option<String>,
    },
    /// The netlink socket failed.
    #[error("{op}: netlink socket: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's reply could not be decoded.
    #[error("{op}: malformed reply from the kernel: {reason}")]
    Decode { op: String, reason: String },
    /// The request was refused before anything was sent.
    #[error("{op}: {reason}")]
    Invalid { op: String, reason: String },
}

impl Error {
    /// The kernel's errno, for errors the kernel returned.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::NotFound { errno, .. }
            | Error::Exists { errno, .. }
            | Error::UnknownScheduler { errno, .. }
            | Error::Kernel { errno, .. } => Some(*errno),
            Error::Io { source, .. } => source.raw_os_error(),
            Error::NoIpvs | Error::Decode { .. } | Error::Invalid { .. } => None,
        }
    }

    /// The kernel's extended-ack message, when it gave one.
    pub fn ext_ack(&self) -> Option<&str> {
        match self {
            Error::NotFound { ext_ack, .. }
            | Error::Exists { ext_ack, .. }
            | Error::UnknownScheduler { ext_ack, .. }
            | Error::Kernel { ext_ack, .. } => ext_ack.as_deref(),
            _ => None,
        }
    }
}

/// "File exists (errno 17)", with the extended-ack text appended when there is one.
fn kernel_message(errno: i32, ext_ack: &Option<String>) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {errno})"))
        .unwrap_or(&text);
    match ext_ack {
        Some(m) => format!("{text} (errno {errno}): {m}"),
        None => format!("{text} (errno {errno})"),
    }
}

/// Failures of a batch ([`crate::Client::apply`]), by index into the operations.
#[derive(Debug, thiserror::Error)]
#[error("{} of {total} IPVS operations failed, the first: {}", .failures.len(), first(.failures))]
pub struct BatchError {
    pub total: usize,
    /// `(index, error)` in operation order; never empty.
    pub failures: Vec<(usize, Error)>,
}

fn first(failures: &[(usize, Error)]) -> String {
    failures
        .first()
        .map(|(i, e)| format!("#{i}: {e}"))
        .unwrap_or_default()
}

impl BatchError {
    /// The first failure, for callers that treat any failure as fatal.
    pub fn into_first(self) -> Error {
        self.failures
            .into_iter()
            .next()
            .map(|(_, e)| e)
            .expect("a BatchError holds at least one failure")
    }
}
