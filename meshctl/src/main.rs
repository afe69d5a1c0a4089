//! meshctl: the command line of a meshnet cluster, with docker's verbs and tables.

mod client;
mod ports;
mod progress;
mod render;
mod spec;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use proto::api::{PublishedPort, Request, Response, Scale, ServiceSpec, SpecUpdate};
use proto::excerpt;
use proto::model::{
    default_stop_grace_ms, Availability, Constraint, EndpointMode, PortConfig, PublishMode, Role,
    ServiceMode, UpdateConfig,
};
use serde::Serialize;

use crate::client::{Client, Host};
use crate::progress::Goal;
use crate::spec::{unique_map, Argv, HealthArgs, UpdateConfigArgs};

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Control a meshnet cluster")]
struct Cli {
    /// The manager's API: unix:///path/to/socket or tcp://address:port.
    #[arg(
        long,
        short = 'H',
        env = "MESH_HOST",
        global = true,
        default_value = "unix:///run/meshnet/manager.sock"
    )]
    host: Host,
    /// For tcp:// hosts: a directory with the cluster's client bundle (ca.pem, cert.pem,
    /// key.pem), a copy of the manager's <data-dir>/client/.
    #[arg(long, env = "MESH_TLS_DIR", global = true)]
    tls_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage nodes
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage overlay networks
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Publish a port of a service (meshctl publish 80:8080 --service web), list or remove
    /// published ports
    Publish(PublishArgs),
    /// Print the token (and the mesh-agent command) that joins a node to the cluster
    JoinToken {
        #[arg(value_enum)]
        role: RoleArg,
        /// Only the token
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Replace the token: the old one no longer joins; nodes that joined stay
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct PublishArgs {
    #[command(subcommand)]
    cmd: Option<PublishCmd>,
    /// PUBLISHED:TARGET[/tcp|udp], or mode=ingress|host,published=P,target=T,protocol=tcp|udp
    #[arg(value_parser = ports::parse_publish_arg, required = true)]
    port: Option<ports::PublishArg>,
    /// The service that gets the port
    #[arg(long, required = true)]
    service: Option<String>,
    /// ingress (every node answers, default) or host (only nodes with a task)
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
enum PublishCmd {
    /// List published ports
    #[command(alias = "list")]
    Ls(ListFormat),
    /// Unpublish ports: meshctl publish rm 80 53/udp (every port, or none if one is refused)
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true, value_parser = ports::parse_unpublish)]
        ports: Vec<PublishedPort>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Ingress,
    Host,
}

