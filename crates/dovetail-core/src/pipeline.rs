//! A flow's data contract, applied to every record in this order:
//!
//! ```text
//! raw bytes ─parse─► input ─keys─► (external key, de-duplication key)
//!                      │
//!                      ├─schema─► valid input ─mapping vN─► canonical ─model─► valid canonical
//!                      │                                                            │
//!                      └──────────────── sink mapping vM ◄──────────────────────────┘
//!                                              │
//!                                              ▼
//!                                        outbound body
//! ```
//!
//! Every stage is optional. A stage that refuses the record stops it with a
//! [`Rejection`] naming the stage and why; the caller quarantines the record
//! with its raw bytes. Nothing is written until every stage has passed, so
//! a record is never half-mapped.

use std::sync::Arc;

use serde_json::Value;

use crate::keypath::KeyExpr;
use crate::mapping::Mapping;
use crate::schema::{self, Schema};
use crate::shape::FieldList;

/// A named canonical model (`[models.Order]`) and its schema.
#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub schema: Arc<Schema>,
}

/// One flow's stages.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    /// The inbound JSON Schema.
    pub schema: Option<Arc<Schema>>,
    /// The record's external key, read from the input.
    pub key: Option<KeyExpr>,
    /// The de-duplication key, used when the source gives no delivery id.
    pub idempotency_key: Option<KeyExpr>,
    /// Source → canonical (or straight to the target's shape).
    pub mapping: Option<Arc<Mapping>>,
    /// The canonical model the mapping's output must match.
    pub model: Option<Model>,
    /// Canonical → the target's shape.
    pub sink_mapping: Option<Arc<Mapping>>,
}

/// Which stage refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Parse,
    Key,
    IdempotencyKey,
    Schema,
    Mapping,
    Model,
    SinkMapping,
}

impl Stage {
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Key => "key",
            Stage::IdempotencyKey => "idempotency_key",
            Stage::Schema => "schema",
            Stage::Mapping => "mapping",
            Stage::Model => "model",
            Stage::SinkMapping => "sink_mapping",
        }
    }
}

/// Why a record cannot go on; `reason` is written for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub stage: Stage,
    pub reason: String,
}

/// The keys read from a record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub external: Option<String>,
    pub dedup: Option<String>,
}

/// A record that passed every stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformed {
    /// The flow mapping's output, when the flow has a mapping.
    pub canonical: Option<Value>,
    /// What goes out, when any mapping ran; `None` means the raw payload is sent as received.
    pub outbound: Option<Value>,
    pub mapping_version: Option<u32>,
    pub sink_mapping_version: Option<u32>,
}

impl Transformed {
    /// The body to send, serialised, when a mapping produced one.
    pub fn body(&self) -> Option<Vec<u8>> {
        // Serialising a `Value` cannot fail: its keys are strings.
        self.outbound.as_ref().map(|v| serde_json::to_vec(v).unwrap_or_default())
    }
}

/// What the pipeline made of one record's raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The parsed input, unless the bytes are not JSON.
    pub input: Option<Value>,
    /// The keys; empty when they could not be read.
    pub keys: Keys,
    pub result: Result<Transformed, Rejection>,
}

/// Parses raw bytes as JSON.
pub fn parse(raw: &[u8]) -> Result<Value, Rejection> {
    serde_json::from_slice(raw).map_err(|e| not_json(&e))
}

fn not_json(e: &serde_json::Error) -> Rejection {
    Rejection { stage: Stage::Parse, reason: format!("the body is not JSON: {e}") }
}

impl Pipeline {
    /// True when no stage needs more than well-formed JSON.
    pub fn is_passthrough(&self) -> bool {
        self.schema.is_none() && self.mapping.is_none() && self.model.is_none() && self.sink_mapping.is_none()
    }

    /// True when the pipeline reads nothing of a record: no stage and no
    /// key. Its records need only be well-formed JSON, which
    /// [`Pipeline::check_and_list`] checks without building a `Value`.
    pub fn reads_nothing(&self) -> bool {
        self.is_passthrough() && self.key.is_none() && self.idempotency_key.is_none()
    }

    /// For a pipeline that [reads nothing](Pipeline::reads_nothing): what
    /// [`Pipeline::run`] makes of `raw` (with no `input`), and the fields
    /// of a well-formed record for drift learning, in one pass over the bytes.
    pub fn check_and_list(&self, raw: &[u8]) -> (Processed, Option<FieldList>) {
        debug_assert!(self.reads_nothing());
        match FieldList::of_json(raw) {
            // No stage reads the input: any value transforms alike.
            Ok(fields) => {
                (Processed { input: None, keys: Keys::default(), result: self.transform(&Value::Null) }, Some(fields))
            }
            Err(e) => (Processed { input: None, keys: Keys::default(), result: Err(not_json(&e)) }, None),
        }
    }

