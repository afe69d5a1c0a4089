//! The guest-kernel tier: boots Debian's kernel under QEMU with virtme-ng (the host's own file
//! system, read-only, plus one writable directory), loads IPVS and the other modules meshnet
//! needs, runs the given shell commands one after another in that single boot, and returns each
//! command's exit status and output.
//!
//! The host kernel of the build machine has no IPVS; the guest's does. KVM hangs at boot on the
//! build machine, so the guest runs under software emulation: slow, but the same kernel code.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Modules loaded before the commands run.
pub const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "vxlan",
    "bridge",
    "veth",
    "nf_tables",
    "nf_nat",
    "nf_conntrack",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_numgen",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "xt_ipvs",
    // Encrypted overlays: ESP in transport mode with rfc4106(gcm(aes)), configured over XFRM
    // netlink.
    "xfrm_user",
    "esp4",
    "gcm",
    "ghash_generic",
    "ctr",
    "seqiv",
];

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("no guest kernel: install linux-image-amd64 (no /boot/vmlinuz-*) or set MESHNET_GUEST_KERNEL")]
    NoKernel,
    #[error(
        "start the guest with vng (install virtme-ng with pip and qemu-system-x86 with apt): {0}"
    )]
    Spawn(std::io::Error),
    #[error("guest did not finish within {0:?}; console:\n{1}")]
    Timeout(Duration, String),
    #[error("guest ended before running every command (exit {status}); console:\n{console}")]
    Incomplete { status: String, console: String },
    #[error("guest scratch directory {path}: {cause}")]
    Scratch {
        path: PathBuf,
        cause: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Defaults to `$MESHNET_GUEST_KERNEL`, else the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    pub memory: String,
    pub cpus: u32,
    pub timeout: Duration,
    /// Environment passed to every command.
    pub env: Vec<(String, String)>,
    /// Working directory of the commands (the host path; the guest sees the same tree).
    pub cwd: PathBuf,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: std::env::var_os("MESHNET_GUEST_KERNEL").map(PathBuf::from),
            memory: "3G".into(),
            cpus: 2,
            timeout: Duration::from_secs(45 * 60),
            env: Vec::new(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CommandResult {
    pub command: String,
    /// The exit status, or -1 when the guest never ran it.
    pub status: i32,
    pub output: String,
}

#[derive(Debug, Clone)]
pub struct GuestRun {
    pub kernel: PathBuf,
    pub results: Vec<CommandResult>,
    pub elapsed: Duration,
}

impl GuestRun {
    pub fn success(&self) -> bool {
        self.results.iter().all(|r| r.status == 0)
    }
}

/// The newest Debian kernel image in /boot (by version order of the file names).
pub fn default_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort_by_key(|k| version_key(k));
    kernels.pop()
}

fn version_key(p: &Path) -> Vec<u64> {
    p.to_string_lossy()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script the guest runs: modules, then each command with its output teed to the console
/// and to a file, and its status to another file.
fn script(dir: &Path, config: &GuestConfig, commands: &[String]) -> String {
    let d = dir.display();
    let mut s = String::from("#!/bin/sh\n");
    s += &format!(
        "modprobe -a {} > {d}/modprobe.log 2>&1\n",
        MODULES.join(" ")
    );
    s += "export MESHNET_GUEST=1\n";
    for (k, v) in &config.env {
        s += &format!("export {k}={}\n", shell_quote(v));
    }
    s += &format!("cd {}\n", shell_quote(&config.cwd.to_string_lossy()));
    for (i, c) in commands.iter().enumerate() {
        s += &format!("echo '=== guest: run {}'\n", c.replace('\'', ""));
        s += &format!(
            "{{ sh -c {} 2>&1; echo $? > {d}/rc.{i}; }} | tee {d}/out.{i}\n",
            shell_quote(c)
        );
    }
    s += &format!("echo ok > {d}/done\n");
    s
}

/// Boots the guest once and runs `commands` in order. A failing command does not stop the
/// next one: every result comes back.
pub fn run(config: &GuestConfig, commands: &[String]) -> Result<GuestRun, GuestError> {
    let kernel = config
        .kernel
        .clone()
        .or_else(default_kernel)
        .ok_or(GuestError::NoKernel)?;
    let dir = std::env::temp_dir().join(format!("meshnet-guest-{}", std::process::id()));
    let scratch = |cause| GuestError::Scratch {
        path: dir.clone(),
        cause,
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(scratch)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let script_path = dir.join("run.sh");
    fs::write(&script_path, script(&dir, config, commands)).map_err(scratch)?;

    let started = Instant::now();
    let mut child = Command::new("vng")
        .args(["--disable-kvm", "--force-9p", "--user", "root"])
        .arg("--run")
        .arg(&kernel)
        .args([
            "--memory",
            &config.memory,
            "--cpus",
            &config.cpus.to_string(),
        ])
        .arg("--rwdir")
        .arg(&dir)
        .arg("--exec")
        .arg(format!("sh {}", script_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GuestError::Spawn)?;

    // Echo the console as it comes, so a long guest run shows progress in CI logs.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let echo = std::thread::spawn(move || {
        let mut console = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            use std::io::Write;
            let _ = std::io::stdout().write_all(&buf[..n]);
            let _ = std::io::stdout().flush();
            console.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&console).into_owned()
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let status = loop {
        if let Some(status) = child.try_wait().map_err(GuestError::Spawn)? {
            break status;
        }
        if started.elapsed() > config.timeout {
            let _ = child.kill();
            let _ = child.wait();
            let console = echo.join().unwrap_or_default() + &errs.join().unwrap_or_default();
            return Err(GuestError::Timeout(config.timeout, tail(&console)));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = echo.join().unwrap_or_default() + &errs.join().unwrap_or_default();
    if !dir.join("done").exists() {
        return Err(GuestError::Incomplete {
            status: status.to_string(),
            console: tail(&console),
        });
    }
    let results = commands
        .iter()
        .enumerate()
        .map(|(i, c)| CommandResult {
            command: c.clone(),
            status: fs::read_to_string(dir.join(format!("rc.{i}")))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(-1),
            output: fs::read_to_string(dir.join(format!("out.{i}"))).unwrap_or_default(),
        })
        .collect();
    Ok(GuestRun {
        kernel,
        results,
        elapsed: started.elapsed(),
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_sort_by_version() {
        let mut v = [
            PathBuf::from("/boot/vmlinuz-6.1.0-9-amd64"),
            PathBuf::from("/boot/vmlinuz-6.1.0-56-amd64"),
            PathBuf::from("/boot/vmlinuz-5.10.0-30-amd64"),
        ];
        v.sort_by_key(|k| version_key(k));
        assert_eq!(v[2], PathBuf::from("/boot/vmlinuz-6.1.0-56-amd64"));
    }

    #[test]
    fn script_records_every_status_and_quotes_commands() {
        let config = GuestConfig {
            cwd: PathBuf::from("/work/main"),
            env: vec![("A".into(), "it's".into())],
            ..GuestConfig::default()
        };
        let s = script(
            Path::new("/tmp/g"),
            &config,
            &["true".into(), "echo 'x'".into()],
        );
        assert!(s.contains("modprobe -a ip_vs "));
        assert!(s.contains("export A='it'\\''s'"));
        assert!(s.contains("echo $? > /tmp/g/rc.0"));
        assert!(s.contains("sh -c 'echo '\\''x'\\''' 2>&1; echo $? > /tmp/g/rc.1"));
        assert!(s.ends_with("echo ok > /tmp/g/done\n"));
    }
}
