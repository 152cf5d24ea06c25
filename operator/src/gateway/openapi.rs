//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand next to the routes it
//! describes; a test checks it lists exactly the router's (path, method) pairs.

use serde_json::{Value, json};

fn error_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for code in codes {
        m.insert(
            (*code).to_owned(),
            json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}),
        );
    }
    Value::Object(m)
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn ok(code: &str, schema: &str) -> Value {
    json!({ code: {"description": "ok", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}} })
}

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}])
}

const READ_SECURITY: &str = r#"[{"deviceSignature": []}, {"approverToken": []}]"#;

pub fn document() -> Value {
    let read_security: Value = serde_json::from_str(READ_SECURITY).unwrap_or(Value::Null);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "agentplane gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Devices submit signed intents and read their tasks; approvers decide tasks awaiting approval. Every error is an ErrorBody."
        },
        "paths": {
            "/v1/intents": {"post": {
                "summary": "Submit a signed intent (DSSE envelope)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
                "responses": merge(ok("202", "SubmitResponse"), error_responses(&["400", "401", "403", "408", "409", "413", "415", "503"]))
            }},
            "/v1/tasks/{id}": {"get": {
                "summary": "Read a task (a device reads only its own)",
                "parameters": id_param(),
                "security": read_security.clone(),
                "responses": merge(ok("200", "TaskView"), error_responses(&["401", "403", "404", "503"]))
            }},
            "/v1/tasks/{id}/events": {"get": {
                "summary": "Server-sent `phase` events carrying a TaskView, until a terminal phase",
                "parameters": id_param(),
                "security": read_security.clone(),
                "responses": merge(
                    json!({"200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}}),
                    error_responses(&["401", "403", "404", "503"]))
            }},
            "/v1/tasks/{id}/cancel": {"post": {
                "summary": "Cancel a task from any non-terminal phase",
                "parameters": id_param(),
                "security": read_security,
                "responses": merge(ok("202", "TaskView"), error_responses(&["401", "403", "404", "409", "503"]))
            }},
            "/v1/approvals": {"get": {
                "summary": "Tasks awaiting an approver's decision, oldest first, with what each asks to allow",
                "security": [{"approverToken": []}],
                "responses": merge(ok("200", "ApprovalList"), error_responses(&["401", "403", "503"]))
            }},
            "/v1/tasks/{id}/approve": {"post": approval_op("Approve a task awaiting approval")},
            "/v1/tasks/{id}/deny": {"post": approval_op("Deny a task awaiting approval")},
            "/v1/devices/enroll": {"post": {
                "summary": "Register a device with a one-time join token",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EnrollRequest"}}}},
                "responses": merge(merge(ok("201", "EnrollResponse"), ok("200", "EnrollResponse")),
                    error_responses(&["400", "401", "408", "409", "413", "415", "503"]))
            }},
            "/v1/devices/{id}/keys": {"post": {
                "summary": "Add a device key (rotation), signed by a registered key and by the new key",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AddKeyRequest"}}}},
                "responses": merge(merge(ok("201", "AddKeyResponse"), ok("200", "AddKeyResponse")),
                    error_responses(&["400", "401", "403", "404", "408", "409", "413", "415", "503"]))
            }},
            "/healthz": {"get": {"summary": "Liveness and store reachability",
                "responses": merge(json!({"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}}}), error_responses(&["503"]))}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                "responses": {"200": {"description": "OpenMetrics text format", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        },
        "components": {
            "securitySchemes": {
                "deviceSignature": {"type": "apiKey", "in": "header", "name": "Authorization",
                    "description": "Agentplane-Ed25519 device=<id>,key=<keyid>,ts=<unix seconds>,sig=<base64 Ed25519 over \"agentplane-read-v1\\n<METHOD>\\n<path?query>\\n<ts>\">"},
                "approverToken": {"type": "http", "scheme": "bearer"}
            },
            "schemas": schemas()
        }
    })
}

fn approval_op(summary: &str) -> Value {
    json!({
        "summary": summary,
        "parameters": id_param(),
        "security": [{"approverToken": []}],
        "requestBody": {"required": false, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApprovalRequest"}}}},
        "responses": merge(ok("200", "TaskView"), error_responses(&["400", "401", "403", "404", "409", "415", "503"]))
    })
}

fn schemas() -> Value {
    let phase = json!({"type": "string", "enum": ["Pending", "Denied", "AwaitingApproval", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]});
    json!({
        "Envelope": {"type": "object", "required": ["payloadType", "payload", "signatures"], "properties": {
            "payloadType": {"type": "string", "enum": [agentplane_api::INTENT_PAYLOAD_TYPE]},
            "payload": {"type": "string", "description": "standard base64 of the intent payload JSON"},
            "signatures": {"type": "array", "minItems": 1, "maxItems": 8, "items": {"type": "object", "required": ["sig"], "properties": {
                "keyid": {"type": "string"}, "sig": {"type": "string"}}}}
        }},
        "SubmitResponse": {"type": "object", "required": ["taskId", "phase", "duplicate"], "properties": {
            "taskId": {"type": "string"}, "phase": phase.clone(), "duplicate": {"type": "boolean"}}},
        "TaskView": {"type": "object", "required": ["taskId", "deviceId", "intentType", "phase"], "properties": {
            "taskId": {"type": "string"}, "deviceId": {"type": "string"}, "intentType": {"type": "string"},
            "phase": phase,
            "model": {"type": "object", "properties": {"requested": {"type": "string"}, "selected": {"type": "string"}, "tier": {"type": "integer"}}},
            "usage": {"type": "object", "properties": {"inputTokens": {"type": "integer"}, "outputTokens": {"type": "integer"}, "costMicros": {"type": "integer"}}},
            "result": {"type": "string"}, "reason": {"type": "string"},
            "approval": {"type": "object", "properties": {"decision": {"type": "string", "enum": ["Approved", "Denied"]}, "approver": {"type": "string"}, "decidedAt": {"type": "string"}, "comment": {"type": "string"}}},
            "traceId": {"type": "string"}}},
        "EnrollRequest": {"type": "object", "required": ["joinToken", "deviceId", "owner", "publicKey"], "properties": {
            "joinToken": {"type": "string", "minLength": 1, "maxLength": 256},
            "deviceId": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", "description": "a DNS-1123 label"},
            "owner": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": "\\S"},
            "publicKey": {"type": "object", "required": ["id", "alg", "key"], "properties": {
                "id": {"type": "string", "minLength": 1, "maxLength": 128},
                "alg": {"type": "string", "enum": ["ed25519"]},
                "key": {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$", "description": "standard base64 of the raw 32-byte Ed25519 public key"},
                "notAfter": {"type": "string", "format": "date-time"}}}}},
        "EnrollResponse": {"type": "object", "required": ["deviceId", "namespace", "alreadyEnrolled"], "properties": {
            "deviceId": {"type": "string"}, "namespace": {"type": "string"}, "alreadyEnrolled": {"type": "boolean"}, "lastSeq": {"type": "integer"},
            "edgePolicy": {"type": "object", "description": "AgentPolicy spec.edge: what the device applies itself", "properties": {
                "regulated": {"type": "string", "enum": ["local", "cloud", "refuse"]}}}}},
        "AddKeyRequest": {"type": "object", "required": ["publicKey", "ts", "signedBy", "signature", "proof"], "properties": {
            "publicKey": {"type": "object", "required": ["id", "alg", "key"], "properties": {
                "id": {"type": "string", "minLength": 1, "maxLength": 128},
                "alg": {"type": "string", "enum": ["ed25519"]},
                "key": {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$"},
                "notAfter": {"type": "string", "format": "date-time"}}},
            "ts": {"type": "integer", "description": "unix seconds"},
            "signedBy": {"type": "string"},
            "signature": {"type": "string", "description": "base64 Ed25519 by signedBy over agentplane-add-key-v1\\n<device>\\n<key id>\\n<key>\\n<ts>\\n<retire or ->"},
            "proof": {"type": "string", "description": "base64 Ed25519 by the new key over the same bytes"},
            "retireSigningKeyAfterSecs": {"type": "integer", "minimum": 0, "maximum": agentplane_api::wire::MAX_RETIRE_AFTER_SECS}}},
        "AddKeyResponse": {"type": "object", "required": ["deviceId", "keyIds", "alreadyRegistered"], "properties": {
            "deviceId": {"type": "string"}, "keyIds": {"type": "array", "items": {"type": "string"}}, "alreadyRegistered": {"type": "boolean"}}},
        "ApprovalRequest": {"type": "object", "properties": {"comment": {"type": "string", "maxLength": 1024},
            "step": {"type": "integer", "minimum": 0, "description": "the plan step decided on; absent: the task-level approval"},
            "argsDigest": {"type": "string", "description": "digest of the pending call's arguments as listed"}}},
        "ApprovalList": {"type": "object", "required": ["pending"], "properties": {"pending": {"type": "array", "items": {
            "type": "object", "required": ["taskId", "deviceId", "userId", "intentType", "prompt"], "properties": {
                "taskId": {"type": "string"}, "deviceId": {"type": "string"}, "userId": {"type": "string"},
                "intentType": {"type": "string"}, "prompt": {"type": "string"},
                "model": {"type": "object", "properties": {"requested": {"type": "string"}, "selected": {"type": "string"}, "tier": {"type": "integer"}}},
                "waitingSince": {"type": "string", "format": "date-time"},
                "step": {"type": "integer"}, "server": {"type": "string"}, "tool": {"type": "string"},
                "arguments": {}, "argsDigest": {"type": "string"}}}}}},
        "ErrorBody": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "serverTime": {"type": "integer"}, "retryAfterSecs": {"type": "integer"}}}}}
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn document_lists_exactly_the_routes() {
        let doc = super::document();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| (path.clone(), m.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let routed: BTreeSet<(String, String)> = super::super::routes()
            .into_iter()
            .flat_map(|(path, methods, _)| {
                methods
                    .iter()
                    .map(move |m| (path.to_owned(), (*m).to_owned()))
            })
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_ref_resolves() {
        let doc = super::document();
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling $ref {name}"
            );
        }
    }
}
