//! The OpenAPI 3.1 description of `/api/v1`, served at `/api/v1/openapi.json`.
//! A test checks that every route the admin router serves is described here.

use serde_json::{Value, json};

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn refused() -> Value {
    json!({ "$ref": "#/components/responses/Error" })
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn path_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": schema })
}

fn action(summary: &str, body: Option<Value>, answer: Value) -> Value {
    let mut op = json!({
        "summary": summary,
        "responses": {
            "200": ok("done", answer),
            "400": refused(), "401": refused(), "403": refused(), "404": refused(), "503": refused()
        }
    });
    if let Some(schema) = body {
        op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": schema } } });
    }
    json!({ "post": op })
}

fn read(summary: &str, parameters: Vec<Value>, answer: Value) -> Value {
    json!({ "get": {
        "summary": summary,
        "parameters": parameters,
        "responses": { "200": ok("found", answer), "401": refused(), "404": refused(), "503": refused() }
    }})
}

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Dovetail admin API",
            "version": "1",
            "description": "Status, dead letters, records and their stories, schema drift; replay, discard and resume. With [engine] admin_token set, every operation needs `Authorization: Bearer TOKEN`; without it the API is read-only."
        },
        "security": [{ "adminToken": [] }],
        "paths": paths(),
        "components": {
            "securitySchemes": { "adminToken": { "type": "http", "scheme": "bearer" } },
            "responses": {
                "Error": { "description": "refused; `error` says why and how to fix it",
                    "content": { "application/json": { "schema": { "type": "object", "required": ["error"],
                        "properties": { "error": { "type": "string" } } } } } }
            },
            "schemas": schemas()
        }
    })
}

fn paths() -> Value {
    let flow = query("flow", "only this flow", json!({ "type": "string" }));
    let limit = |default: u64| {
        query(
            "limit",
            "most items returned (at most 1000)",
            json!({ "type": "integer", "minimum": 1, "default": default }),
        )
    };
    json!({
        "/api/v1/status": read("Every flow's counts, connector health and quota use", vec![], reference("StatusReport")),
        "/api/v1/dlq": read("Dead letters, oldest first", vec![flow.clone(), limit(100)],
            json!({ "type": "object", "properties": { "dead_letters": { "type": "array", "items": reference("DeadLetter") } } })),
        "/api/v1/dlq/replay": action("Back to pending with the same idempotency key; validated and mapped again",
            Some(reference("Which")), json!({ "type": "object", "properties": { "replayed": { "type": "integer" } } })),
        "/api/v1/dlq/discard": action("Mark discarded: never delivered, kept for the record",
            Some(reference("Which")), json!({ "type": "object", "properties": { "discarded": { "type": "integer" } } })),
        "/api/v1/records/{id}": read("One record: raw, mapped and sent side by side, every attempt",
            vec![path_param("id", "record id", json!({ "type": "integer" }))], reference("Record")),
        "/api/v1/trace/{needle}": read("Records named by a record id, correlation id, delivery id or external key, newest first",
            vec![path_param("needle", "what names the record", json!({ "type": "string" })), limit(10)],
            json!({ "type": "object", "properties": { "records": { "type": "array", "items": reference("Record") } } })),
        "/api/v1/drift": read("Schema drift events, newest first", vec![flow, limit(100)],
            json!({ "type": "object", "properties": { "drift": { "type": "array", "items": reference("Drift") } } })),
        "/api/v1/flows/{flow}/resume": {
            "post": action("Lift the pause an auth failure set", None,
                json!({ "type": "object", "properties": { "flow": { "type": "string" }, "resumed": { "type": "boolean" } } }))["post"].clone(),
            "parameters": [path_param("flow", "flow name", json!({ "type": "string" }))]
        },
        "/api/v1/openapi.json": { "get": { "summary": "This document", "security": [],
            "responses": { "200": ok("the document", json!({ "type": "object" })) } } }
    })
}

