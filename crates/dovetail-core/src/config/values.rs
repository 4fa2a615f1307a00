//! Leaf value types of the configuration: durations, byte sizes, secret references.

use std::fmt;

use serde::{Deserialize, Deserializer, de};

/// `with = "values::duration"` for `"10s"`-style fields.
pub mod duration {
    use super::*;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::duration::parse_duration(&s).map_err(de::Error::custom)
    }
}

/// A size in bytes: an integer, or a string like `"512KiB"`, `"1MiB"`, `"10MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().map_err(|_| {
            format!("`{s}` is not a size; write bytes as a number or with a unit, e.g. \"512KiB\" or \"1MiB\"")
        })?;
        let mult: usize = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1024,
            "MB" => 1000 * 1000,
            "MiB" => 1024 * 1024,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!("`{other}` is not a size unit; use B, KB, KiB, MB, MiB, GB or GiB"));
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, e.g. 1048576 or \"1MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                usize::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                usize::try_from(v).map(ByteSize).map_err(|_| E::custom("the size is too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a secret comes from. Secrets are referenced, never inlined, so a
/// config file can be committed and shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`: the process environment variable NAME.
    Env(String),
    /// Not a reference (e.g. a literal secret). Kept, without the value, so
    /// that [`Config::check`](super::Config) reports it at its own key
    /// alongside every other error; a config holding one never loads.
    Invalid { reason: String },
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::Invalid { .. } => f.write_str("(invalid secret reference)"),
        }
    }
}

impl SecretRef {
    pub fn parse(s: &str) -> Result<SecretRef, String> {
        let Some(name) = s.strip_prefix("env:") else {
            return Err("secrets are referenced, never written into the config: write \"env:NAME\" and export NAME in the engine's environment".to_string());
        };
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            Ok(SecretRef::Env(name.to_string()))
        } else {
            Err(format!(
                "`{name}` is not an environment variable name; use letters, digits and _, e.g. \"env:BILLING_TOKEN\""
            ))
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(SecretRef::parse(&s).unwrap_or_else(|reason| SecretRef::Invalid { reason }))
    }
}

/// A resolved secret value. Its `Debug` never shows the value, so it cannot
/// leak into a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// Whether `candidate` is this secret, compared in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == candidate.len() && bool::from(self.0.as_bytes().ct_eq(candidate.as_bytes()))
    }

    /// The value, for the one place that must put it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("1MiB"), Ok(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse("512KiB"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("10MB"), Ok(ByteSize(10_000_000)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("1 parsec").is_err());
    }

    #[test]
    fn secret_refs() {
        assert_eq!(SecretRef::parse("env:A_1"), Ok(SecretRef::Env("A_1".into())));
        assert!(SecretRef::parse("hunter2").unwrap_err().contains("never written into the config"));
        assert!(SecretRef::parse("env:").is_err());
        assert!(SecretRef::parse("env:1A").is_err());
        assert!(SecretRef::parse("env:A-B").is_err());
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(format!("{:?}", Secret::new("hunter2".into())), "Secret(***)");
    }
}
