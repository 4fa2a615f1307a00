//! `dovetail init DIR`: a runnable example project.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

pub const EXAMPLE_CONFIG: &str = r#"# Dovetail example: shop order webhooks -> billing API.
# Reference: the Configuration section of Dovetail's README.

[engine]
store    = "sqlite://dovetail.db"   # the journal, next to this file
listen   = "127.0.0.1:8080"         # webhooks, /healthz, /readyz
max_body = "1MiB"                   # larger webhook bodies get 413

[connectors.billing]
type        = "http"
base_url    = "http://127.0.0.1:9090"   # `dovetail dev partner` stands in for the billing API
api_version = { header = "Api-Version", value = "2026-01-01" }
auth        = { type = "bearer", token = "env:BILLING_TOKEN" }
timeout     = "10s"
retry       = { max_attempts = 6, initial_backoff = "1s", max_backoff = "60s", jitter = 0.5 }

[flows.orders.source]
type      = "webhook"
path      = "/hooks/orders"
signature = { scheme = "standard-webhooks", secret = "env:ORDERS_WEBHOOK_SECRET" }

[flows.orders.sink]
type      = "http"
connector = "billing"
method    = "POST"
path      = "/v1/orders"
"#;

const EXAMPLE_README: &str = r#"# shop-sync: a Dovetail example

Order webhooks (signed with Standard Webhooks) are journalled, then delivered
to a billing API with an Idempotency-Key, retries and a dead-letter queue.

```sh
export ORDERS_WEBHOOK_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw   # example secret
export BILLING_TOKEN=dev-token

dovetail check                                  # config + secrets OK?
dovetail dev partner --fail-body reject &       # stand-in billing API on :9090 (422s bodies containing "reject")
dovetail run &                                  # engine on :8080
dovetail dev send orders samples/order.json     # a signed webhook
dovetail dev send orders samples/order-rejected.json
dovetail status                                 # per-flow counts
dovetail dlq list                               # the rejected order, with the partner's answer
dovetail dlq show 2
```
"#;

const SAMPLE_ORDER: &str = r#"{
  "id": "ord_1001",
  "customer": { "id": "cus_42", "email": "ada@example.com" },
  "currency": "EUR",
  "amount": "129.90",
  "status": "paid",
  "created_at": "2026-11-23T10:15:00Z"
}
"#;

const SAMPLE_REJECTED: &str = r#"{
  "id": "ord_1002",
  "customer": { "id": "cus_43" },
  "currency": "EUR",
  "amount": "-5.00",
  "status": "reject"
}
"#;

pub fn init(dir: &Path) -> Result<ExitCode> {
    let config = dir.join("dovetail.toml");
    if config.exists() {
        bail!("{} already exists; choose an empty folder", config.display());
    }
    std::fs::create_dir_all(dir.join("samples")).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = [
        (config.clone(), EXAMPLE_CONFIG),
        (dir.join("README.md"), EXAMPLE_README),
        (dir.join("samples/order.json"), SAMPLE_ORDER),
        (dir.join("samples/order-rejected.json"), SAMPLE_REJECTED),
    ];
    for (path, text) in files {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("wrote an example project to {}; see {}/README.md", dir.display(), dir.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_checks_clean() {
        let (loaded, warnings) = dovetail_core::config::load(EXAMPLE_CONFIG, Path::new("dovetail.toml")).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(loaded.config.flows.len(), 1);
    }
}
