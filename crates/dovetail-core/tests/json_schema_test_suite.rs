//! The official JSON-Schema-Test-Suite (draft 2020-12, required tests) run
//! through Dovetail's `Schema`, as data, with pass counts.
//!
//! The suite is fetched by `scripts/fetch-test-data` (which `.ci/run`
//! calls) into `target/test-data/JSON-Schema-Test-Suite`, or read from
//! `JSON_SCHEMA_TEST_SUITE`. Without it the test says so and passes, except
//! under CI=true, where it fails.
//!
//! Cases whose schema `$ref`s a remote document are counted apart: Dovetail
//! schemas must be self-contained and nothing is fetched at run time.

use std::path::PathBuf;

use dovetail_core::schema::Schema;

fn suite_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("JSON_SCHEMA_TEST_SUITE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-data/JSON-Schema-Test-Suite")
    });
    dir.join("tests/draft2020-12").is_dir().then_some(dir)
}

#[derive(Default, Debug)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
    remote: usize,
}

#[test]
fn json_schema_test_suite_draft2020_12() {
    let Some(dir) = suite_dir() else {
        let msg = "JSON-Schema-Test-Suite not found: run scripts/fetch-test-data (or set JSON_SCHEMA_TEST_SUITE)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests/draft2020-12"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut tally = Tally::default();
    for file in &files {
        let groups: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        for group in groups.as_array().unwrap() {
            let tests = group["tests"].as_array().unwrap();
            // The suite serves remote documents from localhost:1234. A case
            // that needs one (a custom metaschema, or a $ref that cannot be
            // resolved without fetching) is not run.
            let remote = |v: &serde_json::Value| v.to_string().contains("localhost:1234");
            if remote(&group["schema"]["$schema"]) {
                tally.remote += tests.len();
                continue;
            }
            let schema = match Schema::compile(&group["schema"]) {
                Ok(s) => s,
                Err(_) if remote(&group["schema"]) => {
                    tally.remote += tests.len();
                    continue;
                }
                Err(e) => {
                    tally.failed.extend(tests.iter().map(|t| {
                        format!("{name}: {} / {}: schema refused: {e}", group["description"], t["description"])
                    }));
                    continue;
                }
            };
            for t in tests {
                if schema.is_valid(&t["data"]) == t["valid"].as_bool().unwrap() {
                    tally.passed += 1;
                } else {
                    tally.failed.push(format!("{name}: {} / {}", group["description"], t["description"]));
                }
            }
        }
    }
    println!(
        "JSON-Schema-Test-Suite draft2020-12 ({} files): {} passed, {} failed, {} not run (they need remote documents, which Dovetail never fetches)",
        files.len(),
        tally.passed,
        tally.failed.len(),
        tally.remote
    );
    for f in &tally.failed {
        println!("  failed: {f}");
    }
    assert!(tally.passed > 1000, "the suite was not really run: {tally:?}");
    assert!(tally.failed.is_empty(), "{} cases failed:\n{}", tally.failed.len(), tally.failed.join("\n"));
}
