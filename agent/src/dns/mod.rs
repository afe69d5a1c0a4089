//! The embedded DNS resolver: 127.0.0.11:53 inside every task's namespace, answering the
//! cluster's names scoped to the task's networks ([`records`], [`resolver`]) and forwarding
//! every other name to the node's upstreams ([`upstream`]).
//!
//! [`Dns`] follows the reconciler: the records are swapped on every pass (a change is answered
//! as soon as the agent applies it), and listeners are opened and closed with the tasks'
//! namespaces.

pub mod records;
pub mod resolver;
pub mod server;
pub mod upstream;
pub mod view;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use proto::agent::Assignment;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use self::records::Records;
use self::server::Shared;
use self::upstream::Forwarder;
use crate::metrics::AgentMetrics;

/// Why a task's listeners could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Opening, or entering, the task's namespace.
    #[error("DNS listener: {0}")]
    Netns(#[from] netns::Error),
    /// The thread binding inside the namespace panicked.
    #[error("DNS listener in {}: {source}", path.display())]
    Panicked {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("bind {} in {}: {source}", server::LISTEN, path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve DNS in {}: {source}", path.display())]
    Serve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Listener {
    /// The namespace it was opened in: a task namespace made anew needs a new listener.
    inode: u64,
    /// Dropping it closes the sockets and ends every connection.
    _serving: JoinSet<()>,
}

pub struct Dns {
    records: watch::Sender<Arc<Records>>,
    shared: Arc<Shared>,
    /// The runtime of every listener: one thread of its own, so that a query is answered
    /// without waking another thread, and reconcile work never delays it.
    rt: tokio::runtime::Handle,
    netns_dir: PathBuf,
    listeners: HashMap<String, Listener>,
}

impl Dns {
    pub fn new(
        netns_dir: PathBuf,
        forwarder: Forwarder,
        metrics: AgentMetrics,
    ) -> std::io::Result<Dns> {
        let (records, rx) = watch::channel(Arc::new(Records::default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("mesh-dns".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        Ok(Dns {
            records,
            shared: Arc::new(Shared::new(rx, forwarder, &metrics)),
            rt: handle,
            netns_dir,
            listeners: HashMap::new(),
        })
    }

    /// Every listener answers from `desired` from now on.
    pub fn update(&self, desired: &Assignment) {
        let new = Records::build(desired);
        self.records.send_if_modified(|cur| {
            let changed = **cur != new;
            if changed {
                *cur = Arc::new(new);
            }
            changed
        });
    }

    /// Opens the listeners of `task` inside its namespace (once per namespace).
    pub async fn open(&mut self, task: &str) -> Result<(), DnsError> {
        let path = self.netns_dir.join(task);
        let ns = netns::Netns::open(&path)?;
        let inode = ns.inode()?;
        if self.listeners.get(task).is_some_and(|l| l.inode == inode) {
            return Ok(());
        }
        // Sockets are made on a thread inside the namespace, then served by the runtime.
        let bound = match tokio::task::spawn_blocking(move || ns.run(server::bind)).await {
            Ok(ran) => ran?,
            Err(source) => return Err(DnsError::Panicked { path, source }),
        };
        let (udp, tcp) = bound.map_err(|source| DnsError::Bind {
            path: path.clone(),
            source,
        })?;
        let serving = server::serve(task.to_string(), udp, tcp, self.shared.clone(), &self.rt)
            .map_err(|source| DnsError::Serve { path, source })?;
        info!(task = %task, addr = %server::LISTEN, "DNS listening");
        self.listeners.insert(
            task.to_string(),
            Listener {
                inode,
                _serving: serving,
            },
        );
        Ok(())
    }

    /// Keeps (and opens, for adopted tasks) the listeners of `tasks`; closes the others, which
    /// also lets go of their namespaces.
    pub async fn retain(&mut self, tasks: &BTreeSet<String>) {
        self.listeners.retain(|name, _| tasks.contains(name));
        for task in tasks {
            if let Err(e) = self.open(task).await {
                warn!(task = %task, "{e}");
            }
        }
    }
}
