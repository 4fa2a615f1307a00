//! The request a record would make, built from the configuration alone:
//! what `dovetail test`, `dovetail dlq show` and `dovetail trace` print as
//! "sent". Credentials are never looked up, only named, so a preview
//! cannot leak one and needs no secrets in the operator's shell.

use serde::Serialize;

use dovetail_core::config::{AuthConfig, HttpConnector};

use crate::http::Outbound;

const REDACTED: &str = "[redacted]";

/// A request as it goes on the wire, minus credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestPreview {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// The body as text (JSON, for every body Dovetail sends).
    pub body: String,
}

impl RequestPreview {
    /// The request `out` makes through `connector` with the sink's `method` and `path`.
    pub fn new(connector: &HttpConnector, method: &str, path: &str, out: &Outbound<'_>) -> RequestPreview {
        let mut url = format!("{}{}", connector.base_url.trim_end_matches('/'), path);
        let mut headers: Vec<(String, String)> =
            connector.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(v) = &connector.api_version {
            headers.push((v.header.clone(), v.value.clone()));
        }
        match &connector.auth {
            Some(AuthConfig::Bearer { .. }) => headers.push(("Authorization".into(), format!("Bearer {REDACTED}"))),
            Some(AuthConfig::Basic { username, .. }) => {
                headers.push(("Authorization".into(), format!("Basic {REDACTED} (user {username})")))
            }
            Some(AuthConfig::ApiKey { header, query, .. }) => {
                if let Some(h) = header {
                    headers.push((h.clone(), REDACTED.into()));
                }
                if let Some(q) = query {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    url = format!("{url}{sep}{q}={REDACTED}");
                }
            }
            Some(
                AuthConfig::Oauth2ClientCredentials { token_url, .. }
                | AuthConfig::Oauth2RefreshToken { token_url, .. },
            ) => headers.push(("Authorization".into(), format!("Bearer {REDACTED} (a token from {token_url})"))),
            None => {}
        }
        headers.push(("Content-Type".into(), out.content_type.unwrap_or("application/json").to_string()));
        headers.push(("Idempotency-Key".into(), out.idempotency_key.to_string()));
        headers.push(("X-Correlation-ID".into(), out.correlation_id.to_string()));
        if crate::http::traceparent(out.correlation_id).is_some() {
            headers.push(("traceparent".into(), format!("00-{}-(a new span id per attempt)-01", out.correlation_id)));
        }
        RequestPreview {
            method: method.to_string(),
            url,
            headers,
            body: String::from_utf8_lossy(out.payload).into_owned(),
        }
    }
}

impl std::fmt::Display for RequestPreview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {}", self.method, self.url)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {value}")?;
        }
        writeln!(f)?;
        match serde_json::from_str::<serde_json::Value>(&self.body) {
            Ok(v) => write!(f, "{}", serde_json::to_string_pretty(&v).map_err(|_| std::fmt::Error)?),
            Err(_) => write!(f, "{}", self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dovetail_core::config::SecretRef;

    fn connector(auth: Option<AuthConfig>) -> HttpConnector {
        let text = r#"base_url = "https://api.example.com/"
            headers = { "X-Tenant" = "acme" }
            api_version = { header = "Api-Version", value = "2026-01-01" }"#;
        let mut c: HttpConnector = toml::from_str(text).unwrap();
        c.auth = auth;
        c
    }

    fn out(body: &[u8]) -> Outbound<'_> {
        Outbound {
            payload: body,
            content_type: None,
            idempotency_key: "dvt_abc",
            correlation_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        }
    }

    #[test]
    fn the_preview_names_every_header_and_hides_credentials() {
        let c = connector(Some(AuthConfig::ApiKey {
            key: SecretRef::Env("KEY".into()),
            header: None,
            query: Some("api_key".into()),
        }));
        let p = RequestPreview::new(&c, "POST", "/v1/orders", &out(br#"{"id":1}"#));
        assert_eq!(p.url, "https://api.example.com/v1/orders?api_key=[redacted]");
        let names: Vec<&str> = p.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["X-Tenant", "Api-Version", "Content-Type", "Idempotency-Key", "X-Correlation-ID", "traceparent"]
        );
        assert!(
            p.to_string().starts_with("POST https://api.example.com/v1/orders?api_key=[redacted]\nX-Tenant: acme\n")
        );
        assert!(p.to_string().ends_with("{\n  \"id\": 1\n}"));
    }

    #[test]
    fn bearer_tokens_are_named_not_shown() {
        let c = connector(Some(AuthConfig::Bearer { token: SecretRef::Env("TOKEN".into()) }));
        let p = RequestPreview::new(&c, "PUT", "", &out(b"{}"));
        assert!(p.headers.contains(&("Authorization".into(), "Bearer [redacted]".into())));
        assert!(!p.to_string().contains("TOKEN"));
    }
}
