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

/// The (path, type) of every field of a payload, in [`visit_fields`]'s
/// order, read straight from its bytes: for a flow whose records need no
/// more than well-formed JSON, intake checks the bytes and lists the fields
/// in one pass, without building a `serde_json::Value` (in the webhook
/// handler's profile, parsing into a `Value`, learning from it and dropping
/// it were half of its time). One buffer holds every field's
/// `path\ttype`, the key [`Shape`] counts it under, back to back; a path can
/// hold any character, so where each ends is kept beside it.
///
/// The same as walking the parsed `Value`, except for an object with a key
/// twice: the parsed value keeps only the last, and this lists both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldList {
    keys: String,
    /// Per field: where its key ends in `keys`, and its type.
    ends: Vec<(usize, JsonType)>,
    /// Past [`DEDUP_AFTER`] bytes of keys, the keys listed, so that none is
    /// listed twice: an array of many items under a long key would
    /// otherwise list that key once per item (a 1 MiB body could ask for
    /// gigabytes). Learning counts a field once per record either way.
    seen: Option<std::collections::HashSet<String>>,
}

/// See [`FieldList::seen`]: far more than any ordinary record lists.
const DEDUP_AFTER: usize = 1 << 20;

/// The key under which serde_json (with its `raw_value` feature, which
/// axum turns on) reads an object as a raw JSON text when parsing a
/// `Value`: a body with it is parsed as before, not streamed.
const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

impl FieldList {
    /// Parses `raw` as JSON, as `serde_json::from_slice` would (the same
    /// errors), listing its fields.
    pub fn of_json(raw: &[u8]) -> serde_json::Result<FieldList> {
        use serde::de::DeserializeSeed as _;
        let mut list = FieldList { keys: String::with_capacity(raw.len()), ends: Vec::with_capacity(32), seen: None };
        let reserved = std::cell::Cell::new(false);
        let mut de = serde_json::Deserializer::from_slice(raw);
        let walked = Walk { list: &mut list, path: &mut String::new(), root: true, reserved: &reserved }
            .deserialize(&mut de)
            .and_then(|()| de.end());
        match walked {
            Ok(()) => Ok(list),
            Err(_) if reserved.get() => serde_json::from_slice(raw).map(|v| FieldList::of_value(&v)),
            Err(e) => Err(e),
        }
    }

    /// The fields of a parsed value, in the same form.
    pub fn of_value(value: &serde_json::Value) -> FieldList {
        let mut list = FieldList::default();
        visit_fields(value, &mut String::new(), &mut |path, t| list.push(path, t));
        list
    }

    fn push(&mut self, path: &str, t: JsonType) {
        if self.keys.len() >= DEDUP_AFTER {
            if self.seen.is_none() {
                self.seen = Some(self.entries().map(|(k, _, _)| k.to_string()).collect());
            }
            if let Some(seen) = &mut self.seen
                && !seen.insert(key(path, t))
            {
                return;
            }
        }
        self.keys.push_str(path);
        self.keys.push('\t');
        self.keys.push_str(t.as_str());
        self.ends.push((self.keys.len(), t));
    }

    /// Each field as `path\ttype` (the key [`Shape`] keeps it under), with
    /// its path and type.
    fn entries(&self) -> impl Iterator<Item = (&str, &str, JsonType)> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|(end, _)| *end));
        starts.zip(&self.ends).map(|(start, &(end, t))| {
            let key = &self.keys[start..end];
            (key, &key[..key.len() - 1 - t.as_str().len()], t)
        })
    }
}

/// One JSON value, streamed: lists the value itself under `path` (unless it
/// is the root), then its fields, as [`visit_fields`] does.
struct Walk<'a> {
    list: &'a mut FieldList,
    path: &'a mut String,
    root: bool,
    /// Set on meeting [`RAW_VALUE_KEY`]; the walk then stops.
    reserved: &'a std::cell::Cell<bool>,
}