impl From<ModeArg> for PublishMode {
    fn from(m: ModeArg) -> PublishMode {
        match m {
            ModeArg::Ingress => PublishMode::Ingress,
            ModeArg::Host => PublishMode::Host,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InspectFormat {
    Json,
}

#[derive(Debug, Args)]
struct ListFormat {
    /// Output format
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// `json`: each object as its own JSON document on one line, instead of one JSON array
    #[arg(long, value_enum)]
    format: Option<InspectFormat>,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List nodes
    #[command(alias = "list")]
    Ls(ListFormat),
    /// Show nodes in detail
    Inspect {
        #[command(flatten)]
        format: InspectArgs,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels
    Update {
        #[arg(long, value_enum)]
        availability: Option<AvailabilityArg>,
        /// Add or replace a label KEY=VALUE (repeatable; a key up to 128 bytes without spaces or
        /// =, a value up to 512 bytes, at most 64 labels per node)
        #[arg(long = "label-add", value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// Remove a label
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
    /// Remove nodes from the cluster: their certificates are revoked and their tasks move
    #[command(alias = "remove")]
    Rm {
        /// Remove a node that is still ready (its agent connected)
        #[arg(long, short = 'f')]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes managers (the role their next certificate carries)
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes workers (the role their next certificate carries)
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AvailabilityArg {
    Active,
    Pause,
    Drain,
}

impl From<AvailabilityArg> for Availability {
    fn from(a: AvailabilityArg) -> Availability {
        match a {
            AvailabilityArg::Active => Availability::Active,
            AvailabilityArg::Pause => Availability::Pause,
            AvailabilityArg::Drain => Availability::Drain,
        }
    }
}

#[derive(Debug, Subcommand)]
enum NetworkCmd {
    /// Create an overlay network
    Create {
        #[arg(long, short = 'd', default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form, clear of the ingress network, every node's gwbridge (172.18.0.0/16
        /// by default) and underlay address; a free /24 of 10.0.0.0/8 when left out
        #[arg(long)]
        subnet: Option<String>,
        /// Driver option, KEY or KEY=VALUE, repeatable: `encrypted` carries the network's
        /// traffic between nodes in IPsec ESP (only nodes whose kernel has ESP run its tasks)
        #[arg(long = "opt", short = 'o', value_name = "KEY[=VALUE]")]
        opts: Vec<String>,
        /// 1 to 32 of [a-zA-Z0-9_.-], starting with a letter or digit
        name: String,
    },
    /// List networks
    #[command(alias = "list")]
    Ls(ListFormat),
    /// Show networks in detail: subnet, gateway, VNI, endpoints and peers (for ingress also
    /// each node's ingress_sbox address and load balancer)
    Inspect {
        #[command(flatten)]
        format: InspectArgs,
        /// Human-readable text instead of JSON
        #[arg(long, conflicts_with = "format")]
        pretty: bool,
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks: every one, or none if one is refused
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Create a service: meshctl service create --name web --replicas 3 -- CMD [ARG...]
    Create(Box<CreateArgs>),
    /// List services
    #[command(alias = "list")]
    Ls(ListFormat),
    /// List the tasks of a service
    Ps {
        #[command(flatten)]
        format: ListFormat,
        service: String,
    },
    /// Show services in detail, with their fwmark and each node's load balancer
    Inspect {
        #[command(flatten)]
        format: InspectArgs,
        /// Human-readable text instead of JSON
        #[arg(long, conflicts_with = "format")]
        pretty: bool,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Scale services: meshctl service scale web=5 api=2 (every one, or none if one is refused)
    Scale {
        #[command(flatten)]
        wait: WaitArgs,
        /// SERVICE=REPLICAS, replicas at most 10000
        #[arg(required = true, value_parser = parse_scale)]
        scales: Vec<(String, u64)>,
    },
    /// Remove services: every one, or none if one is refused
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Change a service; what is not given is kept. A change of its tasks' command, environment,
    /// constraints or health check (or --force) replaces the tasks by a rolling update
    /// (--update-*)
    Update(Box<UpdateArgs>),
    /// Return a service to its spec before the last update, replacing its tasks the same way
    Rollback {
        #[command(flatten)]
        wait: WaitArgs,
        service: String,
    },
}

#[derive(Debug, Args)]
struct UpdateArgs {
    /// Publish a port: P:T[/tcp|udp] or mode=...,published=P,target=T,protocol=... (repeatable)
    #[arg(long = "publish-add", value_parser = ports::parse_publish)]
    publish_add: Vec<PortConfig>,
    /// Unpublish a port: P[/tcp|udp] (repeatable)
    #[arg(long = "publish-rm", value_parser = ports::parse_unpublish)]
    publish_rm: Vec<PublishedPort>,
    /// vip: one virtual IP per network, balanced over the tasks; dnsrr: the name resolves
    /// to the tasks' addresses (no ingress-mode ports)
    #[arg(long = "endpoint-mode", value_parser = parse_endpoint_mode)]
    endpoint_mode: Option<EndpointMode>,
    /// Replace the arguments after the program, split like a shell:
    /// --args "--port 8080 --name 'a b'"
    #[arg(
        long,
        value_name = "ARGS",
        allow_hyphen_values = true,
        value_parser = spec::parse_argv
    )]
    args: Option<Argv>,
    /// Replace the whole command, program included, split like a shell:
    /// --command "hello-server --port 8080"
    #[arg(
        long,
        value_name = "COMMAND",
        allow_hyphen_values = true,
        value_parser = spec::parse_argv
    )]
    command: Option<Argv>,
    /// Add or change an environment variable (repeatable)
    #[arg(long = "env-add", value_name = "KEY=VALUE", value_parser = spec::parse_env)]
    env_add: Vec<(String, String)>,
    /// Remove an environment variable (repeatable)
    #[arg(long = "env-rm", value_name = "KEY")]
    env_rm: Vec<String>,
    /// Add a placement constraint, e.g. node.labels.zone==a (repeatable)
    #[arg(long = "constraint-add", value_name = "EXPR", value_parser = parse_constraint)]
    constraint_add: Vec<Constraint>,
    /// Remove a placement constraint, written as `service inspect` shows it (repeatable)
    #[arg(long = "constraint-rm", value_name = "EXPR", value_parser = parse_constraint)]
    constraint_rm: Vec<Constraint>,
    /// Replace every task even if nothing else changes (a rolling restart)
    #[arg(long)]
    force: bool,
    /// Time between SIGTERM and SIGKILL when a task stops, e.g. 30s
    #[arg(
        long = "stop-grace-period",
        value_name = "DURATION",
        value_parser = spec::parse_duration
    )]
    stop_grace_period: Option<u64>,
    /// Remove the health check: tasks get traffic as soon as they run
    #[arg(
        long = "no-healthcheck",
        help_heading = "Health check",
        conflicts_with_all = [
            "health_cmd",
            "health_http",
            "health_interval",
            "health_timeout",
            "health_retries",
            "health_start_period",
        ]
    )]
    no_healthcheck: bool,
    #[command(flatten)]
    wait: WaitArgs,
    service: String,
    // Last: the help headings of these groups also cover the flags after them.
    #[command(flatten)]
    update_config: UpdateConfigArgs,
    #[command(flatten)]
    health: HealthArgs,
}

impl UpdateArgs {
    /// The task-spec part of the request. `current` is the service's spec now: update and
    /// health flags change its update config and health check field by field, as docker's do.
    fn spec_update(&self, current: &ServiceSpec) -> anyhow::Result<SpecUpdate> {
        let command = match &self.command {
            Some(Argv(argv)) if argv.is_empty() => {
                bail!("--command needs at least the program to run")
            }
            other => other.as_ref().map(|a| a.0.clone()),
        };
        let health = if self.no_healthcheck {
            None
        } else {
            self.health.merge(current.health.as_ref())?
        };
        Ok(SpecUpdate {
            command,
            args: self.args.as_ref().map(|a| a.0.clone()),
            env_add: unique_map("env", self.env_add.clone())?,
            env_rm: self.env_rm.clone(),
            constraint_add: self.constraint_add.clone(),
            constraint_rm: self.constraint_rm.clone(),
            force: self.force,
            update_config: self.update_config.merge(&current.update_config),
            stop_grace_ms: self.stop_grace_period,
            health,
            health_none: self.no_healthcheck,
        })
    }
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Return at once instead of waiting for the service to converge
    #[arg(long, short = 'd')]
    detach: bool,
    /// How long to wait for convergence, in seconds
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// 1 to 32 of [a-zA-Z0-9_.-], starting with a letter or digit
    #[arg(long)]
    name: String,
    /// replicated (default): --replicas tasks spread over the nodes; global: one task on every
    /// eligible node (ready, active, within the constraints), following nodes as they join,
    /// leave, drain or change labels
    #[arg(long, default_value = "replicated", value_parser = parse_mode)]
    mode: ServiceMode,
    /// Number of tasks of a replicated service (default 1), at most 10000. With a host-mode
    /// port at most one runs per node; the others wait until a node is free
    #[arg(long, allow_hyphen_values = true, value_parser = parse_replicas)]
    replicas: Option<u64>,
    /// Attach to a network: NAME, or name=NAME,alias=A[,alias=B] to give the service more
    /// names there (repeatable; the first network becomes eth0)
    #[arg(long = "network", value_parser = parse_network)]
    networks: Vec<NetworkArg>,
    /// vip (default): the service's name resolves to one virtual IP per network, balanced over
    /// its tasks; dnsrr: to its tasks' addresses (cannot have ingress-mode ports)
    #[arg(long = "endpoint-mode", default_value = "vip", value_parser = parse_endpoint_mode)]
    endpoint_mode: EndpointMode,
    /// Placement constraint, e.g. node.role==worker (repeatable; at most 32, each up to 256
    /// bytes)
    #[arg(long = "constraint", value_parser = parse_constraint)]
    constraints: Vec<Constraint>,
    /// Publish a port: P:T[/tcp|udp] or mode=ingress|host,published=P,target=T,protocol=tcp|udp
    /// (repeatable)
    #[arg(long = "publish", short = 'p', value_parser = ports::parse_publish)]
    publish: Vec<PortConfig>,
    /// Set an environment variable of the task's process (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = spec::parse_env)]
    env: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL when a task stops, e.g. 30s (default 10s)
    #[arg(
        long = "stop-grace-period",
        value_name = "DURATION",
        value_parser = spec::parse_duration
    )]
    stop_grace_period: Option<u64>,
    #[command(flatten)]
    wait: WaitArgs,
    /// The task's command and its arguments, after -- (at most 1024 arguments and 65536 bytes
    /// in all)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    // Last: the help headings of these groups also cover the flags after them.
    #[command(flatten)]
    update_config: UpdateConfigArgs,
    #[command(flatten)]
    health: HealthArgs,
}

