//! Model endpoints. Only the deterministic `builtin:` models exist so far; the OpenAI-compatible and
//! Anthropic clients arrive with the distributed runtime (issue 3) behind the same [`ModelClient`].

use std::time::Duration;

use agentplane_api::policy::{EndpointKind, ModelTier};
use async_trait::async_trait;

/// What a model call produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The tier names an endpoint this runtime cannot call; retrying will not help.
    #[error("unsupported model endpoint {0:?}")]
    Unsupported(String),
    /// The call failed; a retry may succeed.
    #[error("model call failed: {0}")]
    Failed(String),
}

#[async_trait]
pub trait ModelClient: Send + Sync {
    async fn complete(
        &self,
        tier: &ModelTier,
        prompt: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Completion, ModelError>;
}

/// Routes a tier to its client by endpoint kind.
#[derive(Default)]
pub struct Models {
    builtin: Builtin,
}

#[async_trait]
impl ModelClient for Models {
    async fn complete(
        &self,
        tier: &ModelTier,
        prompt: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Completion, ModelError> {
        match tier.endpoint_kind {
            EndpointKind::Builtin => self.builtin.complete(tier, prompt, params).await,
            EndpointKind::Openai | EndpointKind::Anthropic => {
                Err(ModelError::Unsupported(format!(
                    "{:?} endpoints are not available in this build yet",
                    tier.endpoint_kind
                )))
            }
        }
    }
}

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

pub fn count_tokens(text: &str) -> u64 {
    (text.split_whitespace().count() as u64).max(1)
}

#[async_trait]
impl ModelClient for Builtin {
    async fn complete(
        &self,
        tier: &ModelTier,
        prompt: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Completion, ModelError> {
        let name = tier
            .endpoint
            .strip_prefix("builtin:")
            .unwrap_or(&tier.endpoint);
        let text = match name {
            "echo" => format!("echo: {prompt}"),
            "upper" => prompt.to_uppercase(),
            "reverse" => prompt.chars().rev().collect(),
            "fail" => return Err(ModelError::Failed("builtin:fail always fails".into())),
            "sleep" => {
                let ms = params
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(endpoint: &str) -> ModelTier {
        ModelTier {
            name: "t".into(),
            endpoint_kind: EndpointKind::Builtin,
            endpoint: endpoint.into(),
            model: None,
            price_per_1k_input_micros: 0,
            price_per_1k_output_micros: 0,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: None,
        }
    }

    #[tokio::test]
    async fn builtin_models_are_deterministic() {
        let m = Models::default();
        let none = serde_json::Map::new();
        let a = m
            .complete(&tier("builtin:echo"), "hello world", &none)
            .await
            .unwrap();
        let b = m
            .complete(&tier("builtin:echo"), "hello world", &none)
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text, "echo: hello world");
        assert_eq!((a.input_tokens, a.output_tokens), (2, 3));
        let r = m
            .complete(&tier("builtin:reverse"), "abc", &none)
            .await
            .unwrap();
        assert_eq!(r.text, "cba");
        assert!(m.complete(&tier("builtin:fail"), "x", &none).await.is_err());
        assert!(matches!(
            m.complete(&tier("builtin:nope"), "x", &none).await,
            Err(ModelError::Unsupported(_))
        ));
    }
}
