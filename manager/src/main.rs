//! mesh-manager: keeps the cluster's desired state, allocates and schedules, serves the meshctl
//! API and pushes each node's assignment to its agent.

mod agents;
mod alloc;
mod api;
mod certs;
mod cluster;
mod discovery;
mod etcd;
mod keys;
mod leadership;
mod limits;
mod metrics;
mod outbox;
mod records;
mod reports;
mod rollout;
mod sched;
mod state;
mod store;
mod views;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use proto::model::Role;

use crate::cluster::{lock, Cluster, Shared};
use crate::state::State;
use crate::store::FileStore;

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
    /// Also serve the meshctl API on TCP, over TLS, to clients with an admin or manager
    /// certificate of the cluster (the manager writes one to <data-dir>/client/).
    #[arg(long, env = "MESH_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// The address agents reach this manager at, printed by `meshctl join-token`; by default
    /// the --listen address.
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise_addr: Option<std::net::IpAddr>,
    /// The operator's own root CA certificate (PEM), used instead of creating one. Only when the
    /// cluster is created; later starts must give the same one or none.
    #[arg(long, env = "MESH_EXTERNAL_CA_CERT", requires = "external_ca_key")]
    external_ca_cert: Option<PathBuf>,
    /// The key of --external-ca-cert (PEM).
    #[arg(long, env = "MESH_EXTERNAL_CA_KEY", requires = "external_ca_cert")]
    external_ca_key: Option<PathBuf>,
    /// Lifetime of node certificates (e.g. 90d, 2160h, 30m); nodes renew at a random point
    /// between 50 % and 80 % of it.
    #[arg(long, env = "MESH_CERT_EXPIRY", default_value = "90d", value_parser = parse_cert_expiry)]
    cert_expiry: std::time::Duration,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Subnet of the routing mesh's `ingress` network, used when the cluster is created; an
    /// existing cluster keeps its own. It must not contain any node's address.
    #[arg(long, env = "MESH_INGRESS_SUBNET", default_value = "10.255.0.0/16")]
    ingress_subnet: String,
    /// Serve Prometheus metrics (meshnet_manager_*) on ADDR:PORT at /metrics [default: none].
    #[arg(long, env = "MESH_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How often the IPsec keys of encrypted networks rotate (e.g. 12h, 30m; at least 10s).
    /// Each rotation moves on as the nodes confirm its steps: a new key is received with
    /// everywhere before any node sends with it.
    #[arg(long, env = "MESH_ENCRYPTION_KEY_ROTATION", default_value = "12h", value_parser = parse_key_rotation)]
    encryption_key_rotation: std::time::Duration,
    /// Encrypt the routing mesh's ingress network (IPsec ESP, like `--opt encrypted`), at every
    /// start: nodes that cannot do ESP are left without a routing mesh rather than carry its
    /// traffic in clear (`meshctl node inspect` says so).
    #[arg(long, env = "MESH_INGRESS_ENCRYPTED")]
    ingress_encrypted: bool,
    /// Where the desired state is kept: `file` (one JSON file in --data-dir: one manager, nothing
    /// else to run) or `etcd://HOST:PORT[,HOST:PORT...]` (several managers share it; one is
    /// elected leader; needs --api-listen, where the others forward requests).
    #[arg(long, env = "MESH_STORE", default_value = "file")]
    store: String,
    /// The CA certificate (PEM) that etcd's server certificates are checked with: etcd is then
    /// reached over TLS.
    #[arg(long, env = "MESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// This manager's client certificate for etcd (PEM), with --etcd-key.
    #[arg(long, env = "MESH_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "MESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Moves a single manager's state (its --data-dir, with the cluster's CA) into an empty
    /// etcd, once, when this manager is first elected. Refused if etcd holds a cluster.
    #[arg(long)]
    import: Option<PathBuf>,
}