impl CreateArgs {
    /// The spec to send; `--replicas` with `--mode global` is refused, as by docker.
    fn spec(&self) -> anyhow::Result<ServiceSpec> {
        let replicas = match (self.mode, self.replicas) {
            (ServiceMode::Global, Some(_)) => {
                bail!("--replicas can only be used with replicated mode")
            }
            (ServiceMode::Global, None) => 0,
            (ServiceMode::Replicated, replicas) => replicas.unwrap_or(1),
        };
        Ok(ServiceSpec {
            name: self.name.clone(),
            mode: self.mode,
            replicas,
            networks: self.networks.iter().map(|n| n.name.clone()).collect(),
            constraints: self.constraints.clone(),
            command: self.command.clone(),
            ports: self.publish.clone(),
            endpoint_mode: self.endpoint_mode,
            aliases: self
                .networks
                .iter()
                .filter(|n| !n.aliases.is_empty())
                .map(|n| (n.name.clone(), n.aliases.clone()))
                .collect(),
            env: unique_map("env", self.env.clone())?,
            update_config: self
                .update_config
                .merge(&UpdateConfig::default())
                .unwrap_or_default(),
            stop_grace_ms: self.stop_grace_period.unwrap_or_else(default_stop_grace_ms),
            health: self.health.merge(None)?,
        })
    }
}

/// One `--network` of `service create`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetworkArg {
    name: String,
    aliases: Vec<String>,
}

/// `NAME`, or Docker's long form `name=NAME,alias=A,alias=B`.
fn parse_network(text: &str) -> Result<NetworkArg, String> {
    if !text.contains('=') {
        return Ok(NetworkArg {
            name: text.to_string(),
            aliases: Vec::new(),
        });
    }
    let mut name = None;
    let mut aliases = Vec::new();
    for field in text.split(',') {
        match field.split_once('=') {
            Some(("name", v)) if name.is_none() => name = Some(v.to_string()),
            Some(("alias", v)) => aliases.push(v.to_string()),
            _ => {
                return Err(format!(
                    "invalid network {:?}: expected NAME or name=NAME,alias=ALIAS[,alias=ALIAS...]",
                    excerpt(text)
                ))
            }
        }
    }
    match name {
        Some(name) if !name.is_empty() => Ok(NetworkArg { name, aliases }),
        _ => Err(format!(
            "invalid network {:?}: name=NAME is required",
            excerpt(text)
        )),
    }
}

fn parse_endpoint_mode(text: &str) -> Result<EndpointMode, String> {
    match text {
        "vip" => Ok(EndpointMode::Vip),
        "dnsrr" => Ok(EndpointMode::Dnsrr),
        _ => Err(format!(
            "invalid endpoint mode {:?}: expected vip or dnsrr",
            excerpt(text)
        )),
    }
}

fn parse_mode(text: &str) -> Result<ServiceMode, String> {
    match text {
        "replicated" => Ok(ServiceMode::Replicated),
        "global" => Ok(ServiceMode::Global),
        _ => Err(format!(
            "invalid service mode {:?}: expected replicated or global",
            excerpt(text)
        )),
    }
}

fn parse_replicas(text: &str) -> Result<u64, String> {
    text.parse::<u64>().map_err(|_| {
        format!(
            "invalid replica count {:?}: it must be a non-negative integer",
            excerpt(text)
        )
    })
}

fn parse_scale(text: &str) -> Result<(String, u64), String> {
    let (name, count) = text.split_once('=').ok_or_else(|| {
        format!(
            "invalid scale {:?}: expected SERVICE=REPLICAS",
            excerpt(text)
        )
    })?;
    if name.is_empty() {
        return Err(format!(
            "invalid scale {:?}: the service is missing",
            excerpt(text)
        ));
    }
    Ok((name.to_string(), parse_replicas(count)?))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("invalid label {:?}: expected KEY=VALUE", excerpt(text)))
}

/// The labels of `--label-add`, refusing a key given twice.
fn label_map(labels: Vec<(String, String)>) -> anyhow::Result<BTreeMap<String, String>> {
    unique_map("label", labels)
}

/// Parses the command line. clap quotes the offending argument in its errors; a huge one is cut
/// to an excerpt, as the manager does.
fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::{ContextKind, ContextValue};
    Cli::try_parse_from(args).map_err(|mut e| {
        for kind in [
            ContextKind::InvalidArg,
            ContextKind::InvalidValue,
            ContextKind::InvalidSubcommand,
        ] {
            if let Some(ContextValue::String(text)) = e.get(kind) {
                let short = excerpt(text).to_string();
                e.insert(kind, ContextValue::String(short));
            }
        }
        e
    })
}