impl Walk<'_> {
    fn list_as(&mut self, t: JsonType) {
        if !self.root {
            self.list.push(self.path, t);
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.list_as(JsonType::Null);
        Ok(())
    }
    fn visit_bool<E>(mut self, _: bool) -> Result<(), E> {
        self.list_as(JsonType::Boolean);
        Ok(())
    }
    fn visit_i64<E>(mut self, _: i64) -> Result<(), E> {
        self.list_as(JsonType::Integer);
        Ok(())
    }
    fn visit_u64<E>(mut self, _: u64) -> Result<(), E> {
        self.list_as(JsonType::Integer);
        Ok(())
    }
    fn visit_f64<E>(mut self, _: f64) -> Result<(), E> {
        self.list_as(JsonType::Number);
        Ok(())
    }
    fn visit_str<E>(mut self, _: &str) -> Result<(), E> {
        self.list_as(JsonType::String);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        self.list_as(JsonType::Array);
        let start = self.path.len();
        self.path.push_str("[]");
        while items
            .next_element_seed(Walk { list: self.list, path: self.path, root: false, reserved: self.reserved })?
            .is_some()
        {}
        self.path.truncate(start);
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut entries: A) -> Result<(), A::Error> {
        self.list_as(JsonType::Object);
        let start = self.path.len();
        loop {
            if start > 0 {
                self.path.push('.');
            }
            if entries.next_key_seed(Key(self.path, self.reserved))?.is_none() {
                break;
            }
            entries.next_value_seed(Walk { list: self.list, path: self.path, root: false, reserved: self.reserved })?;
            self.path.truncate(start);
        }
        self.path.truncate(start);
        Ok(())
    }
}

