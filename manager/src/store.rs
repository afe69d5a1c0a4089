//! Where the desired state is kept: [`Store`], and its embedded implementation, [`FileStore`]:
//! a snapshot and a journal of changes in the data dir. The other implementation keeps it in
//! etcd for several managers (see [`crate::etcd`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::records::{apply, changes, decode, Op};
use crate::state::State;

/// Bumped when the file's layout changes incompatibly; an unknown format is refused, not guessed.
const FORMAT: u32 = 1;
const FILE_NAME: &str = "state.json";
const JOURNAL_NAME: &str = "state.journal";
/// The journal is folded into a new snapshot once it is larger than the snapshot and than
/// this: a start replays at most about one snapshot's worth, and each change costs, amortised,
/// about twice its own records.
const COMPACT_FLOOR: u64 = 4 << 20;

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
    #[error("state journal {path}, line {line}: {reason}")]
    Journal {
        path: PathBuf,
        line: usize,
        reason: String,
    },
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
    /// The last journal entry the snapshot holds: replay starts after it.
    #[serde(default)]
    seq: u64,
    state: S,
}

/// One change in the journal: the records it wrote or deleted (see [`crate::records`]); written
/// by [`entry_line`].
#[derive(Deserialize)]
struct Entry {
    seq: u64,
    put: BTreeMap<String, Value>,
    delete: Vec<String>,
}

/// The embedded store: a snapshot (`state.json`, replaced atomically: written to a temp file,
/// fsynced, renamed over the old one, the directory fsynced) and a journal (`state.journal`)
/// of the changes since, one line per change holding only the records it touched, appended and
/// fsynced. So a change's bytes on disk do not grow with the cluster; a crash leaves the state
/// as of the last complete line.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// The last change written (snapshot or journal).
    seq: u64,
    snapshot_bytes: u64,
    /// The journal's length: its complete lines.
    journal_bytes: u64,
    journal: Option<File>,
}

impl Store for FileStore {
    fn save(&mut self, prev: &State, next: &State) -> Result<(), StoreError> {
        let ops = changes(prev, next).map_err(|e| StoreError::Write {
            path: self.path(),
            source: io::Error::other(e),
        })?;
        if ops.is_empty() {
            return Ok(());
        }
        if self.snapshot_bytes == 0 || self.journal_bytes >= COMPACT_FLOOR.max(self.snapshot_bytes)
        {
            return self.snapshot(next);
        }
        self.append(&ops)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

impl FileStore {
    /// Opens the store in `dir` (created if missing) and loads the state, if any was saved:
    /// the snapshot, then the journal's later changes.
    pub fn open(dir: &Path) -> Result<(FileStore, Option<State>), StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut store = FileStore {
            dir: dir.to_path_buf(),
            seq: 0,
            snapshot_bytes: 0,
            journal_bytes: 0,
            journal: None,
        };
        let path = store.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if store.journal_path().exists() {
                    return Err(store.journal_error(0, "there is a journal but no snapshot"));
                }
                return Ok((store, None));
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let header: FileFormat<Value> =
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
        store.seq = header.seq;
        store.snapshot_bytes = bytes.len() as u64;
        let state: State = serde_json::from_value(header.state)
            .map_err(|source| StoreError::Parse { path, source })?;
        let entries = store.read_journal()?;
        if entries.is_empty() {
            return Ok((store, Some(state)));
        }
        let mut records: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let all = changes(&State::default(), &state)
            .map_err(|e| store.journal_error(0, &format!("encode the snapshot: {e}")))?;
        apply(&mut records, all);
        for (line, entry) in entries {
            let mut ops: Vec<Op> = entry.delete.into_iter().map(Op::Delete).collect();
            for (key, value) in entry.put {
                let bytes = serde_json::to_vec(&value)
                    .map_err(|e| store.journal_error(line, &e.to_string()))?;
                ops.push(Op::Put(key, bytes));
            }
            apply(&mut records, ops);
            store.seq = entry.seq;
        }
        let state = decode(records.into_iter().collect())
            .map_err(|reason| store.journal_error(0, &reason))?;
        Ok((store, state))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_NAME)
    }

    fn journal_error(&self, line: usize, reason: &str) -> StoreError {
        StoreError::Journal {
            path: self.journal_path(),
            line,
            reason: reason.to_string(),
        }
    }