/// What every leader does to a state it takes over (also at the first start): configuration
/// that may have changed since it was saved, and what a new cluster needs first.
struct Startup {
    ingress_subnet: String,
    listen_ip: std::net::IpAddr,
    ingress_encrypted: bool,
    key_rotation_secs: u64,
    agent_port: u16,
    api_port: Option<u16>,
}

impl Startup {
    /// Brings `state` up to date; true if it changed what is stored.
    fn prepare(&self, state: &mut State, pki: &certs::Pki) -> anyhow::Result<bool> {
        state.agent_port = Some(self.agent_port);
        state.api_port = self.api_port;
        // Also for a state saved before the routing mesh existed: it gets its ingress network now.
        let mut changed = state
            .ensure_ingress(&self.ingress_subnet, self.listen_ip, proto::unix_now())
            .context("set up the routing mesh")?;
        if state.set_ingress_encrypted(self.ingress_encrypted) {
            tracing::info!(
                encrypted = self.ingress_encrypted,
                "the ingress network's encryption changed"
            );
            changed = true;
        }
        // An encrypted ingress network needs the keys before any node is given it.
        let keys = state.esp_keys.clone();
        state.rotate_keys(
            proto::unix_now_ms(),
            self.key_rotation_secs,
            &mut cluster::fresh_esp_key,
        );
        changed |= state.esp_keys != keys;
        for r in state.nodes.values() {
            if let Some(why) = state.no_routing_mesh(&r.node.id) {
                tracing::warn!(node = %r.node.hostname, "no routing mesh on this node: {why}");
            }
        }
        // Assignments are not stored: every node gets its own anew, under a new revision.
        changed |= !state.refresh_assignments().is_empty();
        for role in [Role::Worker, Role::Manager] {
            if state.join_secrets.get(role).is_none() {
                let token =
                    trust::JoinToken::generate(pki.ca_pem()).context("make a join token")?;
                state.join_secrets.set(role, token.secret);
                changed = true;
            }
        }
        Ok(changed)
    }
}

fn parse_key_rotation(s: &str) -> Result<std::time::Duration, String> {
    let d = certs::parse_duration(s)?;
    // Rotations this close would each hardly be through before the next begins.
    if d < std::time::Duration::from_secs(10) {
        return Err(format!("{s} is shorter than the minimum of 10s"));
    }
    Ok(d)
}

