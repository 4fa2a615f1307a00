//! `Retry-After` per RFC 9110 §10.2.3: delay-seconds or an HTTP-date.
//!
//! HTTP-dates come in three historical forms (IMF-fixdate, RFC 850, asctime)
//! and a recipient must accept all of them; `httpdate` does.

use std::time::{Duration, UNIX_EPOCH};

use crate::clock::Timestamp;

/// The delay a `Retry-After` value asks for, measured from `now`.
///
/// A date in the past means "now" (zero). Unparseable values give `None`:
/// the caller falls back to its own backoff rather than trusting garbage.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Over-long digit strings saturate rather than fail: the partner
        // clearly wants a long wait, and the backoff policy caps it.
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
    let at = Timestamp::from_millis(i64::try_from(at_ms).ok()?);
    Some(at.since(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 1994-11-06T08:49:37Z, the example instant of RFC 9110.
    const RFC_EXAMPLE: i64 = 784_111_777;

    #[test]
    fn delay_seconds() {
        let now = Timestamp::from_secs(1000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn all_three_http_date_forms() {
        let now = Timestamp::from_secs(RFC_EXAMPLE - 30);
        for form in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse_retry_after(form, now), Some(Duration::from_secs(30)), "{form}");
        }
    }

    #[test]
    fn a_date_in_the_past_means_now() {
        let now = Timestamp::from_secs(RFC_EXAMPLE + 3600);
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::ZERO));
    }

    #[test]
    fn garbage_is_ignored() {
        let now = Timestamp::from_secs(0);
        for v in ["", "soon", "-5", "1.5", "Sun, 32 Nov 1994 08:49:37 GMT"] {
            assert_eq!(parse_retry_after(v, now), None, "{v:?}");
        }
    }
}
