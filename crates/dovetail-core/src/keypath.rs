//! Record keys from JSON payloads: `key = ".id"`, `key = ".customer.id"`,
//! `key = '."order-id"'`.
//!
//! The syntax is the path subset of jq, so a key written today keeps its
//! meaning when full jq expressions arrive with mappings.

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
        let mut v = payload;
        for f in &self.fields {
            v = v.get(f)?;
        }
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
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
    fn bad_paths_say_what_is_accepted() {
        for bad in ["", "id", ".", ".a..b", ".\"open", ".a-b", ".a[0]"] {
            let e = KeyPath::parse(bad).unwrap_err();
            assert!(e.contains("jq path"), "{bad}: {e}");
        }
    }
}
