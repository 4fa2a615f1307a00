//! The `dovetail` binary as a user meets it: config errors, status and the DLQ
//! against a real journal file. Messages users read are snapshot-tested.

use std::path::Path;
use std::process::Command;

use dovetail_core::clock::Timestamp;
use dovetail_core::policy::ErrorClass;
use dovetail_journal::{Journal, NewRecord, SqliteJournal, SqliteOptions};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn dovetail(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.current_dir(dir).args(args).env_remove("DOVETAIL_CONFIG").env("DOVETAIL_LOG", "warn");
    for var in ["ORDERS_SECRET", "BILLING_TOKEN"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run dovetail");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(config: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), config).unwrap();
    dovetail(dir.path(), &["check"], env)
}

const GOOD: &str = r#"[engine]
store = "sqlite://journal.db"
listen = "127.0.0.1:0"

[connectors.billing]
type = "http"
base_url = "http://127.0.0.1:9"
auth = { type = "bearer", token = "env:BILLING_TOKEN" }

[flows.orders]
source = { type = "webhook", path = "/hooks/orders", signature = { scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" } }
sink = { type = "http", connector = "billing", path = "/v1/orders" }
"#;

const SECRETS: &[(&str, &str)] = &[("ORDERS_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), ("BILLING_TOKEN", "t")];

#[test]
fn a_good_config_checks_ok() {
    let r = check(GOOD, SECRETS);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    insta::assert_snapshot!(r.stdout, @"dovetail.toml: ok (1 connector(s), 1 flow(s))");
}

#[test]
fn invalid_toml_names_the_line() {
    let r = check("[engine]\nstore = sqlite://journal.db\n", &[]);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn a_misspelt_key_names_the_line_and_the_expected_keys() {
    let r = check(&GOOD.replace("base_url", "baseurl"), SECRETS);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn a_bad_duration_says_the_accepted_forms() {
    let r = check(&GOOD.replace("auth = ", "timeout = \"ten seconds\"\nauth = "), SECRETS);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn every_meaning_error_is_reported_at_once() {
    let config =
        GOOD.replace("connector = \"billing\"", "connector = \"biling\"").replace("env:BILLING_TOKEN", "sk_live_123")
            + r#"
[flows.refunds]
source = { type = "webhook", path = "/hooks/orders" }
sink = { type = "http", connector = "billing", method = "GET" }
"#;
    let r = check(&config, SECRETS);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn missing_secrets_name_the_variable_and_the_line() {
    let r = check(GOOD, &[]);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!(r.stdout);
}

#[test]
fn a_wrongly_formed_signing_secret_is_refused() {
    let r = check(GOOD, &[("ORDERS_SECRET", "whsec_***not base64***"), ("BILLING_TOKEN", "t")]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("dovetail.toml:11:") && r.stdout.contains("not a standard-webhooks secret"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("not base64***"), "the secret value is never printed: {}", r.stdout);
}

#[test]
fn a_missing_config_file_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let r = dovetail(dir.path(), &["status"], &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read the config file dovetail.toml") && r.stderr.contains("dovetail init"),
        "{}",
        r.stderr
    );
}

#[test]
fn status_before_the_engine_ever_ran_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), GOOD).unwrap();
    let r = dovetail(dir.path(), &["status"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("there is no journal at") && r.stderr.contains("dovetail run"), "{}", r.stderr);
}

fn dead_record(i: usize) -> NewRecord {
    NewRecord {
        flow: "orders".into(),
        external_key: None,
        delivery_id: Some(format!("msg_{i}")),
        idempotency_key: format!("key_{i}"),
        correlation_id: format!("corr_{i}"),
        content_type: Some("application/json".into()),
        payload: format!(r#"{{"id":"ord_{i}"}}"#).into_bytes(),
        received_at: Timestamp::from_secs(1_700_000_000),
        quarantine: Some((ErrorClass::Validation, format!("record {i} is unusable"))),
        prepared: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_show_replay_and_discard_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), GOOD).unwrap();
    let journal = SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap();
    for i in 0..2503 {
        journal.ingest(dead_record(i)).await.unwrap();
    }
    let p = dir.path();

    let list = dovetail(p, &["dlq", "list", "--json", "--limit", "2"], &[]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let first = &v["dead_letters"][0];
    assert_eq!((first["id"].as_i64(), first["class"].as_str()), (Some(1), Some("validation")), "{}", list.stdout);
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 2);

    let show = dovetail(p, &["dlq", "show", "1", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["payload"]["id"], "ord_0");
    assert_eq!(v["idempotency_key"], "key_0");
    assert_eq!(v["last_error"], "record 0 is unusable");

    let before: serde_json::Value = serde_json::from_str(&dovetail(p, &["status", "--json"], &[]).stdout).unwrap();
    assert_eq!(before["flows"][0]["rejection_rate"].as_f64(), Some(1.0), "every record so far was quarantined");

    // trace finds a record by its correlation id or delivery id too.
    let by_correlation = dovetail(p, &["trace", "corr_7"], &[]);
    assert_eq!(by_correlation.code, 0, "{}", by_correlation.stderr);
    assert!(by_correlation.stdout.starts_with("record 8 of flow orders — dead"), "{}", by_correlation.stdout);
    assert!(by_correlation.stdout.contains("raw payload (as received):\n{\n  \"id\": \"ord_7\"\n}"));
    assert!(by_correlation.stdout.contains("mapped: not yet"), "a quarantined record was never mapped");
    let story = &by_correlation.stdout;
    assert!(story.contains("received as delivery msg_7, correlation id corr_7"), "{story}");
    assert!(story.contains("refused at intake (quarantined): record 7 is unusable"), "{story}");
    assert!(story.contains("in the dead-letter queue (validation): record 7 is unusable"), "{story}");
    let by_delivery = dovetail(p, &["trace", "msg_9", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&by_delivery.stdout).unwrap();
    assert_eq!(v["records"][0]["id"], 10);
    assert_eq!(v["records"][0]["request"], serde_json::Value::Null, "nothing to send until it is prepared");
    let unknown = dovetail(p, &["trace", "nope"], &[]);
    assert_eq!(unknown.code, 1);
    assert!(unknown.stderr.contains("no record has the id, correlation id, delivery id or key `nope`"));

    let none = dovetail(p, &["dlq", "replay"], &[]);
    assert_eq!(none.code, 1, "replay without a selection refuses: {}", none.stderr);
    assert!(none.stderr.contains("say which records"), "{}", none.stderr);

    let one = dovetail(p, &["dlq", "replay", "1"], &[]);
    assert_eq!(one.code, 0, "{}", one.stderr);
    assert!(one.stdout.starts_with("replayed 1 record(s)"), "{}", one.stdout);
    let detail = journal.record(1).await.unwrap().unwrap();
    assert_eq!((detail.state.as_str(), detail.idempotency_key.as_str()), ("pending", "key_0"), "same key after replay");

    let discard = dovetail(p, &["dlq", "discard", "2", "3"], &[]);
    assert!(discard.stdout.starts_with("discarded 2 record(s)"), "{}", discard.stdout);

    let all = dovetail(p, &["dlq", "replay", "--flow", "orders"], &[]);
    assert_eq!(all.code, 0, "{}", all.stderr);
    assert!(all.stdout.starts_with("replayed 2500 record(s)"), "chunked replay moves every record: {}", all.stdout);

    let status = dovetail(p, &["status", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let orders = &v["flows"][0];
    assert_eq!(
        (orders["flow"].as_str(), orders["pending"].as_u64(), orders["dead"].as_u64(), orders["discarded"].as_u64()),
        (Some("orders"), Some(2501), Some(0), Some(2))
    );
    assert_eq!(orders["state"], "running");
    assert_eq!(orders["rejection_rate"].as_f64(), Some(0.0), "the replayed quarantined records are pending now");
    assert!(orders["oldest_pending_age_seconds"].as_f64().unwrap() > 0.0);

    let human = dovetail(p, &["status"], &[]);
    assert!(human.stdout.starts_with("FLOW    STATE    PENDING"), "{}", human.stdout);
}

#[test]
fn init_writes_a_project_that_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let r = dovetail(dir.path(), &["init", "shop"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let env = [("ORDERS_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), ("BILLING_TOKEN", "t")];
    let r = dovetail(&dir.path().join("shop"), &["check"], &env);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let again = dovetail(dir.path(), &["init", "shop"], &[]);
    assert_eq!(again.code, 1, "init never overwrites a project");
}

#[test]
fn schema_files_are_checked_with_the_line_of_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let with_schema = GOOD.replace(
        "sink = { type = \"http\", connector = \"billing\", path = \"/v1/orders\" }",
        "sink = { type = \"http\", connector = \"billing\", path = \"/v1/orders\" }\nschema = \"schemas/order.json\"",
    );
    std::fs::write(dir.path().join("dovetail.toml"), &with_schema).unwrap();
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("dovetail.toml:13:1: error in `flows.orders.schema`: cannot read"), "{}", r.stdout);
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("schemas/order.json"), r#"{"type": "strnig"}"#).unwrap();
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert!(r.stdout.contains("is not a valid JSON Schema") && r.stdout.contains("strnig"), "{}", r.stdout);
    std::fs::write(dir.path().join("schemas/order.json"), r#"{"type": "object", "required": ["id"]}"#).unwrap();
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_lists_recorded_events() {
    use dovetail_core::shape::{DriftEvent, DriftKind, JsonType};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), GOOD).unwrap();
    let journal = SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap();
    let none = dovetail(dir.path(), &["drift"], &[]);
    assert_eq!(none.stdout.trim(), "no schema drift recorded");
    let e = DriftEvent {
        kind: DriftKind::Retyped,
        path: "amount".into(),
        json_type: JsonType::String,
        previous_types: vec![JsonType::Number],
        at: Timestamp::from_secs(1_700_000_000),
        example_record_id: 7,
    };
    journal.record_drift("orders", vec![e]).await.unwrap();
    let human = dovetail(dir.path(), &["drift"], &[]);
    assert!(human.stdout.contains("orders  retyped  amount  string  number  7"), "{}", human.stdout);
    let json = dovetail(dir.path(), &["drift", "--json", "--flow", "orders"], &[]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["drift"][0]["kind"], "retyped");
    assert_eq!(v["drift"][0]["previous_types"][0], "number");
    assert_eq!(v["drift"][0]["example_record_id"], 7);
}

/// A project with a canonical model, two mappings and samples.
fn contract_project(mapping: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = GOOD.replace(
        "sink = { type = \"http\", connector = \"billing\", path = \"/v1/orders\" }",
        r#"sink = { type = "http", connector = "billing", path = "/v1/orders", mapping = { file = "order_to_billing.jq", version = 2 } }
mapping = { file = "shop_to_order.jq", version = 7 }
model = "Order"
key = ".number"
idempotency_key = ".event"
samples = ["samples/orders.jsonl"]

[models.Order]
schema = "order.json"
samples = ["samples/canonical.json"]"#,
    );
    let files = [
        ("dovetail.toml", config.as_str()),
        ("shop_to_order.jq", mapping),
        ("order_to_billing.jq", "{ref: .id, cents: .cents}"),
        (
            "order.json",
            r#"{"type": "object", "required": ["id", "cents"], "properties": {"cents": {"type": "integer"}}}"#,
        ),
        ("samples/canonical.json", r#"{"id": "A1", "cents": 100}"#),
        (
            "samples/orders.jsonl",
            "{\"event\": \"e1\", \"number\": \"A1\", \"total\": \"12.50\"}\n\n{\"event\": \"e2\", \"number\": \"A2\", \"total\": \"3\"}\n",
        ),
    ];
    std::fs::create_dir(dir.path().join("samples")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const SHOP_TO_ORDER: &str = r#"{id: .number, cents: (.total | to_minor_units("EUR"))}"#;

#[test]
fn check_runs_the_samples_through_the_mappings_and_the_model() {
    let dir = contract_project(SHOP_TO_ORDER);
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // A mapping whose output breaks the model is caught by its sample.
    let dir = contract_project(r#"{id: .number, cents: .total}"#);
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("error in `flows.orders.samples`"), "{}", r.stdout);
    assert!(r.stdout.contains("samples/orders.jsonl:1 is refused at the model stage"), "{}", r.stdout);
    assert!(r.stdout.contains("samples/orders.jsonl:3 is refused"), "line numbers count blank lines: {}", r.stdout);

    // A program that does not compile names its file, line and column.
    let dir = contract_project("{id: .number,\n cents: (.total | to_minor_units(\"EUR\")}");
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("error in `flows.orders.mapping.file`: the jq program does not compile"), "{}", r.stdout);
    assert!(r.stdout.contains("shop_to_order.jq:2:"), "{}", r.stdout);
    // Missing secrets do not hide the files' problems, nor the reverse.
    let r = dovetail(dir.path(), &["check"], &[]);
    assert!(r.stdout.contains("the secret `env:ORDERS_SECRET` is not set"), "{}", r.stdout);
    assert!(r.stdout.contains("the jq program does not compile"), "{}", r.stdout);
}

#[test]
fn an_unknown_model_and_a_version_0_are_refused() {
    let dir = contract_project(SHOP_TO_ORDER);
    let config = std::fs::read_to_string(dir.path().join("dovetail.toml")).unwrap();
    std::fs::write(
        dir.path().join("dovetail.toml"),
        config.replace("model = \"Order\"", "model = \"Ordr\"").replace("version = 7", "version = 0"),
    )
    .unwrap();
    let r = dovetail(dir.path(), &["check"], SECRETS);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("there is no model named `Ordr`") && r.stdout.contains("use one of: Order"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("`flows.orders.mapping.version`: mapping versions start at 1"), "{}", r.stdout);
}

#[test]
fn test_prints_each_stage_and_the_request_that_would_go_out() {
    let dir = contract_project(SHOP_TO_ORDER);
    std::fs::write(dir.path().join("in.json"), r#"{"event": "e9", "number": "B7", "total": "42.10"}"#).unwrap();
    // No secrets are needed: credentials are named, never looked up.
    let r = dovetail(dir.path(), &["test", "orders", "--input", "in.json"], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let key = dovetail_core::ids::idempotency_key("orders", Some("e9"));
    insta::assert_snapshot!(r.stdout.replace(&key, "[KEY]"));

    let r = dovetail(dir.path(), &["test", "orders", "--input", "in.json", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["mapped"], serde_json::json!({"id": "B7", "cents": 4210}));
    assert_eq!(v["outbound"], serde_json::json!({"ref": "B7", "cents": 4210}));
    assert_eq!((v["mapping_version"].as_u64(), v["sink_mapping_version"].as_u64()), (Some(7), Some(2)));
    assert_eq!(v["request"]["url"], "http://127.0.0.1:9/v1/orders");

    std::fs::write(dir.path().join("bad.json"), r#"{"event": "e9", "number": "B7", "total": "42.105"}"#).unwrap();
    let r = dovetail(dir.path(), &["test", "orders", "--input", "bad.json"], &[]);
    assert_eq!(r.code, 1, "a refused record fails the command");
    assert!(r.stdout.contains("REFUSED at the mapping stage: mapping v7 failed: jq error:"), "{}", r.stdout);
    assert!(!r.stdout.contains("the request that would be sent"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_raw_mapped_and_sent_side_by_side() {
    let dir = contract_project(SHOP_TO_ORDER);
    let journal = SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap();
    let raw = r#"{"event":"e5","number":"C3","total":"5.00"}"#;
    let record = NewRecord {
        external_key: Some("C3".into()),
        quarantine: None,
        prepared: Some(dovetail_journal::Prepared {
            body: Some(br#"{"ref":"C3","cents":500}"#.to_vec()),
            mapping_version: Some(7),
            sink_mapping_version: Some(2),
        }),
        ..dead_record(5)
    };
    journal.ingest(NewRecord { payload: raw.as_bytes().to_vec(), ..record }).await.unwrap();
    let r = dovetail(dir.path(), &["trace", "C3"], SECRETS);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = &r.stdout;
    let raw_at = out.find("raw payload (as received):").expect(out);
    let mapped_at =
        out.find("mapped (mapping v7, sink mapping v2):\n{\n  \"ref\": \"C3\",\n  \"cents\": 500\n}").expect(out);
    let sent_at = out.find("sent (the request each attempt makes").expect(out);
    assert!(raw_at < mapped_at && mapped_at < sent_at, "{out}");
    assert!(out.contains("POST http://127.0.0.1:9/v1/orders\nAuthorization: Bearer [redacted]\n"), "{out}");
    assert!(out.contains("Idempotency-Key: key_5\nX-Correlation-ID: corr_5\n"), "{out}");
    assert!(out.contains("  validated and mapped by mapping v7, sink mapping v2\n"), "{out}");
    assert!(out.contains("pending: next attempt due"), "{out}");
    assert!(!out.contains("Bearer t\n"), "the token is never printed: {out}");
}

#[test]
fn json_logs_are_one_object_per_line_with_their_fields() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), GOOD).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .current_dir(dir.path())
        .args(["--log-format", "json", "run"])
        .envs(SECRETS.iter().copied())
        .env_remove("DOVETAIL_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut started = None;
    for line in stderr.lines().take(20) {
        let line = line.unwrap();
        if line.starts_with("dovetail: listening") {
            continue; // the banner for people, not a log line
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["message"] == "engine started" {
            started = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let v = started.expect("the engine logged its start");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["flows"], 1);
    assert!(v["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
    assert!(v["timestamp"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_lists_what_the_engine_saved() {
    use dovetail_core::alert::{AlertBook, AlertKey, Condition, RuleKind, Severity};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dovetail.toml"), GOOD).unwrap();
    let journal = SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap();
    let r = dovetail(dir.path(), &["alerts"], &[]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "no active alerts\n"), "{}", r.stderr);

    let mut book = AlertBook::new();
    let t0 = Timestamp::from_secs(1_700_000_000);
    let condition = |rule, summary: &str| Condition {
        key: AlertKey::new("orders", rule),
        severity: Severity::Warning,
        summary: summary.into(),
        value: 3.0,
        threshold: 1.0,
    };
    let hour = std::time::Duration::from_secs(3600);
    book.observe(t0, "orders", vec![condition(RuleKind::DlqDepth, "orders: 3 records in the DLQ")], hour);
    book.observe(
        t0,
        "orders",
        vec![
            condition(RuleKind::DlqDepth, "orders: 3 records in the DLQ"),
            condition(RuleKind::Drift, "orders: drift"),
        ],
        hour,
    );
    book.observe(t0.plus(hour), "orders", vec![condition(RuleKind::DlqDepth, "orders: 3 records in the DLQ")], hour);
    journal.save_state("alert_book", serde_json::to_string(&book).unwrap(), t0).await.unwrap();

    let r = dovetail(dir.path(), &["alerts", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["active"][0]["key"]["rule"], "dlq_depth", "{v}");
    assert_eq!(v["recent"][0]["alert"]["key"]["rule"], "drift", "{v}");
    let r = dovetail(dir.path(), &["alerts"], &[]);
    assert!(r.stdout.contains("orders  dlq_depth  warning"), "{}", r.stdout);
    assert!(r.stdout.contains("recently resolved:"), "{}", r.stdout);
}
