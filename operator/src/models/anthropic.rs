//! Anthropic Messages (`POST {endpoint}/v1/messages`).
//!
//! Request: `{model, max_tokens, messages: [{role: "user", content: prompt}], temperature?}` with
//! `x-api-key` and `anthropic-version: 2023-06-01`. `max_tokens` is required by the API: the intent's
//! `max_tokens` (or `maxTokens`) param, else 1024. Reply: the `text` of every `content[]` block of type
//! `text`, concatenated, and `usage.input_tokens` / `usage.output_tokens`.
//!
//! The endpoint may be the API root (`https://api.anthropic.com`), its `/v1`, or the full
//! `/v1/messages` URL.

use reqwest::header::HeaderName;
use serde_json::{Value, json};

use super::http::{Http, common_headers, endpoint_url, param_f64, param_u64, secret_header};
use super::{Completion, ModelCall, ModelError, usage_or_estimate};
use crate::secrets::SecretValue;

const PROVIDER: &str = "anthropic";
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
pub const DEFAULT_MAX_TOKENS: u64 = 1024;

pub(crate) fn request_body(call: &ModelCall<'_>) -> Value {
    let mut body = json!({
        "model": call.model(),
        "max_tokens": param_u64(call.params, "max_tokens", "maxTokens").unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": [{"role": "user", "content": call.prompt}],
    });
    if let Some(t) = param_f64(call.params, "temperature") {
        body["temperature"] = t.into();
    }
    body
}

pub(crate) fn parse_reply(call: &ModelCall<'_>, reply: &Value) -> Result<Completion, ModelError> {
    let blocks = reply
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ModelError::Failed(format!(
                "{PROVIDER} reply for tier {} has no content array",
                call.tier.name
            ))
        })?;
    let texts: Vec<&str> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    if texts.is_empty() {
        let stop = reply
            .get("stop_reason")
            .and_then(Value::as_str)
            .unwrap_or("none");
        return Err(ModelError::Failed(format!(
            "{PROVIDER} reply for tier {} has no text content block (stop_reason {stop})",
            call.tier.name
        )));
    }
    let usage = (
        reply.pointer("/usage/input_tokens").and_then(Value::as_u64),
        reply
            .pointer("/usage/output_tokens")
            .and_then(Value::as_u64),
    );
    Ok(usage_or_estimate(PROVIDER, call, texts.concat(), usage))
}

pub(crate) async fn complete(
    http: &Http,
    call: &ModelCall<'_>,
    key: &SecretValue,
) -> Result<Completion, ModelError> {
    let url = endpoint_url(
        &call.tier.name,
        &call.tier.endpoint,
        &["/messages"],
        if call.tier.endpoint.trim_end_matches('/').ends_with("/v1") {
            "/messages"
        } else {
            "/v1/messages"
        },
    )?;
    let mut headers = common_headers(call.idempotency_key, call.traceparent)?;
    headers.insert(
        HeaderName::from_static("x-api-key"),
        secret_header(&call.tier.name, "", key)?,
    );
    headers.insert(
        HeaderName::from_static("anthropic-version"),
        reqwest::header::HeaderValue::from_static(ANTHROPIC_VERSION),
    );
    let reply = http
        .post_json(PROVIDER, url, headers, &request_body(call), key)
        .await?;
    parse_reply(call, &reply)
}
