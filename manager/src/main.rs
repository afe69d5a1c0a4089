//! mesh-manager: keeps the cluster's desired state, allocates and schedules, serves the meshctl
//! API and pushes each node's assignment to its agent.

mod agents;
mod alloc;
mod api;
mod cluster;
mod sched;
mod state;
mod store;
mod views;
mod wire;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::cluster::{Cluster, Shared};
use crate::state::State;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "mesh-manager",
    version,
    about = "meshnet manager: desired state, scheduling, API"
)]
struct Args {
    /// TCP address for agents, e.g. 192.168.56.11:2377. An agent advertising this IP is the
    /// manager node (role manager); every other node is a worker.
    #[arg(long, env = "MESH_LISTEN")]
    listen: SocketAddr,
    /// Where the state file lives.
    #[arg(
        long,
        env = "MESH_DATA_DIR",
        default_value = "/var/lib/meshnet/manager"
    )]
    data_dir: PathBuf,
    /// Unix socket for meshctl.
    #[arg(long, env = "MESH_API_SOCKET", default_value = proto::api::DEFAULT_API_SOCKET)]
    api_socket: PathBuf,
    /// Also serve the meshctl API on TCP (unauthenticated: bind it to a trusted address only).
    #[arg(long, env = "MESH_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Subnet of the routing mesh's `ingress` network, used when the cluster is created; an
    /// existing cluster keeps its own. It must not contain any node's address.
    #[arg(long, env = "MESH_INGRESS_SUBNET", default_value = "10.255.0.0/16")]
    ingress_subnet: String,
}

fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        tracing::error!("{e:#}");
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (store, saved) = Store::open(&args.data_dir).context("open the state store")?;
    let (mut state, new) = match saved {
        Some(state) => {
            tracing::info!(
                path = %store.path().display(),
                nodes = state.nodes.len(),
                networks = state.networks.len(),
                services = state.services.len(),
                tasks = state.tasks.len(),
                revision = state.revision,
                "state loaded"
            );
            (state, false)
        }
        None => (State::default(), true),
    };
    state.agent_port = Some(args.listen.port());
    // Also for a state saved before the routing mesh existed: it gets its ingress network now.
    let changed = state
        .ensure_ingress(&args.ingress_subnet, args.listen.ip(), cluster::unix_now())
        .context("set up the routing mesh")?;
    if new || changed {
        store.save(&state).context("save the cluster")?;
    }
    if new {
        tracing::info!(path = %store.path().display(), "new cluster created");
    }
    let cluster: Shared = Arc::new(Mutex::new(Cluster::new(state, store, args.listen.ip())));

    let agents = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen for agents on {}", args.listen))?;
    let unix = bind_api_socket(&args.api_socket)?;
    tracing::info!(agents = %args.listen, api = %args.api_socket.display(), "listening");
    tokio::spawn(agents::serve(agents, cluster.clone()));
    tokio::spawn(agents::tick(cluster.clone()));
    tokio::spawn(api::serve_unix(unix, cluster.clone()));
    if let Some(addr) = args.api_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for the API on {addr}"))?;
        tracing::info!(api = %addr, "listening for the API on TCP");
        tokio::spawn(api::serve_tcp(tcp, cluster.clone()));
    }

    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = std::fs::remove_file(&args.api_socket);
    Ok(())
}

/// Binds the API socket, replacing a stale socket file but never a live manager's.
fn bind_api_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the API socket dir {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "API socket {}: another manager is listening on it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove the stale API socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("listen for the API on {}", path.display()))?;
    // Whoever can reach the socket controls the cluster: owner and group only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("restrict the API socket {}", path.display()))?;
    Ok(listener)
}
