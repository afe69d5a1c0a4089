//! The state as records: `state/meta` (everything but the four tables, with the format) and
//! `state/{nodes,networks,services,tasks}/<id>`, one per record, so a change is the records it
//! touched and its size does not grow with the cluster. etcd keeps them as keys (under
//! `/meshnet/`); the file store appends them to its journal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::{NodeRecord, State};

pub const STATE: &str = "/meshnet/state/";
const META: &str = "/meshnet/state/meta";
/// Bumped when the layout of the records changes incompatibly.
const FORMAT: u32 = 1;
/// The four tables, each a record per entry.
const TABLES: [&str; 4] = ["nodes", "networks", "services", "tasks"];

/// One record written or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

#[derive(Serialize, Deserialize)]
struct MetaFormat<S> {
    format: u32,
    state: S,
}

/// The state without its four tables, as stored in `state/meta`: what `State` serialises,
/// less the tables, read by reference (a save writes it for every change, so it must not
/// serialise the tables only to drop them). Listing every field makes a new one a compile
/// error here.
fn meta(state: &State) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Meta<'a> {
        revision: &'a u64,
        last_vni: &'a u32,
        last_fwmark: &'a u32,
        cluster_id: &'a String,
        join_secrets: &'a crate::state::JoinSecrets,
        revoked: &'a std::collections::BTreeSet<String>,
        last_subnet: &'a Option<ipnet::Ipv4Net>,
        esp_keys: &'a crate::keys::KeyRing,
    }
    let State {
        nodes: _,
        networks: _,
        services: _,
        tasks: _,
        revision,
        last_vni,
        last_fwmark,
        agent_port: _,
        api_port: _,
        cluster_id,
        join_secrets,
        revoked,
        last_subnet,
        esp_keys,
    } = state;
    serde_json::to_vec(&MetaFormat {
        format: FORMAT,
        state: Meta {
            revision,
            last_vni,
            last_fwmark,
            cluster_id,
            join_secrets,
            revoked,
            last_subnet,
            esp_keys,
        },
    })
}

pub(crate) fn table_key(table: &str, id: &str) -> String {
    format!("{STATE}{table}/{id}")
}

/// Puts for what `next` changed or added since `prev`, deletes for what it removed.
pub fn changes(prev: &State, next: &State) -> serde_json::Result<Vec<Op>> {
    fn diff<T: Serialize>(
        table: &str,
        prev: &BTreeMap<String, T>,
        next: &BTreeMap<String, T>,
        same: impl Fn(&T, &T) -> bool,
        ops: &mut Vec<Op>,
    ) -> serde_json::Result<()> {
        // One walk over both in key order: no lookup per record.
        let mut old = prev.iter().peekable();
        for (id, rec) in next {
            while let Some((gone, _)) = old.next_if(|(k, _)| *k < id) {
                ops.push(Op::Delete(table_key(table, gone)));
            }
            if !old
                .next_if(|(k, _)| *k == id)
                .is_some_and(|(_, p)| same(p, rec))
            {
                ops.push(Op::Put(table_key(table, id), serde_json::to_vec(rec)?));
            }
        }
        for (gone, _) in old {
            ops.push(Op::Delete(table_key(table, gone)));
        }
        Ok(())
    }
    let mut ops = Vec::new();
    let m = meta(next)?;
    if meta(prev)? != m || prev == &State::default() {
        ops.push(Op::Put(META.into(), m));
    }
    diff(
        "nodes",
        &prev.nodes,
        &next.nodes,
        NodeRecord::same_stored,
        &mut ops,
    )?;
    diff(
        "networks",
        &prev.networks,
        &next.networks,
        PartialEq::eq,
        &mut ops,
    )?;
    diff(
        "services",
        &prev.services,
        &next.services,
        PartialEq::eq,
        &mut ops,
    )?;
    diff("tasks", &prev.tasks, &next.tasks, PartialEq::eq, &mut ops)?;
    Ok(ops)
}

/// Rebuilds the state from its records; `None` when there are none.
pub fn decode(kvs: Vec<(String, Vec<u8>)>) -> Result<Option<State>, String> {
    if kvs.is_empty() {
        return Ok(None);
    }
    let mut meta: Option<Value> = None;
    let mut tables: BTreeMap<&str, serde_json::Map<String, Value>> = TABLES
        .iter()
        .map(|t| (*t, serde_json::Map::new()))
        .collect();
    for (key, value) in kvs {
        let parse =
            |v: &[u8]| serde_json::from_slice::<Value>(v).map_err(|e| format!("parse {key}: {e}"));
        if key == META {
            let m: MetaFormat<Value> =
                serde_json::from_value(parse(&value)?).map_err(|e| format!("parse {key}: {e}"))?;
            if m.format != FORMAT {
                return Err(format!(
                    "{key} has format {}, this manager reads format {FORMAT}",
                    m.format
                ));
            }
            meta = Some(m.state);
            continue;
        }
        let rest = key.strip_prefix(STATE).unwrap_or(&key);
        let Some((table, id)) = rest.split_once('/') else {
            return Err(format!("unexpected key {key}"));
        };
        let Some(map) = tables.get_mut(table) else {
            return Err(format!("unexpected key {key}"));
        };
        map.insert(id.to_string(), parse(&value)?);
    }
    let Some(Value::Object(mut state)) = meta else {
        return Err(format!("{META} is missing, but records are there"));
    };
    for (t, map) in tables {
        state.insert(t.to_string(), Value::Object(map));
    }
    serde_json::from_value(Value::Object(state))
        .map(Some)
        .map_err(|e| format!("parse the state: {e}"))
}

