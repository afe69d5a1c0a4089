//! `mesh-agent`: reconciles this node's kernel state (overlay sandboxes, endpoints, peers) and
//! its tasks' processes to the desired state the manager assigns.

mod apply;
mod conn;
mod observe;
mod plan;
mod reconcile;
mod state;
mod tasks;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use netns::Netns;

use crate::apply::{Kernel, NetKernel};
use crate::plan::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "meshnet node agent: overlays and tasks"
)]
struct Flags {
    /// The manager's agent endpoint, ADDR:PORT (its --listen).
    #[arg(long, env = "MESH_MANAGER", value_parser = parse_manager)]
    manager: String,
    /// This node's underlay address: the VTEP other nodes send VXLAN traffic to.
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise_addr: IpAddr,
    /// The node's name at the manager [default: the system hostname].
    #[arg(long, env = "MESH_HOSTNAME")]
    hostname: Option<String>,
    /// Where the agent keeps its node id, last assignment, task records, logs and namespaces.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/meshnet")]
    state_dir: PathBuf,
    /// Load-balancer backend of the routing mesh (validated and logged; the routing mesh uses it).
    #[arg(long, value_enum, default_value_t = Lb::Auto)]
    lb: Lb,
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
    /// Seconds a task has to exit after SIGTERM before it gets SIGKILL.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    stop_grace_period: u64,
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

fn parse_manager(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not ADDR:PORT"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no address"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} has no valid port"))?;
    Ok(s.to_string())
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

fn log_lb_choice(lb: Lb) {
    let has_ipvs = Path::new("/proc/net/ip_vs").exists();
    let resolved = match lb {
        Lb::Auto if has_ipvs => "ipvs",
        Lb::Auto => "nftables",
        Lb::Ipvs => "ipvs",
        Lb::Nftables => "nftables",
    };
    if lb == Lb::Ipvs && !has_ipvs {
        warn!("--lb ipvs, but this kernel has no IPVS (/proc/net/ip_vs is absent)");
    }
    info!(lb = ?lb, resolves_to = resolved, "load-balancer backend (used by the routing mesh)");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    init_logging(flags.log_format);
    let hostname = match flags.hostname.clone() {
        Some(h) => h,
        None => system_hostname()?,
    };
    let state = state::StateDir::open(&flags.state_dir)
        .with_context(|| format!("open state dir {}", flags.state_dir.display()))?;
    // The main thread never changes namespace: its namespace is the node's underlay.
    let node = Netns::current().context("open the node's network namespace")?;
    let mtu = match flags.mtu {
        Some(m) => m,
        None => overlay_mtu(&node, flags.advertise_addr)?,
    };
    log_lb_choice(flags.lb);
    info!(
        %hostname,
        advertise_addr = %flags.advertise_addr,
        state_dir = %flags.state_dir.display(),
        mtu,
        data_path_port = flags.data_path_port,
        "mesh-agent starting"
    );

    let desired = state.assignment()?.unwrap_or_default();
    if desired.revision > 0 {
        info!(
            revision = desired.revision,
            "serving the last applied assignment until the manager is back"
        );
    }
    let (outbox, outgoing) = conn::Outbox::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let supervisor = tasks::Supervisor::adopt(
        state.clone(),
        events_tx,
        outbox.clone(),
        Duration::from_secs(flags.stop_grace_period),
    )
    .context("adopt tasks")?;
    let (assign_tx, assign_rx) = watch::channel(desired);

    let connection = conn::Conn {
        manager: flags.manager.clone(),
        hostname,
        advertise_addr: flags.advertise_addr,
        state: state.clone(),
        assignments: assign_tx,
        outbox: outbox.clone(),
        outgoing,
    };
    tokio::spawn(connection.run());

    let kernel = NetKernel::new(&state.netns_dir(), node);
    // Fail early and clearly if netlink or the state dir is unusable.
    kernel.observe().context("read the node's state")?;
    let reconciler = reconcile::Reconciler {
        kernel: Arc::new(kernel),
        supervisor,
        settings: Settings {
            mtu,
            port: flags.data_path_port,
            advertise_addr: flags.advertise_addr,
        },
        state,
        outbox,
    };
    let interval = Duration::from_secs(flags.reconcile_interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = reconciler.run(assign_rx, events_rx, interval) => {}
        _ = tokio::signal::ctrl_c() => info!("interrupted; tasks and overlays keep running"),
        _ = term.recv() => info!("terminated; tasks and overlays keep running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(f.manager, "192.168.56.11:2377");
        assert_eq!(f.data_path_port, 4789);
        assert_eq!(f.lb, Lb::Auto);
        assert_eq!(f.reconcile_interval, 10);
        assert_eq!(f.mtu, None);
        assert_eq!(f.state_dir, PathBuf::from("/var/lib/meshnet"));

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
        assert_eq!(
            with(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        for bad in [
            &["--lb", "iptables"][..],
            &["--data-path-port", "80"],
            &["--mtu", "100"],
            &["--reconcile-interval", "0"],
        ] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
        for bad in ["nohost", ":2377", "h:0", "h:99999"] {
            assert!(parse_manager(bad).is_err(), "{bad}");
        }
    }
}