fn parse_cert_expiry(s: &str) -> Result<std::time::Duration, String> {
    let d = certs::parse_duration(s)?;
    if d < trust::pki::MIN_CERT_EXPIRY {
        return Err(format!(
            "{s} is shorter than the minimum of {}s",
            trust::pki::MIN_CERT_EXPIRY.as_secs()
        ));
    }
    Ok(d)
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
    raise_file_limit();
    let advertise = args.advertise_addr.unwrap_or(args.listen.ip());
    let mut sans = vec![advertise.to_string()];
    if !args.listen.ip().is_unspecified() && args.listen.ip() != advertise {
        sans.push(args.listen.ip().to_string());
    }
    let startup = Startup {
        ingress_subnet: args.ingress_subnet.clone(),
        listen_ip: args.listen.ip(),
        ingress_encrypted: args.ingress_encrypted,
        key_rotation_secs: args.encryption_key_rotation.as_secs(),
        agent_port: args.listen.port(),
        api_port: args.api_listen.map(|a| a.port()),
    };
    let me = etcd::ManagerInfo {
        addr: advertise,
        agents: SocketAddr::new(advertise, args.listen.port()).to_string(),
        api: args
            .api_listen
            .map(|a| SocketAddr::new(advertise, a.port()).to_string())
            .unwrap_or_default(),
    };
    let mut campaign = None;
    let cluster = if args.store == "file" {
        if args.import.is_some() {
            bail!("--import moves a state into etcd: it needs --store etcd://...");
        }
        let (mut store, saved) = FileStore::open(&args.data_dir).context("open the state store")?;
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
        let mut changed = false;
        if state.cluster_id.is_empty() {
            state.cluster_id = alloc::new_id();
            changed = true;
        }
        let pki = certs::Pki::open(
            &args.data_dir,
            external_ca(&args),
            &state.cluster_id,
            args.cert_expiry,
            sans,
        )
        .context("set up the cluster's certificates")?;
        changed |= startup.prepare(&mut state, &pki)?;
        if new || changed {
            store.snapshot(&state).context("save the cluster")?;
        }
        if new {
            tracing::info!(path = %store.path().display(), cluster = %state.cluster_id, "new cluster created");
        }
        Cluster::new(state, Box::new(store), true, me.clone(), Arc::new(pki))
    } else {
        if args.api_listen.is_none() {
            bail!("--store etcd://... needs --api-listen: the other managers forward requests to the leader's API");
        }
        let tls = match &args.etcd_ca {
            Some(ca) => Some(etcd::EtcdTls {
                ca: read_pem(ca)?,
                identity: match (&args.etcd_cert, &args.etcd_key) {
                    (Some(c), Some(k)) => Some((read_pem(c)?, read_pem(k)?)),
                    _ => None,
                },
            }),
            None => None,
        };
        let config = etcd::EtcdConfig::parse(&args.store, tls).map_err(anyhow::Error::msg)?;
        let client = etcd::Etcd::connect(&config).await?;
        client.wait_ready().await?;
        let imported = match &args.import {
            Some(dir) => Some(import_from(&client, dir, &args.data_dir).await?),
            None => None,
        };
        let pki = shared_pki(&client, &args, imported.as_ref(), sans).await?;
        let (store, fence) = etcd::EtcdStore::new(client.clone());
        campaign = Some((client, fence, imported));
        Cluster::new(
            State::default(),
            Box::new(store),
            false,
            me.clone(),
            Arc::new(pki),
        )
    };
    let pki = cluster.pki_arc();
    let cluster: Shared = Arc::new(Mutex::new(cluster));
    lock(&cluster).set_key_rotation(args.encryption_key_rotation);
    let etcd_client = campaign.as_ref().map(|(c, ..)| c.clone());
    if let Some((client, fence, imported)) = campaign {
        tokio::spawn(leadership::run(
            client,
            cluster.clone(),
            fence,
            startup,
            imported,
            pki.clone(),
            me,
        ));
    }

    let agents = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen for agents on {}", args.listen))?;
    let unix = bind_api_socket(&args.api_socket)?;
    tracing::info!(agents = %args.listen, api = %args.api_socket.display(), "listening");
    let inbox = Arc::new(reports::Inbox::default());
    {
        let (inbox, cluster) = (inbox.clone(), cluster.clone());
        std::thread::Builder::new()
            .name("agent-reports".into())
            .spawn(move || reports::apply_forever(&inbox, &cluster))
            .context("start the agent reports thread")?;
    }
    tokio::spawn(agents::serve(
        agents,
        cluster.clone(),
        inbox,
        pki.agent_tls.clone(),
    ));
    tokio::spawn(agents::tick(cluster.clone()));
    tokio::spawn(api::serve_unix(unix, cluster.clone()));
    tokio::spawn(pki.clone().renew_own());
    if let Some(addr) = args.api_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for the API on {addr}"))?;
        tracing::info!(api = %addr, "listening for the API on TCP (TLS, admin or manager certificates only)");
        tokio::spawn(api::serve_tcp(tcp, cluster.clone(), pki.api_tls.clone()));
    }
    if let Some(addr) = args.metrics_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for metrics on {addr}"))?;
        let metrics = metrics::ManagerMetrics::default();
        let mut registry = mesh_metrics::Registry::with_prefix("meshnet_manager");
        metrics.register(&mut registry);
        let shared = cluster.clone();
        tokio::spawn(mesh_metrics::serve(
            tcp,
            Arc::new(std::sync::Mutex::new(registry)),
            move || metrics.update(&cluster::lock(&shared)),
        ));
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    // Every listener is bound: agents and meshctl can connect (systemd's Type=notify).
    if let Err(e) = proto::sd_notify::ready() {
        tracing::warn!("tell systemd the manager is ready: {e}");
    }

    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    // The others need not wait out the lease to elect a new leader.
    if let Some(client) = etcd_client {
        client.revoke().await;
    }
    let _ = std::fs::remove_file(&args.api_socket);
    Ok(())
}