/// Applies `ops` to records kept by key.
pub fn apply(records: &mut BTreeMap<String, Vec<u8>>, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put(key, value) => {
                records.insert(key, value);
            }
            Op::Delete(key) => {
                records.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{add_network, as_stored, cluster, spec};
    use crate::state::Task;

    #[test]
    fn a_change_writes_only_the_records_it_touched_and_the_keys_rebuild_the_state() {
        let mut s = cluster(3);
        add_network(&mut s, "backend", "10.0.9.0/24");
        s.create_service(&spec("web", 4, &["backend"]), 1).unwrap();
        s.reconcile(1);
        s.refresh_assignments();
        s.agent_port = None;
        // Assignments are not stored: they are computed again at start.
        let s = as_stored(&s);

        let mut kv = BTreeMap::new();
        let all = changes(&State::default(), &s).unwrap();
        assert_eq!(
            all.len(),
            1 + s.nodes.len() + s.networks.len() + s.services.len() + s.tasks.len()
        );
        apply(&mut kv, all);
        assert_eq!(
            decode(kv.clone().into_iter().collect()).unwrap(),
            Some(s.clone())
        );

        // One task's status: that task's key, and nothing else.
        let mut next = s.clone();
        let t = next.tasks.keys().next().unwrap().clone();
        next.tasks.get_mut(&t).unwrap().error = Some("exit status 1".into());
        let ops = changes(&s, &next).unwrap();
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(matches!(&ops[0], Op::Put(k, _) if *k == table_key("tasks", &t)));
        apply(&mut kv, ops);

        // Removing the service deletes its key and its tasks'.
        let mut gone = next.clone();
        gone.services.clear();
        gone.tasks.clear();
        let ops = changes(&next, &gone).unwrap();
        let deletes = ops.iter().filter(|o| matches!(o, Op::Delete(_))).count();
        assert_eq!(deletes, 1 + next.tasks.len());
        apply(&mut kv, ops);
        assert_eq!(decode(kv.into_iter().collect()).unwrap(), Some(gone));

        assert!(changes(&s, &s).unwrap().is_empty(), "no change, no write");

        // Removed, changed and added records side by side in key order, each found once.
        let ids: Vec<String> = s.tasks.keys().cloned().collect();
        let mut mixed = s.clone();
        mixed.tasks.remove(&ids[0]);
        mixed.tasks.remove(&ids[2]);
        mixed.tasks.get_mut(&ids[1]).unwrap().error = Some("changed".into());
        let mut added = Task::clone(&s.tasks[&ids[3]]);
        added.id = format!("{}z", ids[1]);
        mixed.tasks.insert(added.id.clone(), added.clone().into());
        let ops = changes(&s, &mixed).unwrap();
        let mut keys: Vec<String> = ops
            .iter()
            .map(|o| match o {
                Op::Put(k, _) => format!("put {k}"),
                Op::Delete(k) => format!("delete {k}"),
            })
            .collect();
        let mut want = vec![
            format!("delete {}", table_key("tasks", &ids[0])),
            format!("delete {}", table_key("tasks", &ids[2])),
            format!("put {}", table_key("tasks", &ids[1])),
            format!("put {}", table_key("tasks", &added.id)),
        ];
        keys.sort();
        want.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn foreign_or_damaged_keys_are_refused() {
        assert_eq!(decode(Vec::new()).unwrap(), None);
        let meta =
            |f: u32| serde_json::to_vec(&serde_json::json!({"format": f, "state": {}})).unwrap();
        let err = decode(vec![(META.into(), meta(9))]).unwrap_err();
        assert!(err.contains("has format 9"), "{err}");
        let err = decode(vec![(table_key("tasks", "x"), b"{}".to_vec())]).unwrap_err();
        assert!(err.contains("is missing"), "{err}");
        let err = decode(vec![
            (META.into(), meta(FORMAT)),
            (format!("{STATE}widgets/x"), b"{}".to_vec()),
        ])
        .unwrap_err();
        assert!(err.contains("unexpected key"), "{err}");
    }
}