fn main() {
    let cli = match parse_cli(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            eprint!(
                "Error: {}",
                rendered.strip_prefix("error: ").unwrap_or(&rendered)
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

/// Matches the expected kind of answer, or fails with what was asked and what came.
macro_rules! expect {
    ($what:expr, $resp:expr, $pat:pat => $out:expr) => {
        match $resp {
            $pat => $out,
            other => bail!("{}: unexpected answer from the manager: {other:?}", $what),
        }
    };
}

use proto::unix_now;

/// Checked where it is typed: a bad constraint never reaches the manager.
fn parse_constraint(s: &str) -> Result<Constraint, String> {
    Constraint::parse(s).map_err(|e| e.to_string())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("encode JSON output")?;
    println!("{text}");
    Ok(())
}

/// Inspect output as docker prints it: a JSON array by default; with `--format json` one
/// compact document per object, so a single object parses on its own.
/// Prints inspected objects: with `pretty`, as text joined by blank lines; else as JSON.
fn print_inspect<T: Serialize>(
    items: &[T],
    format: &InspectArgs,
    pretty: Option<&dyn Fn(&T) -> String>,
) -> anyhow::Result<()> {
    if let Some(render) = pretty {
        let texts: Vec<String> = items.iter().map(render).collect();
        print!("{}", texts.join("\n"));
        return Ok(());
    }
    match format.format {
        None => print_json(&items),
        Some(InspectFormat::Json) => {
            for item in items {
                println!(
                    "{}",
                    serde_json::to_string(item).context("encode JSON output")?
                );
            }
            Ok(())
        }
    }
}

/// What clap cannot see: flags that contradict each other, and a whole `service create` spec.
/// Checked before connecting.
fn check(cli: &Cli) -> anyhow::Result<()> {
    if let Command::Publish(PublishArgs {
        port: Some(arg),
        mode: Some(_),
        ..
    }) = &cli.command
    {
        if arg.mode_given {
            bail!(
                "publish: the mode is given twice, in the port (mode=...) and in --mode: give one"
            );
        }
    }
    if let Command::Service(ServiceCmd::Create(args)) = &cli.command {
        args.spec()?;
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    check(&cli)?;
    let mut c = Client::connect(&cli.host, cli.tls_dir.as_deref())?;
    match cli.command {
        Command::Node(cmd) => node(&mut c, cmd),
        Command::Network(cmd) => network(&mut c, cmd),
        Command::Service(cmd) => service(&mut c, cmd),
        Command::Publish(args) => publish(&mut c, args),
        Command::JoinToken {
            role,
            quiet,
            rotate,
        } => join_token(&mut c, role.into(), quiet, rotate),
    }
}

fn join_token(c: &mut Client, role: Role, quiet: bool, rotate: bool) -> anyhow::Result<()> {
    let word = match role {
        Role::Worker => "worker",
        Role::Manager => "manager",
    };
    let req = Request::JoinToken { role, rotate };
    let (token, manager) = expect!(format!("get the {word} join token"), c.call(&req)?,
                                   Response::JoinToken { token, manager, .. } => (token, manager));
    if quiet {
        println!("{token}");
        return Ok(());
    }
    if rotate {
        println!("Successfully rotated {word} join token.\n");
    }
    println!("To add a {word} to this cluster, run the following command on it:\n");
    println!("    mesh-agent --join-token {token} --manager {manager} --advertise-addr <its underlay address>\n");
    Ok(())
}

/// Sends one request per node; like docker, prints each node done and reports every failure.
fn each_node(
    c: &mut Client,
    nodes: Vec<String>,
    what: &str,
    req: impl Fn(String) -> Request,
) -> anyhow::Result<()> {
    let mut refused = Vec::new();
    for node in nodes {
        match c.call(&req(node.clone())) {
            Ok(_) => println!("{node}"),
            Err(e) => refused.push(format!("{what} {node}: {e:#}")),
        }
    }
    if !refused.is_empty() {
        bail!(refused.join("\nError: "));
    }
    Ok(())
}

/// Sends a change of `service` (`what` says which, for errors), prints the service as given, and
/// waits for `goal` unless detached.
fn change_service(
    c: &mut Client,
    service: &str,
    what: String,
    req: &Request,
    goal: Goal,
    wait: &WaitArgs,
) -> anyhow::Result<()> {
    let info = expect!(what, c.call(req)?, Response::Service { service } => service);
    println!("{service}");
    if !wait.detach {
        progress::wait(
            c,
            &info,
            goal,
            Duration::from_secs(wait.timeout),
            &mut std::io::stdout(),
        )?;
    }
    Ok(())
}

/// `service update`: the task-spec flags are merged over the service's current spec, so it is
/// asked for first.
fn update_service(c: &mut Client, args: UpdateArgs) -> anyhow::Result<()> {
    let what = format!("update service {}", excerpt(&args.service));
    let req = Request::ServiceInspect {
        service: args.service.clone(),
    };
    let current = expect!(what.clone(), c.call(&req)?, Response::Service { service } => service);
    let spec = args.spec_update(&current.spec).context(what.clone())?;
    let req = Request::ServiceUpdate {
        service: args.service.clone(),
        publish_add: args.publish_add,
        publish_rm: args.publish_rm,
        endpoint_mode: args.endpoint_mode,
        spec,
    };
    change_service(c, &args.service, what, &req, Goal::Update, &args.wait)
}

fn publish(c: &mut Client, args: PublishArgs) -> anyhow::Result<()> {
    match args.cmd {
        Some(PublishCmd::Ls(f)) => {
            let ports = expect!("list published ports", c.call(&Request::PublishLs)?,
                                Response::Ports { ports } => ports);
            match f.format {
                Format::Table => print!("{}", render::published(&ports)),
                Format::Json => print_json(&ports)?,
            }
        }
        Some(PublishCmd::Rm { ports }) => {
            let req = Request::PublishRmMany {
                ports: ports.clone(),
            };
            expect!("unpublish ports", c.call(&req)?, Response::Services { .. } => ());
            for port in ports {
                println!("{port}");
            }
        }
        None => {
            // clap requires both when there is no subcommand.
            let (Some(arg), Some(service)) = (args.port, args.service) else {
                bail!("publish: a port and --service are required");
            };
            let mut port = arg.port;
            if let Some(mode) = args.mode {
                port.mode = mode.into();
            }
            let what = format!(
                "publish {} on service {}",
                ports::short(&port),
                excerpt(&service)
            );
            let req = Request::ServiceUpdate {
                service: service.clone(),
                publish_add: vec![port],
                publish_rm: vec![],
                endpoint_mode: None,
                spec: SpecUpdate::default(),
            };
            change_service(c, &service, what, &req, Goal::Running, &args.wait)?;
        }
    }
    Ok(())
}

fn node(c: &mut Client, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls(f) => {
            let nodes = expect!("list nodes", c.call(&Request::NodeLs)?, Response::Nodes { nodes } => nodes);
            match f.format {
                Format::Table => print!("{}", render::nodes(&nodes)),
                Format::Json => print_json(&nodes)?,
            }
        }
        NodeCmd::Inspect { nodes, format } => {
            let mut out = Vec::new();
            for node in nodes {
                let what = format!("inspect node {}", excerpt(&node));
                let req = Request::NodeInspect { node };
                out.push(expect!(what, c.call(&req)?, Response::Node { node } => node));
            }
            print_inspect(&out, &format, None)?;
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            let what = format!("update node {}", excerpt(&node));
            let req = Request::NodeUpdate {
                node: node.clone(),
                availability: availability.map(Availability::from),
                label_add: label_map(label_add).context(what.clone())?,
                label_rm,
            };
            expect!(what, c.call(&req)?, Response::Node { .. } => ());
            println!("{node}");
        }
        NodeCmd::Rm { force, nodes } => each_node(c, nodes, "remove node", |node| {
            Request::NodeRm { node, force }
        })?,
        NodeCmd::Promote { nodes } => {
            each_node(c, nodes, "promote node", |node| Request::NodeRole {
                node,
                role: Role::Manager,
            })?
        }
        NodeCmd::Demote { nodes } => {
            each_node(c, nodes, "demote node", |node| Request::NodeRole {
                node,
                role: Role::Worker,
            })?
        }
    }
    Ok(())
}

fn network(c: &mut Client, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            opts,
            name,
        } => {
            let what = format!("create network {}", excerpt(&name));
            // The manager checks the keys and values; a key given twice keeps the last value.
            let options = opts
                .iter()
                .map(|o| match o.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (o.clone(), String::new()),
                })
                .collect();
            let req = Request::NetworkCreate {
                name,
                driver,
                subnet,
                options,
            };
            let created = expect!(what, c.call(&req)?, Response::Network { network } => network);
            println!("{}", created.network.id);
        }
        NetworkCmd::Ls(f) => {
            let networks = expect!("list networks", c.call(&Request::NetworkLs)?,
                                   Response::Networks { networks } => networks);
            match f.format {
                Format::Table => print!("{}", render::networks(&networks)),
                Format::Json => print_json(&networks)?,
            }
        }
        NetworkCmd::Inspect {
            networks,
            format,
            pretty,
        } => {
            let mut out = Vec::new();
            for network in networks {
                let what = format!("inspect network {}", excerpt(&network));
                let req = Request::NetworkInspect { network };
                out.push(expect!(what, c.call(&req)?, Response::Network { network } => network));
            }
            let pretty = pretty.then_some(&render::network_pretty as &dyn Fn(&_) -> String);
            print_inspect(&out, &format, pretty)?;
        }
        NetworkCmd::Rm { networks } => {
            let req = Request::NetworkRmMany {
                networks: networks.clone(),
            };
            expect!("remove networks", c.call(&req)?, Response::RemovedMany { .. } => ());
            for network in networks {
                println!("{network}");
            }
        }
    }
    Ok(())
}

