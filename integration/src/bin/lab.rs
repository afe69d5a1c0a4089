//! `lab`: bring up, use and remove a meshnet lab of nodes as network namespaces, and run
//! commands inside the guest kernel.
//!
//!   lab up [--nodes N] [--prefix P]       build a lab that stays until `lab down`
//!   lab exec [--prefix P] NODE -- CMD...  run a command on a node (node1, node2, …)
//!   lab add-host [--prefix P] NAME IP     add a host (a client, say) on the underlay
//!   lab down [--prefix P | --all | --orphans]
//!   lab ls
//!   lab hold [--nodes N]                  a lab that lives while this command runs
//!   lab guest -- CMD...                   run shell commands in one boot of the guest kernel

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use integration::guest::{self, GuestConfig};
use integration::lab::{self, Lab, LabConfig, Owner};

#[derive(Parser)]
#[command(
    name = "lab",
    about = "meshnet lab: nodes as network namespaces on an underlay bridge"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a lab of N nodes (192.168.56.11…) that stays until `lab down`.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
    /// Run a command in a node's namespace.
    Exec {
        #[arg(long, default_value = "lab")]
        prefix: String,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add a host (a client, say) on the underlay, e.g. `lab add-host client 192.168.56.100`.
    AddHost {
        #[arg(long, default_value = "lab")]
        prefix: String,
        name: String,
        ip: std::net::Ipv4Addr,
    },
    /// Remove a lab, every lab, or the labs left by crashed runs.
    Down {
        #[arg(long, default_value = "lab", conflicts_with_all = ["all", "orphans"])]
        prefix: String,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        orphans: bool,
    },
    /// List the labs that exist.
    Ls,
    /// Build a lab owned by this process, print its prefix, and remove it on SIGINT/SIGTERM.
    Hold {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Boot the guest kernel once and run each argument as a shell command inside it.
    Guest {
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        #[arg(long, default_value = "3G")]
        memory: String,
        #[arg(long, default_value_t = 45)]
        timeout_minutes: u64,
        #[arg(last = true, required = true)]
        commands: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up { nodes, prefix } => {
            let lab = Lab::up(LabConfig {
                nodes,
                prefix: Some(prefix.clone()),
                owner: Owner::Cli,
            })?;
            println!("lab {prefix} is up: underlay bridge ulbr, 192.168.56.0/24");
            for n in lab.nodes() {
                println!("  {:<8} {:<15} {}", n.name, n.ip, n.ns.path().display());
            }
            println!("run `lab exec --prefix {prefix} node1 -- ip addr`, remove with `lab down --prefix {prefix}`");
        }
        Cmd::Exec {
            prefix,
            node,
            command,
        } => {
            let lab = Lab::open(&prefix).with_context(|| format!("open lab {prefix}"))?;
            let mut cmd = lab.command(&command[0]);
            cmd.args(&command[1..]);
            let status = lab
                .node(&node)?
                .ns
                .spawn(&mut cmd)?
                .wait()
                .with_context(|| format!("wait for {}", command[0]))?;
            return Ok(ExitCode::from(status.code().unwrap_or(1) as u8));
        }
        Cmd::AddHost { prefix, name, ip } => {
            let mut lab = Lab::open(&prefix).with_context(|| format!("open lab {prefix}"))?;
            let host = lab.add_host(&name, ip)?;
            println!("{name} {ip} {}", host.ns.path().display());
        }
        Cmd::Down {
            prefix,
            all,
            orphans,
        } => {
            let removed = if orphans {
                lab::remove_orphans()
            } else if all {
                let labs = lab::list();
                for p in &labs {
                    lab::remove(p)?;
                }
                labs
            } else {
                if !lab::list().contains(&prefix) {
                    bail!("no lab named {prefix} (see `lab ls`)");
                }
                lab::remove(&prefix)?;
                vec![prefix]
            };
            println!("removed {} lab(s) {}", removed.len(), removed.join(" "));
        }
        Cmd::Ls => {
            for p in lab::list() {
                println!("{p}");
            }
        }
        Cmd::Hold { nodes } => {
            let lab = Lab::up(LabConfig {
                nodes,
                ..LabConfig::default()
            })?;
            println!("holding lab {} at {}", lab.prefix(), lab.root().display());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Guest {
            kernel,
            memory,
            timeout_minutes,
            commands,
        } => {
            let config = GuestConfig {
                kernel: kernel.or(GuestConfig::default().kernel),
                memory,
                timeout: Duration::from_secs(timeout_minutes * 60),
                ..GuestConfig::default()
            };
            let run = guest::run(&config, &commands)?;
            println!(
                "guest {} ran {} command(s) in {:.0?}:",
                run.kernel.display(),
                run.results.len(),
                run.elapsed
            );
            for r in &run.results {
                let verdict = if r.status == 0 { "ok" } else { "FAILED" };
                println!("  {verdict:<6} (exit {:>3}) {}", r.status, r.command);
            }
            if !run.success() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