/// An object's key, appended to the path.
struct Key<'a>(&'a mut String, &'a std::cell::Cell<bool>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<(), E> {
        if key == RAW_VALUE_KEY {
            self.1.set(true);
            return Err(E::custom("a raw value"));
        }
        self.0.push_str(key);
        Ok(())
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
    /// The value's fields are listed into one [`FieldList`] buffer; known
    /// fields are then counted without allocating, since this runs for
    /// every accepted record.
    pub fn learn(&mut self, value: &serde_json::Value, record_id: i64, now: Timestamp) -> Vec<DriftEvent> {
        self.learn_list(&FieldList::of_value(value), record_id, now)
    }

    /// [`Shape::learn`] from a record's [`FieldList`].
    pub fn learn_list(&mut self, list: &FieldList, record_id: i64, now: Timestamp) -> Vec<DriftEvent> {
        self.records += 1;
        let seq = self.records;
        // Known fields are counted once per record; new ones collected,
        // each once (an array's items share their paths).
        let (known, mut new, mut listed) = (&mut self.fields, Vec::new(), std::collections::HashSet::new());
        for (lookup, path, t) in list.entries() {
            match known.get_mut(lookup) {
                // Already counted for this record (an array's items share paths).
                Some(seen) if seen.last_seq == seq => {}
                Some(seen) => {
                    seen.last_seq = seq;
                    seen.count += 1;
                    seen.last_record_id = record_id;
                    seen.removed_reported = false;
                }
                None => {
                    if !listed.contains(lookup) {
                        listed.insert(lookup.to_string());
                        new.push((path.to_string(), t));
                    }
                }
            }
        }
        new.sort();
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

    /// Fields read from the bytes in one pass, against fields read from the parsed value.
    fn both_ways(raw: &str) -> (FieldList, FieldList) {
        let value: serde_json::Value = serde_json::from_str(raw).unwrap();
        (FieldList::of_json(raw.as_bytes()).unwrap(), FieldList::of_value(&value))
    }

    #[test]
    fn fields_read_from_bytes_are_those_of_the_parsed_value() {
        for raw in [
            r#"{"id":"o1","amount":12,"price":12.5,"big":18446744073709551616,"neg":-3,"ok":true,"none":null,
                "customer":{"email":"a@b.c","address":{"city":"Lyon"}},"lines":[{"sku":"A","qty":1},{"sku":"B","note":"x"}],
                "tags":["x",1,null,[2,{"deep":[]}]],"empty":{},"nothing":[],"esc\"aped":"\u00e9"}"#,
            r#"[{"a":1},[{"b":2}],3]"#,
            r#""just a string""#,
            "42",
            "{}",
            " { \"spaced\" : [ 1 , 2.0 ] } ",
        ] {
            let (streamed, parsed) = both_ways(raw);
            assert_eq!(streamed, parsed, "{raw}");
        }
        let (streamed, _) = both_ways(r#"{"a":{"b":[1,"x"]}}"#);
        let listed: Vec<(&str, JsonType)> = streamed.entries().map(|(_, p, t)| (p, t)).collect();
        assert_eq!(
            listed,
            [
                ("a", JsonType::Object),
                ("a.b", JsonType::Array),
                ("a.b[]", JsonType::Integer),
                ("a.b[]", JsonType::String)
            ]
        );
    }

    #[test]
    fn bytes_that_are_not_json_fail_as_parsing_them_does() {
        let bad: [&[u8]; 8] =
            [b"", b"{", b"[1,]", b"{\"a\" 1}", b"{\"a\":1} trailing", b"\"\xff\xfe\"", b"{\"\xc3\x28\":1}", b"nul"];
        for raw in bad {
            let parsed = serde_json::from_slice::<serde_json::Value>(raw).unwrap_err().to_string();
            let streamed = FieldList::of_json(raw).unwrap_err().to_string();
            assert_eq!(streamed, parsed, "{}", String::from_utf8_lossy(raw));
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let parsed = serde_json::from_str::<serde_json::Value>(&deep).unwrap_err().to_string();
        assert_eq!(FieldList::of_json(deep.as_bytes()).unwrap_err().to_string(), parsed);
    }

    /// What `of_json` makes of `raw` is what parsing it into a `Value` does.
    fn same_as_parsing(raw: &[u8]) {
        match (FieldList::of_json(raw), serde_json::from_slice::<serde_json::Value>(raw)) {
            (Ok(listed), Ok(value)) => assert_eq!(listed, FieldList::of_value(&value)),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("{}: streamed {a:?}, parsed {b:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn serde_jsons_raw_value_key_is_read_as_parsing_reads_it() {
        for raw in [
            r#"{"$serde_json::private::RawValue":"nope"}"#,
            r#"{"$serde_json::private::RawValue":1}"#,
            r#"{"$serde_json::private::RawValue":"0","b":1}"#,
            r#"{"x":{"$serde_json::private::RawValue":"[1]"}}"#,
            r#"{"x":{"\u0024serde_json::private::RawValue":"{\"a\":true}"}}"#,
        ] {
            same_as_parsing(raw.as_bytes());
        }
    }

    #[test]
    fn a_long_key_over_many_items_is_listed_once() {
        let key = "k".repeat(64 * 1024);
        let items = vec![r#"{"a":1,"b":[true]}"#; 200].join(",");
        let raw = format!(r#"{{"{key}":[{items}],"z":null}}"#);
        let listed = FieldList::of_json(raw.as_bytes()).unwrap();
        // Without the check, 200 items would list over 25 MiB of keys.
        assert!(listed.keys.len() < 2 * DEDUP_AFTER, "{}", listed.keys.len());
        let value: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(listed, FieldList::of_value(&value));
        let distinct: BTreeSet<(String, JsonType)> = listed.entries().map(|(_, p, t)| (p.to_string(), t)).collect();
        assert_eq!(distinct, fields(&value));
        let (mut from_value, mut from_list) = (Shape::default(), Shape::default());
        assert_eq!(from_list.learn_list(&listed, 1, T), from_value.learn(&value, 1, T));
        assert_eq!(from_list, from_value);
    }

    #[test]
    fn learning_from_a_field_list_is_learning_from_the_value() {
        let (mut from_value, mut from_list) = (Shape::default(), Shape::default());
        for i in 0..(WARMUP as i64 + 60) {
            let record = match i {
                30 => order(json!({"coupon": "X"})),
                31 => order(json!({"amount": "12.00"})),
                i if i > 40 => json!({"id": "o", "customer": {"email": 1}}),
                _ => order(json!({})),
            };
            let list = FieldList::of_json(record.to_string().as_bytes()).unwrap();
            assert_eq!(from_list.learn_list(&list, i, T), from_value.learn(&record, i, T), "record {i}");
        }
        assert_eq!(from_list.removed(T), from_value.removed(T));
        assert_eq!(from_list, from_value);
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            "\\PC{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z\"\\\\ .\\[\\]é\t\n\u{0}]{0,4}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_document_lists_the_same_fields_both_ways(doc in any_json()) {
            let raw = serde_json::to_vec(&doc).unwrap();
            let streamed = FieldList::of_json(&raw).unwrap();
            let listed: Vec<(String, JsonType)> = streamed.entries().map(|(_, p, t)| (p.to_string(), t)).collect();
            let mut walked = Vec::new();
            visit_fields(&doc, &mut String::new(), &mut |p, t| walked.push((p.to_string(), t)));
            proptest::prop_assert_eq!(listed, walked);
            for (key, path, t) in streamed.entries() {
                proptest::prop_assert_eq!(key, super::key(path, t));
            }
        }
    }
}
