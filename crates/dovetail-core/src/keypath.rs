//! Record keys from JSON payloads: `key = ".id"`, `key = ".customer.id"`,
//! `key = '."order-id"'`.
//!
//! A [`KeyPath`] is the path subset of jq, read without running jq. A
//! [`KeyExpr`] is any jq expression (`.customer.id + "-" + .number`); when
//! it is a plain path it is read as a [`KeyPath`], which costs nothing.

use std::fmt;

use serde::{Deserialize, Deserializer, de};

/// A parsed key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath {
    source: String,
    fields: Vec<String>,
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl KeyPath {
    /// Parses `.a.b` / `."x y"`; the message says what is accepted.
    pub fn parse(source: &str) -> Result<KeyPath, String> {
        let err = |why: &str| {
            format!("`{source}` is not a key path: {why}; write a jq path such as \".id\" or \".customer.id\"")
        };
        let mut fields = Vec::new();
        let mut rest = source.trim();
        if rest.is_empty() {
            return Err(err("it is empty"));
        }
        while !rest.is_empty() {
            rest = rest.strip_prefix('.').ok_or_else(|| err("each step starts with ."))?;
            if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').ok_or_else(|| err("a quoted name is not closed"))?;
                fields.push(quoted[..end].to_string());
                rest = &quoted[end + 1..];
            } else {
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                if end == 0 {
                    return Err(err("a step has no name (quote names with other characters: .\"order-id\")"));
                }
                fields.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
        Ok(KeyPath { source: source.trim().to_string(), fields })
    }

    /// The key of a payload: a string as is, a number or boolean as written;
    /// `None` when the path is missing or leads to null, an object or an array.
    pub fn extract(&self, payload: &serde_json::Value) -> Option<String> {
        scalar_key(self.lookup(payload)?).ok().flatten()
    }

    /// The value at the path, if the path exists.
    pub fn lookup<'v>(&self, payload: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        let mut v = payload;
        for f in &self.fields {
            v = v.get(f)?;
        }
        Some(v)
    }
}

/// A key's text: a string as is, a number or boolean as written, `None`
/// for null; an object or array cannot be a key.
fn scalar_key(v: &serde_json::Value) -> Result<Option<String>, String> {
    use serde_json::Value;
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        other => Err(format!("the key must be a string, a number or a boolean, not {other}")),
    }
}

/// A key expression: `key = ".id"`, `idempotency_key = ".event_id + \":\" + .type"`.
#[derive(Debug, Clone)]
pub enum KeyExpr {
    Path(KeyPath),
    Jq { source: String, program: std::sync::Arc<crate::mapping::Program> },
}

impl fmt::Display for KeyExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyExpr::Path(p) => p.fmt(f),
            KeyExpr::Jq { source, .. } => f.write_str(source),
        }
    }
}

impl KeyExpr {
    /// A plain path if it is one, else a compiled jq expression.
    pub fn parse(source: &str) -> Result<KeyExpr, String> {
        // A quoted name with an escape (`."a\\b"`) means what jq says it means.
        if let Some(path) = KeyPath::parse(source).ok().filter(|_| !source.contains('\\')) {
            return Ok(KeyExpr::Path(path));
        }
        if source.trim().is_empty() {
            return Err("the key expression is empty; write a jq expression such as \".id\"".to_string());
        }
        match crate::mapping::Program::compile(source) {
            Ok(program) => Ok(KeyExpr::Jq { source: source.trim().to_string(), program: std::sync::Arc::new(program) }),
            Err(errors) => {
                let first = errors.first().map_or_else(String::new, |e| format!(" (at {e})"));
                Err(format!("`{source}` is not a jq expression{first}; write e.g. \".id\" or \".customer.id\""))
            }
        }
    }

    /// The key of a payload; `Ok(None)` when there is none (the expression
    /// gives null or nothing, or the path is missing). A jq error, several
    /// outputs, or an object or array as the key is an error.
    pub fn extract(&self, payload: &serde_json::Value) -> Result<Option<String>, String> {
        match self {
            KeyExpr::Path(p) => p.lookup(payload).map_or(Ok(None), scalar_key),
            KeyExpr::Jq { program, .. } => {
                program.run_optional(payload).map_err(|e| e.to_string())?.as_ref().map_or(Ok(None), scalar_key)
            }
        }
    }
}

impl<'de> Deserialize<'de> for KeyExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyExpr::parse(&s).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for KeyPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyPath::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_and_values() {
        let v =
            json!({"id": 7, "customer": {"id": "cus_1", "vip": true}, "order-id": "o-9", "lines": [], "none": null});
        let key = |p: &str| KeyPath::parse(p).unwrap().extract(&v);
        assert_eq!(key(".id"), Some("7".into()));
        assert_eq!(key(".customer.id"), Some("cus_1".into()));
        assert_eq!(key(".customer.vip"), Some("true".into()));
        assert_eq!(key(r#"."order-id""#), Some("o-9".into()));
        assert_eq!(key(".missing"), None);
        assert_eq!(key(".lines"), None);
        assert_eq!(key(".none"), None);
        assert_eq!(KeyPath::parse(".customer.id").unwrap().to_string(), ".customer.id");
    }

    #[test]
    fn key_expressions_run_jq_when_they_are_not_plain_paths() {
        let v = json!({"customer": {"id": "cus_1"}, "number": 42, "lines": [1, 2]});
        let key = |e: &str| KeyExpr::parse(e).unwrap().extract(&v);
        assert!(matches!(KeyExpr::parse(".customer.id").unwrap(), KeyExpr::Path(_)));
        assert_eq!(key(".customer.id"), Ok(Some("cus_1".into())));
        assert_eq!(key(r#".customer.id + "-" + (.number | tostring)"#), Ok(Some("cus_1-42".into())));
        assert_eq!(key(".number * 2"), Ok(Some("84".into())));
        assert_eq!(key(".missing // null"), Ok(None));
        assert_eq!(key("empty"), Ok(None));
        assert!(key(".lines").unwrap_err().contains("a string, a number or a boolean"));
        let escaped = KeyExpr::parse(r#"."caf\u00e9""#).unwrap();
        assert!(matches!(escaped, KeyExpr::Jq { .. }), "escapes are jq's to read");
        assert_eq!(escaped.extract(&json!({"café": "x"})), Ok(Some("x".into())));
        assert!(key(".lines[]").is_err(), "two outputs are not one key");
        assert!(key(r#"error("no key")"#).unwrap_err().contains("no key"));
        let e = KeyExpr::parse(".customer.id +").unwrap_err();
        assert!(e.contains("not a jq expression") && e.contains("1:"), "{e}");
    }

    #[test]
    fn bad_paths_say_what_is_accepted() {
        for bad in ["", "id", ".", ".a..b", ".\"open", ".a-b", ".a[0]"] {
            let e = KeyPath::parse(bad).unwrap_err();
            assert!(e.contains("jq path"), "{bad}: {e}");
        }
    }
}