    /// The journal's entries after the snapshot, with their line numbers. A last line without
    /// its newline is a write a crash cut short: it is dropped (and cut off the file).
    fn read_journal(&mut self) -> Result<Vec<(usize, Entry)>, StoreError> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.journal_bytes = complete as u64;
        let mut entries = Vec::new();
        for (i, line) in bytes[..complete].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_slice(line)
                .map_err(|e| self.journal_error(i + 1, &e.to_string()))?;
            if entry.seq > self.seq {
                entries.push((i + 1, entry));
            }
        }
        if complete < bytes.len() {
            tracing::warn!(path = %path.display(), "the state journal's last change was cut short by a crash: it is dropped");
            let len = self.journal_bytes;
            self.journal_file()?
                .set_len(len)
                .map_err(|source| StoreError::Write { path, source })?;
        }
        Ok(entries)
    }

    fn journal_file(&mut self) -> Result<&mut File, StoreError> {
        if self.journal.is_none() {
            let path = self.journal_path();
            let file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| StoreError::Write { path, source })?;
            self.journal = Some(file);
        }
        Ok(self.journal.as_mut().expect("opened above"))
    }

    /// Appends one change and waits for it to be on disk. A failed write is cut off again, so
    /// the journal never holds half a change before a later one.
    fn append(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let seq = self.seq + 1;
        let line = entry_line(seq, ops);
        let path = self.journal_path();
        let len = self.journal_bytes;
        let file = self.journal_file()?;
        let written = file.write_all(&line).and_then(|()| file.sync_data());
        if let Err(source) = written {
            let _ = file.set_len(len);
            return Err(StoreError::Write { path, source });
        }
        self.journal_bytes += line.len() as u64;
        self.seq = seq;
        Ok(())
    }

    /// Writes the whole state as the new snapshot, then empties the journal. A crash between
    /// the two leaves entries the snapshot already holds, which replay skips by their seq.
    pub fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let body = serde_json::to_vec(&FileFormat {
            format: FORMAT,
            seq: self.seq,
            state,
        })
        .map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let write = || -> io::Result<()> {
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
        write().map_err(|source| StoreError::Write {
            path: path.clone(),
            source,
        })?;
        self.snapshot_bytes = body.len() as u64;
        if self.journal_bytes > 0 {
            let journal = self.journal_path();
            let file = self.journal_file()?;
            file.set_len(0)
                .and_then(|()| file.sync_data())
                .map_err(|source| StoreError::Write {
                    path: journal,
                    source,
                })?;
            self.journal_bytes = 0;
        }
        Ok(())
    }
}

