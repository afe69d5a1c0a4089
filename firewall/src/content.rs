//! What our table holds, in one canonical form for both sides of the drift check: chains with
//! their hook and their rules in order, sets and maps with their type and their elements as a
//! set. The desired side comes from the full-build script of a [`Ruleset`](crate::Ruleset)
//! ([`Content::from_script`]), the kernel's side from `nft -j list table ip meshnet`
//! ([`Content::from_listing`]); they are equal exactly when the kernel holds what we program.
//!
//! The common form is our own script syntax (`tcp . 80 : 256`, `ct mark set numgen inc mod 2`):
//! the listing's JSON is printed back into it. Only the expressions our renderers write are
//! printed so; anything else (an unknown expression, a known one with a field we do not set,
//! such as a counter or a numgen offset) stays raw JSON, which no rendered rule equals, so a
//! rule edited by hand never compares equal. Our scripts are written the way nft lists them
//! (e.g. no explicit protocol match before `reject with tcp reset`, which nft adds and elides).
//! The fixtures are real listings (nft 1.0.6) of the states in the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::render::Batch;
use crate::{Error, Result, TABLE};

/// The content of our table (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Content {
    chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chain {
    /// `type nat hook output priority -100; policy accept` for a base chain (priority as a
    /// number, as nft lists it).
    base: Option<String>,
    rules: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Set {
    /// `set` or `map`.
    kind: String,
    /// `type mark . mark : ipv4_addr`.
    spec: String,
    elements: BTreeSet<String>,
}

/// How the kernel's table differs from what it should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// No table at all.
    Missing,
    /// A listing that could not be read (the error).
    Unreadable(String),
    /// What differs, one item each (`chain svc-256 rule 1 differs: …`, `map backends:
    /// element 256 . 1 : 10.255.0.11 missing`).
    Differs(Vec<String>),
}