    /// True when a stage runs jq (a mapping, or a key that is not a plain
    /// path): such a pipeline can take long, and runs off the async workers.
    pub fn uses_jq(&self) -> bool {
        let jq = |k: &Option<KeyExpr>| matches!(k, Some(KeyExpr::Jq { .. }));
        self.mapping.is_some() || self.sink_mapping.is_some() || jq(&self.key) || jq(&self.idempotency_key)
    }

    /// Every stage, from raw bytes.
    pub fn run(&self, raw: &[u8]) -> Processed {
        let input = match parse(raw) {
            Ok(v) => v,
            Err(r) => return Processed { input: None, keys: Keys::default(), result: Err(r) },
        };
        let keys = match self.keys(&input) {
            Ok(k) => k,
            Err(r) => return Processed { input: Some(input), keys: Keys::default(), result: Err(r) },
        };
        let result = self.transform(&input);
        Processed { input: Some(input), keys, result }
    }

    /// Reads the record's keys.
    pub fn keys(&self, input: &Value) -> Result<Keys, Rejection> {
        let read = |expr: &Option<KeyExpr>, stage: Stage| -> Result<Option<String>, Rejection> {
            let Some(expr) = expr else { return Ok(None) };
            expr.extract(input).map_err(|why| Rejection {
                stage,
                reason: format!("the {} `{expr}` cannot be read: {why}", stage.as_str()),
            })
        };
        Ok(Keys {
            external: read(&self.key, Stage::Key)?,
            dedup: read(&self.idempotency_key, Stage::IdempotencyKey)?.filter(|k| !k.trim().is_empty()),
        })
    }