fn schemas() -> Value {
    let timestamp = json!({ "type": "string", "format": "date-time" });
    let nullable = |t: &str| json!({ "type": [t, "null"] });
    json!({
        "Which": { "type": "object", "description": "exactly one of ids, flow, all", "additionalProperties": false,
            "properties": { "ids": { "type": "array", "items": { "type": "integer" } }, "flow": { "type": "string" }, "all": { "type": "boolean" } } },
        "StatusReport": { "type": "object", "required": ["generated_at", "flows", "connectors", "quotas"], "properties": {
            "generated_at": timestamp,
            "flows": { "type": "array", "items": { "type": "object", "properties": {
                "flow": { "type": "string" }, "state": { "enum": ["running", "paused"] },
                "pending": { "type": "integer" }, "in_flight": { "type": "integer" }, "delivered": { "type": "integer" },
                "dead": { "type": "integer" }, "quarantined": { "type": "integer" }, "rejection_rate": { "type": "number" },
                "discarded": { "type": "integer" }, "oldest_pending_at": nullable("string"),
                "oldest_pending_age_seconds": nullable("number"), "paused": { "type": ["object", "null"] },
                "configured": { "type": "boolean" },
                "last_24h": reference("WindowStats"), "last_7d": reference("WindowStats") } } },
            "connectors": { "type": "array", "items": { "type": "object", "properties": {
                "connector": { "type": "string" }, "breaker": { "enum": ["closed", "open", "half_open"] },
                "since": timestamp, "open_until": nullable("string"), "reason": nullable("string"),
                "current_rate": nullable("number"), "configured_rate": nullable("number"),
                "blocked_until": nullable("string"), "updated_at": timestamp } } },
            "quotas": { "type": "array", "items": { "type": "object", "properties": {
                "connector": { "type": "string" }, "per_hour": nullable("integer"), "used_this_hour": { "type": "integer" },
                "per_day": nullable("integer"), "used_today": { "type": "integer" } } } } } },
        "WindowStats": { "type": "object", "description": "from the minute roll-ups", "properties": {
            "received": { "type": "integer" }, "quarantined": { "type": "integer" },
            "delivered": { "type": "integer" }, "dead": { "type": "integer" }, "attempts": { "type": "integer" },
            "success_rate": nullable("number"), "error_rate": nullable("number"),
            "errors_by_class": { "type": "object", "additionalProperties": { "type": "integer" } },
            "avg_latency_ms": nullable("number"), "p95_latency_ms": nullable("integer"),
            "last_delivered_at": nullable("string") } },
        "DeadLetter": { "type": "object", "properties": {
            "id": { "type": "integer" }, "flow": { "type": "string" }, "class": { "type": "string" },
            "reason": { "type": "string" }, "attempts": { "type": "integer" }, "dead_at": timestamp } },
        "Record": { "type": "object", "properties": {
            "id": { "type": "integer" }, "flow": { "type": "string" },
            "state": { "enum": ["pending", "in_flight", "delivered", "dead", "discarded"] },
            "delivery_id": nullable("string"), "external_key": nullable("string"),
            "idempotency_key": { "type": "string" }, "correlation_id": { "type": "string" },
            "payload": { "description": "the raw body: JSON when it is JSON, else a string" },
            "payload_is_json": { "type": "boolean" }, "mapped": { "description": "the mapped body, or null" },
            "mapping_version": nullable("integer"), "sink_mapping_version": nullable("integer"),
            "prepared": { "type": "boolean" },
            "request": { "type": ["object", "null"], "description": "what the record sends, credentials hidden",
                "properties": { "method": { "type": "string" }, "url": { "type": "string" },
                    "headers": { "type": "array", "items": { "type": "array", "items": { "type": "string" } } },
                    "body": { "type": "string" } } },
            "received_at": timestamp, "dead_class": nullable("string"), "dead_reason": nullable("string"),
            "last_error": nullable("string"),
            "attempts": { "type": "array", "items": { "type": "object", "properties": {
                "number": { "type": "integer" }, "started_at": timestamp, "duration_ms": { "type": "integer" },
                "status": nullable("integer"), "class": nullable("string"), "error": nullable("string") } } } } },
        "Drift": { "type": "object", "properties": {
            "id": { "type": "integer" }, "flow": { "type": "string" }, "kind": { "enum": ["added", "retyped", "removed"] },
            "path": { "type": "string" }, "json_type": { "type": "string" },
            "previous_types": { "type": "array", "items": { "type": "string" } },
            "at": timestamp, "example_record_id": { "type": "integer" } } }
    })
}