/// The cluster's CA as etcd has it, or this manager's (new, imported or the operator's)
/// stored there when etcd has none. Managers started together race to store theirs: a loser
/// that made its CA just now drops it and takes the winner's.
async fn shared_pki(
    client: &etcd::Etcd,
    args: &Args,
    imported: Option<&State>,
    sans: Vec<String>,
) -> anyhow::Result<certs::Pki> {
    let had_ca = certs::has_ca(&args.data_dir);
    for _ in 0..2 {
        let cluster_id = match client.ca().await? {
            Some(ca) => {
                certs::install_ca(&args.data_dir, &ca.cert, &ca.key)?;
                return certs::Pki::open(
                    &args.data_dir,
                    external_ca(args),
                    &ca.cluster_id,
                    args.cert_expiry,
                    sans,
                )
                .context("set up the cluster's certificates");
            }
            None => imported
                .map(|s| s.cluster_id.clone())
                .filter(|id| !id.is_empty())
                .unwrap_or_else(alloc::new_id),
        };
        let pki = certs::Pki::open(
            &args.data_dir,
            external_ca(args),
            &cluster_id,
            args.cert_expiry,
            sans.clone(),
        )
        .context("set up the cluster's certificates")?;
        let (cert, key) = pki.ca_pems();
        let record = etcd::CaRecord {
            cluster_id,
            cert,
            key,
        };
        if client.put_ca_if_absent(&record).await? {
            tracing::info!(etcd = %client.endpoints(), "stored the cluster's CA in etcd");
            return Ok(pki);
        }
        if had_ca {
            bail!("etcd at {} holds another cluster's CA than {}: give this manager an empty --data-dir", client.endpoints(), args.data_dir.display());
        }
        certs::forget_ca(&args.data_dir)?;
    }
    bail!("the cluster's CA in etcd changed twice while this manager started: start it again")
}

/// `--external-ca-cert` with `--external-ca-key`, if given.
fn external_ca(args: &Args) -> Option<certs::ExternalCa<'_>> {
    args.external_ca_cert
        .as_deref()
        .zip(args.external_ca_key.as_deref())
        .map(|(cert, key)| certs::ExternalCa { cert, key })
}

fn read_pem(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// `--import DIR`: the state and CA of a single manager's data dir, for an empty etcd.
async fn import_from(client: &etcd::Etcd, dir: &Path, data_dir: &Path) -> anyhow::Result<State> {
    if !etcd::is_empty(client).await? {
        bail!(
            "--import {}: etcd at {} already holds a cluster; it is not overwritten",
            dir.display(),
            client.endpoints()
        );
    }
    let (_, state) = FileStore::open(dir).context("open the state to import")?;
    let state =
        state.with_context(|| format!("--import {}: no state.json there", dir.display()))?;
    let tls = dir.join("tls");
    let cert = read_pem(&tls.join("ca.pem"))?;
    let key = read_pem(&tls.join("ca-key.pem"))?;
    certs::install_ca(data_dir, &cert, &key)?;
    tracing::info!(from = %dir.display(), nodes = state.nodes.len(), services = state.services.len(), "importing the state when elected");
    Ok(state)
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
    // Whoever can reach the socket controls the cluster, and so every node as root: root only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restrict the API socket {}", path.display()))?;
    Ok(listener)
}

/// Every agent and API connection is a file descriptor: take all the kernel allows, so the
/// connection caps (not the default soft limit of 1024) are what bounds them.
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "raise the open file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
