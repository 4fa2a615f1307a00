//! jq's own test files (`tests/jq.test` and `tests/man.test` of jq 1.7.1)
//! run through Dovetail's mapping engine ([`Program`], i.e. jaq), as data,
//! with pass counts.
//!
//! The files are fetched by `scripts/fetch-test-data` (which `.ci/run`
//! calls) into `target/test-data/jq`, or read from the directory named by
//! `JQ_TEST_FILE_DIR`. Without them the test says so and passes, except
//! under CI=true, where it fails.
//!
//! jaq is not jq, and the harness jq runs these files with is not
//! [`Program::run`], so many cases fail for known reasons (jaq's documented
//! differences from jq, jq's error message texts, `input`/`$ENV`/`$__loc__`
//! and the like, which mappings do not have, JSON extensions such as `nan`
//! in the data). The test therefore does not require every case to pass: it
//! prints the counts and the first failures, and asserts a floor measured
//! when it was written, so that a regression in the engine fails it.
//!
//! The format, as jq's harness (`src/jq_test.c`) reads it: blank lines and
//! lines starting with `#` separate cases. A case is a program line, an
//! input line (the very next line), then the expected outputs, one JSON
//! value a line, up to the next blank or comment line. A `%%FAIL` or
//! `%%FAIL IGNORE MSG` line announces a program that must not compile,
//! followed by its expected error message (one line); Dovetail's messages are not jq's,
//! so only the failure to compile is checked.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use dovetail_core::mapping::Program;
use serde_json::Value;

/// Passed cases measured on 2026-11-23 with jq 1.7.1's test files and
/// jaq-core 3.1.2, jaq-std 3.0.4, jaq-json 2.0.3: 310 of the 433 cases of
/// jq.test, 202 of the 224 of man.test. Raise them when the engine gets
/// better; never lower them to let a regression through.
const JQ_TEST_FLOOR: usize = 310;
const MAN_TEST_FLOOR: usize = 202;
/// `%%FAIL` cases of jq.test (man.test has none) that fail to compile, as
/// they should, measured at the same time: 10 of 14.
const MUST_FAIL_FLOOR: usize = 10;

/// How many failures are printed.
const SHOWN_FAILURES: usize = 40;
/// The most characters of a printed failure.
const LINE_WIDTH: usize = 200;

fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("JQ_TEST_FILE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-data/jq"));
    dir.join("jq.test").is_file().then_some(dir)
}

/// One case of a jq test file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Case {
    /// `program` run on `input` must give exactly `expected` (each a JSON text).
    Run { line: usize, program: String, input: String, expected: Vec<String> },
    /// `program` must not compile; jq reports `message` (checked by jq
    /// unless `IGNORE MSG`, never here).
    MustFail { line: usize, program: String, message: String },
}

/// A line jq's harness skips: blank (spaces and tabs only) or a comment.
fn separator(line: &str) -> bool {
    let rest = line.trim_start_matches([' ', '\t']);
    rest.is_empty() || rest.starts_with('#')
}

/// Parses a jq test file into its cases, as jq's harness does.
fn parse(text: &str) -> Vec<Case> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).peekable();
    let mut cases = Vec::new();
    let mut must_fail = false;
    while let Some((line, prog)) = lines.next() {
        if separator(prog) {
            continue;
        }
        if prog == "%%FAIL" || prog == "%%FAIL IGNORE MSG" {
            must_fail = true;
            continue;
        }
        let program = prog.to_string();
        // The error message, or the input, is the very next line, whatever it holds.
        let next = lines.next().map(|(_, l)| l.to_string()).unwrap_or_default();
        if must_fail {
            // jq's harness reads one message line; what follows is the next case.
            cases.push(Case::MustFail { line, program, message: next });
            must_fail = false;
            continue;
        }
        let mut expected = Vec::new();
        while let Some((_, l)) = lines.next_if(|(_, l)| !separator(l)) {
            expected.push(l.to_string());
        }
        cases.push(Case::Run { line, program, input: next, expected });
    }
    cases
}

/// JSON equality as jq has it: numbers are equal when their values are
/// (`1` is `1.0`), objects whatever the order of their keys.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Parses one JSON text of a test file. jq accepts a leading byte order mark.
fn json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| format!("not JSON to serde_json ({e})"))
}

std::thread_local! {
    /// Whether a panic on this thread is expected (caught and counted), so
    /// the panic hook should not print it.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into an error that carries its message.
fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        format!("panicked: {message}")
    })
}

/// Runs a normal case; `Err` says why it failed.
fn run_case(program: &str, input: &str, expected: &[String]) -> Result<(), String> {
    let expected: Vec<Value> = expected.iter().map(|e| json(e)).collect::<Result<_, _>>()?;
    let input = json(input).map_err(|e| format!("input {e}"))?;
    let outputs = catching(|| {
        let program = Program::compile(program).map_err(|errs| {
            let errs: Vec<String> = errs.iter().map(ToString::to_string).collect();
            format!("does not compile: {}", errs.join("; "))
        })?;
        program.run(&input).map_err(|e| e.to_string())
    })??;
    let matches = outputs.len() == expected.len() && outputs.iter().zip(&expected).all(|(o, e)| same(o, e));
    if matches { Ok(()) } else { Err(Value::Array(outputs).to_string()) }
}

#[derive(Default, Debug)]
struct Tally {
    /// Normal cases.
    total: usize,
    passed: usize,
    /// `(line, program, expected, got)` of each failed normal case.
    failed: Vec<(usize, String, String, String)>,
    /// `%%FAIL` cases, and those that did fail to compile.
    must_fail: usize,
    must_fail_passed: usize,
    /// `%%FAIL` programs that compiled.
    must_fail_compiled: Vec<(usize, String)>,
}

