//! Inbound validation against JSON Schema 2020-12.
//!
//! A thin wrapper over the `jsonschema` crate so the rest of Dovetail sees
//! one small type: compile once, then list every violation with its JSON
//! pointer. Remote `$ref`s are not fetched: a schema must be self-contained.

use serde::Serialize;

/// A compiled schema.
pub struct Schema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema(..)")
    }
}

/// One way a record breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Where in the record, as a JSON pointer (`""` is the whole record).
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.pointer.is_empty() { "/" } else { &self.pointer };
        write!(f, "{at}: {}", self.message)
    }
}

/// Most violations listed for one record; a record that breaks every rule
/// should not make an unbounded reason.
pub const MAX_VIOLATIONS: usize = 20;

impl Schema {
    /// Compiles a schema document as draft 2020-12 (unless it names another
    /// draft in `$schema`).
    pub fn compile(document: &serde_json::Value) -> Result<Schema, String> {
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(document)
            .map(|validator| Schema { validator })
            .map_err(|e| e.to_string())
    }

    /// Every violation (up to [`MAX_VIOLATIONS`]), in the validator's order.
    pub fn violations(&self, record: &serde_json::Value) -> Vec<Violation> {
        self.validator
            .iter_errors(record)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation { pointer: e.instance_path().to_string(), message: e.to_string() })
            .collect()
    }

    pub fn is_valid(&self, record: &serde_json::Value) -> bool {
        self.validator.is_valid(record)
    }
}

/// A quarantine reason that names each violation: `"/amount: -5 is less than the minimum of 0; /currency: ..."`.
pub fn describe(violations: &[Violation]) -> String {
    let listed: Vec<String> = violations.iter().map(Violation::to_string).collect();
    format!("the record does not match its schema: {}", listed.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order_schema() -> Schema {
        Schema::compile(&json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["id", "amount"],
            "properties": {
                "id": { "type": "string" },
                "amount": { "type": "number", "minimum": 0 },
                "lines": { "type": "array", "items": { "type": "object", "required": ["sku"] } }
            }
        }))
        .unwrap()
    }

    #[test]
    fn violations_carry_json_pointers() {
        let s = order_schema();
        assert!(s.is_valid(&json!({"id": "o1", "amount": 3})));
        let v = s.violations(&json!({"id": 7, "amount": -1, "lines": [{"sku": "a"}, {}]}));
        let mut pointers: Vec<&str> = v.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort_unstable();
        assert_eq!(pointers, ["/amount", "/id", "/lines/1"], "{v:?}");
        assert!(describe(&v).contains("/id: 7 is not of type \"string\""), "{}", describe(&v));
        let missing = s.violations(&json!({}));
        assert!(missing.iter().any(|v| v.pointer.is_empty() && v.message.contains("\"id\"")), "{missing:?}");
    }

    #[test]
    fn a_broken_schema_is_refused_with_the_reason() {
        let e = Schema::compile(&json!({"type": "strnig"})).unwrap_err();
        assert!(e.contains("strnig"), "{e}");
    }

    #[test]
    fn remote_references_are_not_fetched() {
        let e = Schema::compile(&json!({"$ref": "https://example.com/order.json"}));
        assert!(e.is_err(), "a schema must be self-contained");
    }
}
