//! Schema drift: the observed shape of a flow's payloads, and what changes.
//!
//! Each accepted record is flattened to its field paths and JSON types
//! (`customer.email: string`, `lines[]: array`, `lines[].sku: string`).
//! After a warm-up, a path or a type never seen before is drift: `added`,
//! or `retyped` when the path was known with other types. A field that was
//! in nearly every record and has then been missing from many in a row is
//! `removed`. Each event names the first record that showed it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// Records seen before anything counts as drift.
pub const WARMUP: u64 = 20;
/// A field counts as established when present in at least this share of
/// the records since it first appeared.
pub const ESTABLISHED: f64 = 0.9;
/// An established field missing from this many records in a row is removed.
pub const MISSING_RUN: u64 = 50;

/// The JSON type of a value, as drift reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonType {
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array,
    Object,
}

impl JsonType {
    pub fn of(v: &serde_json::Value) -> JsonType {
        match v {
            serde_json::Value::Null => JsonType::Null,
            serde_json::Value::Bool(_) => JsonType::Boolean,
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => JsonType::Integer,
            serde_json::Value::Number(_) => JsonType::Number,
            serde_json::Value::String(_) => JsonType::String,
            serde_json::Value::Array(_) => JsonType::Array,
            serde_json::Value::Object(_) => JsonType::Object,
        }
    }

    pub fn parse(s: &str) -> Option<JsonType> {
        [
            JsonType::Null,
            JsonType::Boolean,
            JsonType::Integer,
            JsonType::Number,
            JsonType::String,
            JsonType::Array,
            JsonType::Object,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JsonType::Null => "null",
            JsonType::Boolean => "boolean",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::String => "string",
            JsonType::Array => "array",
            JsonType::Object => "object",
        }
    }
}

/// Every (path, type) in a payload. The root itself is not listed.
pub fn fields(value: &serde_json::Value) -> BTreeSet<(String, JsonType)> {
    let mut out = BTreeSet::new();
    visit_fields(value, &mut String::new(), &mut |path, t| {
        out.insert((path.to_string(), t));
    });
    out
}

/// Calls `visit` with the path and type of every field under `v`, in
/// document order; an array's items share their path (`lines[]`), so a
/// path can come more than once. `path` is the buffer the paths are built
/// in: nothing is allocated per field.
fn visit_fields(v: &serde_json::Value, path: &mut String, visit: &mut impl FnMut(&str, JsonType)) {
    let start = path.len();
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                if start > 0 {
                    path.push('.');
                }
                path.push_str(k);
                visit(path, JsonType::of(child));
                visit_fields(child, path, visit);
                path.truncate(start);
            }
        }
        serde_json::Value::Array(items) => {
            path.push_str("[]");
            for item in items {
                visit(path, JsonType::of(item));
                visit_fields(item, path, visit);
            }
            path.truncate(start);
        }
        _ => {}
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    Added,
    Retyped,
    Removed,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Added => "added",
            DriftKind::Retyped => "retyped",
            DriftKind::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<DriftKind> {
        [DriftKind::Added, DriftKind::Retyped, DriftKind::Removed].into_iter().find(|k| k.as_str() == s)
    }
}

/// One change in a flow's payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriftEvent {
    pub kind: DriftKind,
    pub path: String,
    /// The type that appeared (added, retyped) or stopped appearing (removed).
    pub json_type: JsonType,
    /// For `retyped`: the types the path had before.
    pub previous_types: Vec<JsonType>,
    pub at: Timestamp,
    /// The record that first showed the change (for `removed`, the last one that had the field).
    pub example_record_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Seen {
    first_seq: u64,
    last_seq: u64,
    count: u64,
    last_record_id: i64,
    removed_reported: bool,
}

/// The learned shape of one flow. Serializable, so the engine can keep it
/// in the journal across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    records: u64,
    /// Keyed `"path\ttype"` so the map serializes as a JSON object.
    fields: BTreeMap<String, Seen>,
}

fn key(path: &str, t: JsonType) -> String {
    format!("{path}\t{}", t.as_str())
}

impl Shape {
    pub fn records(&self) -> u64 {
        self.records
    }