fn run_file(path: &Path) -> Tally {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tally = Tally::default();
    for case in parse(&text) {
        match case {
            Case::Run { line, program, input, expected } => {
                tally.total += 1;
                match run_case(&program, &input, &expected) {
                    Ok(()) => tally.passed += 1,
                    Err(got) => tally.failed.push((line, program, format!("[{}]", expected.join(",")), got)),
                }
            }
            Case::MustFail { line, program, .. } => {
                tally.must_fail += 1;
                // A panic counts as not compiling: jaq refused the program, if badly.
                if catching(|| Program::compile(&program).is_err()).unwrap_or(true) {
                    tally.must_fail_passed += 1;
                } else {
                    tally.must_fail_compiled.push((line, program));
                }
            }
        }
    }
    tally
}

/// `text` cut to `width` characters.
fn cut(text: &str, width: usize) -> String {
    match text.char_indices().nth(width) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

fn report(name: &str, tally: &Tally) {
    println!(
        "{name}: {} cases, {} passed, {} failed; {} %%FAIL cases, {} of which fail to compile as they should",
        tally.total,
        tally.passed,
        tally.failed.len(),
        tally.must_fail,
        tally.must_fail_passed
    );
    for (line, program, expected, got) in tally.failed.iter().take(SHOWN_FAILURES) {
        println!("  {}", cut(&format!("{name}:{line}: {program}  expected {expected}  got {got}"), LINE_WIDTH));
    }
    if tally.failed.len() > SHOWN_FAILURES {
        println!("  … and {} more failures", tally.failed.len() - SHOWN_FAILURES);
    }
    for (line, program) in &tally.must_fail_compiled {
        println!("  {}", cut(&format!("{name}:{line}: %%FAIL program compiled: {program}"), LINE_WIDTH));
    }
}

#[test]
fn jq_test_files() {
    let Some(dir) = data_dir() else {
        let msg = "jq's test files not found: run scripts/fetch-test-data (or set JQ_TEST_FILE_DIR)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    };
    // Panics inside jaq are caught and counted; do not print them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET_PANICS.with(|q| q.get()) {
            default_hook(info);
        }
    }));

    let jq = run_file(&dir.join("jq.test"));
    report("jq.test", &jq);
    let man_path = dir.join("man.test");
    let man = man_path.is_file().then(|| run_file(&man_path));
    if let Some(man) = &man {
        report("man.test", man);
    }

    assert!(jq.total > 400, "jq.test was not really run: {} cases", jq.total);
    assert!(jq.passed >= JQ_TEST_FLOOR, "jq.test: {} cases passed, fewer than the {JQ_TEST_FLOOR} measured", jq.passed);
    assert!(
        jq.must_fail_passed >= MUST_FAIL_FLOOR,
        "jq.test: {} %%FAIL cases failed to compile, fewer than the {MUST_FAIL_FLOOR} measured",
        jq.must_fail_passed
    );
    if let Some(man) = &man {
        assert!(
            man.passed >= MAN_TEST_FLOOR,
            "man.test: {} cases passed, fewer than the {MAN_TEST_FLOOR} measured",
            man.passed
        );
    }
}

/// The parser and the comparison, on an inline snippet: no data needed.
#[test]
fn parses_the_jq_test_format() {
    let text = "\
# Tests are groups of three lines: program, input, expected output

.[]
[1, 2.0]
1
2

  # an indented comment
empty
null

%%FAIL
{(0):1}
jq: error: Cannot use number (0) as object key at <top-level>, line 1:

%%FAIL IGNORE MSG
. as [] | null
jq: error: syntax error
.
\u{feff}\"bom\"
\"bom\"
";
    let cases = parse(text);
    assert_eq!(
        cases,
        vec![
            Case::Run {
                line: 3,
                program: ".[]".into(),
                input: "[1, 2.0]".into(),
                expected: vec!["1".into(), "2".into()]
            },
            Case::Run { line: 9, program: "empty".into(), input: "null".into(), expected: vec![] },
            Case::MustFail {
                line: 13,
                program: "{(0):1}".into(),
                message: "jq: error: Cannot use number (0) as object key at <top-level>, line 1:".into(),
            },
            Case::MustFail { line: 17, program: ". as [] | null".into(), message: "jq: error: syntax error".into() },
            // As in jq's harness, the message is one line: a case may follow it directly.
            Case::Run {
                line: 19,
                program: ".".into(),
                input: "\u{feff}\"bom\"".into(),
                expected: vec!["\"bom\"".into()]
            },
        ]
    );

    let Case::Run { program, input, expected, .. } = &cases[0] else { unreachable!() };
    assert_eq!(run_case(program, input, expected), Ok(()));
    assert!(run_case(program, input, &expected[..1]).is_err(), "a superfluous output fails the case");
    let Case::Run { program, input, expected, .. } = &cases[4] else { unreachable!() };
    assert_eq!(run_case(program, input, expected), Ok(()), "a byte order mark before the input is ignored");
    assert!(run_case("$__prog_args", "null", &["null".into()]).unwrap_err().starts_with("does not compile"));

    assert!(same(&serde_json::json!({"a": [1, 2.5], "b": null}), &serde_json::json!({"b": null, "a": [1.0, 2.5]})));
    assert!(!same(&serde_json::json!([1]), &serde_json::json!([1, 1])));
    assert!(!same(&serde_json::json!("1"), &serde_json::json!(1)));
}