    /// Validates and maps a record.
    pub fn transform(&self, input: &Value) -> Result<Transformed, Rejection> {
        if let Some(schema) = &self.schema {
            let violations = schema.violations(input);
            if !violations.is_empty() {
                return Err(Rejection { stage: Stage::Schema, reason: schema::describe(&violations) });
            }
        }
        let canonical = match &self.mapping {
            Some(m) => Some(m.apply(input).map_err(|e| Rejection {
                stage: Stage::Mapping,
                reason: format!("mapping v{} failed: {e}", m.version),
            })?),
            None => None,
        };
        if let Some(model) = &self.model {
            let subject = canonical.as_ref().unwrap_or(input);
            let violations = model.schema.violations(subject);
            if !violations.is_empty() {
                let what = if canonical.is_some() { "the mapping's output" } else { "the record" };
                return Err(Rejection {
                    stage: Stage::Model,
                    reason: format!("{what} does not match model `{}`: {}", model.name, schema::describe(&violations)),
                });
            }
        }
        let outbound = match &self.sink_mapping {
            Some(m) => Some(m.apply(canonical.as_ref().unwrap_or(input)).map_err(|e| Rejection {
                stage: Stage::SinkMapping,
                reason: format!("sink mapping v{} failed: {e}", m.version),
            })?),
            None => canonical.clone(),
        };
        Ok(Transformed {
            canonical,
            outbound,
            mapping_version: self.mapping.as_ref().map(|m| m.version),
            sink_mapping_version: self.sink_mapping.as_ref().map(|m| m.version),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mapping::Program;

    fn mapping(code: &str, version: u32) -> Option<Arc<Mapping>> {
        Some(Arc::new(Mapping { program: Program::compile(code).unwrap(), version }))
    }

    fn schema(doc: Value) -> Arc<Schema> {
        Arc::new(Schema::compile(&doc).unwrap())
    }

    fn order_flow() -> Pipeline {
        Pipeline {
            schema: Some(schema(json!({"type": "object", "required": ["id", "total"]}))),
            key: Some(KeyExpr::parse(".id").unwrap()),
            idempotency_key: Some(KeyExpr::parse(r#".id + ":" + .event"#).unwrap()),
            mapping: mapping(r#"{order_id: .id, amount_cents: (.total | to_minor_units("EUR"))}"#, 3),
            model: Some(Model {
                name: "Order".into(),
                schema: schema(json!({"type": "object", "required": ["order_id", "amount_cents"],
                    "properties": {"amount_cents": {"type": "integer", "minimum": 0}}})),
            }),
            sink_mapping: mapping("{reference: .order_id, value: .amount_cents}", 1),
        }
    }

    #[test]
    fn a_record_goes_through_every_stage() {
        let p = order_flow();
        let input = json!({"id": "A1", "event": "created", "total": "12.50"});
        assert_eq!(p.keys(&input), Ok(Keys { external: Some("A1".into()), dedup: Some("A1:created".into()) }));
        let t = p.transform(&input).unwrap();
        assert_eq!(t.canonical, Some(json!({"order_id": "A1", "amount_cents": 1250})));
        assert_eq!(t.outbound, Some(json!({"reference": "A1", "value": 1250})));
        assert_eq!((t.mapping_version, t.sink_mapping_version), (Some(3), Some(1)));
        assert_eq!(t.body().unwrap(), br#"{"reference":"A1","value":1250}"#);
    }

    #[test]
    fn each_stage_names_itself_when_it_refuses() {
        let p = order_flow();
        let stage = |input: Value| p.transform(&input).unwrap_err().stage;
        assert_eq!(stage(json!({"id": "A1"})), Stage::Schema);
        assert_eq!(stage(json!({"id": "A1", "total": "12.505"})), Stage::Mapping);
        assert_eq!(stage(json!({"id": "A1", "total": "-1"})), Stage::Model);
        let e = p.transform(&json!({"id": "A1", "total": "1.234"})).unwrap_err();
        assert!(e.reason.starts_with("mapping v3 failed: jq error:"), "{}", e.reason);
        let e = p.transform(&json!({"id": "A1", "total": "-1"})).unwrap_err();
        assert!(e.reason.contains("model `Order`") && e.reason.contains("/amount_cents"), "{}", e.reason);
        let broken_sink = Pipeline { sink_mapping: mapping(r#"error("no target")"#, 2), ..order_flow() };
        let e = broken_sink.transform(&json!({"id": "A1", "total": "1"})).unwrap_err();
        assert_eq!((e.stage, e.reason.as_str()), (Stage::SinkMapping, "sink mapping v2 failed: jq error: no target"));
    }

    #[test]
    fn a_flow_without_mappings_sends_the_raw_payload() {
        let p = Pipeline { schema: Some(schema(json!({"type": "object"}))), ..Pipeline::default() };
        let t = p.transform(&json!({"a": 1})).unwrap();
        assert_eq!((t.body(), t.outbound, t.mapping_version), (None, None, None));
        assert!(!p.is_passthrough());
        assert!(Pipeline::default().is_passthrough());
    }

    #[test]
    fn a_model_without_a_mapping_checks_the_record_itself() {
        let p = Pipeline {
            model: Some(Model { name: "Order".into(), schema: schema(json!({"required": ["id"]})) }),
            ..Pipeline::default()
        };
        assert!(p.transform(&json!({"id": 1})).is_ok());
        let e = p.transform(&json!({})).unwrap_err();
        assert!(e.reason.starts_with("the record does not match model `Order`"), "{}", e.reason);
    }

    #[test]
    fn keys_that_cannot_be_read_refuse_the_record() {
        let p = Pipeline { key: Some(KeyExpr::parse(".lines").unwrap()), ..Pipeline::default() };
        let e = p.keys(&json!({"lines": [1]})).unwrap_err();
        assert_eq!(e.stage, Stage::Key);
        assert!(e.reason.starts_with("the key `.lines` cannot be read"), "{}", e.reason);
        let blank = Pipeline { idempotency_key: Some(KeyExpr::parse(".id").unwrap()), ..Pipeline::default() };
        assert_eq!(blank.keys(&json!({"id": "  "})).unwrap().dedup, None, "a blank key de-duplicates nothing");
    }

    #[test]
    fn unparsable_bytes_are_a_parse_rejection() {
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.stage, Stage::Parse);
        assert!(e.reason.starts_with("the body is not JSON"));
    }

    #[test]
    fn a_pipeline_that_reads_nothing_checks_and_lists_as_running_it_does() {
        let p = Pipeline::default();
        assert!(p.reads_nothing());
        assert!(!Pipeline { key: Some(KeyExpr::parse(".id").unwrap()), ..Pipeline::default() }.reads_nothing());
        assert!(
            !Pipeline { idempotency_key: Some(KeyExpr::parse(".id").unwrap()), ..Pipeline::default() }.reads_nothing()
        );
        assert!(!order_flow().reads_nothing());
        for raw in [&br#"{"id":"o1","lines":[{"sku":"A"}]}"#[..], b"{not json", b"[1,2] x", b"\"\xff\""] {
            let (checked, fields) = p.check_and_list(raw);
            let ran = p.run(raw);
            assert_eq!(checked.result, ran.result, "{}", String::from_utf8_lossy(raw));
            assert_eq!(checked.keys, ran.keys);
            assert_eq!(checked.input, None);
            assert_eq!(fields, ran.input.as_ref().map(FieldList::of_value));
        }
    }
}
