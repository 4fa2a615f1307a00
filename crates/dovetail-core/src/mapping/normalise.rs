//! Normalisers for partner data: dates, money, booleans, phone numbers and
//! text. They are pure (no I/O, no clock) and are exposed to mappings as jq
//! functions, so each returns a short, user-facing error naming the bad input.
//!
//! The rules:
//!
//! - **Nothing is rounded or guessed.** An amount with more decimals than its
//!   currency has, a Unix time finer than a millisecond, a leap second, an
//!   instant with a fraction of a second asked for in whole seconds: each is
//!   refused rather than rounded.
//! - **Time zones are explicit.** A date-time without a UTC offset is only
//!   read in a named IANA zone (`"Europe/Paris"`), never in the machine's
//!   zone. A local time that a clock change skips (a gap) or repeats (a fold)
//!   is refused: only an explicit offset can say which instant was meant.
//! - **Instants come out in UTC** as RFC 3339 with a `Z`
//!   (`2026-11-23T14:36:17Z`), with a fraction of a second only when the input
//!   had one.
//! - **Money is decimal text**, never a float: `"12.34"` EUR is 1234 cents.

use iso_currency::Currency;
use jiff::Timestamp;
use jiff::civil::{DateTime, Time};
use jiff::fmt::strtime;
use jiff::fmt::temporal::{Pieces, PiecesOffset};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use phonenumber::country;

// ---------------------------------------------------------------------------
// Dates and times
// ---------------------------------------------------------------------------

/// Reads an ISO 8601 / RFC 3339 date-time and returns the instant in UTC.
///
/// With a UTC offset (`Z`, `+01:00`) the offset decides the instant. Without
/// one (`2026-11-23T14:36:17`, `2026-11-23 14:36`, `2026-11-23`) the wall-clock
/// time is read in the IANA zone `tz` (or in the zone of an RFC 9557
/// annotation such as `[Europe/Paris]`); a bare date means midnight there.
pub fn to_iso8601(input: &str, tz: Option<&str>) -> Result<String, String> {
    let given_zone = tz.map(time_zone).transpose()?;
    let instant = match read_iso8601(input)? {
        Written::Instant(instant) => instant,
        Written::Local { datetime, annotated_zone } => {
            let zone = zone_for_local_time(input, annotated_zone, given_zone)?;
            resolve_local(input, datetime, &zone)?
        }
    };
    Ok(rfc3339_utc(instant, fraction_digits(input.trim())))
}

/// Turns seconds since the Unix epoch (fractions down to the millisecond
/// allowed) into an RFC 3339 instant in UTC.
pub fn from_unix_seconds(secs: f64) -> Result<String, String> {
    from_unix_scaled(secs, 3, "seconds", "a fraction finer than a millisecond")
}

/// Turns whole milliseconds since the Unix epoch into an RFC 3339 instant in UTC.
pub fn from_unix_millis(ms: f64) -> Result<String, String> {
    from_unix_scaled(ms, 0, "milliseconds", "a fraction of a millisecond")
}

/// Seconds since the Unix epoch of an RFC 3339 instant (which must carry an
/// offset and no fraction of a second).
pub fn to_unix_seconds(input: &str) -> Result<i64, String> {
    let instant = read_instant(input)?;
    if instant.subsec_nanosecond() != 0 {
        return Err(format!("{input:?} has a fraction of a second; use to_unix_millis or drop the fraction"));
    }
    Ok(instant.as_second())
}

/// Milliseconds since the Unix epoch of an RFC 3339 instant (which must carry
/// an offset and no fraction finer than a millisecond).
pub fn to_unix_millis(input: &str) -> Result<i64, String> {
    let instant = read_instant(input)?;
    if instant.subsec_nanosecond() % 1_000_000 != 0 {
        return Err(format!("{input:?} has a fraction finer than a millisecond"));
    }
    Ok(instant.as_millisecond())
}

/// Reads `input` with a strptime-style `format` (e.g. `%d/%m/%Y %H:%M`) as a
/// wall-clock time in the IANA zone `tz`, and returns the instant in UTC. If
/// the format reads a UTC offset (`%z`) or a Unix time (`%s`), that decides
/// the instant and `tz` is only checked to be a real zone; if it reads an
/// IANA zone name (`%Q`), that zone is used instead of `tz`.
pub fn parse_datetime(input: &str, format: &str, tz: &str) -> Result<String, String> {
    let zone = time_zone(tz)?;
    let parsed = strtime::parse(format, input).map_err(|e| not_in_format(input, "date-time", format, e))?;
    let instant = if parsed.timestamp().is_some() || parsed.offset().is_some() {
        parsed.to_timestamp().map_err(|e| not_in_format(input, "date-time", format, e))?
    } else {
        let datetime = parsed.to_datetime().map_err(|e| not_in_format(input, "date-time", format, e))?;
        let zone = match parsed.iana_time_zone() {
            Some(name) => time_zone(name).map_err(|e| format!("{input:?}: {e}"))?,
            None => zone,
        };
        resolve_local(input, datetime, &zone)?
    };
    Ok(rfc3339_utc(instant, natural_precision(instant)))
}

/// Reads a calendar date with a strptime-style `format` (e.g. `%d/%m/%Y`) and
/// returns it as `YYYY-MM-DD`.
pub fn parse_date(input: &str, format: &str) -> Result<String, String> {
    let date = strtime::parse(format, input)
        .and_then(|parsed| parsed.to_date())
        .map_err(|e| not_in_format(input, "date", format, e))?;
    Ok(date.to_string())
}

/// Formats an RFC 3339 instant (which must carry an offset) with a
/// strftime-style `format`, as wall-clock time in the IANA zone `tz`.
pub fn format_datetime(input: &str, format: &str, tz: &str) -> Result<String, String> {
    let zone = time_zone(tz)?;
    let instant = read_instant(input)?;
    strtime::format(format, &instant.to_zoned(zone))
        .map_err(|e| format!("cannot format {input:?} with {format:?}: {e}"))
}

/// What an ISO 8601 string says: either an exact instant, or a wall-clock
/// time that still needs a time zone.
enum Written {
    Instant(Timestamp),
    Local { datetime: DateTime, annotated_zone: Option<TimeZone> },
}

