//! Removal of everything a lab made, shared by [`crate::Lab`]'s Drop, the signal handler and
//! the clean-up of labs left by a crashed run.
//!
//! A lab owns one directory (its root). Every namespace it or its agents create is bound under
//! it, and every process it starts carries [`LAB_ENV`] in its environment, inherited by the
//! agents' tasks. So the lab can be removed without any bookkeeping that a crash could lose.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where labs live: one directory per lab, named by its prefix.
pub const LABS_DIR: &str = "/run/meshnet-lab";

/// Environment variable that marks every process started for a lab, with the lab's prefix.
pub const LAB_ENV: &str = "MESHNET_LAB";

/// File in a lab's root naming its owner: `pid starttime`, or `cli` for a lab made by `lab up`.
pub const OWNER_FILE: &str = "owner";

static LIVE_LABS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static SIGNALS: Once = Once::new();

/// Records a lab as live so that SIGINT/SIGTERM/SIGHUP remove it before the process exits.
pub fn register(root: &Path) {
    LIVE_LABS.lock().unwrap().push(root.to_path_buf());
    SIGNALS.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lab: cannot watch signals, an interrupted run leaves its lab for the next run to remove: {e}");
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let roots = LIVE_LABS.lock().map(|l| l.clone()).unwrap_or_default();
                for root in roots {
                    remove(&root);
                }
                std::process::exit(128 + sig);
            }
        });
    });
}

pub fn unregister(root: &Path) {
    LIVE_LABS.lock().unwrap().retain(|r| r != root);
}

/// Start time of a process (field 22 of /proc/PID/stat), to tell a live owner from a reused pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner line for the calling process.
pub fn owner_line() -> String {
    let pid = std::process::id();
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// How long a lab directory may lack its owner file before it counts as left by a crash.
/// Another test's `Lab::up` runs in the instant between creating a lab's directory and
/// writing its owner, and must not take that lab for an orphan.
const UNOWNED_GRACE: Duration = Duration::from_secs(30);

/// Writes the owner file in one step (write a sibling, then rename), so that a concurrent
/// `remove_orphans` reads the whole line or no file, never an empty one.
pub fn write_owner(root: &Path, line: &str) -> std::io::Result<()> {
    let tmp = root.join(format!(".{OWNER_FILE}.tmp"));
    fs::write(&tmp, line)?;
    fs::rename(tmp, root.join(OWNER_FILE))
}

/// True if the lab's owner process is gone (the lab was left by a crash or SIGKILL).
fn is_orphaned(root: &Path) -> bool {
    let Ok(owner) = fs::read_to_string(root.join(OWNER_FILE)) else {
        // No owner yet: being built now, or died while being built long ago.
        let age = fs::metadata(root)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        return age.is_none_or(|age| age > UNOWNED_GRACE);
    };
    let mut it = owner.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return owner.trim() != "cli";
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return true;
    };
    start_time(pid) != Some(start)
}

/// Removes every lab whose owner is gone. Returns the prefixes removed.
pub fn remove_orphans() -> Vec<String> {
    let Ok(entries) = fs::read_dir(LABS_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for root in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if root.is_dir() && is_orphaned(&root) {
            remove(&root);
            removed.push(root.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    removed
}

/// Mount points under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Pids whose environment carries `MESHNET_LAB=<prefix>`.
fn marked_pids(prefix: &str) -> Vec<u32> {
    let marker = format!("{LAB_ENV}={prefix}");
    let me = std::process::id();
    let Ok(proc) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == marker.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills every process of the lab at `root`, unmounts its namespaces and removes its files.
/// Never fails: whatever cannot be removed is reported on stderr.
pub fn remove(root: &Path) {
    let prefix = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mounts = mounts_under(root);
    let inodes: Vec<u64> = mounts
        .iter()
        .filter_map(|m| fs::metadata(m).ok().map(|md| md.ino()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut pids: BTreeSet<u32> = marked_pids(&prefix).into_iter().collect();
        pids.extend(netns::pids_in_netns(&inodes).into_iter().map(|(p, _)| p));
        pids.remove(&std::process::id());
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                eprintln!("lab {prefix}: processes still alive after SIGKILL: {pids:?}");
            }
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for m in mounts_under(root) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("lab {prefix}: unmount {}: {e}", m.display());
        }
    }
    if let Err(e) = fs::remove_dir_all(root) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("lab {prefix}: remove {}: {e}", root.display());
        }
    }
}
