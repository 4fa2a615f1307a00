//! Identifiers that travel with a record: idempotency keys and correlation ids.

use sha2::{Digest, Sha256};

/// The `Idempotency-Key` a record carries on every outbound write.
///
/// Fixed once at intake and stored with the record, so it is the same on
/// every retry, after a restart and after a DLQ replay. When the source gave
/// a delivery id (e.g. `webhook-id`), the key is derived from it, so even a
/// duplicate delivery that slipped past de-duplication maps to the same key
/// at the partner; otherwise it is 128 random bits.
pub fn idempotency_key(flow: &str, delivery_id: Option<&str>) -> String {
    match delivery_id {
        Some(id) => {
            let mut h = Sha256::new();
            h.update(flow.as_bytes());
            h.update([0u8]);
            h.update(id.as_bytes());
            let digest = h.finalize();
            format!("dt1-{}", hex::encode(&digest[..16]))
        }
        None => format!("dt1-{:032x}", fastrand::u128(..)),
    }
}

/// The `Idempotency-Key` of a bulk request: derived from its records' keys,
/// so a retry of the same set of records carries the same key, and a retry
/// of only the failed ones a different key.
pub fn batch_idempotency_key<'a>(record_keys: impl IntoIterator<Item = &'a str>) -> String {
    let mut keys: Vec<&str> = record_keys.into_iter().collect();
    keys.sort_unstable();
    let mut h = Sha256::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update([b'\n']);
    }
    format!("dtb1-{}", hex::encode(&h.finalize()[..16]))
}

/// A new correlation id in the W3C trace-id form (32 lower-case hex digits, not all zero).
pub fn new_correlation_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

/// The correlation id an inbound request brings: the trace-id of a valid
/// W3C `traceparent`, else a sane `X-Correlation-ID`.
pub fn inbound_correlation_id(traceparent: Option<&str>, x_correlation_id: Option<&str>) -> Option<String> {
    if let Some(tp) = traceparent {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        let hex =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if parts.len() >= 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && hex(parts[2], 16)
            && hex(parts[3], 2)
        {
            return Some(parts[1].to_string());
        }
    }
    let id = x_correlation_id?.trim();
    let sane = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
    sane.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_give_stable_keys_per_flow() {
        let a = idempotency_key("orders", Some("msg_1"));
        assert_eq!(a, idempotency_key("orders", Some("msg_1")));
        assert_ne!(a, idempotency_key("refunds", Some("msg_1")));
        assert_ne!(a, idempotency_key("orders", Some("msg_2")));
        assert_eq!(a.len(), 4 + 32);
    }

    #[test]
    fn batch_keys_depend_on_the_set_of_records_only() {
        let a = batch_idempotency_key(["k1", "k2", "k3"]);
        assert_eq!(a, batch_idempotency_key(["k3", "k1", "k2"]));
        assert_ne!(a, batch_idempotency_key(["k1", "k3"]));
        assert!(a.starts_with("dtb1-"));
    }

    #[test]
    fn keys_without_delivery_id_are_unique() {
        assert_ne!(idempotency_key("orders", None), idempotency_key("orders", None));
    }

    #[test]
    fn correlation_from_traceparent_then_header() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(inbound_correlation_id(Some(tp), Some("x")), Some("4bf92f3577b34da6a3ce929d0e0e4736".into()));
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(inbound_correlation_id(Some(zero), Some("req-7")), Some("req-7".into()));
        assert_eq!(inbound_correlation_id(Some("garbage"), None), None);
        assert_eq!(inbound_correlation_id(None, Some("bad id with spaces")), None);
        assert_eq!(new_correlation_id().len(), 32);
    }
}