fn service(c: &mut Client, cmd: ServiceCmd) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    match cmd {
        ServiceCmd::Create(args) => {
            let spec = args.spec()?;
            let what = format!("create service {}", excerpt(&spec.name));
            let created = expect!(what, c.call(&Request::ServiceCreate { spec })?,
                                  Response::Service { service } => service);
            println!("{}", created.id);
            if !args.wait.detach {
                progress::wait(
                    c,
                    &created,
                    Goal::Running,
                    Duration::from_secs(args.wait.timeout),
                    &mut stdout,
                )?;
            }
        }
        ServiceCmd::Ls(f) => {
            let services = expect!("list services", c.call(&Request::ServiceLs)?,
                                   Response::Services { services } => services);
            match f.format {
                Format::Table => print!("{}", render::services(&services)),
                Format::Json => print_json(&services)?,
            }
        }
        ServiceCmd::Ps { format, service } => {
            let what = format!("list tasks of service {}", excerpt(&service));
            let tasks = expect!(what, c.call(&Request::ServicePs { service })?,
                                Response::Tasks { tasks } => tasks);
            match format.format {
                Format::Table => print!("{}", render::tasks(&tasks, unix_now())),
                Format::Json => print_json(&tasks)?,
            }
        }
        ServiceCmd::Inspect {
            services,
            format,
            pretty,
        } => {
            let mut out = Vec::new();
            for service in services {
                let what = format!("inspect service {}", excerpt(&service));
                let req = Request::ServiceInspect { service };
                out.push(expect!(what, c.call(&req)?, Response::Service { service } => *service));
            }
            let now = unix_now();
            let render = |s: &_| render::service_pretty(s, now);
            let pretty = pretty.then_some(&render as &dyn Fn(&_) -> String);
            print_inspect(&out, &format, pretty)?;
        }
        ServiceCmd::Update(args) => update_service(c, *args)?,
        ServiceCmd::Rollback { wait, service } => {
            let what = format!("roll back service {}", excerpt(&service));
            let req = Request::ServiceRollback {
                service: service.clone(),
            };
            change_service(c, &service, what, &req, Goal::Rollback, &wait)?;
        }
        ServiceCmd::Scale { wait, scales } => {
            let req = Request::ServiceScaleMany {
                scales: scales
                    .iter()
                    .map(|(service, replicas)| Scale {
                        service: service.clone(),
                        replicas: *replicas,
                    })
                    .collect(),
            };
            let scaled = expect!("scale services", c.call(&req)?,
                                 Response::Services { services } => services);
            for (service, replicas) in &scales {
                println!("{service} scaled to {replicas}");
            }
            if !wait.detach {
                for info in scaled {
                    writeln!(stdout, "{}:", info.spec.name)?;
                    progress::wait(
                        c,
                        &info,
                        Goal::Running,
                        Duration::from_secs(wait.timeout),
                        &mut stdout,
                    )?;
                }
            }
        }
        ServiceCmd::Rm { services } => {
            let req = Request::ServiceRmMany {
                services: services.clone(),
            };
            expect!("remove services", c.call(&req)?, Response::RemovedMany { .. } => ());
            for service in services {
                println!("{service}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        parse_cli(std::iter::once("meshctl").chain(args.iter().copied())).map_err(|e| e.to_string())
    }

    #[test]
    fn network_and_endpoint_mode_flags_refuse_bad_values() {
        let create = |extra: &[&str]| {
            let mut args = vec!["service", "create", "--name", "web"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--", "x"]);
            parse(&args)
        };
        for bad in [
            &["--network", "name=a,color=red"][..],
            &["--network", "alias=x"],
            &["--network", "name=,alias=x"],
            &["--network", "name=a,name=b"],
            &["--endpoint-mode", "rr"],
        ] {
            assert!(create(bad).is_err(), "{bad:?}");
        }
        let Command::Service(ServiceCmd::Create(a)) = create(&[]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.endpoint_mode, EndpointMode::Vip);
        let cli = parse(&["service", "update", "--endpoint-mode", "vip", "web"]).unwrap();
        let Command::Service(ServiceCmd::Update(args)) = cli.command else {
            panic!()
        };
        assert_eq!(args.endpoint_mode, Some(EndpointMode::Vip));
    }

    #[test]
    fn service_create_takes_docker_flags_and_a_command() {
        let cli = parse(&[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "backend",
            "--network",
            "name=front,alias=www,alias=web-v2",
            "--endpoint-mode",
            "dnsrr",
            "--constraint",
            "node.role==worker",
            "--detach",
            "--",
            "hello-server",
            "--port",
            "8080",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Create(a)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(a.name, "web");
        assert_eq!(a.replicas, Some(3));
        assert_eq!(a.mode, ServiceMode::Replicated);
        let spec = a.spec().unwrap();
        assert_eq!((spec.mode, spec.replicas), (ServiceMode::Replicated, 3));
        let net = |name: &str, aliases: &[&str]| NetworkArg {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        };
        assert_eq!(
            a.networks,
            [net("backend", &[]), net("front", &["www", "web-v2"])]
        );
        assert_eq!(a.endpoint_mode, EndpointMode::Dnsrr);
        assert_eq!(
            a.constraints,
            [Constraint::parse("node.role==worker").unwrap()]
        );
        assert!(a.wait.detach);
        assert_eq!(a.command, ["hello-server", "--port", "8080"]);
        assert_eq!(
            cli.host,
            Host::Unix("/run/meshnet/manager.sock".into()),
            "default host"
        );
    }

    #[test]
    fn the_command_may_follow_without_dashes_and_replicas_default_to_one() {
        let cli = parse(&["service", "create", "--name", "w", "sleep", "30"]).unwrap();
        let Command::Service(ServiceCmd::Create(a)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(a.spec().unwrap().replicas, 1);
        assert_eq!(
            (a.replicas, a.command),
            (None, vec!["sleep".to_string(), "30".to_string()])
        );
        assert!(!a.wait.detach);
    }

    #[test]
    fn global_mode_is_parsed_and_refuses_replicas() {
        let create = |extra: &[&str]| {
            let mut args = vec!["service", "create", "--name", "agent"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--", "hello-server"]);
            let cli = parse(&args)?;
            let Command::Service(ServiceCmd::Create(a)) = cli.command else {
                panic!("parsed as {:?}", cli.command)
            };
            Ok::<_, String>(a)
        };
        let spec = create(&["--mode", "global"]).unwrap().spec().unwrap();
        assert_eq!((spec.mode, spec.replicas), (ServiceMode::Global, 0));
        let spec = create(&["--mode", "replicated", "--replicas", "2"])
            .unwrap()
            .spec()
            .unwrap();
        assert_eq!((spec.mode, spec.replicas), (ServiceMode::Replicated, 2));
        let err = create(&["--mode", "global", "--replicas", "2"])
            .unwrap()
            .spec()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--replicas can only be used with replicated mode"
        );
        let err = create(&["--mode", "everywhere"]).unwrap_err();
        assert!(
            err.contains("invalid service mode \"everywhere\": expected replicated or global"),
            "{err}"
        );
    }

    #[test]
    fn bad_replica_counts_are_refused_clearly() {
        for bad in ["-1", "abc", "1.5", ""] {
            let err = parse(&[
                "service",
                "create",
                "--name",
                "w",
                "--replicas",
                bad,
                "--",
                "x",
            ])
            .unwrap_err();
            assert!(
                err.contains("must be a non-negative integer"),
                "{bad}: {err}"
            );
        }
        for bad in ["web=-1", "web=x", "web", "=3"] {
            let err = parse(&["service", "scale", bad]).unwrap_err();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
        let cli = parse(&["service", "scale", "web=0", "api=12", "-d"]).unwrap();
        let Command::Service(ServiceCmd::Scale { wait, scales }) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert!(wait.detach);
        assert_eq!(scales, [("web".to_string(), 0), ("api".to_string(), 12)]);
    }

    #[test]
    fn hosts_formats_and_network_flags() {
        let cli = parse(&[
            "--host",
            "tcp://127.0.0.1:2378",
            "node",
            "ls",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.host, Host::Tcp("127.0.0.1:2378".into()));
        assert!(matches!(
            cli.command,
            Command::Node(NodeCmd::Ls(ListFormat {
                format: Format::Json
            }))
        ));
        let err = parse(&["--host", "http://x", "node", "ls"]).unwrap_err();
        assert!(err.contains("invalid host"), "{err}");
        let cli = parse(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.0.9.0/24",
            "--opt",
            "encrypted",
            "backend",
        ])
        .unwrap();
        let Command::Network(NetworkCmd::Create {
            driver,
            subnet,
            opts,
            name,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(
            (driver.as_str(), subnet.as_deref(), name.as_str()),
            ("overlay", Some("10.0.9.0/24"), "backend")
        );
        assert_eq!(opts, ["encrypted"]);
        assert!(parse(&["service", "ps", "web", "--format", "yaml"]).is_err());
        let cli = parse(&["network", "inspect", "backend", "--format", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Network(NetworkCmd::Inspect {
                format: InspectArgs {
                    format: Some(InspectFormat::Json)
                },
                ..
            })
        ));
        let cli = parse(&["network", "inspect", "a", "b"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Network(NetworkCmd::Inspect {
                format: InspectArgs { format: None },
                ..
            })
        ));
        assert!(parse(&["network", "rm"]).is_err());
    }

    #[test]
    fn publish_flags_in_every_form() {
        use proto::model::Protocol;
        let cli = parse(&[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            "80:8080",
            "-p",
            "53:5353/udp",
            "--publish",
            "mode=host,published=81,target=8080",
            "--",
            "hello-server",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Create(a)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        let seen: Vec<(u16, u16, Protocol, PublishMode)> = a
            .publish
            .iter()
            .map(|p| (p.published, p.target, p.protocol, p.mode))
            .collect();
        assert_eq!(
            seen,
            [
                (80, 8080, Protocol::Tcp, PublishMode::Ingress),
                (53, 5353, Protocol::Udp, PublishMode::Ingress),
                (81, 8080, Protocol::Tcp, PublishMode::Host)
            ]
        );
        assert_eq!(a.command, ["hello-server"]);
        let err = parse(&["service", "create", "--name", "w", "-p", "80", "x"]).unwrap_err();
        assert!(err.contains("invalid publish \"80\""), "{err}");

        let cli = parse(&[
            "service",
            "update",
            "--publish-add",
            "8080:80",
            "--publish-rm",
            "80",
            "--publish-rm",
            "53/udp",
            "-d",
            "web",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Update(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        let UpdateArgs {
            publish_add,
            publish_rm,
            endpoint_mode,
            wait,
            service,
            ..
        } = *args;
        assert_eq!(
            (publish_add[0].published, publish_add[0].target),
            (8080, 80)
        );
        let rm: Vec<String> = publish_rm.iter().map(|p| p.to_string()).collect();
        assert_eq!(rm, ["80/tcp", "53/udp"]);
        assert_eq!(endpoint_mode, None);
        assert!(wait.detach);
        assert_eq!(service, "web");

        let cli = parse(&["publish", "81:8080", "--service", "web", "--mode", "host"]).unwrap();
        let Command::Publish(p) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert!(p.cmd.is_none());
        assert_eq!(p.port.unwrap().port.published, 81);
        assert_eq!(p.mode, Some(ModeArg::Host));
        let cli = parse(&[
            "publish",
            "mode=ingress,published=81,target=8080",
            "--service",
            "web",
            "--mode",
            "host",
        ])
        .unwrap();
        let err = check(&cli).unwrap_err().to_string();
        assert!(err.contains("the mode is given twice"), "{err}");
        assert_eq!(p.service.as_deref(), Some("web"));
        let cli = parse(&["publish", "ls", "--format", "json"]).unwrap();
        let Command::Publish(p) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert!(matches!(
            p.cmd,
            Some(PublishCmd::Ls(ListFormat {
                format: Format::Json
            }))
        ));
        let cli = parse(&["publish", "rm", "80", "53/udp"]).unwrap();
        let Command::Publish(PublishArgs {
            cmd: Some(PublishCmd::Rm { ports }),
            ..
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(ports.len(), 2);
        assert!(
            parse(&["publish", "81:8080"]).is_err(),
            "--service is required"
        );
        assert!(
            parse(&["publish", "--service", "web"]).is_err(),
            "the port is required"
        );
        assert!(parse(&["publish", "rm", "80:8080"]).is_err());
        assert!(parse(&["service", "inspect", "--pretty", "web"]).is_ok());
        assert!(parse(&["network", "inspect", "--pretty", "--format", "json", "x"]).is_err());
    }

    #[test]
    fn node_update_flags() {
        let cli = parse(&[
            "node",
            "update",
            "--availability",
            "drain",
            "--label-add",
            "zone=a",
            "--label-rm",
            "old",
            "node2",
        ])
        .unwrap();
        let Command::Node(NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            node,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(availability, Some(AvailabilityArg::Drain));
        assert_eq!(label_add, [("zone".to_string(), "a".to_string())]);
        assert_eq!(
            (label_rm, node),
            (vec!["old".to_string()], "node2".to_string())
        );
        assert!(parse(&["node", "update", "--label-add", "novalue", "n"]).is_err());
        // The same key twice is refused before anything is sent, not silently the last.
        let twice = vec![
            ("zone".to_string(), "a".to_string()),
            ("zone".to_string(), "b".to_string()),
        ];
        assert_eq!(
            label_map(twice).unwrap_err().to_string(),
            "label zone is given more than once"
        );
        let cli = parse(&["node", "update", "--label-add", "a=1=2", "n"]).unwrap();
        let Command::Node(NodeCmd::Update { label_add, .. }) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(label_add, [("a".to_string(), "1=2".to_string())]);
    }

    #[test]
    fn a_key_given_twice_in_any_key_value_flag_is_refused() {
        for args in [
            &[
                "service",
                "create",
                "--name",
                "w",
                "--publish",
                "published=83,published=84,target=8080",
                "x",
            ][..],
            &[
                "service",
                "update",
                "--publish-add",
                "published=83,target=80,target=81",
                "w",
            ],
            &[
                "publish",
                "mode=host,mode=ingress,published=83,target=80",
                "--service",
                "w",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains("is given more than once"), "{args:?}: {err}");
        }
    }

    #[test]
    fn parse_errors_quote_an_excerpt_of_huge_input() {
        let huge = "x".repeat(10_000);
        for args in [
            vec!["service", "scale", huge.as_str()],
            vec!["service", "create", "--name", "w", "--replicas", &huge, "x"],
            vec!["node", "update", "--label-add", &huge, "n"],
            vec!["node", &huge],
            vec!["service", "ls", &format!("--{huge}")],
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.len() < 500, "{} bytes: {}", err.len(), excerpt(&err));
            assert!(err.contains(" bytes)"), "{}", excerpt(&err));
        }
    }

    fn create_args(extra: &[&str]) -> Result<CreateArgs, String> {
        let mut args = vec!["service", "create", "--name", "web"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "hello-server"]);
        match parse(&args)?.command {
            Command::Service(ServiceCmd::Create(a)) => Ok(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn update_args(extra: &[&str]) -> Result<UpdateArgs, String> {
        let mut args = vec!["service", "update"];
        args.extend_from_slice(extra);
        args.push("web");
        match parse(&args)?.command {
            Command::Service(ServiceCmd::Update(a)) => Ok(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn service_create_takes_env_update_config_and_a_health_check() {
        use proto::model::{FailureAction, HealthTest, Ratio, UpdateOrder};
        let spec = create_args(&[
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--update-parallelism",
            "2",
            "--update-delay",
            "10s",
            "--update-order",
            "start-first",
            "--update-monitor",
            "1m30s",
            "--update-failure-action",
            "rollback",
            "--update-max-failure-ratio",
            "0.25",
            "--stop-grace-period",
            "30s",
            "--health-cmd",
            "curl -f http://localhost:8080/ || exit 1",
            "--health-interval",
            "5s",
            "--health-timeout",
            "2s",
            "--health-retries",
            "4",
            "--health-start-period",
            "500ms",
        ])
        .unwrap()
        .spec()
        .unwrap();
        assert_eq!(
            spec.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())].into()
        );
        assert_eq!(
            spec.update_config,
            UpdateConfig {
                parallelism: 2,
                delay_ms: 10_000,
                order: UpdateOrder::StartFirst,
                monitor_ms: 90_000,
                failure_action: FailureAction::Rollback,
                max_failure_ratio: Ratio(0.25),
            }
        );
        assert_eq!(spec.stop_grace_ms, 30_000);
        let health = spec.health.unwrap();
        assert_eq!(
            health.test,
            HealthTest::Cmd {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "curl -f http://localhost:8080/ || exit 1".into()
                ]
            }
        );
        assert_eq!(
            (
                health.interval_ms,
                health.timeout_ms,
                health.retries,
                health.start_period_ms
            ),
            (5_000, 2_000, 4, 500)
        );
        // Without the flags: docker's defaults and no check.
        let spec = create_args(&[]).unwrap().spec().unwrap();
        assert_eq!(spec.update_config, UpdateConfig::default());
        assert_eq!((spec.stop_grace_ms, spec.health), (10_000, None));
        let spec = create_args(&["--health-http", "8080/healthz"])
            .unwrap()
            .spec()
            .unwrap();
        assert_eq!(
            spec.health.unwrap().test,
            HealthTest::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
    }

    #[test]
    fn bad_task_spec_flags_are_refused_clearly() {
        // A bare number: clap names the flag, the parser says what to write.
        let err = create_args(&["--update-delay", "10"]).unwrap_err();
        assert!(err.contains("--update-delay <DURATION>"), "{err}");
        assert!(err.contains("a number needs a unit"), "{err}");
        let err = create_args(&["--stop-grace-period", "5"]).unwrap_err();
        assert!(err.contains("--stop-grace-period"), "{err}");
        let err = create_args(&["--health-cmd", "true", "--health-http", "80"]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
        for bad in [
            &["--update-max-failure-ratio", "2"][..],
            &["--update-order", "rolling"],
            &["--update-failure-action", "stop"],
            &["--update-parallelism", "-1"],
            &["--health-retries", "0"],
            &["--health-interval", "0s"],
            &["--health-http", "x/healthz"],
            &["--env", "NOVALUE"],
        ] {
            assert!(create_args(bad).is_err(), "{bad:?}");
        }
        let err = create_args(&["--health-interval", "5s"])
            .unwrap()
            .spec()
            .unwrap_err();
        assert!(err.to_string().contains("need a health check"), "{err}");
        // Refused before connecting to the manager.
        let cli = parse(&[
            "service",
            "create",
            "--name",
            "w",
            "--health-retries",
            "2",
            "x",
        ]);
        assert!(check(&cli.unwrap()).is_err());
        let err = create_args(&["-e", "A=1", "-e", "A=2"])
            .unwrap()
            .spec()
            .unwrap_err();
        assert_eq!(err.to_string(), "env A is given more than once");
        let err = update_args(&["--no-healthcheck", "--health-retries", "2"]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
    }

    #[test]
    fn service_update_merges_its_flags_over_the_current_spec() {
        use proto::model::{HealthCheck, HealthTest, UpdateOrder};
        let current = CreateArgs::spec(
            &create_args(&["--update-parallelism", "3", "--health-http", "8080"]).unwrap(),
        )
        .unwrap();
        let args = update_args(&[
            "--args",
            r#"--port 8080 --name "a b""#,
            "--env-add",
            "A=1",
            "--env-rm",
            "B",
            "--constraint-add",
            "node.labels.zone==a",
            "--constraint-rm",
            "node.role==worker",
            "--update-order",
            "start-first",
            "--health-interval",
            "5s",
            "--stop-grace-period",
            "1m",
            "--force",
            "--publish-add",
            "80:8080",
            "-d",
        ])
        .unwrap();
        assert_eq!(args.publish_add.len(), 1);
        let spec = args.spec_update(&current).unwrap();
        assert_eq!(
            spec,
            SpecUpdate {
                command: None,
                args: Some(vec![
                    "--port".into(),
                    "8080".into(),
                    "--name".into(),
                    "a b".into()
                ]),
                env_add: [("A".to_string(), "1".to_string())].into(),
                env_rm: vec!["B".into()],
                constraint_add: vec![Constraint::parse("node.labels.zone==a").unwrap()],
                constraint_rm: vec![Constraint::parse("node.role==worker").unwrap()],
                force: true,
                // The current parallelism stays; only the order changes.
                update_config: Some(UpdateConfig {
                    parallelism: 3,
                    order: UpdateOrder::StartFirst,
                    ..UpdateConfig::default()
                }),
                stop_grace_ms: Some(60_000),
                health: Some(HealthCheck {
                    interval_ms: 5_000,
                    ..HealthCheck::new(HealthTest::Http {
                        port: 8080,
                        path: "/".into()
                    })
                }),
                health_none: false,
            }
        );
        // Nothing but ports: no task-spec change at all.
        let spec = update_args(&["--publish-rm", "80"])
            .unwrap()
            .spec_update(&current)
            .unwrap();
        assert_eq!(spec, SpecUpdate::default());
        let spec = update_args(&["--command", "hello-server --v2"])
            .unwrap()
            .spec_update(&current)
            .unwrap();
        assert_eq!(
            spec.command,
            Some(vec!["hello-server".to_string(), "--v2".to_string()])
        );
        let spec = update_args(&["--no-healthcheck"])
            .unwrap()
            .spec_update(&current)
            .unwrap();
        assert!(spec.health_none && spec.health.is_none());
        // Errors: timing without any check, an empty command, a key twice, an open quote.
        let unchecked = CreateArgs::spec(&create_args(&[]).unwrap()).unwrap();
        let err = update_args(&["--health-timeout", "3s"])
            .unwrap()
            .spec_update(&unchecked)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("give --health-cmd or --health-http"),
            "{err}"
        );
        let err = update_args(&["--command", ""])
            .unwrap()
            .spec_update(&current)
            .unwrap_err();
        assert!(err.to_string().contains("at least the program"), "{err}");
        let err = update_args(&["--env-add", "A=1", "--env-add", "A=2"])
            .unwrap()
            .spec_update(&current)
            .unwrap_err();
        assert_eq!(err.to_string(), "env A is given more than once");
        let err = update_args(&["--args", "'open"]).unwrap_err();
        assert!(err.contains("a quote is not closed"), "{err}");
        let cli = parse(&["service", "rollback", "web", "-d", "--timeout", "5"]).unwrap();
        let Command::Service(ServiceCmd::Rollback { wait, service }) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(
            (wait.detach, wait.timeout, service.as_str()),
            (true, 5, "web")
        );
    }

    #[test]
    fn service_update_help_groups_its_flags() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let update = cmd
            .find_subcommand_mut("service")
            .unwrap()
            .find_subcommand_mut("update")
            .unwrap();
        let help = update.render_help().to_string();
        let at = |text: &str| {
            help.find(text)
                .unwrap_or_else(|| panic!("{text} not in:\n{help}"))
        };
        assert!(at("Arguments:\n  <SERVICE>") < at("Options:"));
        assert!(at("Options:") < at("--env-add <KEY=VALUE>"));
        assert!(at("--detach") < at("Health check:"));
        assert!(at("Health check:") < at("--no-healthcheck"));
        assert!(at("--no-healthcheck") < at("--health-cmd <CMD>"));
        assert!(at("Rolling update:") < at("--update-parallelism <N>"));
        assert!(at("--args <ARGS>") < at("Health check:"));
    }

    #[test]
    fn help_states_the_limits_the_manager_enforces() {
        use clap::CommandFactory;
        use proto::api::*;
        let help = |path: &[&str]| {
            let mut cmd = Cli::command();
            for sub in path {
                cmd = cmd.find_subcommand(sub).unwrap().clone();
            }
            cmd.render_long_help().to_string()
        };
        let create = help(&["service", "create"]);
        for limit in [
            format!("1 to {MAX_NAME_CHARS} of"),
            format!("at most {MAX_REPLICAS}"),
            format!("at most {MAX_CONSTRAINTS}, each up to {MAX_CONSTRAINT_BYTES}"),
            format!("at most {MAX_COMMAND_ARGS} arguments and {MAX_COMMAND_BYTES} bytes"),
        ] {
            assert!(create.contains(&limit), "{limit} not in:\n{create}");
        }
        let update = help(&["node", "update"]);
        for limit in [
            format!("a key up to {MAX_LABEL_KEY_BYTES} bytes"),
            format!("a value up to {MAX_LABEL_VALUE_BYTES} bytes, at most {MAX_LABELS} labels"),
        ] {
            assert!(update.contains(&limit), "{limit} not in:\n{update}");
        }
        assert!(help(&["service", "scale"]).contains(&format!("at most {MAX_REPLICAS}")));
        assert!(help(&["network", "create"]).contains(&format!("1 to {MAX_NAME_CHARS} of")));
    }
}