/// Parses an ISO 8601 / RFC 3339 / RFC 9557 string (surrounding whitespace
/// allowed). An offset decides the instant; a zone annotation next to a
/// numeric offset must agree with it (`Z` and `-00:00` only say the local
/// offset is unknown, so they need not).
fn read_iso8601(input: &str) -> Result<Written, String> {
    let text = input.trim();
    let pieces = Pieces::parse(text).map_err(|e| format!("{input:?} is not an ISO 8601 date-time: {e}"))?;
    refuse_leap_second(input, text)?;
    let datetime = DateTime::from_parts(pieces.date(), pieces.time().unwrap_or(Time::midnight()));
    let annotated_zone =
        pieces.to_time_zone().map_err(|e| format!("{input:?} names a time zone that is not known: {e}"))?;
    let Some(written_offset) = pieces.offset() else {
        return Ok(Written::Local { datetime, annotated_zone });
    };
    let offset = written_offset.to_numeric_offset();
    let instant = offset.to_timestamp(datetime).map_err(|e| format!("{input:?} is out of range: {e}"))?;
    if let (Some(zone), true) = (annotated_zone, is_known_local_offset(written_offset)) {
        check_offset_matches_zone(input, instant, offset, &zone)?;
    }
    Ok(Written::Instant(instant))
}

/// Whether the offset claims to be the local one: not `Z`, not `-00:00`.
fn is_known_local_offset(offset: PiecesOffset) -> bool {
    match offset {
        PiecesOffset::Numeric(numeric) => !(numeric.is_negative() && numeric.offset() == Offset::UTC),
        _ => false,
    }
}

/// Reads an instant that must carry its own UTC offset.
fn read_instant(input: &str) -> Result<Timestamp, String> {
    match read_iso8601(input)? {
        Written::Instant(instant) => Ok(instant),
        Written::Local { .. } => {
            Err(format!("{input:?} has no UTC offset, so it is not an instant; add one (e.g. \"Z\" or \"+01:00\")"))
        }
    }
}

fn check_offset_matches_zone(input: &str, instant: Timestamp, offset: Offset, zone: &TimeZone) -> Result<(), String> {
    let expected = zone.to_offset(instant);
    if expected == offset {
        return Ok(());
    }
    Err(format!(
        "{input:?} is inconsistent: its offset is {offset} but {} was at {expected} at that time",
        zone_name(zone)
    ))
}

/// The zone a wall-clock time is read in: its annotation or the `tz` given
/// (which must then agree), and never a default.
fn zone_for_local_time(input: &str, annotated: Option<TimeZone>, given: Option<TimeZone>) -> Result<TimeZone, String> {
    match (annotated, given) {
        (None, None) => {
            Err(format!("{input:?} has no UTC offset; pass the time zone it is written in (e.g. \"Europe/Paris\")"))
        }
        (Some(zone), None) | (None, Some(zone)) => Ok(zone),
        (Some(annotated), Some(given)) if annotated == given => Ok(given),
        (Some(annotated), Some(given)) => Err(format!(
            "{input:?} is annotated with {} but the time zone passed is {}",
            zone_name(&annotated),
            zone_name(&given)
        )),
    }
}

/// The instant of a wall-clock time in `zone`; times that a clock change
/// skips or repeats there are refused.
fn resolve_local(input: &str, datetime: DateTime, zone: &TimeZone) -> Result<Timestamp, String> {
    let ambiguous = zone.to_ambiguous_timestamp(datetime);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { .. } => {
            ambiguous.unambiguous().map_err(|e| format!("{input:?} is out of range in {}: {e}", zone_name(zone)))
        }
        AmbiguousOffset::Gap { before, after } => Err(format!(
            "{input:?} is a local time that does not exist in {}: the clocks jump from {before} to {after} over it; \
             give an explicit UTC offset",
            zone_name(zone)
        )),
        AmbiguousOffset::Fold { before, after } => Err(format!(
            "{input:?} is an ambiguous local time in {}: it happens twice, at {before} and again at {after}; \
             give an explicit UTC offset",
            zone_name(zone)
        )),
    }
}

/// Looks up an IANA time zone by name.
fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| format!("{name:?} is not a known IANA time zone (e.g. \"Europe/Paris\", \"UTC\")"))
}

fn zone_name(zone: &TimeZone) -> &str {
    zone.iana_name().unwrap_or("the time zone")
}

fn not_in_format(input: &str, what: &str, format: &str, error: jiff::Error) -> String {
    format!("{input:?} is not a {what} in the format {format:?}: {error}")
}

/// The clock part of a trimmed, parsed ISO 8601 string (`14:36:17.250` in
/// `2026-11-23T14:36:17.250+01:00`), if it has one.
fn clock_text(input: &str) -> Option<&str> {
    let start = input.find(['T', 't', ' '])? + 1;
    let rest = &input[start..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || matches!(c, ':' | '.' | ','))).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// jiff reads a leap second (`23:59:60`) as `23:59:59`; refuse it instead.
fn refuse_leap_second(input: &str, text: &str) -> Result<(), String> {
    let Some(clock) = clock_text(text) else { return Ok(()) };
    let whole_seconds = clock.split(['.', ',']).next().unwrap_or(clock);
    let mut digits = whole_seconds.bytes().filter(u8::is_ascii_digit).skip(4);
    if (digits.next(), digits.next()) == (Some(b'6'), Some(b'0')) {
        return Err(format!("{input:?} is a leap second, which cannot be represented"));
    }
    Ok(())
}

/// How many digits the input gave for the fraction of a second.
fn fraction_digits(input: &str) -> usize {
    let Some(clock) = clock_text(input) else { return 0 };
    clock.split_once(['.', ',']).map_or(0, |(_, fraction)| fraction.len())
}

/// The fewest of 0, 3, 6 or 9 fraction digits that show `instant` exactly.
fn natural_precision(instant: Timestamp) -> usize {
    match instant.subsec_nanosecond() {
        0 => 0,
        n if n % 1_000_000 == 0 => 3,
        n if n % 1_000 == 0 => 6,
        _ => 9,
    }
}

/// RFC 3339 in UTC with exactly `fraction_digits` digits of a second.
fn rfc3339_utc(instant: Timestamp, fraction_digits: usize) -> String {
    format!("{instant:.fraction_digits$}")
}

/// The instant `value` units after the Unix epoch, where `value` times
/// 10^`scale` is in milliseconds (seconds: 3, milliseconds: 0) and must be
/// a whole number.
fn from_unix_scaled(value: f64, scale: usize, unit: &str, too_precise: &str) -> Result<String, String> {
    if !value.is_finite() {
        return Err(format!("{value:?} is not a finite number of {unit}"));
    }
    // The shortest decimal text that reads back as `value`, never with an
    // exponent: for any sensible number, exactly what the partner wrote.
    let text = value.to_string();
    let decimal = Decimal::parse(&text).map_err(|why| format!("{value:?} is not a number of {unit}: {why}"))?;
    let millis = decimal.scaled(scale).map_err(|e| match e {
        ScaleError::TooPrecise { .. } => format!("{value:?} has {too_precise}; refusing to round it"),
        ScaleError::Overflow => out_of_range(value, unit),
    })?;
    let instant = Timestamp::from_millisecond(millis).map_err(|_| out_of_range(value, unit))?;
    Ok(rfc3339_utc(instant, natural_precision(instant)))
}

