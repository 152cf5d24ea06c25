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
use super::{Completion, ModelCall, ModelError, usage_or_estimate};
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
    let usage = (
        reply
            .pointer("/usage/prompt_tokens")
            .and_then(Value::as_u64),
        reply
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64),
    );
    Ok(usage_or_estimate(PROVIDER, call, text, usage))
}

pub(crate) async fn complete(
    http: &Http,
    call: &ModelCall<'_>,
    key: &SecretValue,
) -> Result<Completion, ModelError> {
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
    let reply = http
        .post_json(PROVIDER, url, headers, &request_body(call), key)
        .await?;
    parse_reply(call, &reply)
}
