//! `mesh-agent`: reconciles this node's kernel state (overlay sandboxes, endpoints, peers, the
//! gwbridge, the routing mesh's ingress_sbox, nftables tables and load balancer) and its tasks'
//! processes to the desired state the manager assigns.

mod apply;
mod cleanup;
mod conn;
mod dns;
mod esp;
mod health;
mod join;
mod lb;
mod lifecycle;
mod managers;
mod mesh;
mod metrics;
mod names;
mod netwatch;
mod observe;
mod outbox;
mod plan;
mod reconcile;
mod rules;
mod state;
mod tasks;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use netns::Netns;

use crate::apply::{Kernel, NetKernel};
use crate::lb::{LbOptions, Timeouts};
use crate::observe::ObsCache;
use crate::plan::Settings;
use proto::agent::EspSupport;
use proto::model::LbKind;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "meshnet node agent: overlays, routing mesh and tasks"
)]
struct Flags {
    /// A manager's agent endpoint, ADDR:PORT (its --listen). With several managers, repeat it
    /// or give a comma-separated list (MESH_MANAGER=a:2377,b:2377): the agent finds the leader
    /// among them, and also remembers the managers the leader lists (<state-dir>/managers.json).
    #[arg(long, env = "MESH_MANAGER", value_name = "ADDR:PORT", value_parser = managers::parse_manager, value_delimiter = ',', required_unless_present = "cleanup")]
    manager: Vec<String>,
    /// This node's underlay address: the VTEP other nodes send VXLAN traffic to.
    #[arg(long, env = "MESH_ADVERTISE_ADDR", required_unless_present = "cleanup")]
    advertise_addr: Option<IpAddr>,
    /// Removes everything meshnet made on this node (tasks' processes, the namespaces in
    /// <state-dir>/netns with their IPVS services, the gwbridge, the nft table `ip meshnet`)
    /// and exits. Stop the agent first. The node's certificate stays in <state-dir>.
    #[arg(long)]
    cleanup: bool,
    /// The node's name at the manager [default: the system hostname].
    #[arg(long, env = "MESH_HOSTNAME")]
    hostname: Option<String>,
    /// Joins the cluster on first start (`meshctl join-token worker` prints it). The node's
    /// certificate is then kept in <state-dir>/tls/ and later starts need no token.
    #[arg(long, env = "MESH_JOIN_TOKEN", value_parser = parse_token, hide_env_values = true)]
    join_token: Option<trust::JoinToken>,
    /// Where the agent keeps its node id, last assignment, task records, logs and namespaces.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/meshnet")]
    state_dir: PathBuf,
    /// Load-balancer backend of the routing mesh: auto picks ipvs where the kernel has it.
    #[arg(long, value_enum, default_value_t = Lb::Auto)]
    lb: Lb,
    /// Subnet of the node's gwbridge (mesh_gwbridge): egress for tasks and ingress_sbox. Must
    /// not clash with the node's addresses or routes.
    #[arg(long, default_value = "172.18.0.0/16", value_parser = parse_gw_subnet)]
    gwbridge_subnet: Ipv4Net,
    /// Seconds a removed IPVS backend keeps weight 0 (established connections go on) before
    /// it is deleted, counted from when the manager stops listing its task as draining (the
    /// task has ended, or its grace period is over).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_seconds: u64,
    /// Idle timeout of established TCP connections through the mesh, in seconds (IPVS, or
    /// conntrack with --lb nftables) [default: the kernel's].
    #[arg(long)]
    lb_tcp_timeout: Option<NonZeroU32>,
    /// Timeout of TCP connections after FIN, in seconds [default: the kernel's].
    #[arg(long)]
    lb_tcpfin_timeout: Option<NonZeroU32>,
    /// Timeout of UDP flows, in seconds [default: the kernel's].
    #[arg(long)]
    lb_udp_timeout: Option<NonZeroU32>,
    /// UDP port of VXLAN traffic.
    #[arg(long, default_value_t = 4789, value_parser = clap::value_parser!(u16).range(1024..=49151))]
    data_path_port: u16,
    /// MTU of overlay links (vxlan0, br0, veths) [default: the MTU of the advertise address's
    /// interface − 50].
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: Option<u32>,
    /// Log lines as text or JSON (filter with RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds between re-reads of the kernel state (a deleted link or peer entry comes back).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    reconcile_interval: u64,
    /// Serve Prometheus metrics (meshnet_agent_*) on ADDR:PORT at /metrics [default: none].
    #[arg(long, env = "MESH_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Upstream DNS server, ADDR[:PORT], for the names the embedded resolver (127.0.0.11 in
    /// every task) does not answer from the cluster; repeat for up to 3, tried in order
    /// [default: the nameservers of /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR[:PORT]", value_parser = dns::upstream::parse_upstream)]
    dns_upstreams: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lb {
    Auto,
    Ipvs,
    Nftables,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_token(s: &str) -> Result<trust::JoinToken, String> {
    s.parse().map_err(|e: trust::Error| e.to_string())
}

fn parse_gw_subnet(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    mesh::check_gw_subnet(net)?;
    Ok(net)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn system_hostname() -> anyhow::Result<String> {
    let path = "/proc/sys/kernel/hostname";
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {path} (or pass --hostname)"))?
        .trim()
        .to_string())
}

/// The advertise interface's MTU minus the VXLAN overhead.
fn overlay_mtu(node: &Netns, advertise: IpAddr) -> anyhow::Result<u32> {
    let underlay = vxlan::underlay_mtu(node, advertise).with_context(|| {
        format!("find the interface of --advertise-addr {advertise} (or pass --mtu)")
    })?;
    Ok(vxlan::overlay_mtu(underlay, None)?)
}

/// Resolves `--lb`. IPVS is probed by resolving its generic netlink family (global to all
/// namespaces, so the answer holds for ingress_sbox too): a kernel with IPVS as a module loads
/// it for that request (`net-pf-16-proto-16-family-IPVS`), so no `modprobe` is needed, and
/// `--lb nftables` does not probe, so it loads nothing.
fn choose_lb(lb: Lb) -> anyhow::Result<LbKind> {
    let probe = || ipvs::Client::new().map(|c| c.family_id());
    let (kind, why) = decide_lb(lb, probe)?;
    info!(lb = ?lb, backend = kind.as_str(), "routing-mesh load balancer: {why}");
    Ok(kind)
}

/// The balancer for `lb`, and why; `probe` resolves the IPVS family.
fn decide_lb(
    lb: Lb,
    probe: impl FnOnce() -> Result<u16, ipvs::Error>,
) -> anyhow::Result<(LbKind, String)> {
    if lb == Lb::Nftables {
        return Ok((LbKind::Nftables, "asked for".into()));
    }
    match (lb, probe()) {
        (_, Ok(id)) => Ok((
            LbKind::Ipvs,
            format!(
                "the kernel has IPVS (generic netlink family id {id}, built in or loaded on demand)"
            ),
        )),
        (Lb::Auto, Err(e)) => Ok((LbKind::Nftables, format!("no IPVS: {e}"))),
        (_, Err(e)) => anyhow::bail!("--lb ipvs: {e}"),
    }
}

/// The embedded resolver's upstreams (`--dns-upstream`, else the node's resolv.conf) and the
/// node's search domains (for the tasks' resolv.conf).
fn dns_config(upstreams: &[SocketAddr]) -> anyhow::Result<(Vec<SocketAddr>, Vec<String>)> {
    if upstreams.len() > dns::upstream::MAX_UPSTREAMS {
        anyhow::bail!(
            "--dns-upstream: at most {} servers, got {}",
            dns::upstream::MAX_UPSTREAMS,
            upstreams.len()
        );
    }
    let path = "/etc/resolv.conf";
    let node = match std::fs::read_to_string(path) {
        Ok(text) => dns::upstream::parse_resolv_conf(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("read {path}")),
    };
    let servers = if upstreams.is_empty() {
        node.nameservers
    } else {
        upstreams.to_vec()
    };
    if servers.is_empty() {
        warn!("no upstream DNS server (none in {path}, no --dns-upstream): tasks resolve only the cluster's names");
    }
    Ok((servers, node.search))
}

/// `--cleanup`: no manager, no join; only the state dir and the node namespace.
fn cleanup(flags: &Flags) -> anyhow::Result<()> {
    let state = state::StateDir::open(&flags.state_dir)
        .with_context(|| format!("open state dir {}", flags.state_dir.display()))?;
    let node = Netns::current().context("open the node's network namespace")?;
    let kernel = NetKernel::new(
        &state.netns_dir(),
        Netns::open(node.path()).context("open the node's network namespace")?,
    );
    cleanup::run(&state, &kernel, &node)
}

/// Caps glibc malloc's arenas at two. By default every thread that allocates gets an arena of
/// its own, up to 8 per core, and freed memory stays in it. The agent's threads are many and
/// short-lived (one per namespace operation in every pass, a waiter per task): idle with 100
/// tasks it kept 15 to 23 MiB of freed memory in 15 arenas, and 6 to 7 MiB with two (B12b).
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt sets one of the allocator's tunables; it runs before any other thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so that none has made an arena of its own yet.
    #[cfg(target_env = "gnu")]
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let flags = Flags::parse();
    init_logging(flags.log_format);
    if flags.cleanup {
        // It blocks (waits for tasks to stop): off the async runtime's threads.
        return tokio::task::spawn_blocking(move || cleanup(&flags)).await?;
    }
    let (false, Some(advertise_addr)) = (flags.manager.is_empty(), flags.advertise_addr) else {
        anyhow::bail!("--manager and --advertise-addr are required");
    };
    let hostname = match flags.hostname.clone() {
        Some(h) => h,
        None => system_hostname()?,
    };
    let state = state::StateDir::open(&flags.state_dir)
        .with_context(|| format!("open state dir {}", flags.state_dir.display()))?;
    let managers = managers::Managers::new(flags.manager.clone(), state.managers()?);
    // Nothing is built on a node that cannot prove it belongs to the cluster.
    let creds = join::credentials(
        &state.tls_dir(),
        &managers.candidates(),
        flags.join_token.as_ref(),
        &hostname,
        advertise_addr,
    )
    .await?;
    // The main thread never changes namespace: its namespace is the node's underlay.
    let node = Netns::current().context("open the node's network namespace")?;
    let mtu = match flags.mtu {
        Some(m) => m,
        None => overlay_mtu(&node, advertise_addr)?,
    };
    let lb_kind = choose_lb(flags.lb)?;
    let kernel = NetKernel::new(
        &state.netns_dir(),
        Netns::open(node.path()).context("open the node's network namespace")?,
    );
    // A clash found now stops the agent; one that appears later is logged by the pass.
    kernel
        .node_nets()
        .context("read the node's addresses and routes")?
        .check_clash("gwbridge", flags.gwbridge_subnet, &[])
        .map_err(|e| anyhow::anyhow!("{e} (--gwbridge-subnet)"))?;
    // The gwbridge carries underlay-sized packets: the underlay's MTU, or the one --mtu implies.
    let gw_mtu = mtu + vxlan::VXLAN_OVERHEAD;
    info!(
        %hostname,
        advertise_addr = %advertise_addr,
        state_dir = %flags.state_dir.display(),
        mtu,
        data_path_port = flags.data_path_port,
        "mesh-agent starting"
    );

    let (dns_upstreams, dns_search) = dns_config(&flags.dns_upstreams)?;
    info!(upstreams = ?dns_upstreams, search = ?dns_search, "embedded DNS");

    let desired = state.assignment()?.unwrap_or_default();
    if desired.revision > 0 {
        info!(
            revision = desired.revision,
            "serving the last applied assignment until the manager is back"
        );
    }
    let metrics = metrics::AgentMetrics::new();
    if let Some(addr) = flags.metrics_listen {
        let mut registry = mesh_metrics::Registry::with_prefix("meshnet_agent");
        metrics.register(&mut registry);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for metrics on {addr}"))?;
        info!(%addr, "serving metrics at /metrics");
        // Every value is set where it changes: nothing to refresh at scrape time.
        tokio::spawn(mesh_metrics::serve(
            listener,
            Arc::new(Mutex::new(registry)),
            || {},
        ));
    }
    // Asked of the kernel once: what the node can do does not change while it runs.
    let esp_support = match advertise_addr {
        IpAddr::V4(_) => esp::probe(),
        // Overlays run on IPv4 underlays only, and so does their encryption.
        IpAddr::V6(_) => EspSupport::Unsupported {
            reason: "the node's underlay address is IPv6".into(),
        },
    };
    let esp_node = match (&esp_support, advertise_addr) {
        (EspSupport::Supported, IpAddr::V4(local)) => {
            info!("IPsec ESP works on this kernel: encrypted networks can run here");
            Some(Arc::new(Mutex::new(reconcile::EspNode {
                socket: esp::xfrm::XfrmSocket::open().context("open the node's XFRM socket")?,
                sync: esp::EspSync::new(local, flags.data_path_port),
            })))
        }
        (EspSupport::Unsupported { reason }, _) => {
            info!("no IPsec ESP ({reason}): encrypted networks will not run here");
            None
        }
        // Reported unsupported above.
        (EspSupport::Supported, IpAddr::V6(_)) => None,
    };
    let (outbox, outgoing) = outbox::Outbox::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let supervisor =
        tasks::Supervisor::adopt(state.clone(), events_tx, outbox.clone(), metrics.clone())
            .context("adopt tasks")?
            .with_search_domains(dns_search);
    let (assign_tx, assign_rx) = watch::channel(desired);

    let connection = conn::Conn {
        managers,
        hostname,
        advertise_addr,
        gwbridge_subnet: flags.gwbridge_subnet,
        esp: esp_support,
        state: state.clone(),
        creds,
        assignments: assign_tx,
        outbox: outbox.clone(),
        outgoing,
        metrics: metrics.clone(),
    };
    tokio::spawn(connection.run());

    let rules = rules::MeshRules::new(
        Netns::open(node.path()).context("open the node's network namespace")?,
        state.netns_dir(),
        flags.gwbridge_subnet,
        lb_kind,
        LbOptions {
            drain: Duration::from_secs(flags.drain_seconds),
            timeouts: Timeouts {
                tcp: flags.lb_tcp_timeout,
                tcp_fin: flags.lb_tcpfin_timeout,
                udp: flags.lb_udp_timeout,
            },
        },
        Duration::from_secs(flags.reconcile_interval),
    );
    let mesh = reconcile::Mesh {
        gw_subnet: flags.gwbridge_subnet,
        gw_mtu,
        gw_clash: None,
        gw_addrs: state.gw_addrs(flags.gwbridge_subnet)?,
        rules: Arc::new(Mutex::new(rules)),
    };
    // Fail early and clearly if netlink or the state dir is unusable.
    kernel.observe().context("read the node's state")?;
    let netns_dir = state.netns_dir();
    let (watch, changes) = netwatch::Watcher::new(&node, &netns_dir)
        .context("watch the node's links, addresses and routes")?;
    let reconciler = reconcile::Reconciler {
        kernel: Arc::new(kernel),
        supervisor,
        settings: Settings {
            mtu,
            port: flags.data_path_port,
            advertise_addr,
            lb_namespaces: lb_kind == LbKind::Ipvs,
        },
        state,
        outbox,
        mesh,
        wake: None,
        watch,
        settled: false,
        dns: dns::Dns::new(
            netns_dir,
            dns::upstream::Forwarder::new(dns_upstreams),
            metrics.clone(),
        )
        .context("start the DNS resolver's thread")?,
        metrics,
        esp: esp_node,
        observed: ObsCache::default(),
    };
    let interval = Duration::from_secs(flags.reconcile_interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = reconciler.run(assign_rx, events_rx, changes, interval) => {}
        _ = tokio::signal::ctrl_c() => info!("interrupted; tasks and overlays keep running"),
        _ = term.recv() => info!("terminated; tasks and overlays keep running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_auto_takes_ipvs_when_its_family_resolves_and_says_why() {
        let (kind, why) = decide_lb(Lb::Auto, || Ok(23)).unwrap();
        assert_eq!(kind, LbKind::Ipvs);
        assert!(why.contains("family id 23"), "{why}");
        let (kind, why) = decide_lb(Lb::Auto, || Err(ipvs::Error::NoIpvs)).unwrap();
        assert_eq!(kind, LbKind::Nftables);
        assert!(why.starts_with("no IPVS: IPVS is not available"), "{why}");
        assert_eq!(decide_lb(Lb::Ipvs, || Ok(23)).unwrap().0, LbKind::Ipvs);
        let err = decide_lb(Lb::Ipvs, || Err(ipvs::Error::NoIpvs)).unwrap_err();
        assert!(err.to_string().starts_with("--lb ipvs: "), "{err}");
        let nft = decide_lb(Lb::Nftables, || {
            panic!("--lb nftables must not probe (it would load ip_vs)")
        });
        assert_eq!(nft.unwrap().0, LbKind::Nftables);
    }

    #[test]
    fn flags_parse_with_defaults_and_validation() {
        let f = Flags::try_parse_from([
            "mesh-agent",
            "--manager",
            "192.168.56.11:2377",
            "--advertise-addr",
            "192.168.56.12",
        ])
        .unwrap();
        assert_eq!(f.manager, ["192.168.56.11:2377"]);
        assert!(!f.cleanup);
        assert_eq!(f.data_path_port, 4789);
        assert_eq!(f.lb, Lb::Auto);
        assert_eq!(f.reconcile_interval, 10);
        assert_eq!(f.mtu, None);
        assert_eq!(f.state_dir, PathBuf::from("/var/lib/meshnet"));
        assert_eq!(f.gwbridge_subnet.to_string(), "172.18.0.0/16");
        assert_eq!(f.drain_seconds, 2);
        assert!(f.dns_upstreams.is_empty());

        let base = [
            "mesh-agent",
            "--manager",
            "m:1",
            "--advertise-addr",
            "10.0.0.1",
        ];
        let with = |extra: &[&str]| Flags::try_parse_from(base.iter().chain(extra.iter()).copied());
        assert_eq!(with(&["--lb", "nftables"]).unwrap().lb, Lb::Nftables);
        assert_eq!(with(&["--mtu", "1400"]).unwrap().mtu, Some(1400));
        let f = with(&[
            "--gwbridge-subnet",
            "10.99.0.0/24",
            "--drain-seconds",
            "5",
            "--lb-udp-timeout",
            "30",
        ])
        .unwrap();
        assert_eq!(
            f.gwbridge_subnet,
            "10.99.0.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(f.drain_seconds, 5);
        assert_eq!(f.lb_udp_timeout, NonZeroU32::new(30));
        assert_eq!(f.lb_tcp_timeout, None);
        let f = with(&[
            "--dns-upstream",
            "192.168.56.1",
            "--dns-upstream",
            "[::1]:5353",
        ])
        .unwrap();
        assert_eq!(
            f.dns_upstreams,
            ["192.168.56.1:53", "[::1]:5353"].map(|s| s.parse::<SocketAddr>().unwrap())
        );
        assert!(dns_config(&f.dns_upstreams).is_ok());
        let four = ["1.1.1.1:53"; 4].map(|s| s.parse::<SocketAddr>().unwrap());
        assert!(dns_config(&four).is_err());
        assert_eq!(
            with(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        for bad in [
            &["--lb", "iptables"][..],
            &["--data-path-port", "80"],
            &["--mtu", "100"],
            &["--reconcile-interval", "0"],
            &["--gwbridge-subnet", "172.18.0.1/16"],
            &["--gwbridge-subnet", "10.0.0.0/30"],
            &["--lb-tcp-timeout", "0"],
            &["--dns-upstream", "dns.example"],
            &["--dns-upstream", "10.0.0.1:0"],
        ] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
        // --cleanup needs neither the manager nor an address; without it both are required.
        let f =
            Flags::try_parse_from(["mesh-agent", "--cleanup", "--state-dir", "/tmp/x"]).unwrap();
        assert!(f.cleanup && f.manager.is_empty() && f.advertise_addr.is_none());
        assert!(Flags::try_parse_from(["mesh-agent", "--manager", "m:1"]).is_err());
        assert!(Flags::try_parse_from(["mesh-agent", "--advertise-addr", "10.0.0.1"]).is_err());
        // Several managers: repeated, or a comma-separated list (as MESH_MANAGER gives them),
        // each entry checked.
        let m = |args: &[&str]| {
            let base = ["mesh-agent", "--advertise-addr", "10.0.0.1"];
            Flags::try_parse_from(base.iter().chain(args).copied()).map(|f| f.manager)
        };
        assert_eq!(
            m(&["--manager", "a:1", "--manager", "b:2,[::1]:3"]).unwrap(),
            ["a:1", "b:2", "[::1]:3"]
        );
        for bad in ["nohost", ":2377", "h:0", "h:99999", "a:1,h:0", "a:1,"] {
            assert!(m(&["--manager", bad]).is_err(), "{bad}");
        }
    }
}
