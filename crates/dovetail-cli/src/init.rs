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

[flows.orders]
key     = ".id"                                   # the order's id in the shop
schema  = "schemas/shop-order.json"               # records that break it are quarantined, never sent
mapping = { file = "mappings/shop_to_billing.jq", version = 1 }   # bump version on every change
samples = ["samples/order.json", "samples/order-rejected.json"]   # `dovetail check` maps these

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

dovetail check                                  # config, secrets, schema, mapping and samples OK?
dovetail test orders --input samples/order.json # what the mapping makes of it, and the request
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

const SHOP_ORDER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "customer", "currency", "amount"],
  "properties": {
    "id": { "type": "string" },
    "customer": { "type": "object", "required": ["id"] },
    "currency": { "type": "string", "pattern": "^[A-Za-z]{3}$" },
    "amount": { "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$" }
  }
}
"#;

const SHOP_TO_BILLING: &str = r#"# Shop order -> billing API. Runs once per record; must give one JSON value.
# Normalisers (to_minor_units, to_iso8601, ...) are listed in Dovetail's README.
{
  order_id: .id,
  customer_id: .customer.id,
  email: (.customer.email // null),
  amount_minor: (.currency as $c | .amount | to_minor_units($c)),
  currency: (.currency | currency_code),
  status: .status,
  ordered_at: (if .created_at then .created_at | to_iso8601 else null end)
}
"#;

pub fn init(dir: &Path) -> Result<ExitCode> {
    let config = dir.join("dovetail.toml");
    if config.exists() {
        bail!("{} already exists; choose an empty folder", config.display());
    }
    for sub in ["samples", "schemas", "mappings"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let files = [
        (config.clone(), EXAMPLE_CONFIG),
        (dir.join("README.md"), EXAMPLE_README),
        (dir.join("samples/order.json"), SAMPLE_ORDER),
        (dir.join("samples/order-rejected.json"), SAMPLE_REJECTED),
        (dir.join("schemas/shop-order.json"), SHOP_ORDER_SCHEMA),
        (dir.join("mappings/shop_to_billing.jq"), SHOP_TO_BILLING),
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
