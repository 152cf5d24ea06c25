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
use super::plan::{Conversation, Message, ToolCall, ToolSpec, Turn, TurnReply};
use super::{Completion, ModelCall, ModelError, tool_calls_turn, usage_or_estimate};
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
    let usage = reported_usage(reply);
    Ok(usage_or_estimate(PROVIDER, call, texts.concat(), usage))
}

pub(crate) async fn complete(
    http: &Http,
    call: &ModelCall<'_>,
    key: &SecretValue,
) -> Result<Completion, ModelError> {
    let (url, headers) = request_parts(call, key)?;
    let reply = http
        .post_json(PROVIDER, url, headers, &request_body(call), key)
        .await?;
    parse_reply(call, &reply)
}

/// The URL and headers every Messages call sends (`x-api-key`, `anthropic-version`).
fn request_parts(
    call: &ModelCall<'_>,
    key: &SecretValue,
) -> Result<(reqwest::Url, reqwest::header::HeaderMap), ModelError> {
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
    Ok((url, headers))
}

/// The Messages request for one turn of a plan: assistant turns as `text` + `tool_use` content
/// blocks, tool results as `tool_result` blocks (with `is_error`) in the following user message, and
/// the allowed tools as `tools: [{name, description, input_schema}]`. Consecutive results are merged
/// into one user message: the API requires user and assistant turns to alternate.
pub(crate) fn plan_request_body(
    call: &ModelCall<'_>,
    conversation: &Conversation,
    tools: &[ToolSpec],
) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    for m in &conversation.messages {
        match m {
            Message::User(text) => messages.push(json!({"role": "user", "content": text})),
            Message::Assistant { text, calls } => {
                let mut blocks = Vec::new();
                if let Some(t) = text {
                    blocks.push(json!({"type": "text", "text": t}));
                }
                blocks.extend(calls.iter().map(|c| {
                    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments})
                }));
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            Message::ToolResult {
                call_id,
                content,
                is_error,
            } => {
                let block = json!({"type": "tool_result", "tool_use_id": call_id,
                                   "content": content, "is_error": is_error});
                let merges = messages.last().is_some_and(|last| {
                    last["role"] == "user"
                        && last["content"]
                            .as_array()
                            .is_some_and(|b| b.iter().all(|b| b["type"] == "tool_result"))
                });
                match messages.last_mut() {
                    Some(last) if merges => {
                        if let Some(blocks) = last["content"].as_array_mut() {
                            blocks.push(block);
                        }
                    }
                    _ => messages.push(json!({"role": "user", "content": [block]})),
                }
            }
        }
    }
    let mut body = request_body(call);
    body["messages"] = Value::Array(messages);
    if !tools.is_empty() {
        body["tools"] = tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.input_schema}))
            .collect();
    }
    body
}

/// Reads one plan turn: every `tool_use` block is a call (its `input` an object); without any, the
/// text blocks are the answer.
pub(crate) fn parse_turn(call: &ModelCall<'_>, reply: &Value) -> Result<TurnReply, ModelError> {
    let blocks = reply.get("content").and_then(Value::as_array);
    let uses: Vec<&Value> = blocks
        .into_iter()
        .flatten()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .collect();
    if uses.is_empty() {
        let c = parse_reply(call, reply)?;
        return Ok(TurnReply {
            turn: Turn::Answer { text: c.text },
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
        });
    }
    let mut calls = Vec::with_capacity(uses.len());
    for (i, b) in uses.into_iter().enumerate() {
        let id = b.get("id").and_then(Value::as_str);
        let name = b.get("name").and_then(Value::as_str);
        let input = b.get("input").and_then(Value::as_object);
        let (Some(id), Some(name), Some(input)) = (id, name, input) else {
            return Err(ModelError::Failed(format!(
                "{PROVIDER} reply for tier {} has a malformed tool_use block {i} (needs id, name and an input object)",
                call.tier.name
            )));
        };
        calls.push(ToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: input.clone(),
        });
    }
    let texts: Vec<&str> = blocks
        .into_iter()
        .flatten()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let text = (!texts.is_empty()).then(|| texts.concat());
    let usage = reported_usage(reply);
    Ok(tool_calls_turn(call, text, calls, usage))
}

/// The (input, output) token counts the reply reports, when it does.
fn reported_usage(reply: &Value) -> (Option<u64>, Option<u64>) {
    (
        reply.pointer("/usage/input_tokens").and_then(Value::as_u64),
        reply
            .pointer("/usage/output_tokens")
            .and_then(Value::as_u64),
    )
}

/// One plan turn against the endpoint.
pub(crate) async fn complete_turn(
    http: &Http,
    call: &ModelCall<'_>,
    key: &SecretValue,
    conversation: &Conversation,
    tools: &[ToolSpec],
) -> Result<TurnReply, ModelError> {
    let (url, headers) = request_parts(call, key)?;
    let body = plan_request_body(call, conversation, tools);
    let reply = http.post_json(PROVIDER, url, headers, &body, key).await?;
    parse_turn(call, &reply)
}