/// At most this many differences are named in a [`Drift`]'s text: a flushed map has thousands.
const SHOWN: usize = 5;

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Missing => write!(f, "table {TABLE} missing"),
            Drift::Unreadable(e) => write!(f, "unreadable listing ({e})"),
            Drift::Differs(items) => {
                let shown: Vec<&str> = items.iter().take(SHOWN).map(String::as_str).collect();
                f.write_str(&shown.join("; "))?;
                if items.len() > SHOWN {
                    write!(f, "; and {} more differences", items.len() - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

/// The numbers of the named chain priorities of the ip family, as nft lists them.
pub(crate) fn priority(name: &str) -> Option<i64> {
    Some(match name {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        n => return n.parse().ok(),
    })
}

impl Content {
    /// The content a full-build script (`Ruleset::render(None, …)`) creates.
    pub fn from_script(script: &Batch) -> Result<Content> {
        let mut c = Content::default();
        let prefix = |verb: &str| format!("{verb} {TABLE} ");
        for line in script.as_str().lines() {
            let bad = || Error::Script(line.to_string());
            if line.strip_prefix("add table ") == Some(TABLE)
                || line.strip_prefix("delete table ") == Some(TABLE)
            {
                continue;
            }
            if let Some(rest) = line.strip_prefix(&prefix("add rule")) {
                let (chain, rule) = rest.split_once(' ').ok_or_else(bad)?;
                let chain = c.chains.get_mut(chain).ok_or_else(bad)?;
                chain.rules.push(rule.to_string());
            } else if let Some(rest) = line.strip_prefix(&prefix("add element")) {
                let (set, list) = rest.split_once(' ').ok_or_else(bad)?;
                let list = list
                    .strip_prefix("{ ")
                    .and_then(|l| l.strip_suffix(" }"))
                    .ok_or_else(bad)?;
                let set = c.sets.get_mut(set).ok_or_else(bad)?;
                set.elements.extend(list.split(", ").map(String::from));
            } else if let Some(rest) = line.strip_prefix(&prefix("add chain")) {
                let (name, base) = match rest.split_once(' ') {
                    None => (rest, None),
                    Some((name, spec)) => (name, Some(base_spec(spec).ok_or_else(bad)?)),
                };
                let chain = Chain {
                    base,
                    rules: Vec::new(),
                };
                c.chains.insert(name.to_string(), chain);
            } else if let Some((kind, rest)) = ["set", "map"]
                .into_iter()
                .find_map(|k| Some((k, line.strip_prefix(&prefix(&format!("add {k}")))?)))
            {
                let (name, spec) = rest.split_once(' ').ok_or_else(bad)?;
                let spec = spec
                    .strip_prefix("{ ")
                    .and_then(|s| s.strip_suffix("; }"))
                    .ok_or_else(bad)?;
                let set = Set {
                    kind: kind.to_string(),
                    spec: spec.to_string(),
                    elements: BTreeSet::new(),
                };
                c.sets.insert(name.to_string(), set);
            } else {
                return Err(bad());
            }
        }
        Ok(c)
    }

    /// The content of our table as `nft -j list table ip meshnet` shows it.
    pub fn from_listing(json: &str) -> Result<Content> {
        let v: Value =
            serde_json::from_str(json).map_err(|e| Error::Listing(format!("not JSON: {e}")))?;
        let items = v
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::Listing("no \"nftables\" array".into()))?;
        let mut c = Content::default();
        let name_of = |o: &Map<String, Value>, key: &str| -> Result<String> {
            o.get(key)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| Error::Listing(format!("an object without \"{key}\"")))
        };
        for item in items {
            let Some(item) = item.as_object() else {
                continue;
            };
            if let Some(o) = item.get("chain").and_then(Value::as_object) {
                // Entered as for a rule: rules are not bound to come after their chain.
                c.chains.entry(name_of(o, "name")?).or_default().base = listed_base(o);
            } else if let Some(o) = item.get("rule").and_then(Value::as_object) {
                let name = name_of(o, "chain")?;
                let rule = listed_rule(o);
                c.chains.entry(name).or_default().rules.push(rule);
            } else if let Some((kind, o)) = ["set", "map"]
                .into_iter()
                .find_map(|k| Some((k, item.get(k)?.as_object()?)))
            {
                c.sets.insert(name_of(o, "name")?, listed_set(kind, o));
            }
        }
        Ok(c)
    }

    /// What `observed` has otherwise than `self`; empty when they are equal.
    pub fn differences(&self, observed: &Content) -> Vec<String> {
        let mut out = Vec::new();
        for (name, want) in &self.sets {
            let kind = &want.kind;
            let Some(got) = observed.sets.get(name) else {
                out.push(format!("{kind} {name} missing"));
                continue;
            };
            if (&got.kind, &got.spec) != (&want.kind, &want.spec) {
                out.push(format!(
                    "{kind} {name}: `{} {}` instead of `{kind} {}`",
                    got.kind, got.spec, want.spec
                ));
            }
            for e in want.elements.difference(&got.elements) {
                out.push(format!("{kind} {name}: element {e} missing"));
            }
            for e in got.elements.difference(&want.elements) {
                out.push(format!("{kind} {name}: element {e} extra"));
            }
        }
        for (name, got) in &observed.sets {
            if !self.sets.contains_key(name) {
                out.push(format!("{} {name} extra", got.kind));
            }
        }
        for (name, want) in &self.chains {
            let Some(got) = observed.chains.get(name) else {
                out.push(format!("chain {name} missing"));
                continue;
            };
            if got.base != want.base {
                let show = |b: &Option<String>| b.clone().unwrap_or_else(|| "no hook".into());
                out.push(format!(
                    "chain {name}: `{}` instead of `{}`",
                    show(&got.base),
                    show(&want.base)
                ));
            }
            for i in 0..want.rules.len().max(got.rules.len()) {
                let n = i + 1;
                match (want.rules.get(i), got.rules.get(i)) {
                    (Some(w), Some(g)) if w != g => out.push(format!(
                        "chain {name} rule {n} differs: `{g}` instead of `{w}`"
                    )),
                    (Some(w), None) => out.push(format!("chain {name} rule {n} missing: `{w}`")),
                    (None, Some(g)) => out.push(format!("chain {name} rule {n} extra: `{g}`")),
                    _ => {}
                }
            }
        }
        for name in observed.chains.keys() {
            if !self.chains.contains_key(name) {
                out.push(format!("chain {name} extra"));
            }
        }
        out
    }
}

/// `type filter hook prerouting priority raw; policy accept;` with the priority as a number.
fn base_spec(spec: &str) -> Option<String> {
    let inner = spec.strip_prefix("{ ")?.strip_suffix("; }")?;
    let (hook, policy) = inner.split_once("; policy ")?;
    let words: Vec<&str> = hook.split(' ').collect();
    let ["type", kind, "hook", hook, "priority", prio] = words[..] else {
        return None;
    };
    let prio = priority(prio)?;
    Some(format!(
        "type {kind} hook {hook} priority {prio}; policy {policy}"
    ))
}

/// A listed chain's hook as [`base_spec`] writes it; `None` for a regular chain. Any field
/// we never set is kept raw, so that it differs.
fn listed_base(o: &Map<String, Value>) -> Option<String> {
    let text = |k: &str| o.get(k).map(plain);
    let kind = text("type")?;
    let mut spec = format!(
        "type {kind} hook {} priority {}; policy {}",
        text("hook").unwrap_or_default(),
        text("prio").unwrap_or_default(),
        text("policy").unwrap_or_default()
    );
    const KNOWN: [&str; 8] = [
        "family", "table", "name", "handle", "type", "hook", "prio", "policy",
    ];
    append_unknown(&mut spec, o, &KNOWN);
    Some(spec)
}

/// A listed set or map: its type as our scripts write it, and its elements.
fn listed_set(kind: &str, o: &Map<String, Value>) -> Set {
    let types = |v: Option<&Value>| -> String {
        match v {
            Some(Value::Array(parts)) => parts.iter().map(plain).collect::<Vec<_>>().join(" . "),
            Some(v) => plain(v),
            None => String::new(),
        }
    };
    let mut spec = format!("type {}", types(o.get("type")));
    if kind == "map" {
        spec.push_str(&format!(" : {}", types(o.get("map"))));
    }
    const KNOWN: [&str; 7] = ["family", "table", "name", "handle", "type", "map", "elem"];
    append_unknown(&mut spec, o, &KNOWN);
    let elements = o
        .get("elem")
        .and_then(Value::as_array)
        .map(|elems| {
            elems
                .iter()
                .map(|e| match (kind, e) {
                    ("map", Value::Array(kv)) if kv.len() == 2 => {
                        format!("{} : {}", element(&kv[0]), element(&kv[1]))
                    }
                    _ => element(e),
                })
                .collect()
        })
        .unwrap_or_default();
    Set {
        kind: kind.to_string(),
        spec,
        elements,
    }
}

/// Fields outside `known`, appended raw (` flags=["interval"]`).
fn append_unknown(spec: &mut String, o: &Map<String, Value>, known: &[&str]) {
    for (k, v) in o {
        if !known.contains(&k.as_str()) {
            spec.push_str(&format!(" {k}={v}"));
        }
    }
}

/// A string without its quotes, anything else as JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// An element's key or data: `tcp . 80`, `256`, `10.255.0.10`, `jump svc-256`; raw JSON for
/// anything else (timeouts, counters, ranges, prefixes).
fn element(v: &Value) -> String {
    match v {
        Value::String(_) | Value::Number(_) => plain(v),
        Value::Object(o) => {
            if let Some(Value::Array(parts)) = only(o, "concat") {
                return parts.iter().map(element).collect::<Vec<_>>().join(" . ");
            }
            verdict(o).unwrap_or_else(|| v.to_string())
        }
        v => v.to_string(),
    }
}

/// The value of `o` when `key` is its only field.
fn only<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    (o.len() == 1).then(|| o.get(key)).flatten()
}