fn out_of_range(value: f64, unit: &str) -> String {
    format!("{value:?} {unit} since the Unix epoch is out of range (years -9999 to 9999)")
}

// ---------------------------------------------------------------------------
// Money
// ---------------------------------------------------------------------------

/// A decimal amount in minor units of `currency`: `"12.34"` EUR is 1234.
/// More decimals than the currency has are refused (trailing zeros aside).
pub fn to_minor_units(amount: &str, currency: &str) -> Result<i64, String> {
    let currency = lookup_currency(currency)?;
    let exponent = minor_exponent(currency)?;
    let decimal = Decimal::parse(amount).map_err(|why| format!("{amount:?} is not an amount: {why}"))?;
    decimal.scaled(usize::from(exponent)).map_err(|e| match e {
        ScaleError::TooPrecise { places } => format!(
            "{amount:?} has {places} decimal place{} but {} has {exponent}; refusing to round it",
            if places == 1 { "" } else { "s" },
            currency.code()
        ),
        ScaleError::Overflow => format!("{amount:?} is too large to count in minor units of {}", currency.code()),
    })
}

/// A count of minor units of `currency` as a decimal amount: 1234 EUR is `"12.34"`.
pub fn from_minor_units(units: i64, currency: &str) -> Result<String, String> {
    let currency = lookup_currency(currency)?;
    let exponent = minor_exponent(currency)?;
    let sign = if units < 0 { "-" } else { "" };
    let magnitude = units.unsigned_abs();
    if exponent == 0 {
        return Ok(format!("{sign}{magnitude}"));
    }
    let divisor = 10u64
        .checked_pow(u32::from(exponent))
        .ok_or_else(|| format!("{} has too many minor-unit digits ({exponent})", currency.code()))?;
    let (whole, fraction) = (magnitude / divisor, magnitude % divisor);
    let width = usize::from(exponent);
    Ok(format!("{sign}{whole}.{fraction:0width$}"))
}

/// The ISO 4217 code of `input`, trimmed and uppercased: `" eur "` is `"EUR"`.
pub fn currency_code(input: &str) -> Result<String, String> {
    lookup_currency(input).map(|currency| currency.code().to_string())
}

fn lookup_currency(input: &str) -> Result<Currency, String> {
    let unknown = || format!("{input:?} is not an ISO 4217 currency code (e.g. \"EUR\")");
    let code: [u8; 3] = input.trim().as_bytes().try_into().map_err(|_| unknown())?;
    let code = code.map(|b| b.to_ascii_uppercase());
    std::str::from_utf8(&code).ok().and_then(Currency::from_code).ok_or_else(unknown)
}

/// How many decimal places the currency's minor unit has.
fn minor_exponent(currency: Currency) -> Result<u16, String> {
    currency
        .exponent()
        .ok_or_else(|| format!("{} has no minor unit, so it cannot be counted in minor units", currency.code()))
}

/// A decimal number as written: `[+-]digits[.digits]`, surrounding
/// whitespace allowed. `fraction` is empty when there is no point.
#[derive(Debug, PartialEq)]
struct Decimal<'a> {
    negative: bool,
    whole: &'a str,
    fraction: &'a str,
}

#[derive(Debug, PartialEq)]
enum ScaleError {
    /// More significant decimal places than the scale allows.
    TooPrecise {
        places: usize,
    },
    Overflow,
}

impl<'a> Decimal<'a> {
    fn parse(text: &'a str) -> Result<Decimal<'a>, &'static str> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("it is empty");
        }
        let (negative, unsigned) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
        };
        let (whole, fraction) = match unsigned.split_once('.') {
            Some((whole, fraction)) if all_digits(fraction) => (whole, fraction),
            Some(_) => return Err(malformed_reason(trimmed)),
            None => (unsigned, ""),
        };
        if !all_digits(whole) {
            return Err(malformed_reason(trimmed));
        }
        Ok(Decimal { negative, whole, fraction })
    }

    /// The value times 10^`scale`, which must be a whole number fitting an i64.
    fn scaled(&self, scale: usize) -> Result<i64, ScaleError> {
        let significant = self.fraction.trim_end_matches('0');
        if significant.len() > scale {
            return Err(ScaleError::TooPrecise { places: significant.len() });
        }
        let padding = std::iter::repeat_n(b'0', scale - significant.len());
        let digits = self.whole.bytes().chain(significant.bytes()).chain(padding);
        digits
            .map(|digit| i64::from(digit - b'0'))
            .try_fold(0i64, |acc, digit| {
                let acc = acc.checked_mul(10)?;
                if self.negative { acc.checked_sub(digit) } else { acc.checked_add(digit) }
            })
            .ok_or(ScaleError::Overflow)
    }
}

/// At least one ASCII digit, and nothing else.
fn all_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn malformed_reason(text: &str) -> &'static str {
    if text.contains(',') {
        "commas are not accepted (neither as thousands separators nor as a decimal comma); write 1234.56"
    } else if text.contains(['e', 'E']) {
        "exponents are not accepted; write the digits out, e.g. 1234.56"
    } else {
        "expected digits with an optional sign and decimal point, e.g. -1234.56"
    }
}

// ---------------------------------------------------------------------------
// Booleans
// ---------------------------------------------------------------------------

const TRUE_WORDS: [&str; 6] = ["true", "t", "yes", "y", "1", "on"];
const FALSE_WORDS: [&str; 6] = ["false", "f", "no", "n", "0", "off"];
const BOOLEAN_FORMS: &str = "true or false, 1 or 0, or one of the strings true/false, t/f, yes/no, y/n, on/off, 1/0";

/// A boolean from JSON `true`/`false`, the numbers 1/0, or the strings
/// true/false, t/f, yes/no, y/n, 1/0, on/off (trimmed, any case).
pub fn to_bool(input: &serde_json::Value) -> Result<bool, String> {
    use serde_json::Value;
    let parsed = match input {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => number_to_bool(n),
        Value::String(s) => word_to_bool(s),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    };
    parsed.ok_or_else(|| format!("{input} is not a boolean: expected {BOOLEAN_FORMS}"))
}

fn number_to_bool(n: &serde_json::Number) -> Option<bool> {
    match n.as_f64()? {
        1.0 => Some(true),
        0.0 => Some(false),
        _ => None,
    }
}

