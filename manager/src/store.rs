//! Where the desired state is kept: [`Store`], and its embedded implementation, one JSON file
//! in the data dir, replaced atomically (write a temp file, fsync it, rename it over the old
//! one, fsync the directory), so a crash at any point leaves either the old state or the new
//! one. The other implementation keeps it in etcd for several managers (see [`crate::etcd`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::State;

/// Bumped when the file's layout changes incompatibly; an unknown format is refused, not guessed.
const FORMAT: u32 = 1;
const FILE_NAME: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create data dir {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("read state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parse state file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file {path} has format {found}, this manager reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("write state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("etcd: {0}")]
    Etcd(String),
    /// The manager is not (or no longer) the leader: it may not write.
    #[error("this manager is not the leader{}", leader_hint(.0))]
    NotLeader(Option<String>),
}

fn leader_hint(leader: &Option<String>) -> String {
    match leader {
        Some(addr) => format!(" (the leader's API is at {addr})"),
        None => {
            " and no manager is now: an election is under way, or etcd has lost its quorum".into()
        }
    }
}

/// Keeps the state: `save` is called with the state as last saved (or loaded) and the next
/// one, so a store may write only what changed. A failed save must leave the stored state as
/// it was.
pub trait Store: Send {
    fn save(&mut self, prev: &State, next: &State) -> Result<(), StoreError>;
    /// Where the state is, for logs.
    fn describe(&self) -> String;
}

#[derive(Serialize, Deserialize)]
struct FileFormat<S> {
    format: u32,
    state: S,
}

#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl Store for FileStore {
    fn save(&mut self, _prev: &State, next: &State) -> Result<(), StoreError> {
        self.write(next)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

impl FileStore {
    /// Opens the store in `dir` (created if missing) and loads the state, if any was saved.
    pub fn open(dir: &Path) -> Result<(FileStore, Option<State>), StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let store = FileStore {
            dir: dir.to_path_buf(),
        };
        let path = store.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((store, None)),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let header: FileFormat<serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
                path: path.clone(),
                source,
            })?;
        if header.format != FORMAT {
            return Err(StoreError::Format {
                path,
                found: header.format,
            });
        }
        let state = serde_json::from_value(header.state)
            .map_err(|source| StoreError::Parse { path, source })?;
        Ok((store, Some(state)))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    pub fn write(&self, state: &State) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let write = || -> io::Result<()> {
            let body = serde_json::to_vec_pretty(&FileFormat {
                format: FORMAT,
                state,
            })?;
            // It holds the join tokens' secrets: root only.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(&body)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename itself is only durable once the directory entry is on disk.
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| StoreError::Write { path, source })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::tests::{add_network, cluster, spec};
    use proto::model::TaskState;

    /// A unique directory under the system temp dir, removed when dropped.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "mesh-manager-{tag}-{}-{}",
                std::process::id(),
                crate::alloc::new_id()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let tmp = TempDir::new("store");
        let dir = tmp.0.join("data");
        let (store, loaded) = FileStore::open(&dir).unwrap();
        assert!(loaded.is_none());

        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        let t = s.tasks.values().next().unwrap().id.clone();
        s.tasks.get_mut(&t).unwrap().state = TaskState::Running;
        store.write(&s).unwrap();
        assert!(!dir.join("state.json.tmp").exists());

        let (_, loaded) = FileStore::open(&dir).unwrap();
        let mut loaded = loaded.unwrap();
        // The agent port is configuration, given to the manager again at every start.
        assert_eq!(loaded.agent_port, None);
        loaded.agent_port = s.agent_port;
        assert_eq!(loaded, s);
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let tmp = TempDir::new("store-bad");
        fs::write(tmp.0.join("state.json"), b"{not json").unwrap();
        let err = FileStore::open(&tmp.0).unwrap_err();
        assert!(err.to_string().starts_with("parse state file "), "{err}");
        fs::write(tmp.0.join("state.json"), br#"{"format":99,"state":{}}"#).unwrap();
        let err = FileStore::open(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("has format 99"), "{err}");
    }
}
