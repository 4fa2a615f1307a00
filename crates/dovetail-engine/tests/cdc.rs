//! The PostgreSQL CDC source against the real PostgreSQL on 127.0.0.1:5432
//! (database `test`, user `postgres`, `wal_level = logical`;
//! `DOVETAIL_TEST_PG` overrides). Without it, or without logical decoding,
//! the tests say so and pass, except under CI=true.
//!
//! Every test makes its own tables, slot and publication (named
//! `dovetail_test_PID_…`) and drops them when it ends, even by a failed
//! assertion; slots left by a test process that died are dropped at the
//! start, since a forgotten slot holds WAL for ever.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use dovetail_core::config;
use dovetail_engine::{EngineOptions, RunningEngine};
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Partner};

fn pg_url() -> String {
    std::env::var("DOVETAIL_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn connect() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The database, or `None` (the test is skipped) when it is unreachable or
/// not set up for logical decoding; under CI=true, a panic.
async fn database() -> Option<tokio_postgres::Client> {
    let skip = |msg: String| {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        None
    };
    let db = match connect().await {
        Ok(db) => db,
        Err(e) => return skip(format!("PostgreSQL is not reachable at {} ({e})", pg_url())),
    };
    let level: String = match db.query_one("SHOW wal_level", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return skip(format!("cannot read wal_level ({e})")),
    };
    if level != "logical" {
        return skip(format!("PostgreSQL's wal_level is {level}; these tests need logical"));
    }
    drop_stale_slots(&db).await;
    Some(db)
}

/// Drops inactive test slots whose process is gone (never another live run's).
async fn drop_stale_slots(db: &tokio_postgres::Client) {
    let Ok(rows) = db
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'dovetail\\_test\\_%' AND NOT active", &[])
        .await
    else {
        return;
    };
    for row in rows {
        let slot: String = row.get(0);
        let pid = slot.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = db.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
        }
    }
}

/// A name no other run uses: `dovetail_test_PID_RANDOM`.
fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("dovetail_test_{}_{:08x}", std::process::id(), nanos ^ (nanos >> 7).rotate_left(13))
}

/// Drops the test's slots, publication and tables when it ends, whether it
/// passed or not (on its own thread and runtime: `Drop` cannot await).
struct Cleanup {
    slots: Vec<String>,
    publication: String,
    tables: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut sql = String::new();
        for slot in &self.slots {
            sql += &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}';"
            );
        }
        sql += &format!("DROP PUBLICATION IF EXISTS {};", self.publication);
        sql += &format!("DROP TABLE IF EXISTS {};", self.tables.join(", "));
        let outcome = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // An engine that was just stopped may still hold the slot for a moment.
            rt.block_on(async {
                let mut last = None;
                for _ in 0..50 {
                    match connect().await {
                        Ok(db) => match db.batch_execute(&sql).await {
                            Ok(()) => return Ok(()),
                            Err(e) => last = Some(e.to_string()),
                        },
                        Err(e) => last = Some(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::io::Error::other(last.unwrap_or_default()))
            })
        })
        .join();
        if let Ok(Err(e)) = outcome {
            eprintln!("cleanup failed (drop the slot by hand): {e}");
        }
    }
}

/// One engine with a CDC flow to a partner; `tables` as the config names them.
struct Setup {
    text: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(partner: &Partner, slot: &str, tables: &[String], batch: u32) -> Setup {
        let tables = tables.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
        let text = format!(
            r#"[engine]
listen = "127.0.0.1:0"

[connectors.erp]
type = "http"
base_url = "{url}"

[flows.changes]
source = {{ type = "postgres_cdc", url = "env:CDC_DB", slot = "{slot}", publication = "{slot}", tables = [{tables}], schedule = "every 100ms", batch = {batch} }}
key = '.table + ":" + ((.new // .old // .key // {{}}).id | tostring)'
ordering = "per_key"
sink = {{ type = "http", connector = "erp", path = "/v1/changes" }}
"#,
            url = partner.url()
        );
        Setup { text, dir: tempfile::tempdir().unwrap() }
    }

