//! Named network namespaces kept as bind-mounted files in a directory the caller chooses
//! (the `ip netns` model, with any directory instead of `/run/netns`).
//!
//! Code runs inside a namespace on a dedicated thread ([`Netns::run`]); the calling thread
//! never changes namespace, so this is safe to use from async runtimes whose tasks migrate
//! between worker threads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message (and not a `source`), so that it is printed once.
    #[error("{op} network namespace {path}: {cause}")]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("invalid network namespace name {0:?}: use 1-64 characters of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidName(String),
    #[error("{0} is not a network namespace (no nsfs mount there)")]
    NotANamespace(PathBuf),
    #[error("network namespace {0} already exists")]
    Exists(PathBuf),
    #[error("invalid sysctl key {0:?}")]
    InvalidSysctl(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |cause| Error::Io {
        op,
        path: path.to_path_buf(),
        cause,
    }
}

fn sys_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |e| Error::Io {
        op,
        path: path.to_path_buf(),
        cause: io::Error::from(e),
    }
}

/// Checks a namespace name: it becomes a file name and often part of interface names.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

/// An open handle on a named network namespace. Holding it keeps the namespace alive
/// even if its file is deleted.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Creates a new, empty network namespace bound to `dir/name`, with loopback up.
    /// Fails with [`Error::Exists`] if a namespace is already bound there.
    pub fn create(dir: &Path, name: &str) -> Result<Netns> {
        validate_name(name)?;
        let path = dir.join(name);
        fs::create_dir_all(dir).map_err(io_err("create directory for", &path))?;
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return if is_nsfs(&path) {
                    Err(Error::Exists(path))
                } else {
                    // A crash between creating the file and mounting left an empty file.
                    fs::remove_file(&path).map_err(io_err("remove stale file of", &path))?;
                    Netns::create(dir, name)
                };
            }
            Err(e) => return Err(io_err("create file for", &path)(e)),
        }
        let bound = std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                // This thread is private: the new namespace never leaks to other threads.
                unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err("unshare", &path))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys_err("bind-mount", &path))?;
                set_loopback_up().map_err(io_err("bring up loopback in", &path))
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
        if let Err(e) = bound {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Netns::open(&path)
    }

    /// Opens the namespace bound at `path`.
    pub fn open(path: &Path) -> Result<Netns> {
        let file = File::open(path).map_err(io_err("open", path))?;
        if !fd_is_nsfs(&file) {
            return Err(Error::NotANamespace(path.to_path_buf()));
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Opens the namespace `dir/name` if it exists, or creates it.
    pub fn open_or_create(dir: &Path, name: &str) -> Result<Netns> {
        validate_name(name)?;
        match Netns::create(dir, name) {
            Err(Error::Exists(p)) => Netns::open(&p),
            other => other,
        }
    }

    /// The namespace of the calling thread. The path names this thread, so the handle means
    /// the same namespace wherever it is used or reopened.
    pub fn current() -> Result<Netns> {
        let path = format!(
            "/proc/{}/task/{}/ns/net",
            std::process::id(),
            nix::unistd::gettid()
        );
        Netns::open(Path::new(&path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file name of the namespace (its name in its directory).
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The namespace's inode number: equal inodes mean the same namespace.
    pub fn inode(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.ino())
            .map_err(io_err("stat", &self.path))
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// A panic in `f` is propagated to the caller.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(sys_err("enter", &self.path))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Prepares `cmd` so that the process it starts runs inside this namespace.
    /// The namespace file stays open in `self`, which must outlive the spawn.
    pub fn prepare(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is a single async-signal-safe syscall, run in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Starts `cmd` inside this namespace.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        self.prepare(cmd);
        cmd.spawn()
            .map_err(io_err("spawn a process in", &self.path))
    }

    /// Runs `cmd` inside this namespace to completion and returns its output. It is started
    /// from a thread that entered the namespace (a child inherits its thread's namespace), so
    /// that, with no `pre_exec`, the standard library spawns it with posix_spawn (vfork) rather
    /// than fork: a fork copies the caller's page tables and write-protects all its memory,
    /// which in a large multi-threaded caller cost more than the command (B12b: ~70 % of the
    /// idle agent's CPU went to forking `nft` for its periodic checks).
    pub fn output(&self, cmd: &mut Command) -> Result<Output> {
        self.run(|| cmd.output())?
            .map_err(io_err("run a process in", &self.path))
    }

    /// Reads a sysctl (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`) as seen in this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let file = sysctl_path(key)?;
        self.run(|| fs::read_to_string(&file))?
            .map(|s| s.trim_end().to_string())
            .map_err(io_err("read sysctl in", &self.path))
    }

    /// Writes a sysctl in this namespace.
    pub fn write_sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.write_sysctls(&[(key, value)])
    }

    /// Writes sysctls in this namespace, in order, from one thread that entered it (each
    /// entry costs a thread otherwise). Stops at the first that fails, and names it.
    pub fn write_sysctls<K: AsRef<str>, V: AsRef<str> + Sync>(
        &self,
        pairs: &[(K, V)],
    ) -> Result<()> {
        let files = pairs
            .iter()
            .map(|(k, v)| Ok((k.as_ref(), sysctl_path(k.as_ref())?, v.as_ref())))
            .collect::<Result<Vec<_>>>()?;
        self.run(|| {
            files.iter().try_for_each(|(key, file, value)| {
                // Not created if absent (procfs would refuse it anyway): a missing key is
                // NotFound, whatever of its path is missing.
                OpenOptions::new()
                    .write(true)
                    .open(file)
                    .and_then(|mut f| f.write_all(value.as_bytes()))
                    .map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))
            })
        })?
        .map_err(io_err("write sysctl in", &self.path))
    }

    /// Brings sysctls to the values given, from one thread in this namespace: reads each and
    /// writes only those that differ, which it returns with what they were. A key this
    /// namespace does not have is skipped when `skip_absent` (keys that exist only while their
    /// module is loaded, as `net.bridge.*` with br_netfilter), an error otherwise.
    pub fn sync_sysctls<K: AsRef<str>, V: AsRef<str> + Sync>(
        &self,
        pairs: &[(K, V)],
        skip_absent: bool,
    ) -> Result<Vec<SysctlDiff>> {
        let files = pairs
            .iter()
            .map(|(k, v)| Ok((k.as_ref(), sysctl_path(k.as_ref())?, v.as_ref())))
            .collect::<Result<Vec<_>>>()?;
        self.run(|| {
            let mut differ = Vec::new();
            for (key, file, want) in &files {
                let was = match fs::read_to_string(file) {
                    Err(e) if skip_absent && e.kind() == ErrorKind::NotFound => continue,
                    r => r.map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))?,
                };
                // procfs prints multi-value keys with tabs; ours are single values.
                if was.trim_end() == want.trim() {
                    continue;
                }
                OpenOptions::new()
                    .write(true)
                    .open(file)
                    .and_then(|mut f| f.write_all(want.as_bytes()))
                    .map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))?;
                differ.push(SysctlDiff {
                    key: key.to_string(),
                    was: was.trim_end().to_string(),
                    want: want.to_string(),
                });
            }
            Ok::<_, io::Error>(differ)
        })?
        .map_err(io_err("sync sysctls in", &self.path))
    }

    /// Read-only handles on sysctls of this namespace, opened from inside it: a handle goes on
    /// reading this namespace's value from any thread, without entering it again (see
    /// [`read_sysctl_handle`]). A key this namespace does not have is left out when
    /// `skip_absent`, an error otherwise.
    pub fn open_sysctls<K: AsRef<str> + Sync>(
        &self,
        keys: &[K],
        skip_absent: bool,
    ) -> Result<Vec<(String, File)>> {
        let files = keys
            .iter()
            .map(|k| Ok((k.as_ref(), sysctl_path(k.as_ref())?)))
            .collect::<Result<Vec<_>>>()?;
        self.run(|| {
            let mut out = Vec::new();
            for (key, file) in &files {
                match File::open(file) {
                    Err(e) if skip_absent && e.kind() == ErrorKind::NotFound => {}
                    r => out.push((
                        key.to_string(),
                        r.map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))?,
                    )),
                }
            }
            Ok::<_, io::Error>(out)
        })?
        .map_err(io_err("open sysctls in", &self.path))
    }

    /// Process ids whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let ino = self.inode()?;
        Ok(pids_in_netns(&[ino])
            .into_iter()
            .map(|(pid, _)| pid)
            .collect())
    }
}

