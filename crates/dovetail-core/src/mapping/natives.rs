//! The filters a mapping can call: jq's standard library (from jaq) and
//! Dovetail's normalisers, each a thin adapter over [`super::normalise`].

use jaq_core::box_iter::box_once;
use jaq_core::native::{Fun, run, v};
use jaq_core::{Error, Exn, RunPtr, ValXs};
use jaq_json::{Num, Val};

use super::Data;
use super::normalise as n;

type Native = (&'static str, Box<[jaq_core::Bind]>, RunPtr<Data>);

/// Every native filter, with `env` replaced by one that refuses.
pub(super) fn all() -> impl Iterator<Item = Fun<Data>> {
    let std = jaq_core::funs::<Data>()
        .chain(jaq_std::funs::<Data>())
        .chain(jaq_json::funs::<Data>())
        .filter(|(name, ..)| *name != "env");
    std.chain(dovetail().into_vec().into_iter().map(run::<Data>))
}

fn done<'a, T: Into<Val>>(r: Result<T, String>) -> ValXs<'a, Val> {
    box_once(r.map(Into::into).map_err(|e| Exn::from(Error::str(e))))
}

/// The text of a string value, or an error naming what `what` expected.
fn text<'v>(v: &'v Val, what: &str) -> Result<&'v str, String> {
    match v {
        Val::TStr(b) => std::str::from_utf8(b).map_err(|_| format!("{what}: the string is not valid UTF-8")),
        other => Err(format!("{what} expects a string, got {other}")),
    }
}

/// A number's decimal text (as written in the input, for decimals) or a string's text.
fn decimal_text(v: &Val, what: &str) -> Result<String, String> {
    match v {
        Val::Num(n) => Ok(n.to_string()),
        other => text(other, what).map(str::to_string),
    }
}

fn number(v: &Val, what: &str) -> Result<f64, String> {
    match v {
        Val::Num(n) => n.to_string().parse::<f64>().map_err(|e| format!("{what}: {e}")),
        Val::TStr(_) => {
            let s = text(v, what)?.trim();
            s.parse::<f64>().map_err(|_| format!("{what} expects a number, got \"{s}\""))
        }
        other => Err(format!("{what} expects a number, got {other}")),
    }
}

fn int(i: i64) -> Val {
    Val::Num(Num::from_integral(i))
}

fn string(s: String) -> Val {
    Val::from(s)
}

fn dovetail() -> Box<[Native]> {
    Box::new([
        ("env", v(0), |_| done::<Val>(Err("env is not available to mappings: it holds the engine's secrets".into()))),
        ("to_iso8601", v(0), |cv| done(text(&cv.1, "to_iso8601").and_then(|s| n::to_iso8601(s, None)).map(string))),
        ("to_iso8601", v(1), |mut cv| {
            let tz = cv.0.pop_var();
            done(
                text(&tz, "to_iso8601's time zone")
                    .and_then(|tz| text(&cv.1, "to_iso8601").and_then(|s| n::to_iso8601(s, Some(tz))).map(string)),
            )
        }),
        ("from_unix_seconds", v(0), |cv| {
            done(number(&cv.1, "from_unix_seconds").and_then(n::from_unix_seconds).map(string))
        }),
        ("from_unix_millis", v(0), |cv| {
            done(number(&cv.1, "from_unix_millis").and_then(n::from_unix_millis).map(string))
        }),
        ("to_unix_seconds", v(0), |cv| done(text(&cv.1, "to_unix_seconds").and_then(n::to_unix_seconds).map(int))),
        ("to_unix_millis", v(0), |cv| done(text(&cv.1, "to_unix_millis").and_then(n::to_unix_millis).map(int))),
        ("parse_datetime", v(2), |mut cv| {
            let tz = cv.0.pop_var();
            let format = cv.0.pop_var();
            done((|| {
                let (input, format, tz) = (
                    text(&cv.1, "parse_datetime")?,
                    text(&format, "parse_datetime's format")?,
                    text(&tz, "time zone")?,
                );
                n::parse_datetime(input, format, tz).map(string)
            })())
        }),
        ("parse_date", v(1), |mut cv| {
            let format = cv.0.pop_var();
            done((|| n::parse_date(text(&cv.1, "parse_date")?, text(&format, "parse_date's format")?).map(string))())
        }),
        ("format_datetime", v(2), |mut cv| {
            let tz = cv.0.pop_var();
            let format = cv.0.pop_var();
            done((|| {
                let (input, format, tz) = (
                    text(&cv.1, "format_datetime")?,
                    text(&format, "format_datetime's format")?,
                    text(&tz, "time zone")?,
                );
                n::format_datetime(input, format, tz).map(string)
            })())
        }),
        ("to_minor_units", v(1), |mut cv| {
            let currency = cv.0.pop_var();
            done((|| {
                n::to_minor_units(&decimal_text(&cv.1, "to_minor_units")?, text(&currency, "currency code")?).map(int)
            })())
        }),
        ("from_minor_units", v(1), |mut cv| {
            let currency = cv.0.pop_var();
            done((|| {
                let units = match &cv.1 {
                    Val::Num(Num::Int(i)) => *i as i64,
                    other => {
                        return Err(format!("from_minor_units expects a whole number of minor units, got {other}"));
                    }
                };
                n::from_minor_units(units, text(&currency, "currency code")?).map(string)
            })())
        }),
        ("currency_code", v(0), |cv| done(text(&cv.1, "currency_code").and_then(n::currency_code).map(string))),
        ("to_bool", v(0), |cv| {
            done(super::to_json(&cv.1).map_err(|e| e.to_string()).and_then(|j| n::to_bool(&j)).map(Val::Bool))
        }),
        ("to_e164", v(0), |cv| done(text(&cv.1, "to_e164").and_then(|s| n::to_e164(s, None)).map(string))),
        ("to_e164", v(1), |mut cv| {
            let region = cv.0.pop_var();
            done((|| n::to_e164(text(&cv.1, "to_e164")?, Some(text(&region, "to_e164's region")?)).map(string))())
        }),
        ("collapse_whitespace", v(0), |cv| {
            done(text(&cv.1, "collapse_whitespace").map(n::collapse_whitespace).map(string))
        }),
        ("lowercase", v(0), |cv| done(text(&cv.1, "lowercase").map(n::lowercase).map(string))),
        ("uppercase", v(0), |cv| done(text(&cv.1, "uppercase").map(n::uppercase).map(string))),
        ("titlecase", v(0), |cv| done(text(&cv.1, "titlecase").map(n::titlecase).map(string))),
    ])
}
