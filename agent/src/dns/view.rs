//! A task's own `/etc/resolv.conf` and `/etc/hosts`: written under the state dir and
//! bind-mounted over the node's files in the task's own mount namespace (see
//! `tasks::Supervisor::spawn`), so the node's files are never touched.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use proto::agent::TaskSpec;

use super::server::LISTEN;

/// resolv.conf: the embedded resolver only, the node's search list, and ndots:0 so that
/// `web` and `tasks.web` are asked as they are before any search domain is tried.
pub fn resolv_conf(search: &[String]) -> String {
    let mut s = format!("# written by mesh-agent\nnameserver {}\n", LISTEN.ip());
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s.push_str("options ndots:0\n");
    s
}

/// hosts: localhost, and the task's own names on its first network's address (eth0).
pub fn hosts(spec: &TaskSpec) -> String {
    let mut s = String::from(
        "# written by mesh-agent\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    if let Some(a) = spec.attachments.first() {
        s.push_str(&format!("{}\t{}", a.addr.addr(), spec.name));
        // `<service>.<slot>`: the full name without its `.<task id>`.
        if let Some(short) = spec
            .name
            .strip_suffix(spec.id.as_str())
            .and_then(|n| n.strip_suffix('.'))
            .filter(|n| !n.is_empty())
        {
            s.push_str(&format!(" {short}"));
        }
        s.push('\n');
    }
    s
}

/// The files of one task, in `dir` (created): (resolv.conf, hosts).
pub fn write(dir: &Path, spec: &TaskSpec, search: &[String]) -> io::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let resolv = dir.join("resolv.conf");
    let hosts_file = dir.join("hosts");
    fs::write(&resolv, resolv_conf(search))?;
    fs::write(&hosts_file, hosts(spec))?;
    Ok((resolv, hosts_file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::tests::task;

    #[test]
    fn resolv_conf_points_at_the_embedded_resolver() {
        assert_eq!(
            resolv_conf(&["corp.example".into(), "lab".into()]),
            "# written by mesh-agent\nnameserver 127.0.0.11\nsearch corp.example lab\noptions ndots:0\n"
        );
        assert!(!resolv_conf(&[]).contains("search"));
    }

    #[test]
    fn hosts_names_the_task_on_its_first_address() {
        let t = task("web.2.abc", &[("n1", "10.0.9.4"), ("n2", "10.0.8.4")]);
        let h = hosts(&t);
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.0.9.4\tweb.2.abc web.2\n"), "{h}");
        let lonely = task("x.1.y", &[]);
        assert!(!hosts(&lonely).contains("x.1.y"));
    }
}