/// An object's fields when all of them are among `allowed`.
fn fields<'a>(v: &'a Value, allowed: &[&str]) -> Option<&'a Map<String, Value>> {
    let o = v.as_object()?;
    o.keys().all(|k| allowed.contains(&k.as_str())).then_some(o)
}

/// `jump <chain>` / `goto <chain>`.
fn verdict(o: &Map<String, Value>) -> Option<String> {
    for verb in ["jump", "goto"] {
        if let Some(target) = only(o, verb) {
            let target = fields(target, &["target"])?.get("target")?.as_str()?;
            return Some(format!("{verb} {target}"));
        }
    }
    None
}

/// A listed rule as our scripts write it: its statements, each printed or raw.
fn listed_rule(o: &Map<String, Value>) -> String {
    let statements = o.get("expr").and_then(Value::as_array);
    let mut words: Vec<String> = statements
        .into_iter()
        .flatten()
        .map(|s| statement(s).unwrap_or_else(|| s.to_string()))
        .collect();
    const KNOWN: [&str; 5] = ["family", "table", "chain", "handle", "expr"];
    let mut rest = String::new();
    append_unknown(&mut rest, o, &KNOWN);
    if !rest.is_empty() {
        words.push(rest.trim_start().to_string());
    }
    words.join(" ")
}