/// The value of a sysctl through a handle from [`Netns::open_sysctls`], read from its start.
pub fn read_sysctl_handle(file: &File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = file.read_at(&mut buf, 0)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

/// A sysctl found with another value than the one wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlDiff {
    pub key: String,
    pub was: String,
    pub want: String,
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Prepares `cmd` so that its process gets a mount namespace of its own in which each
/// `(source, target)` file is bind-mounted over `target`, as `ip netns exec` does with
/// `/etc/netns/<name>/`: the node's files stay as they are. `/` is made a recursive slave
/// first, so the binds do not propagate back while the node's later mounts still show.
///
/// The copy of the mount table would also hold every namespace file bound at the time, and so
/// keep those namespaces alive after they are deleted on the node (where `/` is private, the
/// deletion does not propagate): the `detach` files (the namespace files bound in the
/// caller's directory) are unmounted in the copy.
pub fn prepare_own_mounts(
    cmd: &mut Command,
    binds: &[(&Path, &Path)],
    detach: &[PathBuf],
) -> Result<()> {
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Error::Io {
            op: "prepare a mount namespace (a path with a NUL byte) for",
            path: p.to_path_buf(),
            cause: io::ErrorKind::InvalidInput.into(),
        })
    };
    let pairs = binds
        .iter()
        .map(|(src, dst)| Ok((cstr(src)?, cstr(dst)?)))
        .collect::<Result<Vec<_>>>()?;
    let detach = detach.iter().map(|p| cstr(p)).collect::<Result<Vec<_>>>()?;
    // SAFETY: after fork only unshare, mount and umount2 (async-signal-safe syscalls) run, on C
    // strings made before the fork; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            let none = std::ptr::null();
            let root = c"/".as_ptr();
            if libc::mount(
                none,
                root,
                none,
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A file already gone or not mounted is fine: only the references matter.
            for path in &detach {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
            for (src, dst) in &pairs {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Unmounts and removes the namespace file at `path`. A namespace that is already gone is fine.
/// The namespace itself lives on while a process or open handle still uses it.
pub fn delete(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a stale plain file); ENOENT: already gone.
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(sys_err("unmount", path)(e)),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// The namespace files bound in `dir` (files that are not nsfs mounts are skipped).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list directory of", dir)(e)),
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_nsfs(p))
        .collect();
    out.sort();
    Ok(out)
}

/// Every (pid, inode) whose network namespace inode is in `inodes`.
pub fn pids_in_netns(inodes: &[u64]) -> Vec<(u32, u64)> {
    let Ok(proc) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let ino = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
            inodes.contains(&ino).then_some((pid, ino))
        })
        .collect()
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    let valid = !key.is_empty()
        && !key.contains("..")
        && !key.starts_with(['/', '.'])
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b));
    if !valid {
        return Err(Error::InvalidSysctl(key.to_string()));
    }
    // The dotted form cannot name interfaces with dots in them; the slash form can.
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    Ok(Path::new("/proc/sys").join(rel))
}

fn is_nsfs(path: &Path) -> bool {
    File::open(path).map(|f| fd_is_nsfs(&f)).unwrap_or(false)
}

fn fd_is_nsfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file.as_fd())
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Sets IFF_UP on `lo` in the calling thread's namespace.
fn set_loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq that we own; the fd is closed below.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["ingress_sbox", "1-abcdef0123", "lb_x.y", "web.1.abc"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sysctl_keys_map_to_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.5/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.5/forwarding")
        );
        for bad in ["", "../etc/passwd", "/etc/passwd", "net.ipv4;rm", "a/../b"] {
            assert!(
                matches!(sysctl_path(bad), Err(Error::InvalidSysctl(_))),
                "{bad}"
            );
        }
    }
}
