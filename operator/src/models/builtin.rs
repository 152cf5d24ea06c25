//! Deterministic models for development and tests (`endpoint: builtin:<name>`).

use std::time::Duration;

use async_trait::async_trait;

use super::{Completion, ModelCall, ModelClient, ModelError, count_tokens};

/// Deterministic models for development and tests (`endpoint: builtin:<name>`):
/// - `builtin:echo`: `echo: <prompt>`;
/// - `builtin:upper`: the prompt upper-cased;
/// - `builtin:reverse`: the prompt's characters reversed;
/// - `builtin:fail`: always fails (drives the retry and dead-letter paths);
/// - `builtin:sleep`: waits `params.sleepMs` (at most 60 s), then echoes (drives cancellation).
///
/// Tokens are counted as whitespace-separated words, at least one per call.
#[derive(Default)]
pub struct Builtin;

/// Longest `builtin:sleep`.
const MAX_SLEEP: Duration = Duration::from_secs(60);

#[async_trait]
impl ModelClient for Builtin {
    async fn complete(&self, call: &ModelCall<'_>) -> Result<Completion, ModelError> {
        let prompt = call.prompt;
        let name = call
            .tier
            .endpoint
            .strip_prefix("builtin:")
            .unwrap_or(&call.tier.endpoint);
        let text = match name {
            "echo" => format!("echo: {prompt}"),
            "upper" => prompt.to_uppercase(),
            "reverse" => prompt.chars().rev().collect(),
            "fail" => return Err(ModelError::Failed("builtin:fail always fails".into())),
            "sleep" => {
                let ms = call
                    .params
                    .get("sleepMs")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLEEP)).await;
                format!("echo: {prompt}")
            }
            other => return Err(ModelError::Unsupported(format!("builtin:{other}"))),
        };
        Ok(Completion {
            input_tokens: count_tokens(prompt),
            output_tokens: count_tokens(&text),
            text,
        })
    }
}
