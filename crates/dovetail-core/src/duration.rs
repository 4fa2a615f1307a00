//! Human-written durations in configuration: `"500ms"`, `"10s"`, `"15m"`, `"2h"`, `"30d"`.
//!
//! One unit per value keeps configs unambiguous; compound forms (`"1h30m"`)
//! are accepted too because people write them.

use std::time::Duration;

/// Why a duration string was refused; the message says the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a duration: {reason}; write a number and a unit, e.g. \"500ms\", \"10s\", \"15m\", \"2h\" or \"30d\""
)]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses `"10s"`, `"1h30m"`, `"250ms"`. Units: ms, s, m, h, d.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError { input: input.to_string(), reason };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(err("the unit is missing")),
            _ => return Err(err("unknown unit (use ms, s, m, h or d)")),
        };
        rest = &rest[unit_len..];
        let ms = n.checked_mul(unit_ms).ok_or_else(|| err("the duration is too large"))?;
        total = total.checked_add(Duration::from_millis(ms)).ok_or_else(|| err("the duration is too large"))?;
    }
    Ok(total)
}

/// The shortest faithful rendering, e.g. `90s` → `"1m30s"`, for messages and status output.
pub fn format_duration(d: Duration) -> String {
    let mut ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_compounds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_with_a_reason() {
        assert_eq!(parse_duration("10").unwrap_err().reason, "the unit is missing");
        assert_eq!(parse_duration("ten s").unwrap_err().reason, "expected a number");
        assert_eq!(parse_duration("3w").unwrap_err().reason, "unknown unit (use ms, s, m, h or d)");
        assert_eq!(parse_duration("").unwrap_err().reason, "it is empty");
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for s in ["1m30s", "10s", "2h", "1d2h3m4s5ms", "250ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
