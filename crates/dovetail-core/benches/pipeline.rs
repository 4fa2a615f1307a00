//! What validation and mapping cost per record, against parsing alone.
//!
//! `cargo bench -p dovetail-core --bench pipeline` runs each variant over
//! the same ~300-byte order, a fixed number of times (bounded), on one
//! thread, and prints records/s and the ratio to the baseline measured in
//! the same run: `serde_json` parsing the raw bytes, which intake does for
//! every record anyway.

use std::sync::Arc;
use std::time::Instant;

use dovetail_core::keypath::KeyExpr;
use dovetail_core::mapping::{Mapping, Program};
use dovetail_core::pipeline::{self, Model, Pipeline};
use dovetail_core::schema::Schema;
use dovetail_core::shape::Shape;

const RECORDS: usize = 50_000;

const ORDER: &str = r#"{"event_id":"evt_1001","order":{"number":"SO-1001","placed":"23/11/2026 09:30","total":"149.90","currency":"eur","gift":"N","lines":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}]},"customer":{"name":"  jean-luc   PICARD ","email":"jl@example.com","phone":"06 12 34 56 78"}}"#;

const PLAIN: &str = r#"{order_id: .order.number, total: .order.total, currency: .order.currency, lines: [.order.lines[] | {sku, qty}], email: .customer.email}"#;

const NORMALISING: &str = r#"{
  order_id: .order.number,
  placed_at: (.order.placed | parse_datetime("%d/%m/%Y %H:%M"; "Europe/Paris")),
  amount_minor: (.order.currency as $c | .order.total | to_minor_units($c)),
  currency: (.order.currency | currency_code),
  customer: { name: (.customer.name | collapse_whitespace | titlecase), phone: (.customer.phone | to_e164("FR")) },
  gift: (.order.gift | to_bool)
}"#;

fn mapping(code: &str) -> Option<Arc<Mapping>> {
    Some(Arc::new(Mapping { program: Program::compile(code).expect("bench mapping compiles"), version: 1 }))
}

fn schema(doc: &str) -> Arc<Schema> {
    Arc::new(Schema::compile(&serde_json::from_str(doc).unwrap()).unwrap())
}

/// Runs `f` over every record and returns records/s.
fn measure(f: &dyn Fn(&[u8]) -> usize) -> f64 {
    let raw = ORDER.as_bytes();
    let mut sink = 0;
    for _ in 0..1000 {
        sink += f(raw);
    }
    let start = Instant::now();
    for _ in 0..RECORDS {
        sink += f(raw);
    }
    let rate = RECORDS as f64 / start.elapsed().as_secs_f64();
    assert!(sink > 0);
    rate
}

fn main() {
    let inbound = schema(
        r#"{"type":"object","required":["event_id","order","customer"],"properties":{"order":{"type":"object","required":["number","total","currency"],"properties":{"total":{"type":"string","pattern":"^[0-9]+\\.[0-9]{2}$"}}}}}"#,
    );
    let model = Model {
        name: "Order".into(),
        schema: schema(
            r#"{"type":"object","required":["order_id","amount_minor","currency"],"properties":{"amount_minor":{"type":"integer"}}}"#,
        ),
    };
    let variants: Vec<(&str, Pipeline)> = vec![
        (
            "keys (.order.number, .event_id)",
            Pipeline {
                key: Some(KeyExpr::parse(".order.number").unwrap()),
                idempotency_key: Some(KeyExpr::parse(".event_id").unwrap()),
                ..Pipeline::default()
            },
        ),
        ("schema", Pipeline { schema: Some(inbound.clone()), ..Pipeline::default() }),
        ("plain jq mapping", Pipeline { mapping: mapping(PLAIN), ..Pipeline::default() }),
        ("normalising jq mapping", Pipeline { mapping: mapping(NORMALISING), ..Pipeline::default() }),
        (
            "schema + normalising mapping + model + sink mapping",
            Pipeline {
                schema: Some(inbound),
                key: Some(KeyExpr::parse(".order.number").unwrap()),
                idempotency_key: Some(KeyExpr::parse(".event_id").unwrap()),
                mapping: mapping(NORMALISING),
                model: Some(model),
                sink_mapping: mapping("{id: .order_id, cents: .amount_minor, at: .placed_at}"),
            },
        ),
    ];
    let baseline = measure(&|raw| pipeline::parse(raw).map(|v| v.as_object().map_or(0, |o| o.len())).unwrap_or(0));
    println!("{RECORDS} records of {} bytes, one thread", ORDER.len());
    println!("{:<52} {:>12} {:>9}", "per record", "records/s", "vs parse");
    println!("{:<52} {:>12.0} {:>8.2}x", "baseline: parse the raw bytes (serde_json)", baseline, 1.0);
    for (name, p) in &variants {
        let rate = measure(&|raw| {
            let v = pipeline::parse(raw).unwrap();
            let keys = p.keys(&v).unwrap();
            let t = p.transform(&v).unwrap();
            keys.external.map_or(1, |k| k.len()) + t.body().map_or(1, |b| b.len())
        });
        println!("{:<52} {:>12.0} {:>8.2}x", format!("parse + {name}"), rate, rate / baseline);
    }
    // A flow that reads nothing of its records: intake checks the JSON and
    // learns its shape for drift detection, from a parsed `Value` before
    // 2026-12-03, from the bytes in one pass since.
    let now = dovetail_core::clock::Timestamp::from_secs(1_800_000_000);
    let shape = std::cell::RefCell::new(Shape::default());
    let rate = measure(&|raw| {
        let v = pipeline::parse(raw).unwrap();
        shape.borrow_mut().learn(&v, 1, now).len() + 1
    });
    println!("{:<52} {:>12.0} {:>8.2}x", "parse + learn the shape from the value", rate, rate / baseline);
    let (shape, plain) = (std::cell::RefCell::new(Shape::default()), Pipeline::default());
    let rate = measure(&|raw| {
        let (_, fields) = plain.check_and_list(raw);
        shape.borrow_mut().learn_list(&fields.unwrap(), 1, now).len() + 1
    });
    println!("{:<52} {:>12.0} {:>8.2}x", "check and list the fields in one pass + learn", rate, rate / baseline);
}
