//! The agent's state directory: what must survive an agent restart.
//!
//! Layout under `<state-dir>`:
//! - `node_id`: the id the manager gave this node.
//! - `assignment.json`: the last assignment applied, served again before the manager is back.
//! - `netns/`: the namespace files (overlay sandboxes `1-<netid[:10]>`, tasks by task name).
//! - `tasks/<name>.json`: one record per task the agent runs or ran ([`TaskRecord`]).
//! - `tasks/<name>.log`: the task's stdout and stderr.
//! - `tasks/<name>/`: the task's own `resolv.conf` and `hosts`, mounted over the node's in the
//!   task's mount namespace.
//! - `gwbridge.json`: the gwbridge subnet and each leg's address, so a task keeps its address
//!   across agent restarts.
//! - `managers.json`: `{"addrs": ["ADDR:PORT", ...]}`, the managers the leader listed last
//!   (`ManagerMsg::Managers`), tried besides the `--manager` flags' after a restart.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, ErrorKind};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use proto::agent::Assignment;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::lifecycle::TaskRecord;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it and its subdirectories if needed.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        let dir = StateDir {
            root: root.to_path_buf(),
        };
        for d in [dir.root.clone(), dir.netns_dir(), dir.tasks_dir()] {
            fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
        Ok(dir)
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.root.join("netns")
    }

    /// The node's CA, certificate and key (trust::Credentials' node layout).
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    pub fn tasks_dir(&self) -> PathBuf {
        self.root.join("tasks")
    }

    pub fn task_log(&self, name: &str) -> PathBuf {
        self.tasks_dir().join(format!("{name}.log"))
    }

    /// Files the agent writes for the task's own view: `resolv.conf`, `hosts`.
    pub fn task_files_dir(&self, name: &str) -> PathBuf {
        self.tasks_dir().join(name)
    }

    fn task_record_path(&self, name: &str) -> PathBuf {
        self.tasks_dir().join(format!("{name}.json"))
    }

    pub fn node_id(&self) -> Result<Option<String>, StateError> {
        let path = self.root.join("node_id");
        match fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub fn save_node_id(&self, id: &str) -> Result<(), StateError> {
        write_atomic(&self.root.join("node_id"), format!("{id}\n").as_bytes())
    }

    pub fn assignment(&self) -> Result<Option<Assignment>, StateError> {
        read_json(&self.root.join("assignment.json"))
    }

    /// Saves the assignment without its IPsec keys, which the agent keeps in memory only.
    pub fn save_assignment(&self, a: &Assignment) -> Result<(), StateError> {
        let keyless = Assignment {
            encryption: None,
            ..a.clone()
        };
        write_json(&self.root.join("assignment.json"), &keyless)
    }

    /// The gwbridge addresses given out in `subnet` (none if they were given in another one).
    pub fn gw_addrs(&self, subnet: Ipv4Net) -> Result<BTreeMap<String, Ipv4Addr>, StateError> {
        Ok(read_json::<GwFile>(&self.root.join("gwbridge.json"))?
            .filter(|f| f.subnet == subnet)
            .map(|f| f.addrs)
            .unwrap_or_default())
    }

    pub fn save_gw_addrs(
        &self,
        subnet: Ipv4Net,
        addrs: &BTreeMap<String, Ipv4Addr>,
    ) -> Result<(), StateError> {
        let file = GwFile {
            subnet,
            addrs: addrs.clone(),
        };
        write_json(&self.root.join("gwbridge.json"), &file)
    }

    /// The managers the leader listed last (none before any list).
    pub fn managers(&self) -> Result<Vec<String>, StateError> {
        Ok(read_json::<ManagersFile>(&self.root.join("managers.json"))?
            .map(|f| f.addrs)
            .unwrap_or_default())
    }

    pub fn save_managers(&self, addrs: &[String]) -> Result<(), StateError> {
        let file = ManagersFile {
            addrs: addrs.to_vec(),
        };
        write_json(&self.root.join("managers.json"), &file)
    }

    /// Every task record, sorted by task name. A record that cannot be parsed is an error that
    /// names its file: silently dropping it would orphan a running process.
    pub fn task_records(&self) -> Result<Vec<TaskRecord>, StateError> {
        let dir = self.tasks_dir();
        let entries = fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_err("list", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(rec) = read_json::<TaskRecord>(&path)? {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    pub fn save_task(&self, rec: &TaskRecord) -> Result<(), StateError> {
        write_json(&self.task_record_path(&rec.spec.name), rec)
    }

    /// Removes the task's record and files (its log stays).
    pub fn remove_task(&self, name: &str) -> Result<(), StateError> {
        let dir = self.task_files_dir(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &dir)(e)),
        }
        let path = self.task_record_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct GwFile {
    subnet: Ipv4Net,
    addrs: BTreeMap<String, Ipv4Addr>,
}

#[derive(Serialize, Deserialize)]
struct ManagersFile {
    addrs: Vec<String>,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    // Our own plain data types always serialize.
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    write_atomic(path, &bytes)
}

/// Write-then-rename, so a crash leaves the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Phase;
    use proto::agent::TaskSpec;
    use proto::model::TaskState;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-agent-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn spec(name: &str) -> TaskSpec {
        TaskSpec {
            id: format!("id-{name}"),
            name: name.into(),
            service_id: "s1".into(),
            service_name: "web".into(),
            command: vec!["sleep".into(), "1000".into()],
            attachments: vec![],
            env: Default::default(),
            stop_grace_ms: 10_000,
            health: None,
        }
    }

    #[test]
    fn everything_round_trips_and_missing_is_none() {
        let root = temp_dir("state");
        let dir = StateDir::open(&root).unwrap();
        assert!(dir.netns_dir().is_dir() && dir.tasks_dir().is_dir());
        assert_eq!(dir.node_id().unwrap(), None);
        assert_eq!(dir.assignment().unwrap(), None);
        assert!(dir.task_records().unwrap().is_empty());

        dir.save_node_id("node-abc").unwrap();
        assert_eq!(dir.node_id().unwrap().as_deref(), Some("node-abc"));

        let a = Assignment {
            revision: 9,
            ..Default::default()
        };
        dir.save_assignment(&a).unwrap();
        assert_eq!(dir.assignment().unwrap(), Some(a.clone()));
        // IPsec keys never reach the disk.
        let keyed = Assignment {
            encryption: Some(proto::agent::EncryptionKeys {
                keys: vec![proto::agent::EspKey {
                    tag: 1,
                    secret: [0x5a; proto::agent::ESP_KEY_BYTES],
                }],
                send: 1,
            }),
            ..a.clone()
        };
        dir.save_assignment(&keyed).unwrap();
        assert_eq!(dir.assignment().unwrap(), Some(a));
        let text = std::fs::read_to_string(root.join("assignment.json")).unwrap();
        assert!(!text.contains("5a5a") && !text.contains("secret"), "{text}");

        let running = TaskRecord {
            spec: spec("web.2.b"),
            phase: Phase::Running {
                pid: 42,
                start_time: 7,
                netns_inode: 4026532000,
            },
            health: None,
        };
        let failed = TaskRecord {
            spec: spec("web.1.a"),
            phase: Phase::Exited {
                state: TaskState::Failed,
                error: Some("exit status 3".into()),
            },
            health: None,
        };
        dir.save_task(&running).unwrap();
        dir.save_task(&failed).unwrap();
        std::fs::create_dir_all(dir.task_files_dir("web.1.a")).unwrap();
        std::fs::write(dir.task_files_dir("web.1.a").join("hosts"), b"x").unwrap();
        // A reopened directory reads the same (what a restarted agent sees).
        let dir = StateDir::open(&root).unwrap();
        assert_eq!(dir.task_records().unwrap(), vec![failed, running]);
        dir.remove_task("web.1.a").unwrap();
        dir.remove_task("web.1.a").unwrap();
        assert_eq!(dir.task_records().unwrap().len(), 1);
        assert!(!dir.task_files_dir("web.1.a").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn gw_addresses_persist_per_subnet() {
        let root = temp_dir("gw");
        let dir = StateDir::open(&root).unwrap();
        let sub: Ipv4Net = "172.18.0.0/16".parse().unwrap();
        assert!(dir.gw_addrs(sub).unwrap().is_empty());
        let addrs: BTreeMap<String, Ipv4Addr> =
            [("web.1.a".to_string(), "172.18.0.3".parse().unwrap())].into();
        dir.save_gw_addrs(sub, &addrs).unwrap();
        let dir = StateDir::open(&root).unwrap();
        assert_eq!(dir.gw_addrs(sub).unwrap(), addrs);
        // Another subnet (the flag changed): the old addresses mean nothing there.
        assert!(dir
            .gw_addrs("10.99.0.0/24".parse().unwrap())
            .unwrap()
            .is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn managers_persist_as_a_list() {
        let root = temp_dir("managers");
        let dir = StateDir::open(&root).unwrap();
        assert!(dir.managers().unwrap().is_empty());
        let addrs = vec!["10.0.0.1:2377".to_string(), "10.0.0.2:2377".to_string()];
        dir.save_managers(&addrs).unwrap();
        let dir = StateDir::open(&root).unwrap();
        assert_eq!(dir.managers().unwrap(), addrs);
        let text = fs::read_to_string(root.join("managers.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json, serde_json::json!({"addrs": addrs}));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let root = temp_dir("corrupt");
        let dir = StateDir::open(&root).unwrap();
        fs::write(dir.tasks_dir().join("web.1.x.json"), b"{nope").unwrap();
        let err = dir.task_records().unwrap_err().to_string();
        assert!(err.contains("web.1.x.json"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