/// One statement of a rule, as our scripts write it; `None` when it is not one we write.
fn statement(s: &Value) -> Option<String> {
    let o = s.as_object().filter(|o| o.len() == 1)?;
    let (name, body) = o.iter().next()?;
    Some(match name.as_str() {
        "accept" | "drop" | "masquerade" if body.is_null() => name.clone(),
        "jump" | "goto" => verdict(o)?,
        "match" => {
            let m = fields(body, &["op", "left", "right"])?;
            let left = m.get("left")?;
            let right = m.get("right")?;
            let ifname = matches!(
                left.pointer("/meta/key").and_then(Value::as_str),
                Some("iifname" | "oifname")
            );
            let right = match right {
                Value::String(s) if ifname => format!("\"{s}\""),
                // Flags (`ct state established,related`).
                Value::Array(flags) => flags
                    .iter()
                    .map(|f| f.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()?
                    .join(","),
                v => expr(v)?,
            };
            match m.get("op")?.as_str()? {
                "==" | "in" => format!("{} {right}", expr(left)?),
                "!=" => format!("{} != {right}", expr(left)?),
                _ => return None,
            }
        }
        "dnat" | "snat" => {
            let n = fields(body, &["family", "addr"])?;
            let family = match n.get("family") {
                Some(f) => format!(" {}", f.as_str()?),
                None => String::new(),
            };
            format!("{name}{family} to {}", expr(n.get("addr")?)?)
        }
        "redirect" => {
            let port = fields(body, &["port"])?.get("port")?.as_u64()?;
            format!("redirect to :{port}")
        }
        "mangle" => {
            let m = fields(body, &["key", "value"])?;
            format!("{} set {}", expr(m.get("key")?)?, expr(m.get("value")?)?)
        }
        "vmap" => {
            let m = fields(body, &["key", "data"])?;
            format!("{} vmap {}", expr(m.get("key")?)?, expr(m.get("data")?)?)
        }
        "reject" => {
            let r = fields(body, &["type", "expr"])?;
            match (
                r.get("type")?.as_str()?,
                r.get("expr").and_then(Value::as_str),
            ) {
                ("tcp reset", None) => "reject with tcp reset".into(),
                // nft's default reject in the ip family.
                ("icmp", Some("port-unreachable")) => "reject".into(),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// An expression, as our scripts write it; `None` when it is not one we write.
fn expr(v: &Value) -> Option<String> {
    let o = match v {
        Value::String(_) | Value::Number(_) => return Some(plain(v)),
        Value::Object(o) if o.len() == 1 => o,
        _ => return None,
    };
    let (name, body) = o.iter().next()?;
    Some(match name.as_str() {
        "payload" => {
            let p = fields(body, &["protocol", "field"])?;
            format!(
                "{} {}",
                p.get("protocol")?.as_str()?,
                p.get("field")?.as_str()?
            )
        }
        "meta" => match fields(body, &["key"])?.get("key")?.as_str()? {
            // nft writes these without `meta`.
            k @ ("iifname" | "oifname") => k.to_string(),
            k => format!("meta {k}"),
        },
        "ct" => format!("ct {}", fields(body, &["key"])?.get("key")?.as_str()?),
        "fib" => {
            let f = fields(body, &["result", "flags"])?;
            let flags = match f.get("flags")? {
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()?,
                Value::String(s) => vec![s.clone()],
                _ => return None,
            };
            format!("fib {} {}", flags.join(" . "), f.get("result")?.as_str()?)
        }
        "concat" => body
            .as_array()?
            .iter()
            .map(expr)
            .collect::<Option<Vec<_>>>()?
            .join(" . "),
        "prefix" => {
            let p = fields(body, &["addr", "len"])?;
            format!("{}/{}", p.get("addr")?.as_str()?, p.get("len")?.as_u64()?)
        }
        "numgen" => {
            let n = fields(body, &["mode", "mod", "offset"])?;
            if n.get("offset").is_some_and(|o| o.as_u64() != Some(0)) {
                return None;
            }
            format!(
                "numgen {} mod {}",
                n.get("mode")?.as_str()?,
                n.get("mod")?.as_u64()?
            )
        }
        "map" => {
            let m = fields(body, &["key", "data"])?;
            let data = match m.get("data")? {
                Value::Object(d) => anonymous_map(only(d, "set")?)?,
                d => expr(d)?,
            };
            format!("{} map {data}", expr(m.get("key")?)?)
        }
        _ => return None,
    })
}

/// `{ 0 : 10.0.9.5, 1 : 10.0.9.6 }`, in key order as our scripts write it.
fn anonymous_map(items: &Value) -> Option<String> {
    let mut pairs: Vec<(&Value, String)> = items
        .as_array()?
        .iter()
        .map(|kv| match kv.as_array()?.as_slice() {
            [k, v] => Some((k, format!("{} : {}", expr(k)?, expr(v)?))),
            _ => None,
        })
        .collect::<Option<_>>()?;
    pairs.sort_by(|(a, _), (b, _)| match (a.as_u64(), b.as_u64()) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => a.to_string().cmp(&b.to_string()),
    });
    let items: Vec<String> = pairs.into_iter().map(|(_, s)| s).collect();
    Some(format!("{{ {} }}", items.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use crate::{Ruleset, SboxState};
    use proto::model::LbKind;

    fn rendered<R: Ruleset>(state: &R) -> Content {
        Content::from_script(&R::render(None, state).unwrap()).unwrap()
    }

    fn differences<R: Ruleset>(state: &R, listing: &str) -> Vec<String> {
        rendered(state).differences(&Content::from_listing(listing).unwrap())
    }

    #[test]
    fn every_table_we_render_compares_equal_to_its_listing() {
        let node = fixtures::node();
        assert_eq!(differences(&node, fixtures::NODE), Vec::<String>::new());
        let sbox = fixtures::sbox(LbKind::Nftables);
        assert_eq!(differences(&sbox, fixtures::SBOX), Vec::<String>::new());
        let ipvs = fixtures::sbox(LbKind::Ipvs);
        assert_eq!(differences(&ipvs, fixtures::IPVS), Vec::<String>::new());
        let task = fixtures::task();
        assert_eq!(differences(&task, fixtures::TASK), Vec::<String>::new());
        // Equal as a whole, too: nothing is left out of the comparison.
        assert_eq!(
            rendered(&task),
            Content::from_listing(fixtures::TASK).unwrap()
        );
    }

    #[test]
    fn an_edited_element_with_the_same_count_differs() {
        let sbox = fixtures::sbox(LbKind::Nftables);
        assert_eq!(
            differences(&sbox, fixtures::SBOX_EDITED_ELEMENT),
            [
                "map published: element tcp . 443 : 257 missing",
                "map published: element tcp . 443 : 258 extra"
            ]
        );
    }

    #[test]
    fn an_edited_rule_with_the_same_count_differs() {
        let sbox = fixtures::sbox(LbKind::Nftables);
        assert_eq!(
            differences(&sbox, fixtures::SBOX_EDITED_RULE),
            ["chain nat-postrouting rule 1 differs: \
              `ip daddr 10.255.0.0/16 oifname \"eth0\" snat to 10.255.0.3` instead of \
              `ip daddr 10.255.0.0/16 oifname \"eth0\" snat to 10.255.0.2`"]
        );
        assert_eq!(
            differences(&sbox, fixtures::SBOX_EDITED_SVC_RULE),
            ["chain svc-256 rule 1 differs: \
              `ct mark set numgen inc mod 3` instead of `ct mark set numgen inc mod 2`"]
        );
    }

    #[test]
    fn a_missing_element_differs() {
        let sbox = fixtures::sbox(LbKind::Nftables);
        assert_eq!(
            differences(&sbox, fixtures::SBOX_MISSING_ELEMENT),
            ["map backends: element 256 . 1 : 10.255.0.11 missing"]
        );
    }

    #[test]
    fn a_changed_chain_policy_differs() {
        assert_eq!(
            differences(&fixtures::node(), fixtures::NODE_POLICY_DROP),
            ["chain filter-forward: \
              `type filter hook forward priority 0; policy drop` instead of \
              `type filter hook forward priority 0; policy accept`"]
        );
    }

    #[test]
    fn another_state_differs_from_a_listing() {
        // The same listing against other desired states: each difference is named.
        let mut node = fixtures::node();
        node.ingress_ports.remove(&crate::PortKey::udp(53));
        node.config.gwbridge = "gw2".into();
        let d = differences(&node, fixtures::NODE);
        assert!(
            d.contains(&"set ingress-ports: element udp . 53 extra".to_string()),
            "{d:?}"
        );
        assert!(
            d.contains(
                &"chain filter-forward rule 4 differs: \
                 `iifname \"gwbr\" oifname \"gwbr\" drop` instead of \
                 `iifname \"gw2\" oifname \"gw2\" drop`"
                    .to_string()
            ),
            "{d:?}"
        );
        // A VIP lost its last task: its chain has one rule more than listed.
        let mut task = fixtures::task();
        task.vips
            .insert("10.0.9.2".parse().unwrap(), Default::default());
        assert_eq!(
            differences(&task, fixtures::TASK),
            [
                "chain vip-10.0.9.2 rule 1 differs: \
                 `dnat to numgen inc mod 2 map { 0 : 10.0.9.5, 1 : 10.0.9.6 }` instead of \
                 `reject with tcp reset`",
                "chain vip-10.0.9.2 rule 2 missing: `reject`"
            ]
        );
        // The IPVS table lacks the balancing maps and chains.
        let d = differences(&fixtures::sbox(LbKind::Nftables), fixtures::IPVS);
        for missing in ["map services missing", "chain svc-256 missing"] {
            assert!(d.contains(&missing.to_string()), "{d:?}");
        }
        assert!(differences(
            &SboxState::new(fixtures::sbox(LbKind::Ipvs).config),
            fixtures::IPVS
        )
        .contains(&"map published: element tcp . 443 : 257 extra".to_string()));
    }

    #[test]
    fn what_we_do_not_write_stays_raw_and_differs() {
        let listing = fixtures::SBOX.replace(
            r#"{"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}}}"#,
            r#"{"counter": {"packets": 0, "bytes": 0}}, {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"numgen": {"mode": "inc", "mod": 2, "offset": 1}}}}"#,
        );
        assert_ne!(listing, fixtures::SBOX);
        let d = differences(&fixtures::sbox(LbKind::Nftables), &listing);
        assert_eq!(d.len(), 1, "{d:?}");
        let (found, wanted) = d[0]
            .strip_prefix("chain svc-256 rule 1 differs: `")
            .and_then(|rest| rest.split_once("` instead of `"))
            .unwrap_or_else(|| panic!("{d:?}"));
        assert_eq!(wanted, "ct mark set numgen inc mod 2`");
        // Raw JSON, whatever the order of its fields.
        assert!(found.starts_with(r#"{"counter":{"#), "{found}");
        assert!(found.contains(r#""offset":1"#), "{found}");
    }

    #[test]
    fn a_drift_names_a_few_differences() {
        assert_eq!(Drift::Missing.to_string(), "table ip meshnet missing");
        let many = Drift::Differs((1..=7).map(|i| format!("d{i}")).collect());
        assert_eq!(
            many.to_string(),
            "d1; d2; d3; d4; d5; and 2 more differences"
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Content::from_listing("nope").is_err());
        assert!(Content::from_listing("{}").is_err());
        let mut b = Batch::default();
        b.flush_chain("x");
        assert!(matches!(Content::from_script(&b), Err(Error::Script(_))));
    }
}