fn word_to_bool(word: &str) -> Option<bool> {
    let word = word.trim();
    let is = |candidates: &[&str]| candidates.iter().any(|c| c.eq_ignore_ascii_case(word));
    if is(&TRUE_WORDS) {
        Some(true)
    } else if is(&FALSE_WORDS) {
        Some(false)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// Phone numbers
// ---------------------------------------------------------------------------

/// A phone number in E.164 (`+442079460000`). A number written with `+` or
/// `00` is international; any other needs the `region` it is dialled in
/// (ISO 3166-1 alpha-2, e.g. `"GB"`). Numbers libphonenumber does not
/// consider valid, and numbers with an extension (which E.164 cannot hold),
/// are refused.
pub fn to_e164(input: &str, region: Option<&str>) -> Result<String, String> {
    let region = region.map(phone_region).transpose()?;
    let text = input.trim();
    let international = text.strip_prefix("00").map(|rest| format!("+{rest}"));
    if international.is_none() && !text.starts_with('+') && region.is_none() {
        return Err(format!(
            "{input:?} has no international prefix (+ or 00); pass the region it is dialled in (e.g. \"GB\")"
        ));
    }
    let number = phonenumber::parse(region, international.as_deref().unwrap_or(text))
        .map_err(|e| format!("{input:?} is not a phone number: {e}"))?;
    if !phonenumber::is_valid(&number) {
        return Err(format!("{input:?} is not a valid phone number{}", region_suffix(region)));
    }
    if number.extension().is_some() {
        return Err(format!("{input:?} has an extension, which E.164 cannot hold"));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

fn phone_region(code: &str) -> Result<country::Id, String> {
    let unknown = || format!("{code:?} is not a region code (ISO 3166-1 alpha-2, e.g. \"GB\")");
    let letters: [u8; 2] = code.trim().as_bytes().try_into().map_err(|_| unknown())?;
    let letters = letters.map(|b| b.to_ascii_uppercase());
    std::str::from_utf8(&letters).ok().and_then(|id| id.parse().ok()).ok_or_else(unknown)
}

fn region_suffix(region: Option<country::Id>) -> String {
    region.map(|id| format!(" in {}", id.as_ref())).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------

/// Trims and turns every run of Unicode whitespace into one space.
pub fn collapse_whitespace(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for word in input.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Unicode lowercase.
pub fn lowercase(input: &str) -> String {
    input.to_lowercase()
}

/// Unicode uppercase.
pub fn uppercase(input: &str) -> String {
    input.to_uppercase()
}

/// Uppercases the first letter or digit of each word and lowercases the
/// rest; words are separated by whitespace or hyphens, which are kept as
/// they are: `"jEAN-luc  picard"` is `"Jean-Luc  Picard"`.
pub fn titlecase(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut at_word_start = true;
    for c in input.chars() {
        if c.is_whitespace() || c == '-' {
            out.push(c);
            at_word_start = true;
        } else if at_word_start {
            out.extend(c.to_uppercase());
            at_word_start = !c.is_alphanumeric();
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PARIS: Option<&str> = Some("Europe/Paris");

    /// Asserts `result` is an error whose message contains every fragment.
    #[track_caller]
    fn assert_err<T: std::fmt::Debug>(result: Result<T, String>, fragments: &[&str]) {
        let message = match result {
            Ok(value) => panic!("expected an error containing {fragments:?}, got Ok({value:?})"),
            Err(message) => message,
        };
        for fragment in fragments {
            assert!(message.contains(fragment), "{message:?} does not contain {fragment:?}");
        }
    }

    // -- to_iso8601 -----------------------------------------------------------

    #[test]
    fn to_iso8601_converts_offsets_to_utc() {
        let cases = [
            ("2026-11-23T14:36:17Z", "2026-11-23T14:36:17Z"),
            ("2026-11-23t14:36:17z", "2026-11-23T14:36:17Z"),
            ("2026-11-23T14:36:17+01:00", "2026-11-23T13:36:17Z"),
            ("2026-11-23 14:36:17+01:00", "2026-11-23T13:36:17Z"),
            ("2026-11-23T00:30:00-05:00", "2026-11-23T05:30:00Z"),
            ("2026-11-23T23:30:00-05:00", "2026-11-24T04:30:00Z"),
            ("2026-11-23T14:36:17-00:00", "2026-11-23T14:36:17Z"),
            ("2026-11-23T14:36:17+05:30", "2026-11-23T09:06:17Z"),
            ("20261123T143617+0100", "2026-11-23T13:36:17Z"),
            (" 2026-11-23 14:36:17.5Z\n", "2026-11-23T14:36:17.5Z"),
        ];
        for (input, expected) in cases {
            assert_eq!(to_iso8601(input, None).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_iso8601_keeps_the_fraction_digits_the_input_had() {
        let cases = [
            ("2026-11-23T14:36:17.250+01:00", "2026-11-23T13:36:17.250Z"),
            ("2026-11-23T14:36:17.5Z", "2026-11-23T14:36:17.5Z"),
            ("2026-11-23T14:36:17,25Z", "2026-11-23T14:36:17.25Z"),
            ("2026-11-23T14:36:17.000Z", "2026-11-23T14:36:17.000Z"),
            ("2026-11-23T14:36:17.123456789Z", "2026-11-23T14:36:17.123456789Z"),
            ("20261123T143617.5Z", "2026-11-23T14:36:17.5Z"),
        ];
        for (input, expected) in cases {
            assert_eq!(to_iso8601(input, None).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_iso8601_reads_local_times_in_the_given_zone() {
        let cases = [
            ("2026-11-23T14:36:17", "Europe/Paris", "2026-11-23T13:36:17Z"),
            ("2026-07-01 14:36", "Europe/Paris", "2026-07-01T12:36:00Z"),
            ("2026-11-23T14:36:17.25", "Europe/Paris", "2026-11-23T13:36:17.25Z"),
            ("2026-11-23", "Europe/Paris", "2026-11-22T23:00:00Z"),
            ("2026-11-23", "UTC", "2026-11-23T00:00:00Z"),
            ("2026-11-23T14:36:17", "America/New_York", "2026-11-23T19:36:17Z"),
            ("2026-11-23T14:36:17", "Asia/Kolkata", "2026-11-23T09:06:17Z"),
            // An explicit offset wins over the zone passed.
            ("2026-11-23T14:36:17+01:00", "America/New_York", "2026-11-23T13:36:17Z"),
        ];
        for (input, tz, expected) in cases {
            assert_eq!(to_iso8601(input, Some(tz)).as_deref(), Ok(expected), "{input} in {tz}");
        }
    }

    #[test]
    fn to_iso8601_accepts_times_just_outside_dst_transitions() {
        let cases = [
            ("2026-03-29T01:59:59", "2026-03-29T00:59:59Z"),
            ("2026-03-29T03:00:00", "2026-03-29T01:00:00Z"),
            ("2026-03-29T03:30", "2026-03-29T01:30:00Z"),
            ("2026-10-25T01:59:59", "2026-10-24T23:59:59Z"),
            ("2026-10-25T03:00:00", "2026-10-25T02:00:00Z"),
        ];
        for (input, expected) in cases {
            assert_eq!(to_iso8601(input, PARIS).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_iso8601_refuses_local_times_in_a_dst_gap() {
        for input in ["2026-03-29T02:30", "2026-03-29T02:00:00", "2026-03-29 02:59:59"] {
            assert_err(
                to_iso8601(input, PARIS),
                &[&format!("{input:?}"), "does not exist in Europe/Paris", "jump from +01 to +02"],
            );
        }
        // Brazil's clocks skipped midnight itself, so this date has no midnight.
        assert_err(to_iso8601("2018-11-04", Some("America/Sao_Paulo")), &["does not exist", "America/Sao_Paulo"]);
    }

    #[test]
    fn to_iso8601_refuses_local_times_in_a_dst_fold() {
        for input in ["2026-10-25T02:30", "2026-10-25T02:00:00", "2026-10-25 02:59:59"] {
            assert_err(
                to_iso8601(input, PARIS),
                &[&format!("{input:?}"), "ambiguous local time in Europe/Paris", "twice, at +02 and again at +01"],
            );
        }
    }

    #[test]
    fn to_iso8601_needs_a_zone_for_local_times() {
        for input in ["2026-11-23T14:36:17", "2026-11-23 14:36", "2026-11-23"] {
            assert_err(to_iso8601(input, None), &[&format!("{input:?}"), "no UTC offset", "time zone"]);
        }
    }

    #[test]
    fn to_iso8601_refuses_unknown_zones_even_when_unused() {
        assert_err(to_iso8601("2026-11-23T14:36", Some("Europe/Pariss")), &["\"Europe/Pariss\"", "not a known"]);
        assert_err(to_iso8601("2026-11-23T14:36Z", Some("CET+1")), &["\"CET+1\"", "not a known"]);
        assert_err(to_iso8601("2026-11-23T14:36Z", Some("")), &["\"\"", "not a known"]);
    }

    #[test]
    fn to_iso8601_refuses_malformed_input() {
        let cases = [
            "",
            "23/11/2026",
            "2026-02-30T10:00:00Z",
            "2026-11-23T25:00:00Z",
            "2026-11-23T14:36:17+01:00 trailing",
            "yesterday",
        ];
        for input in cases {
            assert_err(to_iso8601(input, PARIS), &[&format!("{input:?}"), "is not an ISO 8601 date-time"]);
        }
    }

    #[test]
    fn to_iso8601_refuses_instants_beyond_the_supported_range() {
        assert_err(to_iso8601("9999-12-31T23:00:00Z", None), &["\"9999-12-31T23:00:00Z\"", "out of range"]);
        assert_err(to_iso8601("9999-12-31T23:00", Some("UTC")), &["\"9999-12-31T23:00\"", "out of range in UTC"]);
    }

    #[test]
    fn to_iso8601_refuses_leap_seconds_instead_of_clamping_them() {
        for input in ["2016-12-31T23:59:60Z", "2016-12-31T23:59:60.5Z", "20161231T235960Z"] {
            assert_err(to_iso8601(input, None), &[&format!("{input:?}"), "leap second"]);
        }
        // A 60 in the minutes or the offset is not a leap second (and 23:59:59 still works).
        assert_eq!(to_iso8601("2016-12-31T23:59:59Z", None).as_deref(), Ok("2016-12-31T23:59:59Z"));
        assert_eq!(to_iso8601("2016-12-31T06:00:00+06:00", None).as_deref(), Ok("2016-12-31T00:00:00Z"));
    }

    #[test]
    fn to_iso8601_uses_and_checks_zone_annotations() {
        let cases = [
            ("2026-07-01T14:36:17+02:00[Europe/Paris]", None, "2026-07-01T12:36:17Z"),
            ("2026-07-01T14:36:17[Europe/Paris]", None, "2026-07-01T12:36:17Z"),
            ("2026-07-01T14:36:17[Europe/Paris]", PARIS, "2026-07-01T12:36:17Z"),
            // `Z` and `-00:00` say the local offset is unknown, so the zone cannot contradict them.
            ("2026-07-01T14:36:17Z[Europe/Paris]", None, "2026-07-01T14:36:17Z"),
            ("2026-07-01T14:36:17-00:00[Europe/Paris]", None, "2026-07-01T14:36:17Z"),
        ];
        for (input, tz, expected) in cases {
            assert_eq!(to_iso8601(input, tz).as_deref(), Ok(expected), "{input}");
        }
        for input in ["2026-07-01T14:36:17+01:00[Europe/Paris]", "2026-07-01T14:36:17+00:00[Europe/Paris]"] {
            assert_err(to_iso8601(input, None), &[&format!("{input:?}"), "inconsistent", "Europe/Paris"]);
        }
        assert_err(
            to_iso8601("2026-07-01T14:36:17[Europe/Paris]", Some("America/New_York")),
            &["Europe/Paris", "America/New_York"],
        );
        assert_err(to_iso8601("2026-07-01T14:36:17[Mars/Olympus_Mons]", None), &["not known"]);
    }

    // -- Unix times -----------------------------------------------------------

    #[test]
    fn from_unix_seconds_converts_whole_and_millisecond_values() {
        let cases = [
            (0.0, "1970-01-01T00:00:00Z"),
            (-0.0, "1970-01-01T00:00:00Z"),
            (1_795_444_577.0, "2026-11-23T14:36:17Z"),
            (1_795_444_577.25, "2026-11-23T14:36:17.250Z"),
            (1_795_444_577.123, "2026-11-23T14:36:17.123Z"),
            (1_795_444_577.001, "2026-11-23T14:36:17.001Z"),
            (0.1, "1970-01-01T00:00:00.100Z"),
            (-1.5, "1969-12-31T23:59:58.500Z"),
            // The range of jiff's timestamps (any offset must give a year within ±9999).
            (253_402_207_200.0, "9999-12-30T22:00:00Z"),
            (-377_705_023_201.0, "-009999-01-02T01:59:59Z"),
        ];
        for (secs, expected) in cases {
            assert_eq!(from_unix_seconds(secs).as_deref(), Ok(expected), "{secs}");
        }
    }

    #[test]
    fn from_unix_seconds_refuses_what_it_would_have_to_round_or_clamp() {
        assert_err(from_unix_seconds(1.0005), &["1.0005", "finer than a millisecond"]);
        assert_err(from_unix_seconds(0.1 + 0.2), &["finer than a millisecond"]);
        assert_err(from_unix_seconds(1e-300), &["finer than a millisecond"]);
        assert_err(from_unix_seconds(253_402_207_201.0), &["253402207201", "out of range"]);
        assert_err(from_unix_seconds(-377_705_023_202.0), &["-377705023202", "out of range"]);
        assert_err(from_unix_seconds(-1e20), &["out of range"]);
        assert_err(from_unix_seconds(1e300), &["1e300 seconds", "out of range"]);
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_err(from_unix_seconds(value), &["not a finite number of seconds"]);
        }
    }

    #[test]
    fn from_unix_millis_converts_whole_milliseconds() {
        let cases = [
            (0.0, "1970-01-01T00:00:00Z"),
            (1_795_444_577_000.0, "2026-11-23T14:36:17Z"),
            (1_795_444_577_250.0, "2026-11-23T14:36:17.250Z"),
            (-1.0, "1969-12-31T23:59:59.999Z"),
        ];
        for (ms, expected) in cases {
            assert_eq!(from_unix_millis(ms).as_deref(), Ok(expected), "{ms}");
        }
    }

    #[test]
    fn from_unix_millis_refuses_fractions_and_out_of_range_values() {
        assert_err(from_unix_millis(1.5), &["1.5", "fraction of a millisecond"]);
        assert_err(from_unix_millis(253_402_300_800_000.0), &["out of range"]);
        assert_err(from_unix_millis(1e300), &["out of range"]);
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_err(from_unix_millis(value), &["not a finite number of milliseconds"]);
        }
    }

    #[test]
    fn to_unix_seconds_reads_instants_with_offsets() {
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59Z", -1),
            ("2026-11-23T14:36:17Z", 1_795_444_577),
            ("2026-11-23T15:36:17+01:00", 1_795_444_577),
            ("2026-11-23 14:36:17.000Z", 1_795_444_577),
        ];
        for (input, expected) in cases {
            assert_eq!(to_unix_seconds(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_unix_seconds_refuses_missing_offsets_and_fractions() {
        assert_err(to_unix_seconds("2026-11-23T14:36:17"), &["\"2026-11-23T14:36:17\"", "no UTC offset"]);
        assert_err(to_unix_seconds("2026-11-23"), &["no UTC offset"]);
        assert_err(to_unix_seconds("2026-11-23T14:36:17.5Z"), &["fraction of a second"]);
        assert_err(to_unix_seconds("1795444577"), &["is not an ISO 8601 date-time"]);
    }

    #[test]
    fn to_unix_millis_reads_instants_with_offsets() {
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59.999Z", -1),
            ("2026-11-23T14:36:17Z", 1_795_444_577_000),
            ("2026-11-23T15:36:17.25+01:00", 1_795_444_577_250),
            ("2026-11-23T14:36:17.250000Z", 1_795_444_577_250),
        ];
        for (input, expected) in cases {
            assert_eq!(to_unix_millis(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_unix_millis_refuses_missing_offsets_and_sub_millisecond_fractions() {
        assert_err(to_unix_millis("2026-11-23T14:36:17"), &["no UTC offset"]);
        assert_err(to_unix_millis("2026-11-23T14:36:17.2501Z"), &["finer than a millisecond"]);
    }

    #[test]
    fn unix_millis_round_trip() {
        for ms in [0, -1, 1, 999, 1_795_444_577_250, -62_135_596_800_000] {
            let text = from_unix_millis(ms as f64).unwrap();
            assert_eq!(to_unix_millis(&text), Ok(ms), "{text}");
        }
    }

    // -- parse_datetime / parse_date / format_datetime --------------------------

    #[test]
    fn parse_datetime_reads_local_times_in_the_zone() {
        let cases = [
            ("23/11/2026 14:36", "%d/%m/%Y %H:%M", "Europe/Paris", "2026-11-23T13:36:00Z"),
            ("01/07/2026 14:36", "%d/%m/%Y %H:%M", "Europe/Paris", "2026-07-01T12:36:00Z"),
            ("23/11/2026", "%d/%m/%Y", "America/New_York", "2026-11-23T05:00:00Z"),
            ("2026-11-23 14:36:17.25", "%Y-%m-%d %H:%M:%S%.f", "UTC", "2026-11-23T14:36:17.250Z"),
            ("2026-11-23 14:36:17.1234", "%Y-%m-%d %H:%M:%S%.f", "UTC", "2026-11-23T14:36:17.123400Z"),
            ("2026-11-23 14:36:17.1234567", "%Y-%m-%d %H:%M:%S%.f", "UTC", "2026-11-23T14:36:17.123456700Z"),
            ("2026-11-23 14:36:17.000", "%Y-%m-%d %H:%M:%S%.f", "UTC", "2026-11-23T14:36:17Z"),
            ("Nov 23 2026 2:36 PM", "%b %d %Y %I:%M %p", "UTC", "2026-11-23T14:36:00Z"),
        ];
        for (input, format, tz, expected) in cases {
            assert_eq!(parse_datetime(input, format, tz).as_deref(), Ok(expected), "{input} / {format}");
        }
    }

    #[test]
    fn parse_datetime_prefers_what_the_format_says_about_the_zone() {
        let cases = [
            ("23/11/2026 14:36 +0500", "%d/%m/%Y %H:%M %z", "2026-11-23T09:36:00Z"),
            ("23/11/2026 14:36 -03:30", "%d/%m/%Y %H:%M %:z", "2026-11-23T18:06:00Z"),
            ("1795444577", "%s", "2026-11-23T14:36:17Z"),
            ("2026-07-01 14:36 Europe/London", "%Y-%m-%d %H:%M %Q", "2026-07-01T13:36:00Z"),
        ];
        for (input, format, expected) in cases {
            assert_eq!(parse_datetime(input, format, "Asia/Tokyo").as_deref(), Ok(expected), "{input} / {format}");
        }
    }

    #[test]
    fn parse_datetime_refuses_dst_gaps_and_folds() {
        assert_err(
            parse_datetime("29/03/2026 02:30", "%d/%m/%Y %H:%M", "Europe/Paris"),
            &["\"29/03/2026 02:30\"", "does not exist", "Europe/Paris"],
        );
        assert_err(
            parse_datetime("25/10/2026 02:30", "%d/%m/%Y %H:%M", "Europe/Paris"),
            &["\"25/10/2026 02:30\"", "ambiguous", "Europe/Paris"],
        );
    }

    #[test]
    fn parse_datetime_refuses_bad_input_format_and_zone() {
        let format = "%d/%m/%Y %H:%M";
        for input in ["31/02/2026 10:00", "2026-11-23 10:00", "23/11/2026 10:00 extra", "23/11/2026 24:00", ""] {
            assert_err(
                parse_datetime(input, format, "Europe/Paris"),
                &[&format!("{input:?}"), "is not a date-time in the format \"%d/%m/%Y %H:%M\""],
            );
        }
        // Lower units without the higher ones cannot make a date-time.
        assert_err(parse_datetime("14:36", "%H:%M", "UTC"), &["is not a date-time in the format"]);
        assert_err(parse_datetime("23/11/2026 14:36", format, "Nowhere/Special"), &["\"Nowhere/Special\""]);
        assert_err(parse_datetime("23/11/2026 14:36 +0100", "%d/%m/%Y %H:%M %z", "Nope"), &["\"Nope\""]);
        assert_err(
            parse_datetime("2026-07-01 14:36 Mars/Base", "%Y-%m-%d %H:%M %Q", "UTC"),
            &["\"2026-07-01 14:36 Mars/Base\"", "\"Mars/Base\" is not a known IANA time zone"],
        );
    }

    #[test]
    fn parse_date_reads_calendar_dates() {
        let cases = [
            ("23/11/2026", "%d/%m/%Y", "2026-11-23"),
            ("11/23/2026", "%m/%d/%Y", "2026-11-23"),
            ("23 Nov 2026", "%d %b %Y", "2026-11-23"),
            ("29.02.2024", "%d.%m.%Y", "2024-02-29"),
            ("2026-11-23", "%Y-%m-%d", "2026-11-23"),
            ("20261123", "%Y%m%d", "2026-11-23"),
        ];
        for (input, format, expected) in cases {
            assert_eq!(parse_date(input, format).as_deref(), Ok(expected), "{input} / {format}");
        }
    }

    #[test]
    fn parse_date_refuses_impossible_and_mismatched_dates() {
        let cases = [
            ("31/02/2026", "%d/%m/%Y"),
            ("29/02/2026", "%d/%m/%Y"),
            ("31/04/2026", "%d/%m/%Y"),
            ("00/01/2026", "%d/%m/%Y"),
            ("23/13/2026", "%d/%m/%Y"),
            ("23/11", "%d/%m"),
            ("2026-11-23", "%d/%m/%Y"),
            ("23/11/2026 ", "%d/%m/%Y"),
            ("", "%d/%m/%Y"),
        ];
        for (input, format) in cases {
            let prefix = format!("{input:?} is not a date in the format {format:?}: ");
            assert_err(parse_date(input, format), &[&prefix]);
        }
    }

    #[test]
    fn format_datetime_writes_wall_clock_time_in_the_zone() {
        let cases = [
            ("2026-11-23T13:36:17Z", "%d/%m/%Y %H:%M", "Europe/Paris", "23/11/2026 14:36"),
            ("2026-07-01T12:00:00Z", "%Y-%m-%dT%H:%M:%S%:z", "Europe/Paris", "2026-07-01T14:00:00+02:00"),
            ("2026-07-01T12:00:00Z", "%H:%M %Z", "America/New_York", "08:00 EDT"),
            ("2026-11-23T23:30:00-05:00", "%Y-%m-%d", "UTC", "2026-11-24"),
            ("2026-11-23T13:36:17.25Z", "%H:%M:%S%.3f", "UTC", "13:36:17.250"),
        ];
        for (input, format, tz, expected) in cases {
            assert_eq!(format_datetime(input, format, tz).as_deref(), Ok(expected), "{input} / {format} / {tz}");
        }
    }

    #[test]
    fn format_datetime_refuses_local_times_bad_zones_and_bad_formats() {
        assert_err(format_datetime("2026-11-23T13:36:17", "%Y", "UTC"), &["no UTC offset"]);
        assert_err(format_datetime("2026-11-23T13:36:17Z", "%Y", "Utopia/Capital"), &["\"Utopia/Capital\""]);
        assert_err(format_datetime("2026-11-23T13:36:17Z", "%Y %", "UTC"), &["cannot format", "\"%Y %\""]);
    }

    // -- Money ----------------------------------------------------------------

    #[test]
    fn to_minor_units_scales_decimal_text_exactly() {
        let cases = [
            ("12.34", "EUR", 1234),
            ("-0.5", "EUR", -50),
            ("12", "EUR", 1200),
            ("12.340", "EUR", 1234),
            ("12.3400000000000000000000", "EUR", 1234),
            ("  +7.1 ", "eur", 710),
            ("\t-7.10\n", "Eur", -710),
            ("0", "EUR", 0),
            ("-0.00", "EUR", 0),
            ("007.5", "usd", 750),
            ("0.01", "EUR", 1),
            ("500", "JPY", 500),
            ("500.00", "JPY", 500),
            ("1.234", "KWD", 1234),
            ("0.001", "KWD", 1),
            ("1.5", "CLF", 15000),
            ("92233720368547758.07", "EUR", i64::MAX),
            ("-92233720368547758.08", "EUR", i64::MIN),
            ("9223372036854775807", "JPY", i64::MAX),
        ];
        for (amount, currency, expected) in cases {
            assert_eq!(to_minor_units(amount, currency), Ok(expected), "{amount:?} {currency}");
        }
    }

    #[test]
    fn to_minor_units_refuses_amounts_it_would_have_to_round() {
        assert_err(to_minor_units("12.345", "EUR"), &["\"12.345\"", "3 decimal places", "EUR has 2"]);
        assert_err(to_minor_units("500.5", "JPY"), &["\"500.5\" has 1 decimal place but JPY has 0"]);
        assert_err(to_minor_units("0.0001", "KWD"), &["4 decimal places", "KWD has 3"]);
    }

    #[test]
    fn to_minor_units_refuses_malformed_amounts() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("1,234.56", "commas"),
            ("12,34", "commas"),
            ("1e3", "exponents"),
            ("1.5E2", "exponents"),
            (".5", "expected digits"),
            ("5.", "expected digits"),
            ("-", "expected digits"),
            ("--5", "expected digits"),
            ("+-5", "expected digits"),
            ("1 000", "expected digits"),
            ("12.3.4", "expected digits"),
            ("١٢", "expected digits"),
            ("NaN", "expected digits"),
            ("$12", "expected digits"),
        ];
        for (amount, reason) in cases {
            assert_err(to_minor_units(amount, "EUR"), &[&format!("{amount:?} is not an amount"), reason]);
        }
    }

    #[test]
    fn to_minor_units_refuses_overflow() {
        for amount in ["92233720368547758.08", "-92233720368547758.09", "100000000000000000000"] {
            assert_err(to_minor_units(amount, "EUR"), &[&format!("{amount:?}"), "too large"]);
        }
        assert_err(to_minor_units("9223372036854775808", "JPY"), &["too large"]);
    }

    #[test]
    fn to_minor_units_refuses_unknown_currencies_and_ones_without_minor_units() {
        for currency in ["EURO", "ZZZ", "", "€", "E U"] {
            assert_err(to_minor_units("12", currency), &[&format!("{currency:?}"), "not an ISO 4217"]);
        }
        assert_err(to_minor_units("12", "XAU"), &["XAU has no minor unit"]);
    }

    #[test]
    fn from_minor_units_writes_the_decimal_amount() {
        let cases = [
            (1234, "EUR", "12.34"),
            (-5, "EUR", "-0.05"),
            (-50, "EUR", "-0.50"),
            (0, "EUR", "0.00"),
            (7, "eur", "0.07"),
            (500, "JPY", "500"),
            (-500, "JPY", "-500"),
            (1234, "KWD", "1.234"),
            (1, "KWD", "0.001"),
            (12345, "CLF", "1.2345"),
            (i64::MAX, "EUR", "92233720368547758.07"),
            (i64::MIN, "EUR", "-92233720368547758.08"),
            (i64::MIN, "JPY", "-9223372036854775808"),
        ];
        for (units, currency, expected) in cases {
            assert_eq!(from_minor_units(units, currency).as_deref(), Ok(expected), "{units} {currency}");
        }
    }

    #[test]
    fn from_minor_units_refuses_unknown_currencies_and_ones_without_minor_units() {
        assert_err(from_minor_units(1, "ZZZ"), &["\"ZZZ\"", "not an ISO 4217"]);
        assert_err(from_minor_units(1, "XAU"), &["XAU has no minor unit"]);
    }

    #[test]
    fn minor_units_round_trip() {
        for currency in ["EUR", "JPY", "KWD", "CLF"] {
            for units in [0, 1, -1, 99, -100, 123_456_789, i64::MAX, i64::MIN] {
                let amount = from_minor_units(units, currency).unwrap();
                assert_eq!(to_minor_units(&amount, currency), Ok(units), "{amount} {currency}");
            }
        }
    }

    #[test]
    fn currency_code_normalises_known_codes() {
        let cases = [("EUR", "EUR"), (" eur ", "EUR"), ("Jpy", "JPY"), ("XAU", "XAU"), ("kwd\n", "KWD")];
        for (input, expected) in cases {
            assert_eq!(currency_code(input).as_deref(), Ok(expected), "{input:?}");
        }
    }

    #[test]
    fn currency_code_refuses_unknown_codes() {
        for input in ["", "EU", "EURO", "ZZZ", "€", "E R", "978"] {
            assert_err(currency_code(input), &[&format!("{input:?}"), "not an ISO 4217 currency code"]);
        }
    }

    // -- Booleans -------------------------------------------------------------

    #[test]
    fn to_bool_accepts_the_usual_spellings() {
        let cases = [
            (json!(true), true),
            (json!(false), false),
            (json!(1), true),
            (json!(0), false),
            (json!(1.0), true),
            (json!(0.0), false),
            (json!(-0.0), false),
            (json!("true"), true),
            (json!("FALSE"), false),
            (json!(" True "), true),
            (json!("t"), true),
            (json!("F"), false),
            (json!("yes"), true),
            (json!("No"), false),
            (json!("Y"), true),
            (json!("n"), false),
            (json!("1"), true),
            (json!("0"), false),
            (json!("ON"), true),
            (json!("off\n"), false),
        ];
        for (input, expected) in cases {
            assert_eq!(to_bool(&input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn to_bool_refuses_everything_else() {
        let cases = [
            json!(null),
            json!(""),
            json!("  "),
            json!("maybe"),
            json!("yes please"),
            json!("tru"),
            json!("01"),
            json!("1.0"),
            json!(2),
            json!(-1),
            json!(0.5),
            json!(u64::MAX),
            json!([true]),
            json!({"value": true}),
        ];
        for input in cases {
            assert_err(to_bool(&input), &[&input.to_string(), "is not a boolean"]);
        }
    }

    // -- Phones ---------------------------------------------------------------

    #[test]
    fn to_e164_normalises_real_numbers() {
        let cases = [
            ("020 7946 0000", Some("GB"), "+442079460000"),
            ("020 7946 0000", Some("gb"), "+442079460000"),
            ("(201) 555-0123", Some("US"), "+12015550123"),
            ("201-555-0123", Some(" us "), "+12015550123"),
            ("06 12 34 56 78", Some("FR"), "+33612345678"),
            ("+49 30 901820", None, "+4930901820"),
            ("0049 30 901820", None, "+4930901820"),
            ("00 49 30 901820", None, "+4930901820"),
            ("  +44 (0)20 7946 0000 ", None, "+442079460000"),
            // An international number ignores the region given.
            ("+44 20 7946 0000", Some("FR"), "+442079460000"),
            ("0033 6 12 34 56 78", Some("US"), "+33612345678"),
        ];
        for (input, region, expected) in cases {
            assert_eq!(to_e164(input, region).as_deref(), Ok(expected), "{input} in {region:?}");
        }
    }

    #[test]
    fn to_e164_needs_a_region_for_national_numbers() {
        for input in ["020 7946 0000", "(201) 555-0123", "4930901820"] {
            assert_err(to_e164(input, None), &[&format!("{input:?}"), "pass the region"]);
        }
    }

    #[test]
    fn to_e164_refuses_invalid_numbers() {
        let cases =
            [("123", Some("GB")), ("020 7946 00", Some("GB")), ("+44 99 1234 5678", None), ("+1 000 555 0123", None)];
        for (input, region) in cases {
            assert_err(to_e164(input, region), &[&format!("{input:?}"), "not a valid phone number"]);
        }
        for input in ["hello", "", "   "] {
            assert_err(to_e164(input, Some("GB")), &[&format!("{input:?}"), "not a phone number"]);
        }
    }

    #[test]
    fn to_e164_refuses_extensions() {
        assert_err(to_e164("+44 20 7946 0000 ext. 123", None), &["extension"]);
    }

    #[test]
    fn to_e164_refuses_unknown_regions() {
        for region in ["ZZ", "GBR", "", "G"] {
            assert_err(to_e164("020 7946 0000", Some(region)), &[&format!("{region:?}"), "not a region code"]);
        }
    }

    // -- Text -----------------------------------------------------------------

    #[test]
    fn collapse_whitespace_trims_and_joins_runs() {
        let cases = [
            ("  a  b\t\nc  ", "a b c"),
            ("a\u{00A0}\u{2003}b", "a b"),
            ("one", "one"),
            ("", ""),
            (" \t\n ", ""),
            ("a b", "a b"),
        ];
        for (input, expected) in cases {
            assert_eq!(collapse_whitespace(input), expected, "{input:?}");
        }
    }

    #[test]
    fn lowercase_and_uppercase_are_unicode_aware() {
        assert_eq!(lowercase("ÉCOLE Straße"), "école straße");
        assert_eq!(lowercase("ὈΔΥΣΣΕΎΣ"), "ὀδυσσεύς");
        assert_eq!(uppercase("école"), "ÉCOLE");
        assert_eq!(uppercase("straße"), "STRASSE");
        assert_eq!(lowercase(""), "");
        assert_eq!(uppercase(""), "");
    }

    #[test]
    fn titlecase_capitalises_each_word() {
        let cases = [
            ("jEAN-luc  picard", "Jean-Luc  Picard"),
            ("ÉMILE zola", "Émile Zola"),
            ("o'brien", "O'brien"),
            ("(john smith)", "(John Smith)"),
            ("1st avenue", "1st Avenue"),
            ("  leading\tTAB", "  Leading\tTab"),
            ("a--b", "A--B"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(titlecase(input), expected, "{input:?}");
        }
    }
}
