//! Mappings: jq programs that turn a record's inbound shape into the
//! outbound (or canonical) one, run by [jaq](https://github.com/01mf02/jaq).
//!
//! A [`Program`] is compiled once, when the configuration is loaded, with
//! jq's standard library plus Dovetail's normalisers ([`normalise`]), and
//! is then shared by every thread: running it allocates only the values it
//! builds. A [`Mapping`] is a program with the version the operator gave it;
//! it must produce exactly one JSON value per record, and anything else (an
//! error, no output, several outputs, a value JSON cannot hold) is a
//! [`MapError`] that quarantines the record. Nothing is half-written: the
//! output is built whole in memory before anyone sees it.
//!
//! Mappings cannot read the process environment (`env` and `$ENV` are
//! refused): that is where secrets live.

mod natives;
pub mod normalise;

use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Ctx, Vars};
use jaq_json::Val;

type Data = JustLut<Val>;

/// A compiled jq program.
pub struct Program {
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Program")
    }
}

/// Where and why a jq program does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct CompileError {
    /// 1-based line in the program's text.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    pub message: String,
}

/// Why a record could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// jq raised an error (`error(...)`, a type error, a normaliser refusing its input).
    #[error("jq error: {0}")]
    Jq(String),
    #[error("the mapping produced no output; it must produce exactly one value per record")]
    NoOutput,
    #[error("the mapping produced {0} outputs; it must produce exactly one value per record")]
    ManyOutputs(usize),
    /// The output holds something JSON cannot (a byte string, a non-string object key).
    #[error("the mapping's output is not JSON: {0}")]
    NotJson(String),
    #[error("the input is not JSON: {0}")]
    BadInput(String),
}

/// The most outputs collected when counting a program's surplus outputs.
const MAX_COUNTED_OUTPUTS: usize = 1000;

impl Program {
    /// Compiles `code`. Every problem is reported, each with its position.
    pub fn compile(code: &str) -> Result<Program, Vec<CompileError>> {
        let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader.load(&arena, File { code, path: () }).map_err(|errs| load_errors(code, errs))?;
        // A data import (`import "file" as $x`) would read a file at run time: refused.
        jaq_core::load::import(&modules, |_| Err("imports are not available to mappings".to_string()))
            .map_err(|errs| load_errors(code, errs))?;
        let filter = jaq_core::Compiler::default()
            .with_funs(natives::all())
            .compile(modules)
            .map_err(|errs| compile_errors(code, errs))?;
        Ok(Program { filter })
    }

