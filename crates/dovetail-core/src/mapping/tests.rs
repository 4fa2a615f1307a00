use serde_json::json;

use super::*;

fn program(code: &str) -> Program {
    Program::compile(code).unwrap_or_else(|e| panic!("{code}: {e:?}"))
}

#[test]
fn maps_a_record_to_one_value() {
    let m = Mapping { program: program("{id: .order_id, total: (.lines | map(.qty * .price) | add)}"), version: 3 };
    let out = m.apply(&json!({"order_id": "A1", "lines": [{"qty": 2, "price": 5}, {"qty": 1, "price": 7}]})).unwrap();
    assert_eq!(out, json!({"id": "A1", "total": 17}));
}

#[test]
fn zero_or_several_outputs_are_errors() {
    let none = Mapping { program: program("select(.keep)"), version: 1 };
    assert_eq!(none.apply(&json!({"keep": false})), Err(MapError::NoOutput));
    let many = Mapping { program: program(".[]"), version: 1 };
    assert_eq!(many.apply(&json!([1, 2, 3])), Err(MapError::ManyOutputs(3)));
}

#[test]
fn jq_errors_are_reported_as_text() {
    let p = program(r#"if .total < 0 then error("negative total") else . end"#);
    assert_eq!(p.run_one(&json!({"total": -1})), Err(MapError::Jq("negative total".into())));
    let typed = program(".a + 1");
    let Err(MapError::Jq(text)) = typed.run_one(&json!({"a": "x"})) else { panic!("a type error must fail") };
    assert!(text.contains("cannot calculate"), "{text}");
}

#[test]
fn an_error_after_a_first_output_still_fails_the_record() {
    let p = program(r#"1, error("late")"#);
    assert_eq!(p.run(&json!(null)), Err(MapError::Jq("late".into())));
    assert_eq!(p.run_one(&json!(null)), Err(MapError::Jq("late".into())));
}

#[test]
fn outputs_that_json_cannot_hold_are_refused() {
    let p = program("{(1): 2}");
    assert!(matches!(p.run_one(&json!(null)), Err(MapError::NotJson(_)) | Err(MapError::Jq(_))));
    assert_eq!(program("nan").run_one(&json!(null)), Ok(json!(null)));
    assert_eq!(program("infinite").run_one(&json!(null)), Ok(json!(f64::MAX)));
    let deep = program("reduce range(200) as $i (0; [.])");
    assert!(matches!(deep.run_one(&json!(null)), Err(MapError::NotJson(m)) if m.contains("deeper than 128")));
    assert!(program("reduce range(100) as $i (0; [.])").run_one(&json!(null)).is_ok());
    let huge = program("9223372036854775807 * 4");
    let err = MapError::NotJson("the integer 36893488147419103228 does not fit in 64 bits".into());
    assert_eq!(huge.run_one(&json!(null)), Err(err), "never rounded to a float");
}

#[test]
fn numbers_keep_their_precision() {
    let p = program(".");
    let input: serde_json::Value =
        serde_json::from_str(r#"{"big": 12345678901234567, "dec": 0.1, "neg": -7}"#).unwrap();
    assert_eq!(p.run_one(&input).unwrap(), input);
}

#[test]
fn compile_errors_carry_positions() {
    let errs = Program::compile("{id: .id,\n  total: .total +}").unwrap_err();
    assert_eq!(errs[0].line, 2, "{errs:?}");
    let errs = Program::compile(".a | no_such_filter(1)").unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].line, errs[0].column), (1, 6));
    assert!(errs[0].message.contains("no_such_filter/1"), "{}", errs[0].message);
}

#[test]
fn mappings_cannot_import_files() {
    for code in [r#"import "data" as $d; $d"#, r#"include "lib"; ."#, r#"import "lib" as lib; ."#] {
        let errs = Program::compile(code).unwrap_err();
        assert!(!errs.is_empty(), "{code}");
    }
    let errs = Program::compile(r#"import "data" as $d; $d"#).unwrap_err();
    assert_eq!(errs[0].message, "imports are not available to mappings");
}

#[test]
fn mappings_cannot_read_the_environment() {
    assert!(matches!(program("env").run_one(&json!(null)), Err(MapError::Jq(_))));
    assert!(Program::compile("$ENV").is_err());
}

#[test]
fn normalisers_are_callable_from_jq() {
    let p = program(
        r#"{
            at: (.ts | from_unix_seconds),
            cents: (.amount | to_minor_units("EUR")),
            active: (.active | to_bool),
            phone: (.phone | to_e164("GB")),
            name: (.name | collapse_whitespace | titlecase)
        }"#,
    );
    let out = p
        .run_one(&json!({"ts": 1_700_000_000, "amount": "12.34", "active": "Y", "phone": "020 7946 0000", "name": "  ada   LOVELACE "}))
        .unwrap();
    assert_eq!(
        out,
        json!({"at": "2023-11-14T22:13:20Z", "cents": 1234, "active": true, "phone": "+442079460000", "name": "Ada Lovelace"})
    );
}

#[test]
fn a_normaliser_refusing_its_input_fails_the_mapping() {
    let p = program(r#".amount | to_minor_units("EUR")"#);
    let Err(MapError::Jq(text)) = p.run_one(&json!({"amount": "12.345"})) else { panic!("must refuse") };
    assert!(text.contains("12.345"), "{text}");
}

#[test]
fn programs_are_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Program>();
}
