//! Reading back our own table, for reconciliation only (never on the incremental path).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{Error, Result};

/// The outline of our table: each chain with its number of rules, each set or map with its
/// number of elements. Comparing the expected shape with the listed one finds a deleted chain,
/// rule or element (or a stray one) without parsing rule expressions, whose JSON form varies
/// between nft versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    pub chains: BTreeMap<String, usize>,
    pub sets: BTreeMap<String, usize>,
}

/// Parses `nft -j list table ip meshnet` output.
pub fn parse_listing(json: &str) -> Result<TableShape> {
    let root: Value = serde_json::from_str(json).map_err(|e| Error::Listing(e.to_string()))?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Listing("no \"nftables\" array".into()))?;
    let name_of = |obj: &Value, key: &str| -> Result<String> {
        obj.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Listing(format!("an object without {key:?}: {obj}")))
    };
    let mut shape = TableShape::default();
    for item in items {
        if let Some(chain) = item.get("chain") {
            shape.chains.entry(name_of(chain, "name")?).or_insert(0);
        } else if let Some(rule) = item.get("rule") {
            *shape.chains.entry(name_of(rule, "chain")?).or_insert(0) += 1;
        } else if let Some(set) = item.get("set").or_else(|| item.get("map")) {
            let elements = set
                .get("elem")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            shape.sets.insert(name_of(set, "name")?, elements);
        }
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chains_rules_sets_and_maps() {
        // Trimmed from `nft -j list table ip meshnet` (nft 1.0.6).
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"table": {"family": "ip", "name": "meshnet", "handle": 7}},
          {"map": {"family": "ip", "name": "published", "table": "meshnet", "type": ["inet_proto", "inet_service"], "handle": 1, "map": "mark",
                   "elem": [[{"concat": ["tcp", 80]}, 256], [{"concat": ["udp", 80]}, 256]]}},
          {"map": {"family": "ip", "name": "services", "table": "meshnet", "type": "mark", "handle": 2, "map": "verdict"}},
          {"chain": {"family": "ip", "table": "meshnet", "name": "nat-prerouting", "handle": 3, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
          {"chain": {"family": "ip", "table": "meshnet", "name": "svc-256", "handle": 4}},
          {"rule": {"family": "ip", "table": "meshnet", "chain": "nat-prerouting", "handle": 5, "expr": [{"vmap": {"key": {"meta": {"key": "mark"}}, "data": "@services"}}]}},
          {"rule": {"family": "ip", "table": "meshnet", "chain": "nat-prerouting", "handle": 6, "expr": []}}]}"#;
        let shape = parse_listing(json).unwrap();
        assert_eq!(
            shape.chains,
            [("nat-prerouting".into(), 2), ("svc-256".into(), 0)].into()
        );
        assert_eq!(
            shape.sets,
            [("published".into(), 2), ("services".into(), 0)].into()
        );
    }

    #[test]
    fn rejects_what_is_not_a_listing() {
        assert!(matches!(parse_listing("{}"), Err(Error::Listing(_))));
        assert!(matches!(parse_listing("nope"), Err(Error::Listing(_))));
        let nameless = r#"{"nftables": [{"chain": {"family": "ip"}}]}"#;
        assert!(parse_listing(nameless)
            .unwrap_err()
            .to_string()
            .contains("without \"name\""));
    }
}