    /// Runs the program on `input` and collects every output, stopping at
    /// the first error. At most `limit` outputs are kept.
    fn outputs(&self, input: Val, limit: usize) -> Result<Vec<Val>, MapError> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let mut out = Vec::new();
        for item in self.filter.id.run((ctx, input)).take(limit) {
            match item {
                Ok(v) => out.push(v),
                Err(exn) => {
                    return Err(MapError::Jq(match exn.get_err() {
                        Ok(e) => error_text(e),
                        Err(_) => "the program halted".to_string(),
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Runs the program on `input` and returns every output as JSON.
    pub fn run(&self, input: &serde_json::Value) -> Result<Vec<serde_json::Value>, MapError> {
        self.outputs(to_val(input)?, usize::MAX)?.iter().map(to_json).collect()
    }

    /// Runs the program and returns its single output, or `None` when it
    /// has none (for key expressions: a record without that field has no key).
    pub fn run_optional(&self, input: &serde_json::Value) -> Result<Option<serde_json::Value>, MapError> {
        let mut outputs = self.outputs(to_val(input)?, 2)?;
        match outputs.len() {
            0 => Ok(None),
            1 => to_json(&outputs.remove(0)).map(Some),
            _ => Err(MapError::ManyOutputs(self.outputs(to_val(input)?, MAX_COUNTED_OUTPUTS)?.len())),
        }
    }

    /// Runs the program and returns its single output.
    pub fn run_one(&self, input: &serde_json::Value) -> Result<serde_json::Value, MapError> {
        self.run_optional(input)?.ok_or(MapError::NoOutput)
    }
}

/// The text of a jq error: a string error is shown as the string itself,
/// as jq does (`error("bad")` reads `bad`, not `"bad"`).
fn error_text(e: jaq_core::Error<Val>) -> String {
    match e.into_val() {
        Val::TStr(b) => String::from_utf8_lossy(&b).into_owned(),
        other => format!("{other} (not a string)"),
    }
}

/// Loads what the normalisers load on first use (libphonenumber's metadata,
/// the time zone database), so that the first record a mapping sees is not
/// the one that pays for it. Takes a moment; call it once at start-up.
pub fn warm_up() {
    let _ = normalise::to_e164("020 7946 0000", Some("GB"));
    let _ = normalise::parse_datetime("23/11/2026 09:30", "%d/%m/%Y %H:%M", "Europe/Paris");
}

/// A mapping: a program and the version the operator declared for it.
#[derive(Debug)]
pub struct Mapping {
    pub program: Program,
    pub version: u32,
}

impl Mapping {
    /// Maps one record.
    pub fn apply(&self, input: &serde_json::Value) -> Result<serde_json::Value, MapError> {
        self.program.run_one(input)
    }
}

fn to_val(v: &serde_json::Value) -> Result<Val, MapError> {
    use serde::Deserialize;
    Val::deserialize(v).map_err(|e| MapError::BadInput(e.to_string()))
}

/// How deep a mapping's output may nest: what `serde_json` reads back.
pub const MAX_DEPTH: usize = 128;

/// Converts jq's value to JSON. Like jq, NaN becomes `null` and the
/// infinities the largest finite doubles; what JSON cannot hold exactly
/// (byte strings, invalid UTF-8, non-string keys, integers beyond 64 bits,
/// nesting deeper than [`MAX_DEPTH`]) is an error, never altered.
fn to_json(v: &Val) -> Result<serde_json::Value, MapError> {
    to_json_at(v, 0)
}

fn to_json_at(v: &Val, depth: usize) -> Result<serde_json::Value, MapError> {
    use serde_json::Value;
    let text = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| MapError::NotJson("a string is not valid UTF-8".to_string()))
    };
    if depth > MAX_DEPTH {
        return Err(MapError::NotJson(format!("it nests deeper than {MAX_DEPTH} levels")));
    }
    Ok(match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => number(n)?,
        Val::TStr(b) => Value::String(text(b)?),
        Val::BStr(_) => return Err(MapError::NotJson(format!("{v} is a byte string"))),
        Val::Arr(items) => Value::Array(items.iter().map(|i| to_json_at(i, depth + 1)).collect::<Result<_, _>>()?),
        Val::Obj(map) => {
            let mut obj = serde_json::Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                let Val::TStr(key) = k else {
                    return Err(MapError::NotJson(format!("the object key {k} is not a string")));
                };
                obj.insert(text(key)?, to_json_at(v, depth + 1)?);
            }
            Value::Object(obj)
        }
    })
}

fn number(n: &jaq_json::Num) -> Result<serde_json::Value, MapError> {
    use jaq_json::Num;
    use serde_json::Value;
    let float = |f: f64| {
        if f.is_nan() { Value::Null } else { Value::from(f.clamp(f64::MIN, f64::MAX)) }
    };
    Ok(match n {
        Num::Int(i) => Value::from(*i as i64),
        Num::Float(f) => float(*f),
        Num::BigInt(i) => {
            let exact =
                i64::try_from(i.as_ref()).map(Value::from).or_else(|_| u64::try_from(i.as_ref()).map(Value::from));
            exact.map_err(|_| MapError::NotJson(format!("the integer {n} does not fit in 64 bits")))?
        }
        Num::Dec(_) => {
            let text = n.to_string();
            match text.parse::<serde_json::Number>() {
                Ok(num) => Value::Number(num),
                Err(_) => float(text.parse::<f64>().map_err(|e| MapError::NotJson(format!("{text}: {e}")))?),
            }
        }
    })
}

/// 1-based line and column of byte `offset` in `code`.
fn position(code: &str, offset: usize) -> (usize, usize) {
    let before = &code[..offset.min(code.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn error_at(code: &str, part: &str, message: String) -> CompileError {
    let offset = jaq_core::load::span(code, part).start;
    let (line, column) = position(code, offset);
    CompileError { line, column, message }
}

fn load_errors(code: &str, errs: jaq_core::load::Errors<&str, ()>) -> Vec<CompileError> {
    use jaq_core::load::Error;
    let mut out = Vec::new();
    for (_file, err) in errs {
        match err {
            Error::Io(items) => out.extend(items.into_iter().map(|(part, why)| error_at(code, part, why))),
            Error::Lex(items) => out.extend(
                items.into_iter().map(|(expect, part)| error_at(code, part, format!("expected {}", expect.as_str()))),
            ),
            Error::Parse(items) => out.extend(items.into_iter().map(|(expect, part)| {
                let found = if part.is_empty() { "the end of the program".to_string() } else { format!("`{part}`") };
                error_at(code, part, format!("expected {}, found {found}", expect.as_str()))
            })),
        }
    }
    out
}

fn compile_errors(code: &str, errs: jaq_core::compile::Errors<&str, ()>) -> Vec<CompileError> {
    errs.into_iter()
        .flat_map(|(_file, items)| items)
        .map(|(name, undefined)| {
            let what = match undefined {
                jaq_core::compile::Undefined::Filter(arity) => format!("filter `{name}/{arity}`"),
                other => format!("{} `{name}`", other.as_str()),
            };
            error_at(code, name, format!("undefined {what}"))
        })
        .collect()
}

#[cfg(test)]
mod tests;