    fn types_of(&self, path: &str) -> Vec<JsonType> {
        let prefix = format!("{path}\t");
        self.fields
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|t| serde_json::from_value(serde_json::Value::String(t.to_string())).ok())
            .collect()
    }

    /// Learns one record's fields (as [`fields`] lists them); returns what
    /// is new about them, in path order.
    ///
    /// Walks the value once with one path buffer and one key buffer: known
    /// fields are counted without allocating, since this runs for every
    /// accepted record.
    pub fn learn(&mut self, value: &serde_json::Value, record_id: i64, now: Timestamp) -> Vec<DriftEvent> {
        self.records += 1;
        let seq = self.records;
        // Known fields are counted once per record; new ones collected.
        let (known, mut lookup, mut new) = (&mut self.fields, String::new(), Vec::new());
        visit_fields(value, &mut String::new(), &mut |path, t| {
            lookup.clear();
            lookup.push_str(path);
            lookup.push('\t');
            lookup.push_str(t.as_str());
            match known.get_mut(lookup.as_str()) {
                // Already counted for this record (an array's items share paths).
                Some(seen) if seen.last_seq == seq => {}
                Some(seen) => {
                    seen.last_seq = seq;
                    seen.count += 1;
                    seen.last_record_id = record_id;
                    seen.removed_reported = false;
                }
                None => new.push((path.to_string(), t)),
            }
        });
        new.sort();
        new.dedup();
        let warm = seq > WARMUP;
        let mut events = Vec::new();
        for (path, t) in new {
            if warm {
                let previous_types = self.types_of(&path);
                let kind = if previous_types.is_empty() { DriftKind::Added } else { DriftKind::Retyped };
                events.push(DriftEvent {
                    kind,
                    path: path.clone(),
                    json_type: t,
                    previous_types,
                    at: now,
                    example_record_id: record_id,
                });
            }
            self.fields.insert(
                key(&path, t),
                Seen { first_seq: seq, last_seq: seq, count: 1, last_record_id: record_id, removed_reported: false },
            );
        }
        events
    }

    /// Established fields that have been missing from [`MISSING_RUN`]
    /// records in a row; each is reported once until it comes back.
    pub fn removed(&mut self, now: Timestamp) -> Vec<DriftEvent> {
        let records = self.records;
        let mut events = Vec::new();
        for (k, seen) in self.fields.iter_mut() {
            let span = seen.last_seq - seen.first_seq + 1;
            let established = seen.count >= WARMUP && seen.count as f64 >= ESTABLISHED * span as f64;
            if established && !seen.removed_reported && records - seen.last_seq >= MISSING_RUN {
                seen.removed_reported = true;
                let (path, t) = k.split_once('\t').unwrap_or((k.as_str(), "null"));
                let json_type =
                    serde_json::from_value(serde_json::Value::String(t.to_string())).unwrap_or(JsonType::Null);
                events.push(DriftEvent {
                    kind: DriftKind::Removed,
                    path: path.to_string(),
                    json_type,
                    previous_types: Vec::new(),
                    at: now,
                    example_record_id: seen.last_record_id,
                });
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: Timestamp = Timestamp::from_secs(1_800_000_000);

    fn order(extra: serde_json::Value) -> serde_json::Value {
        let mut v =
            json!({"id": "o1", "amount": 12, "customer": {"email": "a@b.c"}, "lines": [{"sku": "A"}], "tags": ["x"]});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        v
    }

    #[test]
    fn fields_are_paths_with_types() {
        let f = fields(&order(json!({})));
        let listed: Vec<String> = f.iter().map(|(p, t)| format!("{p}:{}", t.as_str())).collect();
        assert_eq!(
            listed,
            [
                "amount:integer",
                "customer:object",
                "customer.email:string",
                "id:string",
                "lines:array",
                "lines[]:object",
                "lines[].sku:string",
                "tags:array",
                "tags[]:string"
            ]
        );
    }

    #[test]
    fn nothing_is_drift_during_the_warmup() {
        let mut s = Shape::default();
        for i in 0..WARMUP {
            let f = if i == 3 { order(json!({"coupon": "X"})) } else { order(json!({})) };
            assert!(s.learn(&f, i as i64, T).is_empty());
        }
    }

    #[test]
    fn new_fields_and_new_types_are_reported_once_with_an_example() {
        let mut s = Shape::default();
        for i in 0..WARMUP {
            s.learn(&order(json!({})), i as i64, T);
        }
        let e = s.learn(&order(json!({"coupon": "X", "amount": "12.00"})), 100, T);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!((e[0].kind, e[0].path.as_str(), e[0].json_type), (DriftKind::Retyped, "amount", JsonType::String));
        assert_eq!(e[0].previous_types, [JsonType::Integer]);
        assert_eq!((e[1].kind, e[1].path.as_str(), e[1].example_record_id), (DriftKind::Added, "coupon", 100));
        assert!(s.learn(&order(json!({"coupon": "Y", "amount": "1.00"})), 101, T).is_empty(), "reported once");
    }

    /// Paths shared by an array's items count once per record; a path with
    /// two new types in one record is reported for each, in order.
    #[test]
    fn a_record_counts_each_field_once() {
        let mut s = Shape::default();
        let two_lines = order(json!({"lines": [{"sku": "A"}, {"sku": "B"}, {"sku": "C"}]}));
        for i in 0..WARMUP {
            s.learn(&two_lines, i as i64, T);
        }
        assert!(s.fields.values().all(|seen| seen.count == WARMUP), "{:?}", s.fields);
        let e = s.learn(&order(json!({"tags": [1, 2.5]})), 50, T);
        let got: Vec<(DriftKind, &str, JsonType, Vec<JsonType>)> =
            e.iter().map(|e| (e.kind, e.path.as_str(), e.json_type, e.previous_types.clone())).collect();
        assert_eq!(
            got,
            [
                (DriftKind::Retyped, "tags[]", JsonType::Integer, vec![JsonType::String]),
                (DriftKind::Retyped, "tags[]", JsonType::Number, vec![JsonType::Integer, JsonType::String]),
            ]
        );
    }

    #[test]
    fn an_established_field_that_stops_appearing_is_removed_once() {
        let mut s = Shape::default();
        for i in 0..100 {
            s.learn(&order(json!({})), i, T);
        }
        let without = json!({"id": "o1", "amount": 12, "customer": {"email": "a@b.c"}, "lines": [{"sku": "A"}]});
        for i in 100..(100 + MISSING_RUN as i64 - 1) {
            s.learn(&without, i, T);
            assert!(s.removed(T).is_empty(), "not yet at record {i}");
        }
        s.learn(&without, 999, T);
        let e = s.removed(T);
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["tags", "tags[]"]);
        assert_eq!((e[0].kind, e[0].example_record_id), (DriftKind::Removed, 99));
        assert!(s.removed(T).is_empty(), "reported once");
    }

    #[test]
    fn occasional_fields_are_never_removed() {
        let mut s = Shape::default();
        for i in 0..300 {
            let f = if i % 10 == 0 { order(json!({"note": "n"})) } else { order(json!({})) };
            s.learn(&f, i, T);
        }
        assert!(s.removed(T).iter().all(|e| e.path != "note"));
    }

    #[test]
    fn the_shape_survives_serialization() {
        let mut s = Shape::default();
        s.learn(&order(json!({})), 1, T);
        let back: Shape = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
