//! OpenAI-compatible chat completions (`POST {endpoint}/chat/completions`): OpenAI, Azure-style
//! gateways, vLLM, llama.cpp's server, Ollama's `/v1`, and anything else that speaks the format.
//!
//! Request: `{model, messages: [{role: "user", content: prompt}], max_tokens?, temperature?}` with
//! `Authorization: Bearer <key>`. `max_tokens` (or `maxTokens`) and `temperature` are taken from the
//! intent's params when present and of the right type. Reply: `choices[0].message.content`, and
//! `usage.prompt_tokens` / `usage.completion_tokens`.

use reqwest::header::AUTHORIZATION;
use serde_json::{Value, json};

use super::http::{Http, common_headers, endpoint_url, param_f64, param_u64, secret_header};
use super::plan::{Conversation, Message, ToolCall, ToolSpec, Turn, TurnReply};
use super::{Completion, ModelCall, ModelError, tool_calls_turn, usage_or_estimate};
use crate::secrets::SecretValue;

const PROVIDER: &str = "openai";

pub(crate) fn request_body(call: &ModelCall<'_>) -> Value {
    let mut body = json!({
        "model": call.model(),
        "messages": [{"role": "user", "content": call.prompt}],
    });
    if let Some(n) = param_u64(call.params, "max_tokens", "maxTokens") {
        body["max_tokens"] = n.into();
    }
    if let Some(t) = param_f64(call.params, "temperature") {
        body["temperature"] = t.into();
    }
    body
}

pub(crate) fn parse_reply(call: &ModelCall<'_>, reply: &Value) -> Result<Completion, ModelError> {
    let message = reply.pointer("/choices/0/message").ok_or_else(|| {
        ModelError::Failed(format!(
            "{PROVIDER} reply for tier {} has no choices[0].message",
            call.tier.name
        ))
    })?;
    let text = match message.get("content").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        None => {
            // A refusal is the model's answer to this prompt: asking again will not change it.
            if let Some(r) = message.get("refusal").and_then(Value::as_str) {
                let r: String = r.chars().take(200).collect();
                return Err(ModelError::Rejected(format!("the model refused: {r}")));
            }
            let finish = reply
                .pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("none");
            return Err(ModelError::Failed(format!(
                "{PROVIDER} reply for tier {} has no text in choices[0].message.content (finish_reason {finish})",
                call.tier.name
            )));
        }
    };
    let usage = reported_usage(reply);
    Ok(usage_or_estimate(PROVIDER, call, text, usage))
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

/// The URL and headers every chat-completions call sends (`Authorization: Bearer`).
fn request_parts(
    call: &ModelCall<'_>,
    key: &SecretValue,
) -> Result<(reqwest::Url, reqwest::header::HeaderMap), ModelError> {
    let url = endpoint_url(
        &call.tier.name,
        &call.tier.endpoint,
        &["/chat/completions"],
        "/chat/completions",
    )?;
    let mut headers = common_headers(call.idempotency_key, call.traceparent)?;
    headers.insert(
        AUTHORIZATION,
        secret_header(&call.tier.name, "Bearer ", key)?,
    );
    Ok((url, headers))
}

/// The chat-completions request for one turn of a plan: the conversation as `messages` (assistant
/// turns with `tool_calls`, results as `role: tool` with their `tool_call_id`) and the allowed tools
/// as `tools: [{type: function, function: {name, description, parameters}}]`.
pub(crate) fn plan_request_body(
    call: &ModelCall<'_>,
    conversation: &Conversation,
    tools: &[ToolSpec],
) -> Value {
    let messages: Vec<Value> = conversation
        .messages
        .iter()
        .map(|m| match m {
            Message::User(text) => json!({"role": "user", "content": text}),
            Message::Assistant { text, calls } => json!({
                "role": "assistant",
                "content": text,
                "tool_calls": calls.iter().map(|c| json!({
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        // The API carries arguments as a JSON string, not an object.
                        "arguments": Value::Object(c.arguments.clone()).to_string(),
                    },
                })).collect::<Vec<_>>(),
            }),
            // The format has no error flag: an error result says so in its text.
            Message::ToolResult {
                call_id,
                content,
                is_error,
            } => json!({
                "role": "tool",
                "tool_call_id": call_id,
                "content": if *is_error { format!("error: {content}") } else { content.clone() },
            }),
        })
        .collect();
    let mut body = request_body(call);
    body["messages"] = Value::Array(messages);
    if !tools.is_empty() {
        body["tools"] = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                }})
            })
            .collect();
    }
    body
}

/// Reads one plan turn: `choices[0].message.tool_calls` (each `function.arguments` a JSON object
/// encoded as a string) or, when there are none, the text answer.
pub(crate) fn parse_turn(call: &ModelCall<'_>, reply: &Value) -> Result<TurnReply, ModelError> {
    let calls = reply
        .pointer("/choices/0/message/tool_calls")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty());
    let Some(calls) = calls else {
        let c = parse_reply(call, reply)?;
        return Ok(TurnReply {
            turn: Turn::Answer { text: c.text },
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
        });
    };
    let bad = |what: String| {
        ModelError::Failed(format!(
            "{PROVIDER} reply for tier {} has a malformed tool call: {what}",
            call.tier.name
        ))
    };
    let mut parsed = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        let id = c.get("id").and_then(Value::as_str);
        let name = c.pointer("/function/name").and_then(Value::as_str);
        let (Some(id), Some(name)) = (id, name) else {
            return Err(bad(format!("tool_calls[{i}] has no id or function.name")));
        };
        let raw = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let arguments =
            match serde_json::from_str::<Value>(if raw.trim().is_empty() { "{}" } else { raw }) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(bad(format!(
                        "tool_calls[{i}] arguments are not a JSON object"
                    )));
                }
                Err(e) => return Err(bad(format!("tool_calls[{i}] arguments: {e}"))),
            };
        parsed.push(ToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            arguments,
        });
    }
    let text = reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let usage = reported_usage(reply);
    Ok(tool_calls_turn(call, text, parsed, usage))
}

/// The (input, output) token counts the reply reports, when it does.
fn reported_usage(reply: &Value) -> (Option<u64>, Option<u64>) {
    (
        reply
            .pointer("/usage/prompt_tokens")
            .and_then(Value::as_u64),
        reply
            .pointer("/usage/completion_tokens")
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