    async fn start(&self, journal: Arc<SqliteJournal>) -> RunningEngine {
        dovetail_connectors::http::install_crypto_provider();
        let (loaded, _) = config::load(&self.text, &self.dir.path().join("dovetail.toml")).unwrap();
        let secrets: BTreeMap<String, String> = [("CDC_DB".to_string(), pg_url())].into();
        let resolved = loaded.resolve(&secrets).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = EngineOptions { idle_poll: Duration::from_millis(50), ..EngineOptions::default() };
        dovetail_engine::start(&loaded.config, &resolved, journal, listener, options).await.unwrap()
    }

    fn journal(&self) -> Arc<SqliteJournal> {
        Arc::new(SqliteJournal::open(&self.dir.path().join("journal.db"), SqliteOptions::default()).unwrap())
    }
}

/// The change payloads the partner applied, in the order it applied them.
fn applied(partner: &Partner) -> Vec<Value> {
    partner.effects().iter().map(|e| serde_json::from_slice(&e.body).unwrap()).collect()
}

/// `table:id` of a change, as the flow's key names it.
fn key_of(change: &Value) -> String {
    let row = [&change["new"], &change["old"], &change["key"]].into_iter().find(|v| v.is_object());
    let id = row.map_or(Value::Null, |r| r["id"].clone());
    format!("{}:{}", change["table"].as_str().unwrap_or_default(), id)
}

fn lsn(change: &Value) -> u64 {
    let (hi, lo) = change["lsn"].as_str().and_then(|s| s.split_once('/')).unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Each change was applied once: one effect per idempotency key and per change.
fn assert_once_each(partner: &Partner) {
    let effects = partner.effects();
    let keys: BTreeSet<_> = effects.iter().map(|e| e.idempotency_key.clone().unwrap()).collect();
    assert_eq!(keys.len(), effects.len(), "an idempotency key was applied twice");
    let changes: BTreeSet<_> =
        applied(partner).iter().map(|c| (c["lsn"].to_string(), c["op"].to_string(), key_of(c))).collect();
    assert_eq!(changes.len(), effects.len(), "a change was applied twice: {:#?}", applied(partner));
}

/// The ops applied per `table:id`, in order, checking that LSNs only grow per key.
fn ops_by_key(changes: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for c in changes {
        let key = key_of(c);
        let at = lsn(c);
        if let Some(prev) = last.insert(key.clone(), at) {
            assert!(prev < at, "{key} was applied out of commit order: {changes:#?}");
        }
        out.entry(key).or_default().push(c["op"].as_str().unwrap().to_string());
    }
    out
}

/// The slot's confirmed LSN, once it exists and is ready (NULL while it is being made).
async fn confirmed(db: &tokio_postgres::Client, slot: &str) -> Option<String> {
    db.query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// Whether no session holds the slot: the engine's connection has ended
/// on the server too (its backend exits a moment after the socket closes).
async fn released(db: &tokio_postgres::Client, slot: &str) -> bool {
    db.query_one("SELECT NOT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)", &[&slot])
        .await
        .unwrap()
        .get(0)
}

/// Whether the slot is confirmed at or past the WAL flushed now (the engine caught up).
async fn caught_up(db: &tokio_postgres::Client, slot: &str, flushed: &str) -> bool {
    db.query_one(
        "SELECT coalesce((SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1), false)",
        &[&slot, &flushed],
    )
    .await
    .unwrap()
    .get(0)
}

async fn flushed(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]).await.unwrap().get(0)
}

