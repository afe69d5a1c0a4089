//! Overlay plumbing of one node, Swarm style: per overlay network a sandbox namespace
//! with a bridge (`br0`, holding the subnet's gateway IP) and a VXLAN device whose UDP
//! socket stays in the node's underlay namespace; veth endpoints from the bridge into
//! task namespaces; static neighbour and FDB entries for every remote endpoint (no
//! multicast, no learning from the wire).
//!
//! The API is synchronous, for the agent's blocking threads: each call does its netlink
//! work on a fresh thread inside the namespace concerned, so no thread of the caller
//! (or of any tokio runtime) ever changes namespace. Every `ensure_*`, `add_*`,
//! `remove_*` and `sync_*` call is idempotent. The decision of which peer entries to add
//! or remove is a pure function, [`plan_peers`].
//!
//! Only IPv4 underlays and overlays are supported.
//!
//! ```no_run
//! use std::path::Path;
//! use vxlan::{
//!     overlay_mtu, underlay_mtu, BridgeConfig, EndpointConfig, RemotePeer, Sandbox,
//!     VxlanConfig,
//! };
//! # fn main() -> Result<(), vxlan::Error> {
//! let node = netns::Netns::current()?;
//! let mtu = overlay_mtu(underlay_mtu(&node, "192.168.56.11".parse().unwrap())?, None)?;
//!
//! let dir = Path::new("/run/meshnet/netns");
//! let sandbox = Sandbox::open_or_create(dir, "1-abcdef0123")?;
//! sandbox.ensure_bridge(&BridgeConfig::new("10.0.0.1/24".parse().unwrap(), mtu))?;
//! sandbox.ensure_vxlan(&node, &VxlanConfig::new(4096, mtu))?;
//!
//! let task = netns::Netns::open_or_create(dir, "task-web.1")?;
//! sandbox.ensure_endpoint(&task, &EndpointConfig::new("eth0", "10.0.0.5/24".parse().unwrap(), mtu))?;
//!
//! // Every remote endpoint of the network, wherever it runs; reconciled on each change.
//! let peers = [RemotePeer::new("10.0.0.6".parse().unwrap(), "192.168.56.12".parse().unwrap())];
//! let changed = sandbox.sync_peers("vxlan0", &peers)?;
//! # let _ = changed;
//!
//! sandbox.delete()?; // when the last local endpoint has left
//! # Ok(()) }
//! ```

mod addr;
mod nl;
mod plan;
mod sandbox;

use std::io;

pub use addr::{host_ifname, overlay_mtu, MacAddr, ParseMacError, VXLAN_OVERHEAD};
pub use plan::{plan_peers, FdbEntry, FdbOwner, NeighEntry, PeerAction, RemotePeer};
pub use sandbox::{
    delete_sandbox, underlay_mtu, BridgeConfig, EndpointConfig, LinkKind, LinkState, Observed,
    RouteEntry, Sandbox, VxlanConfig, VxlanState, DEFAULT_VXLAN_PORT,
};

/// What went wrong, naming the operation, the object and the namespace, e.g.
/// `add fdb 02:42:0a:00:00:05 dst 192.168.56.12 on vxlan0 in 1-abcdef0123: No such device`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused a request.
    #[error("{op} in {ns}: {source}")]
    Kernel {
        op: String,
        ns: String,
        #[source]
        source: io::Error,
    },
    /// Something the operation needs is not there (e.g. the bridge for a port).
    #[error("{op} in {ns}: {what} does not exist")]
    Missing {
        op: String,
        ns: String,
        what: String,
    },
    /// Something is in the way (e.g. a non-bridge link named like the bridge).
    #[error("{op} in {ns}: {reason}")]
    Conflict {
        op: String,
        ns: String,
        reason: String,
    },
    /// Bad input, rejected before anything changed.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

impl Error {
    /// The errno behind a kernel error (e.g. `EEXIST` for a VNI already in use).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