/// One journal line, an [`Entry`]: the records go in as `changes` encoded them (JSON already),
/// not parsed and encoded again on every save. Compact JSON holds no raw newline.
fn entry_line(seq: u64, ops: &[Op]) -> Vec<u8> {
    let string = |s: &str| serde_json::to_vec(s).expect("a string encodes");
    let mut line = format!("{{\"seq\":{seq},\"put\":{{").into_bytes();
    let mut deletes = Vec::new();
    for op in ops {
        match op {
            Op::Put(key, record) => {
                if line.last() != Some(&b'{') {
                    line.push(b',');
                }
                line.extend(string(key));
                line.push(b':');
                line.extend(record);
            }
            Op::Delete(key) => deletes.push(key.as_str()),
        }
    }
    line.extend(b"},\"delete\":");
    line.extend(serde_json::to_vec(&deletes).expect("strings encode"));
    line.extend(b"}\n");
    line
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::tests::{add_network, as_stored, cluster, spec};
    use proto::model::TaskState;
    use std::sync::Arc;

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

    /// What the store in `dir` holds on disk: the snapshot, then the journal.
    pub(crate) fn stored_bytes(dir: &Path) -> Vec<u8> {
        let mut bytes = fs::read(dir.join(FILE_NAME)).unwrap();
        bytes.extend(fs::read(dir.join(JOURNAL_NAME)).unwrap_or_default());
        bytes
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The state as stored; the agent port is configuration, given again at every start.
    fn stored(s: &State) -> State {
        let mut s = as_stored(s);
        s.agent_port = None;
        s
    }

    fn web_cluster() -> State {
        let mut s = cluster(2);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 3, &["backend"]), 1).unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        s
    }

    #[test]
    fn state_round_trips_through_the_snapshot() {
        let tmp = TempDir::new("store");
        let dir = tmp.0.join("data");
        let (mut store, loaded) = FileStore::open(&dir).unwrap();
        assert!(loaded.is_none());

        let mut s = web_cluster();
        let t = s.tasks.values().next().unwrap().id.clone();
        s.tasks.get_mut(&t).unwrap().state = TaskState::Running;
        store.save(&State::default(), &s).unwrap();
        assert!(!dir.join("state.json.tmp").exists());
        assert!(
            !dir.join(JOURNAL_NAME).exists(),
            "the first save is a snapshot"
        );

        let (_, loaded) = FileStore::open(&dir).unwrap();
        assert_eq!(loaded.unwrap(), stored(&s));
    }

    #[test]
    fn changes_go_to_the_journal_with_their_records_only_and_replay_on_open() {
        let tmp = TempDir::new("store-journal");
        let (mut store, _) = FileStore::open(&tmp.0).unwrap();
        let s = web_cluster();
        store.save(&State::default(), &s).unwrap();
        let snapshot = fs::metadata(store.path()).unwrap().len();

        // One task's status: one line with that task's record.
        let mut next = s.clone();
        let t = next.tasks.keys().next().unwrap().clone();
        next.tasks.get_mut(&t).unwrap().state = TaskState::Running;
        store.save(&s, &next).unwrap();
        let journal = fs::read_to_string(tmp.0.join(JOURNAL_NAME)).unwrap();
        assert_eq!(journal.lines().count(), 1);
        let entry: Entry = serde_json::from_str(journal.trim()).unwrap();
        assert_eq!(
            entry.put.keys().collect::<Vec<_>>(),
            [&crate::records::table_key("tasks", &t)]
        );
        assert_eq!(fs::metadata(store.path()).unwrap().len(), snapshot);

        // A node's new assignment alone is not stored: no line.
        let mut assigned = next.clone();
        let node = assigned.nodes.keys().next().unwrap().clone();
        Arc::make_mut(&mut assigned.nodes.get_mut(&node).unwrap().assignment).revision += 100;
        store.save(&next, &assigned).unwrap();
        assert_eq!(
            fs::read_to_string(tmp.0.join(JOURNAL_NAME))
                .unwrap()
                .lines()
                .count(),
            1
        );

        // Removing the service: its record and its tasks' deleted.
        let mut gone = assigned.clone();
        gone.services.clear();
        gone.tasks.clear();
        store.save(&assigned, &gone).unwrap();
        let (_, loaded) = FileStore::open(&tmp.0).unwrap();
        assert_eq!(loaded.unwrap(), stored(&gone));
    }

    #[test]
    fn a_change_cut_short_by_a_crash_is_dropped_and_cut_off() {
        let tmp = TempDir::new("store-torn");
        let (mut store, _) = FileStore::open(&tmp.0).unwrap();
        let s = web_cluster();
        store.save(&State::default(), &s).unwrap();
        let mut next = s.clone();
        let t = next.tasks.keys().next().unwrap().clone();
        next.tasks.get_mut(&t).unwrap().state = TaskState::Running;
        store.save(&s, &next).unwrap();
        let path = tmp.0.join(JOURNAL_NAME);
        let whole = fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"seq":3,"put":{"#);
        fs::write(&path, &torn).unwrap();

        let (mut store, loaded) = FileStore::open(&tmp.0).unwrap();
        assert_eq!(loaded.unwrap(), stored(&next));
        assert_eq!(fs::read(&path).unwrap(), whole, "the torn line is cut off");
        // Later changes follow the last complete line and replay.
        let mut later = next.clone();
        later.tasks.get_mut(&t).unwrap().state = TaskState::Failed;
        store.save(&next, &later).unwrap();
        let (_, loaded) = FileStore::open(&tmp.0).unwrap();
        assert_eq!(loaded.unwrap(), stored(&later));

        // A damaged line before others is not guessed around.
        let mut bad = b"{not json}\n".to_vec();
        bad.extend_from_slice(&whole);
        fs::write(&path, bad).unwrap();
        let err = FileStore::open(&tmp.0).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_snapshot_empties_the_journal_and_entries_it_holds_are_not_replayed() {
        let tmp = TempDir::new("store-compact");
        let (mut store, _) = FileStore::open(&tmp.0).unwrap();
        let s = web_cluster();
        store.save(&State::default(), &s).unwrap();
        let t = s.tasks.keys().next().unwrap().clone();
        let mut prev = s.clone();
        let mut last_journal = Vec::new();
        for (i, state) in [TaskState::Running, TaskState::Failed, TaskState::Running]
            .into_iter()
            .enumerate()
        {
            let mut next = prev.clone();
            next.tasks.get_mut(&t).unwrap().state = state;
            next.tasks.get_mut(&t).unwrap().updated_at = i as u64;
            store.save(&prev, &next).unwrap();
            prev = next;
            last_journal = fs::read(tmp.0.join(JOURNAL_NAME)).unwrap();
        }
        // The snapshot holds all three; a crash before the journal was emptied leaves them
        // there, and replaying them over the snapshot would undo nothing, but they are skipped.
        store.snapshot(&prev).unwrap();
        assert_eq!(fs::metadata(tmp.0.join(JOURNAL_NAME)).unwrap().len(), 0);
        let mut after = prev.clone();
        after.tasks.clear();
        after.services.clear();
        fs::write(tmp.0.join(JOURNAL_NAME), &last_journal).unwrap();
        let (_, loaded) = FileStore::open(&tmp.0).unwrap();
        assert_eq!(loaded.unwrap(), stored(&prev));
        // Once the journal outgrows the snapshot, the next save is a snapshot.
        store.journal_bytes = COMPACT_FLOOR.max(store.snapshot_bytes);
        store.save(&prev, &after).unwrap();
        assert_eq!(store.journal_bytes, 0);
        let (_, loaded) = FileStore::open(&tmp.0).unwrap();
        assert_eq!(loaded.unwrap(), stored(&after));
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