/// Waits for `what` to hold, up to `deadline`.
async fn until<F: AsyncFnMut() -> bool>(deadline: Instant, what: &str, mut cond: F) {
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn journalled(journal: &SqliteJournal) -> u64 {
    journal.counts().await.unwrap().iter().map(|c| c.pending + c.in_flight + c.delivered + c.dead).sum()
}

async fn settled(journal: &SqliteJournal) -> bool {
    journal.counts().await.unwrap().iter().all(|c| c.pending == 0 && c.in_flight == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_reach_the_partner_once_in_commit_order_and_a_restart_goes_on() {
    let Some(db) = database().await else { return };
    let name = unique();
    let (orders, lines) = (format!("{name}_orders"), format!("{name}_lines"));
    let _cleanup =
        Cleanup { slots: vec![name.clone()], publication: name.clone(), tables: vec![orders.clone(), lines.clone()] };
    db.batch_execute(&format!(
        "CREATE TABLE {orders} (id int PRIMARY KEY, status text, total numeric(10,2), doc jsonb);
         ALTER TABLE {orders} REPLICA IDENTITY FULL;
         CREATE TABLE {lines} (id int PRIMARY KEY, note text, big text);
         ALTER TABLE {lines} ALTER COLUMN big SET STORAGE EXTERNAL;"
    ))
    .await
    .unwrap();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    // A small batch: several reads per run, and a transaction larger than a batch.
    let setup = Setup::new(&partner, &name, &[format!("public.{orders}"), lines.clone()], 4);
    let journal = setup.journal();
    let engine = setup.start(journal.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    until(deadline, "the slot to be made", async || confirmed(&db, &name).await.is_some()).await;

    // Each statement sent on its own is its own transaction.
    let big = "x".repeat(4000);
    for sql in [
        format!(r#"INSERT INTO {orders} VALUES (1, 'new', 12.50, '{{"a": [1, 2]}}')"#),
        format!("INSERT INTO {orders} VALUES (2, 'new', 5, NULL)"),
        format!(
            "BEGIN; INSERT INTO {orders} VALUES (3, 'new', 1, NULL);
             INSERT INTO {lines} SELECT g, 'n' || g, '{big}' FROM generate_series(10, 12) g;
             UPDATE {orders} SET status = 'paid' WHERE id = 1; COMMIT;"
        ),
        format!(
            "BEGIN; INSERT INTO {orders} VALUES (99, 'rolled back', 1, NULL); INSERT INTO {lines} VALUES (99, 'no', NULL); ROLLBACK;"
        ),
        format!("UPDATE {orders} SET total = 20.5 WHERE id = 2"),
        format!("DELETE FROM {orders} WHERE id = 1"),
        format!("UPDATE {lines} SET note = 'changed' WHERE id = 10"),
        format!("DELETE FROM {lines} WHERE id = 11"),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }
    until(deadline, "11 changes applied", async || partner.effects().len() >= 11).await;
    let end = flushed(&db).await;
    until(deadline, "the slot to be confirmed", async || caught_up(&db, &name, &end).await).await;
    until(deadline, "the journal to settle", async || settled(&journal).await).await;
    assert_eq!(partner.effects().len(), 11);
    assert_eq!(journalled(&journal).await, 11);
    assert_once_each(&partner);

    let changes = applied(&partner);
    let (o, l) = (format!("public.{orders}"), format!("public.{lines}"));
    let expected: BTreeMap<String, Vec<String>> = [
        (format!("{o}:1"), vec!["insert", "update", "delete"]),
        (format!("{o}:2"), vec!["insert", "update"]),
        (format!("{o}:3"), vec!["insert"]),
        (format!("{l}:10"), vec!["insert", "update"]),
        (format!("{l}:11"), vec!["insert", "delete"]),
        (format!("{l}:12"), vec!["insert"]),
    ]
    .into_iter()
    .map(|(k, ops)| (k, ops.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(ops_by_key(&changes), expected, "the rolled-back rows (99) never appear");

    let find = |key: &str, op: &str| {
        changes.iter().find(|c| key_of(c) == key && c["op"] == op).cloned().unwrap_or_else(|| panic!("{key} {op}"))
    };
    let first = find(&format!("{o}:1"), "insert");
    assert_eq!(first["new"], json!({"id": 1, "status": "new", "total": 12.5, "doc": {"a": [1, 2]}}));
    assert_eq!((&first["old"], &first["key"], &first["unchanged"]), (&Value::Null, &Value::Null, &json!([])));
    assert!(first["xid"].is_u64());
    let when: jiff::Timestamp = first["commit_time"].as_str().unwrap().parse().unwrap();
    assert!(when.as_second() > 1_700_000_000);
    // REPLICA IDENTITY FULL: the old row comes with updates and deletes.
    let repriced = find(&format!("{o}:2"), "update");
    assert_eq!((&repriced["old"]["total"], &repriced["new"]["total"]), (&json!(5), &json!(20.5)));
    let deleted = find(&format!("{o}:1"), "delete");
    assert_eq!(deleted["old"], json!({"id": 1, "status": "paid", "total": 12.5, "doc": {"a": [1, 2]}}));
    assert_eq!(deleted["new"], Value::Null);
    // The default identity: an unchanged TOASTed value is not sent, a delete gives the key.
    let noted = find(&format!("{l}:10"), "update");
    assert_eq!(noted["new"], json!({"id": 10, "note": "changed"}));
    assert_eq!((&noted["unchanged"], &noted["old"]), (&json!(["big"]), &Value::Null));
    let removed = find(&format!("{l}:11"), "delete");
    assert_eq!((&removed["key"], &removed["old"]), (&json!({"id": 11}), &Value::Null));
    // The multi-row transaction's five changes share its xid and commit time, in order.
    let xid = find(&format!("{o}:3"), "insert")["xid"].clone();
    let mut together: Vec<&Value> = changes.iter().filter(|c| c["xid"] == xid).collect();
    together.sort_by_key(|c| lsn(c));
    assert_eq!(together.len(), 5);
    assert!(together.iter().all(|c| c["commit_time"] == together[0]["commit_time"]));
    assert_eq!(together[4]["op"], "update");

    // Stopped and started again on the same journal: only new changes come.
    engine.shutdown().await;
    let engine = setup.start(journal.clone()).await;
    for sql in [
        format!("INSERT INTO {orders} VALUES (4, 'new', 7.25, NULL)"),
        format!("UPDATE {orders} SET status = 'paid' WHERE id = 4"),
        format!("TRUNCATE {lines}"),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }
    until(deadline, "3 more changes applied", async || partner.effects().len() >= 14).await;
    let end = flushed(&db).await;
    until(deadline, "the slot to be confirmed again", async || caught_up(&db, &name, &end).await).await;
    until(deadline, "the journal to settle again", async || settled(&journal).await).await;
    engine.shutdown().await;
    assert_eq!(partner.effects().len(), 14, "{:#?}", &applied(&partner)[11..]);
    assert_eq!(journalled(&journal).await, 14, "nothing journalled twice");
    assert_once_each(&partner);
    let after = &applied(&partner)[11..];
    assert_eq!(after.iter().map(|c| c["op"].as_str().unwrap()).collect::<Vec<_>>(), ["insert", "update", "truncate"]);
    assert_eq!(after[2]["tables"], json!([l]));
    assert_eq!((&after[2]["cascade"], &after[2]["restart_identity"]), (&json!(false), &json!(false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_slot_advance_rereads_and_deduplicates() {
    let Some(db) = database().await else { return };
    let name = unique();
    let backup = format!("{name}_bak");
    let items = format!("{name}_items");
    let _cleanup =
        Cleanup { slots: vec![name.clone(), backup.clone()], publication: name.clone(), tables: vec![items.clone()] };
    db.batch_execute(&format!("CREATE TABLE {items} (id int PRIMARY KEY, n int)")).await.unwrap();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let setup = Setup::new(&partner, &name, std::slice::from_ref(&items), 100);
    let journal = setup.journal();
    let deadline = Instant::now() + Duration::from_secs(60);

    let engine = setup.start(journal.clone()).await;
    until(deadline, "the slot to be made", async || confirmed(&db, &name).await.is_some()).await;
    db.batch_execute(&format!("INSERT INTO {items} SELECT g, 0 FROM generate_series(1, 3) g")).await.unwrap();
    until(deadline, "the first 3 changes", async || partner.effects().len() >= 3).await;
    let end = flushed(&db).await;
    until(deadline, "the first changes to be confirmed", async || caught_up(&db, &name, &end).await).await;
    engine.shutdown().await;

    // While the engine is down: more changes, and a copy of the slot as it is now.
    for sql in [
        format!("INSERT INTO {items} VALUES (4, 0)"),
        format!("INSERT INTO {items} VALUES (5, 0)"),
        format!("UPDATE {items} SET n = 1 WHERE id = 1"),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }
    db.execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&name, &backup]).await.unwrap();
    let engine = setup.start(journal.clone()).await;
    until(deadline, "the next 3 changes", async || partner.effects().len() >= 6).await;
    let end = flushed(&db).await;
    until(deadline, "the slot to be confirmed", async || caught_up(&db, &name, &end).await).await;
    engine.shutdown().await;
    assert_eq!(journalled(&journal).await, 6);

    // The crash: the slot back where it was before those 3 changes were
    // confirmed, as if the engine died between the journal and the advance.
    until(deadline, "the slot to be released", async || released(&db, &name).await).await;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.unwrap();
    db.execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&backup, &name]).await.unwrap();
    db.execute("SELECT pg_drop_replication_slot($1)", &[&backup]).await.unwrap();
    let pending: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('{name}', NULL, NULL, \
                 'proto_version', '1', 'publication_names', '{name}') WHERE get_byte(data, 0) IN (73, 85)"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 3, "the rewound slot gives the 3 journalled changes again");

    let engine = setup.start(journal.clone()).await;
    db.batch_execute(&format!("INSERT INTO {items} VALUES (6, 0)")).await.unwrap();
    until(deadline, "the change made after the crash", async || partner.effects().len() >= 7).await;
    let end = flushed(&db).await;
    until(deadline, "the re-read to be confirmed", async || caught_up(&db, &name, &end).await).await;
    until(deadline, "the journal to settle", async || settled(&journal).await).await;
    engine.shutdown().await;
    assert_eq!(partner.effects().len(), 7, "re-read changes were not sent again: {:#?}", applied(&partner));
    assert_eq!(journalled(&journal).await, 7, "re-read changes were duplicates in the journal");
    assert_once_each(&partner);
    let ops = ops_by_key(&applied(&partner));
    assert_eq!(ops[&format!("public.{items}:1")], ["insert", "update"]);
    assert_eq!(ops.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_other_tables_do_not_hold_the_slot_back_nor_hide_later_ones() {
    let Some(db) = database().await else { return };
    let name = unique();
    let (watched, other) = (format!("{name}_watched"), format!("{name}_other"));
    let _cleanup =
        Cleanup { slots: vec![name.clone()], publication: name.clone(), tables: vec![watched.clone(), other.clone()] };
    db.batch_execute(&format!(
        "CREATE TABLE {watched} (id int PRIMARY KEY); CREATE TABLE {other} (id int PRIMARY KEY);"
    ))
    .await
    .unwrap();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let setup = Setup::new(&partner, &name, std::slice::from_ref(&watched), 100);
    let journal = setup.journal();
    let deadline = Instant::now() + Duration::from_secs(60);
    let engine = setup.start(journal.clone()).await;
    until(deadline, "the slot to be made", async || confirmed(&db, &name).await.is_some()).await;
    let start = confirmed(&db, &name).await.unwrap();

    // Only an unpublished table changes: reads return nothing, yet the slot moves on.
    for id in 1..=3 {
        db.execute(&format!("INSERT INTO {other} VALUES ({id})"), &[]).await.unwrap();
    }
    let end = flushed(&db).await;
    until(deadline, "the slot to pass the other table's changes", async || caught_up(&db, &name, &end).await).await;
    assert_ne!(confirmed(&db, &name).await.unwrap(), start);
    assert!(partner.effects().is_empty());

    // A change to the watched table after that is still read.
    db.execute(&format!("INSERT INTO {watched} VALUES (1)"), &[]).await.unwrap();
    until(deadline, "the watched change", async || !partner.effects().is_empty()).await;
    let end = flushed(&db).await;
    until(deadline, "the slot to be confirmed", async || caught_up(&db, &name, &end).await).await;
    engine.shutdown().await;
    assert_eq!(partner.effects().len(), 1);
    assert_eq!(applied(&partner)[0]["new"], json!({"id": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_after_reading_is_not_made_again_until_an_operator_does() {
    let Some(db) = database().await else { return };
    let name = unique();
    let items = format!("{name}_items");
    let _cleanup = Cleanup { slots: vec![name.clone()], publication: name.clone(), tables: vec![items.clone()] };
    db.batch_execute(&format!("CREATE TABLE {items} (id int PRIMARY KEY)")).await.unwrap();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let setup = Setup::new(&partner, &name, std::slice::from_ref(&items), 100);
    let journal = setup.journal();
    let deadline = Instant::now() + Duration::from_secs(60);

    let engine = setup.start(journal.clone()).await;
    until(deadline, "the slot to be made", async || confirmed(&db, &name).await.is_some()).await;
    db.batch_execute(&format!("INSERT INTO {items} VALUES (1)")).await.unwrap();
    until(deadline, "the first change", async || !partner.effects().is_empty()).await;
    engine.shutdown().await;

    // Lost while the engine is down (a manual drop, a failover), with a change in between.
    // An operator can drop it once the engine's session has let go of it.
    until(deadline, "the slot to be released", async || released(&db, &name).await).await;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.unwrap();
    db.batch_execute(&format!("INSERT INTO {items} VALUES (2)")).await.unwrap();
    let engine = setup.start(journal.clone()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(confirmed(&db, &name).await, None, "a slot was made in place of the lost one");

    // The operator makes it by hand: the source goes on from there (change 2 is not read).
    db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&name]).await.unwrap();
    db.batch_execute(&format!("INSERT INTO {items} VALUES (3)")).await.unwrap();
    until(deadline, "the change made after the slot", async || partner.effects().len() >= 2).await;
    until(deadline, "the journal to settle", async || settled(&journal).await).await;
    engine.shutdown().await;
    assert_eq!(partner.effects().len(), 2);
    assert_eq!(applied(&partner)[1]["new"], json!({"id": 3}));
}

/// Stopped while the server decodes a large transaction for it, the engine
/// cancels the read: when shutdown returns, the slot is free for an
/// operator or the next engine, not held until the decoding ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_in_the_middle_of_a_read_lets_go_of_the_slot_at_once() {
    let Some(db) = database().await else { return };
    let name = unique();
    let items = format!("{name}_items");
    let _cleanup = Cleanup { slots: vec![name.clone()], publication: name.clone(), tables: vec![items.clone()] };
    db.batch_execute(&format!("CREATE TABLE {items} (id int PRIMARY KEY, body text)")).await.unwrap();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let setup = Setup::new(&partner, &name, std::slice::from_ref(&items), 100);
    let deadline = Instant::now() + Duration::from_secs(60);

    let engine = setup.start(setup.journal()).await;
    until(deadline, "the slot to be made", async || confirmed(&db, &name).await.is_some()).await;
    // One transaction the server must decode whole before the first change comes out.
    db.batch_execute(&format!("INSERT INTO {items} SELECT g, repeat('x', 200) FROM generate_series(1, 400000) g"))
        .await
        .unwrap();
    until(deadline, "the engine to be reading the slot", async || !released(&db, &name).await).await;
    engine.shutdown().await;
    assert!(released(&db, &name).await, "the slot is still held after the engine stopped");
}
